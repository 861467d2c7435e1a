"""Shared machinery of the stateful tfp_glow bijectors.

Every tfp_glow bijector is a `tfb.Bijector` whose trainable state lives in
Keras 3 variables owned by a small Keras layer (`_state.ParameterLayer`), so
Keras models, checkpoints and `tf.Module` walks all see it. This module
gives them what TFP does not:

* `forward_and_log_det` / `inverse_and_log_det`: one pass that returns the
  output *and* the log-det (reduced over the event), so a coupling network
  runs once per step instead of once for `forward` and again for the log-det.
  One walker (`_walk`) serves both directions for any composition of TFP
  bijectors (`tfb.Chain`, `tfb.Invert`, tfp_glow bijectors, any other).
* Identity equality: TFP's cache keys on `parameters`; two `ActNorm(8)`
  instances would otherwise compare equal and share cached outputs.
* No eager caching: in eager mode a cached `forward(x)` would survive a
  variable update and return a stale value; inside `tf.function` the cache is
  kept (it is keyed by graph tensors, so it cannot go stale) and the log-det
  computed alongside the output is stored in it, so TFP's separate
  `forward_log_det_jacobian` call costs nothing.
* `trainable_variables` that include the Keras variables, so a plain
  `tf.GradientTape` loop over `dist.trainable_variables` trains them.
* `copy()` that shares the state (TFP's rebuilds from `parameters`, which for
  a stateful bijector means new variables and a different map).

And it keeps TFP's own contract: scalar batch shape (`_parameter_properties`),
`validate_args` checks (parameters and input domain), and a clear error for an
input of unknown rank or channel count.
"""

from typing import Any

import keras
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_glow.bijectors import _shapes, _tfp_parts

tfb = tfp.bijectors

__all__ = [
    "FlowBijector",
    "forward_and_log_det",
    "inverse_and_log_det",
    "keras_layers_of",
]

# `tfb.Chain(...)` and `tfb.Invert(...)` return instances of the private
# `_Chain` / `_Invert` bases when a part is not a CompositeTensor (every
# stateful tfp_glow bijector): `isinstance(b, tfb.Chain)` is then False. Match
# the bases too, or the one-pass dispatch below silently falls back to TFP's
# public methods (each coupling net run twice, kwargs such as
# `conditional_input` dropped). Found by name in the MRO: no TFP internals.
_CHAIN_TYPES = tuple(c for c in tfb.Chain.__mro__ if c.__name__ in ("Chain", "_Chain"))
_INVERT_TYPES = tuple(c for c in tfb.Invert.__mro__ if c.__name__ in ("Invert", "_Invert"))

# The flow's Python only branches on static facts (types, static shapes), so
# AutoGraph has nothing to convert; skipping the conversion of every bijector
# method makes the first trace of a Glow's log_prob about 4x faster
# (benchmarks/, BENCHMARKS.md) and keeps a trace independent of the source
# files (AutoGraph re-reads them).
_no_autograph = tf.autograph.experimental.do_not_convert

# The process-wide cache TFP binds to every bijector (a descriptor on the
# class). Taken from the class dict so no TFP internals are imported.
_TFP_SHARED_CACHE = tfb.Bijector.__dict__["_cache"]

class _EagerNoCache:
    """Stands in for TFP's cache in eager mode: always recomputes."""

    __slots__ = ("_bijector",)

    def __init__(self, bijector):
        self._bijector = bijector

    def forward(self, x, **kwargs):
        return self._bijector._forward(x, **kwargs)

    def inverse(self, y, **kwargs):
        return self._bijector._inverse(y, **kwargs)

    def forward_attributes(self, x, **kwargs):
        return {}

    def inverse_attributes(self, y, **kwargs):
        return {}


def _same_value(a, b):
    try:
        return bool(a is b or a == b)
    except (TypeError, ValueError):  # arrays, tensors: never "the same" here
        return False


