"""TFP bijectors the one-pass walker of `base` runs its own way.

TFP's compositions other than `Chain` (`tfb.Glow` and its blocks, `Blockwise`,
`JointMap`) are walked part by part, so each part runs once and under the
walker's rules; `tfb.Reshape` is reshaped with its event shapes resolved
statically, since TFP 0.25's own fails with an unknown batch dimension.
Every other TFP bijector runs its public methods (`public_pass`); those whose
networks take a context (`CONDITIONAL_TYPES`) receive `conditional_input`;
`tfb.FFJORD` gets its context bound into its vector field (`bind_ffjord_context`).
"""

import tensorflow as tf
import tensorflow_probability as tfp

tfb = tfp.bijectors

__all__ = [
    "COMPOSITION_TYPES",
    "CONDITIONAL_TYPES",
    "bind_ffjord_context",
    "public_pass",
    "reshape",
    "walk_composition",
]

# The base of every TFP composition (Chain, Blockwise, JointMap, tfb.Glow ...),
# found by name in the MRO: no TFP internals imported.
COMPOSITION_TYPES = tuple(c for c in tfb.Chain.__mro__ if c.__name__ == "Composition")

# TFP's bijectors that hand `conditional_input` on to their networks (MADE,
# RealNVPNet, AutoregressiveSplineFn): `bijector_kwargs` of TFP's own
# conditional flows. Any other (tfb.Permute, tfb.Reshape, ...) would refuse
# the keyword with a TypeError, so it never gets it.
CONDITIONAL_TYPES = (tfb.MaskedAutoregressiveFlow, tfb.RealNVP)


def bind_ffjord_context(ffjord, context):
    """A fresh `tfb.FFJORD` whose field is `ffjord`'s with `context` bound:
    `f(t, z) = field(t, z, conditional_input=context)`.

    Why not TFP's own condition kwargs (`ffjord.inverse(y, conditional_input=c)`,
    which it hands to the solver as `constants`): TFP 0.25's FFJORD caches its
    log-det keyed by the input tensor alone, so the same `y` under a second
    context returns the first context's log-det (checked eagerly). A fresh
    bijector per call has an empty cache; the context is closed over, and the
    solver's adjoint gradients still reach every variable the field reads
    (it collects them from the tape, not from `constants`).
    """
    field = ffjord.parameters["state_time_derivative_fn"]

    def bound_field(time, state):
        return field(time, state, conditional_input=context)

    return tfb.FFJORD(**{**ffjord.parameters, "state_time_derivative_fn": bound_field})


def public_pass(bijector, t, event_ndims, inverse, kwargs):
    """`(output, log-det)` from TFP's public methods; `conditional_input`
    only for `CONDITIONAL_TYPES` (other walker kwargs are tfp_glow's), bound
    into the field of a `tfb.FFJORD`."""
    context = kwargs.get("conditional_input")
    if context is not None and isinstance(bijector, tfb.FFJORD):
        bijector, context = bind_ffjord_context(bijector, context), None
    kw = (
        {"conditional_input": context}
        if context is not None and isinstance(bijector, CONDITIONAL_TYPES)
        else {}
    )
    if inverse:
        return (
            bijector.inverse(t, **kw),
            bijector.inverse_log_det_jacobian(t, event_ndims=event_ndims, **kw),
        )
    return (
        bijector.forward(t, **kw),
        bijector.forward_log_det_jacobian(t, event_ndims=event_ndims, **kw),
    )


def walk_composition(bijector, t, event_ndims, inverse, kwargs, walk):
    """Any other TFP composition (`tfb.Glow` and its blocks, `Blockwise`,
    `JointMap` ...) through its own walk, each part through `walk` (the
    one-pass walker of `base`).

    TFP's `Composition` walks its parts with a `step_fn` (the extension point
    its own `forward` and log-det use); giving it ours runs each part once, in
    one pass, with the walker's rules (`reshape` below, tfp_glow bijectors'
    one-pass methods) instead of TFP's public methods. (`_call_walk_*` is
    TFP's own protocol for compositions; TFP is pinned to 0.25.)
    """
    total = []

    def step(part, x, ndims):
        y, ldj = walk(part, x, ndims, inverse, kwargs)
        total.append(ldj)
        return y, (part.inverse_event_ndims(ndims) if inverse else part.forward_event_ndims(ndims))

    tfp_walk = bijector._call_walk_inverse if inverse else bijector._call_walk_forward
    out, _ = tfp_walk(step, t, event_ndims)
    ldj = tf.zeros([], t.dtype)
    for part in total:  # shapes differ (a constant log-det is a scalar): broadcast
        ldj = ldj + part
    return out, ldj


def reshape(bijector, t, inverse):
    """`tfb.Reshape` with a zero log-det, its event shapes resolved statically.

    TFP 0.25's own `Reshape` concatenates an int32 dynamic batch shape with its
    int64 event shape and fails inside `tf.function` with an unknown batch
    dimension (so does every flow built on it, such as `tfb.Glow`).
    """
    t = tf.convert_to_tensor(t, dtype_hint=bijector.dtype)
    ndims = bijector.inverse_min_event_ndims if inverse else bijector.forward_min_event_ndims
    event = t.shape[t.shape.rank - ndims :]
    out = bijector.inverse_event_shape(event) if inverse else bijector.forward_event_shape(event)
    if t.shape.rank is None or not out.is_fully_defined():
        return ((bijector.inverse if inverse else bijector.forward)(t), tf.zeros([], t.dtype))
    batch = tf.shape(t)[: t.shape.rank - ndims]
    return tf.reshape(t, tf.concat([batch, out.as_list()], 0)), tf.zeros([], t.dtype)
