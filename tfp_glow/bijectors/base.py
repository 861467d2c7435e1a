"""Shared machinery of the stateful tfp_glow bijectors.

Every tfp_glow bijector is a `tfb.Bijector` whose trainable state lives in
Keras 3 variables owned by a small Keras layer (`_state.ParameterLayer`), so
Keras models, checkpoints and `tf.Module` walks all see it. This module
gives them four things TFP does not:

* `forward_and_log_det` / `inverse_and_log_det`: one pass that returns the
  output *and* the log-det (reduced over the event), so a coupling network
  runs once per step instead of once for `forward` and again for the log-det.
* Identity equality: TFP's cache keys on `parameters`; two `ActNorm(8)`
  instances would otherwise compare equal and share cached outputs.
* No eager caching: in eager mode a cached `forward(x)` would survive a
  variable update and return a stale value; inside `tf.function` the cache is
  kept (it is keyed by graph tensors, so it cannot go stale) and the log-det
  computed alongside the output is stored in it, so TFP's separate
  `forward_log_det_jacobian` call costs nothing.
* `trainable_variables` that include the Keras variables, so a plain
  `tf.GradientTape` loop over `dist.trainable_variables` trains them.
"""

import tensorflow as tf
import tensorflow_probability as tfp

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


class FlowBijector(tfb.Bijector):
    """Base class: subclasses implement the two one-pass methods.

    Subclasses define

        _forward_and_log_det(x, **kwargs) -> (y, log|det df/dx|)
        _inverse_and_log_det(y, **kwargs) -> (x, log|det df^-1/dy|)

    with the log-det reduced over `forward_min_event_ndims` (resp.
    `inverse_min_event_ndims`) dimensions, exactly as TFP's
    `_forward_log_det_jacobian` returns it. Keras layers holding the state are
    registered with `_track_layers` so their variables are visible to
    `tf.Module` walks and to `FlowModel`.
    """

    def __init__(self, *, forward_min_event_ndims, inverse_min_event_ndims=None,
                 is_constant_jacobian=False, validate_args=False, dtype=None,
                 parameters=None, name=None):
        self._keras_layers = []
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

    @_no_autograph
    def forward_and_log_det(self, x, **kwargs):
        """Returns `(f(x), log|det J_f(x)|)` in one pass (no TFP cache)."""
        return self._forward_and_log_det(x, **kwargs)

    @_no_autograph
    def inverse_and_log_det(self, y, **kwargs):
        """Returns `(f^-1(y), log|det J_{f^-1}(y)|)` in one pass."""
        return self._inverse_and_log_det(y, **kwargs)

    # -- TFP subclass contract ---------------------------------------------
    @_no_autograph
    def _forward(self, x, **kwargs):
        y, ldj = self._forward_and_log_det(x, **kwargs)
        if not tf.executing_eagerly():
            self._cache.forward_attributes(x, **kwargs)["ildj"] = -ldj
        return y

    @_no_autograph
    def _inverse(self, y, **kwargs):
        x, ildj = self._inverse_and_log_det(y, **kwargs)
        if not tf.executing_eagerly():
            self._cache.inverse_attributes(y, **kwargs)["ildj"] = ildj
        return x

    @_no_autograph
    def _forward_log_det_jacobian(self, x, **kwargs):
        return self._forward_and_log_det(x, **kwargs)[1]

    @_no_autograph
    def _inverse_log_det_jacobian(self, y, **kwargs):
        return self._inverse_and_log_det(y, **kwargs)[1]


def _reduce_extra(ldj, extra_ndims):
    if extra_ndims <= 0:
        return ldj
    return tf.reduce_sum(ldj, axis=list(range(-extra_ndims, 0)))


def _event_ndims_in(bijector, event_ndims):
    return bijector.forward_min_event_ndims if event_ndims is None else event_ndims


@_no_autograph
def forward_and_log_det(bijector, x, event_ndims=None, **kwargs):
    """One pass of `bijector` on `x`: `(y, fldj)` with fldj over `event_ndims`.

    Understands `FlowBijector`, `tfb.Chain` and `tfb.Invert` without touching
    TFP's cache; any other TFP bijector falls back to its public methods.
    `kwargs` (e.g. `conditional_input`) reach every `FlowBijector` inside.
    """
    event_ndims = _event_ndims_in(bijector, event_ndims)
    if isinstance(bijector, FlowBijector):
        y, ldj = bijector._forward_and_log_det(x, **kwargs)
        return y, _reduce_extra(ldj, event_ndims - bijector.forward_min_event_ndims)
    if isinstance(bijector, _INVERT_TYPES):
        ndims = bijector.bijector.inverse_event_ndims(event_ndims)
        return inverse_and_log_det(bijector.bijector, x, ndims, **kwargs)
    if isinstance(bijector, _CHAIN_TYPES):
        total = tf.zeros([], dtype=x.dtype)
        for b in reversed(bijector.bijectors):
            x, ldj = forward_and_log_det(b, x, event_ndims, **kwargs)
            total = total + ldj
            event_ndims = b.forward_event_ndims(event_ndims)
        return x, total
    y = bijector.forward(x)
    return y, bijector.forward_log_det_jacobian(x, event_ndims=event_ndims)


@_no_autograph
def inverse_and_log_det(bijector, y, event_ndims=None, **kwargs):
    """One pass of `bijector.inverse` on `y`: `(x, ildj)` over `event_ndims`."""
    if event_ndims is None:
        event_ndims = bijector.inverse_min_event_ndims
    if isinstance(bijector, FlowBijector):
        x, ldj = bijector._inverse_and_log_det(y, **kwargs)
        return x, _reduce_extra(ldj, event_ndims - bijector.inverse_min_event_ndims)
    if isinstance(bijector, _INVERT_TYPES):
        ndims = bijector.bijector.forward_event_ndims(event_ndims)
        return forward_and_log_det(bijector.bijector, y, ndims, **kwargs)
    if isinstance(bijector, _CHAIN_TYPES):
        total = tf.zeros([], dtype=y.dtype)
        for b in bijector.bijectors:
            y, ldj = inverse_and_log_det(b, y, event_ndims, **kwargs)
            total = total + ldj
            event_ndims = b.inverse_event_ndims(event_ndims)
        return y, total
    x = bijector.inverse(y)
    return x, bijector.inverse_log_det_jacobian(y, event_ndims=event_ndims)


def sub_bijectors(bijector):
    """Direct children of a composite bijector (Chain, Invert, our composites)."""
    if isinstance(bijector, _INVERT_TYPES):
        return [bijector.bijector]
    children = getattr(bijector, "bijectors", None)
    return list(children) if children else []


def keras_layers_of(bijector):
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