class FlowBijector(tfp.bijectors.Bijector):  # tfp.bijectors, not tfb: mypy reads the base
    """Base class: subclasses implement the two one-pass methods.

    Subclasses define

        _forward_and_log_det(x, **kwargs) -> (y, log|det df/dx|)
        _inverse_and_log_det(y, **kwargs) -> (x, log|det df^-1/dy|)

    with the log-det reduced over `forward_min_event_ndims` (resp.
    `inverse_min_event_ndims`) dimensions, exactly as TFP's
    `_forward_log_det_jacobian` returns it. Keras layers holding the state are
    registered with `_track_layers` so their variables are visible to
    `tf.Module` walks and to `FlowModel`.

    With `validate_args=True`, every call asserts that the variables are finite
    (`_parameter_control_dependencies`) and that the input lies in the domain
    (`_input_assertions`: finite by default; subclasses add their own), raising
    `tf.errors.InvalidArgumentError`.
    """

    # An input of unknown rank, or of unknown channel count (last axis), is
    # refused with a ValueError; elementwise bijectors set this to False.
    _needs_static_event = True
    # What `copy()` of a stateful bijector may change: nothing that defines the
    # variables (their shapes, dtype, initial values or networks).
    _copy_overridable = ("name", "validate_args")

    def __init__(self, *, forward_min_event_ndims: int,
                 inverse_min_event_ndims: int | None = None, is_constant_jacobian: bool = False,
                 validate_args: bool = False, dtype: tf.DType | str | None = None,
                 parameters: dict[str, Any] | None = None, name: str | None = None) -> None:
        self._keras_layers: list[keras.layers.Layer] = []
        if inverse_min_event_ndims is None:
            inverse_min_event_ndims = forward_min_event_ndims
        super().__init__(
            forward_min_event_ndims=forward_min_event_ndims,
            inverse_min_event_ndims=inverse_min_event_ndims,
            is_constant_jacobian=is_constant_jacobian,
            validate_args=validate_args,
            dtype=dtype,
            parameters=parameters,
            name=name)

    # -- state -------------------------------------------------------------
    def _track_layers(self, *layers):
        """Registers Keras layers whose variables this bijector reads."""
        self._keras_layers = list(self._keras_layers) + list(layers)
        self._refresh_variable_refs()

    def _refresh_variable_refs(self):
        # tf.Module finds tf.Variables by walking instance attributes; Keras 3
        # variables wrap a tf.Variable in `.value`, so expose those.
        self._variable_refs = tuple(
            v.value for layer in self._keras_layers for v in layer.weights)

    @property
    def keras_layers(self):
        """The Keras layers holding this bijector's variables."""
        return tuple(self._keras_layers)

    @property
    def trainable_variables(self):
        """tf.Variables of every Keras layer inside (sub-bijectors included)."""
        return tuple(v.value for layer in keras_layers_of(self)
                     for v in layer.trainable_weights)

    @property
    def variables(self):
        """tf.Variables (trainable or not) of every Keras layer inside."""
        return tuple(v.value for layer in keras_layers_of(self) for v in layer.weights)

    def copy(self, **override_parameters_kwargs):
        """A bijector computing the same map, sharing this one's state.

        TFP's `copy` rebuilds `type(self)(**parameters)`, which for a stateful
        bijector creates *new* variables (a different map). Here the copy reads
        the very same Keras layers and variables: training either trains both.
        Only `name` and `validate_args` may be overridden (a subclass may add to
        `_copy_overridable`); a parameter that defines the variables (channels,
        dtype, seed, networks, ...) raises a ValueError, since the shared
        variables could not follow it.
        """
        if not self._keras_layers:  # stateless: TFP's copy is the same map
            return super().copy(**override_parameters_kwargs)
        unknown = sorted(set(override_parameters_kwargs) - set(self.parameters))
        if unknown:
            raise TypeError(f"{type(self).__name__}.copy() got unknown parameters "
                            f"{unknown}; its parameters are {sorted(self.parameters)}.")
        fixed = sorted(k for k, v in override_parameters_kwargs.items()
                       if k not in self._copy_overridable
                       and not _same_value(v, self.parameters[k]))
        if fixed:
            raise ValueError(
                f"{type(self).__name__}.copy() shares the variables of the original, so "
                f"it cannot override {fixed}: they define those variables. Only "
                f"{list(self._copy_overridable)} may change; build a new "
                f"{type(self).__name__}(...) for a different map.")
        parameters = dict(self.parameters, **override_parameters_kwargs)
        twin = type(self)(**parameters)
        twin._adopt_state(self)
        twin._parameters = self._no_dependency(parameters)
        return twin

    def _adopt_state(self, other):
        # Every attribute holding state (Keras layers and variables, e.g.
        # `self.log_scale`, `self._prior_net`) now points at `other`'s; the
        # variables built by the constructor are dropped.
        for key, value in list(vars(other).items()):
            if isinstance(value, (keras.layers.Layer, keras.Variable, tf.Variable)):
                setattr(self, key, value)
        self._keras_layers = list(other._keras_layers)
        self._refresh_variable_refs()

    # -- TFP contract: batch shape and validate_args -------------------------
    @classmethod
    def _parameter_properties(cls, dtype):
        # No parameter is a batched Tensor: the state is Keras variables of
        # fixed shape and every other parameter is Python configuration, so
        # the batch shape is [] (one map, broadcast over any sample shape).
        return {}

    def _parameter_control_dependencies(self, is_init):
        """With `validate_args`, asserts every float variable is finite.

        TFP calls this at construction (`is_init=True`, before our variables
        exist: nothing to check) and in every public method; the one-pass
        module functions call it too.
        """
        if not self.validate_args or is_init:
            return []
        return [tf.debugging.assert_all_finite(
            tf.convert_to_tensor(v),
            f"{self.name}: variable {v.path if hasattr(v, 'path') else v.name} is not finite.")
            for layer in self._keras_layers for v in layer.weights
            if tf.as_dtype(v.dtype).is_floating]

    def _input_assertions(self, t, inverse, **kwargs):
        """With `validate_args`, ops asserting `t` is in the domain of the call.

        The default asks for finite values; subclasses extend the list.
        """
        arg = "y" if inverse else "x"
        return [tf.debugging.assert_all_finite(
            t, f"{self.name}: `{arg}` must be finite (validate_args=True).")]

    def _check_static_input(self, t, inverse):
        if not self._needs_static_event:
            return
        ndims = self.inverse_min_event_ndims if inverse else self.forward_min_event_ndims
        if t.shape.rank is None or (ndims > 0 and t.shape.rank > 0 and t.shape[-1] is None):
            arg = "y" if inverse else "x"
            raise ValueError(
                f"{type(self).__name__} ({self.name!r}) needs `{arg}` of known rank (at "
                f"least {ndims} event dims, plus batch dims) and a known channel count "
                f"(last axis); got shape {t.shape}. Inside tf.function give an "
                f"input_signature such as tf.TensorSpec([None, H, W, C]).")

    def _one_pass(self, t, inverse, kwargs, parameter_checks):
        """`(output, log-det)` after the static and `validate_args` checks."""
        if not tf.is_tensor(t):
            t = tf.convert_to_tensor(t, dtype_hint=self.dtype)
        self._check_static_input(t, inverse)
        if self.validate_args:
            deps = list(self._input_assertions(t, inverse, **kwargs))
            if parameter_checks:
                deps += list(self._parameter_control_dependencies(is_init=False))
            with tf.control_dependencies([d for d in deps if d is not None]):
                t = tf.identity(t)
        if inverse:
            return self._inverse_and_log_det(t, **kwargs)
        return self._forward_and_log_det(t, **kwargs)

    # -- caching -----------------------------------------------------------
    def _get_parameterization(self):
        # Identity semantics: never share cache entries with another instance.
        return id(self)

    @property
    def _cache(self):
        if tf.executing_eagerly():
            return _EagerNoCache(self)
        return _TFP_SHARED_CACHE.__get__(self, type(self))

    # -- one-pass API ----------------------------------------------------------
    def _forward_and_log_det(self, x, **kwargs):
        raise NotImplementedError

    def _inverse_and_log_det(self, y, **kwargs):
        raise NotImplementedError

    def forward_and_log_det(self, x, event_ndims=None, **kwargs):
        """`forward_and_log_det(self, x, event_ndims, **kwargs)` (the module function)."""
        return forward_and_log_det(self, x, event_ndims, **kwargs)

    def inverse_and_log_det(self, y, event_ndims=None, **kwargs):
        """`inverse_and_log_det(self, y, event_ndims, **kwargs)` (the module function)."""
        return inverse_and_log_det(self, y, event_ndims, **kwargs)

    # -- TFP subclass contract ---------------------------------------------
    # TFP's public methods have already added the parameter checks (its name
    # and control scope), so only the input is checked here.
    @_no_autograph
    def _forward(self, x, **kwargs):
        y, ldj = self._one_pass(x, False, kwargs, parameter_checks=False)
        if not tf.executing_eagerly():
            self._cache.forward_attributes(x, **kwargs)["ildj"] = -ldj
        return y

    @_no_autograph
    def _inverse(self, y, **kwargs):
        x, ildj = self._one_pass(y, True, kwargs, parameter_checks=False)
        if not tf.executing_eagerly():
            self._cache.inverse_attributes(y, **kwargs)["ildj"] = ildj
        return x

    @_no_autograph
    def _forward_log_det_jacobian(self, x, **kwargs):
        return self._one_pass(x, False, kwargs, parameter_checks=False)[1]

    @_no_autograph
    def _inverse_log_det_jacobian(self, y, **kwargs):
        return self._one_pass(y, True, kwargs, parameter_checks=False)[1]


