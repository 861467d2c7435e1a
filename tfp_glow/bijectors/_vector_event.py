"""Argument and input checks of the bijectors on vectors `[D]` (planar, radial)."""

from typing import Any

import tensorflow as tf

from tfp_glow import checks


def event_size(value: Any, owner: str) -> int:
    """`D` from an int or a one-element shape `(D,)`; a ValueError otherwise."""
    if isinstance(value, (tuple, list)) and len(value) == 1:
        value = value[0]
    if isinstance(value, (tuple, list)):
        raise ValueError(
            f"{owner} acts on vectors: `event_size` must be an int D (event shape [D]); "
            f"received the event shape {tuple(value)}. Flatten the event first, e.g. "
            f"tfb.Reshape([-1], event_shape_in={list(value)})."
        )
    if not checks.is_int(value) or value < 1:
        raise ValueError(f"{owner}: `event_size` must be a positive int; received {value!r}.")
    return int(value)


def seed(value: Any) -> int | None:
    """An int seed >= 0, or None (fresh entropy)."""
    return checks.positive_int(value, "seed", minimum=0, allow_none=True)


def check(t: tf.Tensor, size: int, arg_name: str, owner: str) -> None:
    """Raises ValueError unless `t` is a batch of vectors of `size` coordinates."""
    if t.shape.rank is not None and t.shape.rank < 1:
        raise ValueError(
            f"{owner}: `{arg_name}` must be vectors of shape [..., {size}]; "
            f"got the scalar shape {t.shape}."
        )
    last = t.shape[-1] if t.shape.rank else None
    if last is not None and last != size:
        raise ValueError(
            f"{owner}: `{arg_name}` must have {size} coordinates in its last "
            f"axis (event shape [{size}]); got shape {t.shape}."
        )
