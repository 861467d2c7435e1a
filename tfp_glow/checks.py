"""Argument checks shared by every module of tfp_glow (one rule for each kind).

Every check raises `TypeError` for a value of the wrong kind and `ValueError`
for a value of the right kind out of range, with a message that names the
argument, says what was expected and what was received. One rule for
integers everywhere: Python ints and NumPy integers are accepted, `bool`
never is (it would silently pass as 0 or 1), nor are floats such as `2.0`.

This module imports nothing of tfp_glow, so the bijectors may use it too.
"""

import math
import numbers

import numpy as np

__all__ = [
    "boolean",
    "choice",
    "is_int",
    "number",
    "positive_int",
    "shape",
]


def is_int(value):
    """True for Python and NumPy integers, False for bools and everything else."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def positive_int(value, arg_name, minimum=1, allow_none=False):
    """`value` as a Python int `>= minimum` (NumPy ints accepted, bools refused)."""
    if value is None and allow_none:
        return None
    if not is_int(value):
        none = " or None" if allow_none else ""
        raise TypeError(
            f"`{arg_name}` must be an int >= {minimum}{none}; received {value!r} "
            f"(type {type(value).__name__})."
        )
    if value < minimum:
        raise ValueError(f"`{arg_name}` must be an int >= {minimum}; received {value!r}.")
    return int(value)


def number(
    value,
    arg_name,
    minimum=None,
    maximum=None,
    exclusive_minimum=False,
    exclusive_maximum=False,
    allow_none=False,
):
    """`value` as a finite Python float within the given bounds (bools refused)."""
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"`{arg_name}` must be a number; received {value!r} (type {type(value).__name__})."
        )
    value = float(value)
    low_ok = minimum is None or (value > minimum if exclusive_minimum else value >= minimum)
    high_ok = maximum is None or (value < maximum if exclusive_maximum else value <= maximum)
    if not math.isfinite(value) or not (low_ok and high_ok):
        lo = "" if minimum is None else ("(" if exclusive_minimum else "[") + f"{minimum}, "
        hi = "" if maximum is None else f"{maximum}" + (")" if exclusive_maximum else "]")
        if minimum is None and maximum is None:
            expected = "a finite number"
        elif maximum is None:
            expected = f"a finite number {'>' if exclusive_minimum else '>='} {minimum}"
        elif minimum is None:
            expected = f"a finite number {'<' if exclusive_maximum else '<='} {maximum}"
        else:
            expected = f"a number in {lo}{hi}"
        raise ValueError(f"`{arg_name}` must be {expected}; received {value!r}.")
    return value


def boolean(value, arg_name):
    """`value` as a Python bool (NumPy bools accepted; 0/1 refused)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"`{arg_name}` must be a bool; received {value!r}.")
    return bool(value)


def choice(value, allowed, arg_name):
    """`value` if it is one of `allowed`, else a ValueError listing them."""
    allowed = tuple(allowed)
    try:
        ok = value in allowed
    except TypeError:  # unhashable or incomparable values are simply not allowed
        ok = False
    if not ok:
        raise ValueError(f"`{arg_name}` must be one of {allowed}; received {value!r}.")
    return value


def shape(value, arg_name, rank=None):
    """`value` as a tuple of positive Python ints (of `rank` dims if given)."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(f"`{arg_name}` must be a sequence of positive ints; received {value!r}.")
    dims = tuple(value)
    if rank is not None and len(dims) not in (rank if isinstance(rank, tuple) else (rank,)):
        raise ValueError(f"`{arg_name}` must have {rank} dims; received {value!r}.")
    if not dims or not all(is_int(d) and d > 0 for d in dims):
        raise ValueError(f"`{arg_name}` must be a sequence of positive ints; received {value!r}.")
    return tuple(int(d) for d in dims)