def _reduce_extra(ldj, t, min_ndims, event_ndims):
    """Sums `ldj` (over `min_ndims`) over the `event_ndims - min_ndims` dims
    before them, as TFP does; a constant (scalar) log-det is multiplied by
    their size instead of being broadcast."""
    extra = event_ndims - min_ndims
    if extra < 0:
        raise ValueError(f"`event_ndims` must be >= {min_ndims}; got {event_ndims}.")
    if extra == 0:
        return ldj
    ldj = tf.convert_to_tensor(ldj)
    rank = t.shape.rank
    if rank is None:  # elementwise bijectors accept it: reduce by the dynamic rank
        batch = tf.shape(t)[:tf.rank(t) - min_ndims]
        return tf.reduce_sum(tf.broadcast_to(ldj, batch), axis=tf.range(-extra, 0))
    if rank < event_ndims:
        raise ValueError(f"`event_ndims`={event_ndims} exceeds the rank of the input "
                         f"shape {t.shape}.")
    if ldj.shape.rank == 0:
        return ldj * _shapes.event_size(t, range(-event_ndims, -min_ndims))
    batch = tf.shape(t)[:rank - min_ndims]
    return tf.reduce_sum(tf.broadcast_to(ldj, batch), axis=list(range(-extra, 0)))


@_no_autograph
def _walk(bijector, t, event_ndims, inverse, kwargs):
    """One pass through `bijector` (`inverse` selects the direction).

    tfp_glow bijectors run their one-pass method and receive `kwargs`;
    `tfb.Invert` flips the direction; `tfb.Chain` runs its parts in order
    (last first when forward) tracking the event rank; any other bijector
    runs TFP's public method and log-det, with only `conditional_input` and
    only when it takes one (`_tfp_parts.public_pass`).
    """
    if isinstance(bijector, FlowBijector):
        if not tf.is_tensor(t):
            t = tf.convert_to_tensor(t, dtype_hint=bijector.dtype)
        out, ldj = bijector._one_pass(t, inverse, kwargs, parameter_checks=True)
        min_ndims = (bijector.inverse_min_event_ndims if inverse
                     else bijector.forward_min_event_ndims)
        # The log-det has the batch shape of this call's input `t`.
        return out, _reduce_extra(ldj, t, min_ndims, event_ndims)
    if isinstance(bijector, _INVERT_TYPES):
        return _walk(bijector.bijector, t, event_ndims, not inverse, kwargs)
    if isinstance(bijector, _CHAIN_TYPES):
        parts = bijector.bijectors if inverse else list(reversed(bijector.bijectors))
        total = None
        for part in parts:
            next_ndims = (part.inverse_event_ndims(event_ndims) if inverse
                          else part.forward_event_ndims(event_ndims))
            t, ldj = _walk(part, t, event_ndims, inverse, kwargs)
            total = ldj if total is None else total + ldj
            event_ndims = next_ndims
        if total is None:  # an empty Chain is the identity
            total = tf.zeros([], tf.convert_to_tensor(t).dtype)
        return t, total
    if isinstance(bijector, tfb.Reshape):
        return _tfp_parts.reshape(bijector, t, inverse)
    if isinstance(bijector, _tfp_parts.COMPOSITION_TYPES) and tf.is_tensor(t):
        return _tfp_parts.walk_composition(bijector, t, event_ndims, inverse, kwargs, _walk)
    return _tfp_parts.public_pass(bijector, t, event_ndims, inverse, kwargs)


def _default_ndims(bijector, event_ndims, inverse):
    if event_ndims is not None:
        return event_ndims
    return bijector.inverse_min_event_ndims if inverse else bijector.forward_min_event_ndims


@_no_autograph
def forward_and_log_det(bijector: tfp.bijectors.Bijector, x: tf.Tensor,
                        event_ndims: int | None = None,
                        **kwargs: Any) -> tuple[tf.Tensor, tf.Tensor]:
    """One pass of `bijector.forward` on `x`: `(y, fldj)`, fldj over `event_ndims`.

    `event_ndims` defaults to `bijector.forward_min_event_ndims`, which is
    what `FlowBijector.forward_and_log_det(x)` means. Works on any TFP
    bijector; `tfb.Chain` / `tfb.Invert` compositions of tfp_glow bijectors
    never touch TFP's cache and run each coupling network once. `kwargs`
    (e.g. `conditional_input`) reach every tfp_glow bijector inside;
    `conditional_input` also reaches TFP's `MaskedAutoregressiveFlow` and
    `RealNVP` (their networks' context) and is bound into a `tfb.FFJORD`'s
    field, and reaches no other bijector.
    """
    return _walk(bijector, x, _default_ndims(bijector, event_ndims, False), False, kwargs)


@_no_autograph
def inverse_and_log_det(bijector: tfp.bijectors.Bijector, y: tf.Tensor,
                        event_ndims: int | None = None,
                        **kwargs: Any) -> tuple[tf.Tensor, tf.Tensor]:
    """One pass of `bijector.inverse` on `y`: `(x, ildj)`, ildj over `event_ndims`
    (default `bijector.inverse_min_event_ndims`); see `forward_and_log_det`."""
    return _walk(bijector, y, _default_ndims(bijector, event_ndims, True), True, kwargs)


def sub_bijectors(bijector):
    """Direct children of a composite bijector (Chain, Invert, our composites)."""
    if isinstance(bijector, _INVERT_TYPES):
        return [bijector.bijector]
    children = getattr(bijector, "bijectors", None)
    return list(children) if children else []


def walk_bijectors(bijector):
    """`bijector` and every bijector inside it, depth first."""
    yield bijector
    for child in sub_bijectors(bijector):
        yield from walk_bijectors(child)


def keras_layers_of(bijector: tfp.bijectors.Bijector) -> list[keras.layers.Layer]:
    """Every Keras layer held by `bijector` or its sub-bijectors, in order."""
    seen, layers = set(), []

    def visit(b):
        if id(b) in seen:
            return
        seen.add(id(b))
        for layer in getattr(b, "keras_layers", ()):
            if id(layer) not in seen:
                seen.add(id(layer))
                layers.append(layer)
        for child in sub_bijectors(b):
            visit(child)

    visit(bijector)
    return layers
