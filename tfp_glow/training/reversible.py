"""Training memory that does not grow with depth: checkpointed and reversible backprop.

A flow step `y = f(x)` is invertible, so the activations autodiff keeps for
the backward pass can be recomputed instead (i-RevNet [1], MemCNN [2]).
`forward_and_log_det(flow, x, backprop=...)` returns `(z, log|det J|)` exactly
as `tfp_glow.bijectors.forward_and_log_det` does, and `backprop` picks what the
gradient keeps:

* `"standard"`: plain autodiff; every step's activations (the coupling
  networks' hidden layers included) live until the backward pass. Memory
  grows linearly with the number of steps.
* `"checkpoint"`: each flow step (the bijectors up to and including a
  coupling layer) runs under a `tf.custom_gradient` that keeps only its input
  `x_k`; the backward pass recomputes the step from `x_k` under a
  `GradientTape`. Memory still grows with depth, by one step input per step.
* `"reversible"`: each block of steps (a level's `tfb.Chain`, a split prior,
  the top prior, or a whole plain chain) keeps only its output. Backward, for
  the steps `k = K, ..., 1` of a block, from `y_K` = the block output:

      x_k         = f_k^{-1}(y_k)                      (rebuild the input)
      (y_k, l_k)  = f_k(x_k)  under a GradientTape     (recompute one step)
      dL/dx_k, dL/dtheta_k = VJP of (y_k, l_k) with (dL/dy_k, dL/dldj)
      y_{k-1} = x_k,  dL/dy_{k-1} = dL/dx_k

  so only one step's activations exist at a time and memory is flat in depth.
  The gradient is exact up to the rebuild's rounding (`x_k` is recomputed, not
  stored): see `reconstruction_errors` and BENCHMARKS.md for when a deep
  float32 flow should use `"checkpoint"` instead.

For a `MultiScaleFlow` the levels run as blocks and the split priors
(`FactorOut`) and the top prior as one-step blocks; the factored latents
leave through `tf.split` / `tf.concat`, whose gradients keep nothing, so the
latents' gradients and the log-det's gradient reach every block. Any other
flow (a `tfb.Chain` / `tfb.Invert` of tfp_glow and TFP bijectors) is walked
the way `tfp_glow.bijectors.forward_and_log_det` walks it. A bijector whose
inverse is not implemented (or that sets `exact_inverse = False`) is not
rebuilt: its input is kept, as in `"checkpoint"`, so its gradient stays exact.

`kwargs` (e.g. `conditional_input`) reach every tfp_glow bijector; they are
constants for the gradient (no gradient flows to labels).

#### Examples

```python
from tfp_glow.training import reversible
with tf.GradientTape() as tape:
    z, ldj = reversible.forward_and_log_det(flow, x, backprop="reversible")
    loss = -tf.reduce_mean(base.log_prob(z) + ldj)
grads = tape.gradient(loss, flow.trainable_variables)
```

#### References

[1] Jacobsen, Smeulders & Oyallon. i-RevNet: Deep Invertible Networks.
    ICLR 2018. https://arxiv.org/abs/1802.07088
[2] van de Leemput et al. MemCNN: a Python/PyTorch package for creating
    memory-efficient invertible neural networks. JOSS 2019.
[3] Gomez et al. The Reversible Residual Network: Backpropagation Without
    Storing Activations. NeurIPS 2017. https://arxiv.org/abs/1707.04585
"""

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_glow import checks
from tfp_glow.bijectors import base as _base
from tfp_glow.bijectors.coupling import CouplingBase
from tfp_glow.bijectors.multi_scale import MultiScaleFlow
from tfp_glow.training._reversible_blocks import custom_gradient_block

tfb = tfp.bijectors

__all__ = ["BACKPROP_MODES", "forward_and_log_det", "reconstruction_errors"]

BACKPROP_MODES = ("standard", "checkpoint", "reversible")

# The walk branches only on static facts (types, event ranks): nothing for
# AutoGraph to convert, and converting it made the first trace of a Glow
# training step about 2x slower.
_no_autograph = tf.autograph.experimental.do_not_convert

# As in tfp_glow.bijectors.base: `tfb.Chain(...)`/`tfb.Invert(...)` of
# non-CompositeTensor parts are instances of the private `_Chain`/`_Invert`.
_CHAIN_TYPES = tuple(c for c in tfb.Chain.__mro__ if c.__name__ in ("Chain", "_Chain"))
_INVERT_TYPES = tuple(c for c in tfb.Invert.__mro__ if c.__name__ in ("Invert", "_Invert"))


class Step:
    """One bijector applied in one direction at a given event rank.

    `apply` is exactly what `tfp_glow.bijectors.forward_and_log_det` runs for
    this bijector (so values match `"standard"`); `undo(y)` rebuilds the input
    from the output. `stored` is True when `undo` is unavailable or inexact:
    then the input is kept instead.
    """

    __slots__ = ("bijector", "inverse", "event_ndims", "stored")

    def __init__(self, bijector, inverse, event_ndims):
        self.bijector = bijector
        self.inverse = bool(inverse)
        self.event_ndims = event_ndims
        self.stored = not _has_exact_undo(bijector, self.inverse)

    def apply(self, x, kwargs):
        fn = _base.inverse_and_log_det if self.inverse else _base.forward_and_log_det
        return fn(self.bijector, x, self.event_ndims, **kwargs)

    def undo(self, y, kwargs):
        b = self.bijector
        if isinstance(b, _base.FlowBijector):
            fn = b.forward_and_log_det if self.inverse else b.inverse_and_log_det
            return fn(y, **kwargs)[0]
        # A fresh tensor: TFP's cache would otherwise answer `inverse(y)` with
        # the forward's stored input, keeping it alive.
        y = tf.identity(y)
        return b.forward(y) if self.inverse else b.inverse(y)

    @property
    def ends_flow_step(self):
        """A coupling closes a flow step (ActNorm, 1x1 conv, coupling)."""
        return isinstance(self.bijector, CouplingBase)


def _has_exact_undo(bijector, inverse):
    if getattr(bijector, "exact_inverse", True) is False:
        return False
    if isinstance(bijector, _base.FlowBijector):
        name = "_forward_and_log_det" if inverse else "_inverse_and_log_det"
        return getattr(type(bijector), name) is not getattr(_base.FlowBijector, name)
    name = "_forward" if inverse else "_inverse"
    return getattr(type(bijector), name, None) is not getattr(tfb.Bijector, name)


class MultiScale:
    """A `MultiScaleFlow` in the normalizing direction, run level by level."""

    __slots__ = ("bijector", "event_ndims")

    def __init__(self, bijector, event_ndims):
        self.bijector = bijector
        self.event_ndims = event_ndims


def flow_units(bijector, event_ndims, inverse=False):
    """The flow as a flat list of `Step`s and `MultiScale`s, in order of application.

    Mirrors the walk of `tfp_glow.bijectors.forward_and_log_det` (of
    `inverse_and_log_det` when `inverse`): `tfb.Invert` flips the direction,
    `tfb.Chain` runs its parts last first (first first when inverse) tracking
    the event rank; every other bijector is one step.
    """
    if isinstance(bijector, MultiScaleFlow) and not inverse:
        return [MultiScale(bijector, event_ndims)]
    if isinstance(bijector, _base.FlowBijector):
        return [Step(bijector, inverse, event_ndims)]
    if isinstance(bijector, _INVERT_TYPES):
        return flow_units(bijector.bijector, event_ndims, not inverse)
    if isinstance(bijector, _CHAIN_TYPES):
        units = []
        for part in bijector.bijectors if inverse else reversed(bijector.bijectors):
            units += flow_units(part, event_ndims, inverse)
            event_ndims = (
                part.inverse_event_ndims(event_ndims)
                if inverse
                else part.forward_event_ndims(event_ndims)
            )
        return units
    return [Step(bijector, inverse, event_ndims)]


def _groups(units, backprop):
    """Consecutive `Step`s become blocks: one per run ("reversible"), one per
    flow step ("checkpoint"); a `MultiScale` stands alone."""
    groups, current = [], []
    for unit in units:
        if isinstance(unit, MultiScale):
            groups += ([current] if current else []) + [unit]
            current = []
            continue
        current.append(unit)
        if backprop == "checkpoint" and unit.ends_flow_step:
            groups.append(current)
            current = []
    return groups + ([current] if current else [])


def _run(units, x, kwargs, backprop, block):
    """Applies `units` to `x`; each group of steps through `block`."""
    total = tf.zeros([], x.dtype)
    for group in _groups(units, backprop):
        if isinstance(group, MultiScale):
            x, ldj = _multi_scale(group, x, kwargs, backprop, block)
        else:
            x, ldj = block(group, x, kwargs, backprop)
        total = total + ldj
    return x, total


def _flatten(z, ndims):
    return tf.reshape(z, tf.concat([tf.shape(z)[:-ndims], [-1]], 0))


def _check_multi_scale_input(flow, x):
    event_shape = tuple(flow.inverse_event_shape([flow.latent_size]))
    nd = len(event_shape)
    if (
        x.shape.rank is None
        or x.shape.rank < nd
        or not all(a is None or a == b for a, b in zip(x.shape[-nd:], event_shape))
    ):
        raise ValueError(
            f"`x` must have shape [batch, {', '.join(map(str, event_shape))}]; got {x.shape}."
        )


def _multi_scale(unit, x, kwargs, backprop, block):
    """`MultiScaleFlow._forward_and_log_det` with each stage through `block`.

    Same stages, same order, same log-det sums: the values equal the flow's
    own; only what the gradient keeps differs.
    """
    flow = unit.bijector
    _check_multi_scale_input(flow, x)
    nd = nd_in = flow.forward_min_event_ndims
    h, total, latents = x, tf.zeros([], x.dtype), []
    for steps, factor_out in flow.levels:
        h, ldj = _run(flow_units(steps, nd), h, kwargs, backprop, block)
        total += ldj
        nd = steps.forward_event_ndims(nd)
        if factor_out is not None:
            h, ldj = _run([Step(factor_out, False, nd)], h, kwargs, backprop, block)
            total += ldj
            k = factor_out.num_factored
            z, h = tf.split(h, [k, factor_out.channels - k], axis=-1)
            latents.append(_flatten(z, nd))
    if flow.top_prior is not None:
        h, ldj = _run([Step(flow.top_prior, False, nd)], h, kwargs, backprop, block)
        total += ldj
    latents.append(_flatten(h, len(flow.latent_shapes[-1])))
    z = tf.concat(latents, axis=-1)
    z.set_shape(x.shape[: x.shape.rank - nd_in].concatenate([flow.latent_size]))
    return z, _reduce_extra_event_dims(total, x, nd_in, unit.event_ndims)


def _reduce_extra_event_dims(ldj, x, min_ndims, event_ndims):
    """Sums the log-det over event dims beyond the flow's own, as TFP does (a
    constant log-det counts once per position)."""
    extra = event_ndims - min_ndims
    if extra <= 0:
        return ldj
    batch = tf.shape(x)[: x.shape.rank - min_ndims]
    return tf.reduce_sum(tf.broadcast_to(ldj, batch), axis=list(range(-extra, 0)))


def _start(flow, x, event_ndims):
    x = tf.convert_to_tensor(x, dtype_hint=flow.dtype)
    if event_ndims is None:
        event_ndims = flow.forward_min_event_ndims
    else:
        event_ndims = checks.positive_int(event_ndims, "event_ndims", minimum=0)
    return x, flow_units(flow, event_ndims)


@_no_autograph
def forward_and_log_det(flow, x, backprop="standard", *, event_ndims=None, **kwargs):
    """`(z, log|det J_flow(x)|)` of the normalizing `flow`, with a choice of backprop.

    Same contract as `tfp_glow.bijectors.forward_and_log_det(flow, x,
    event_ndims, **kwargs)`; `backprop` is `"standard"` (that function,
    unchanged), `"checkpoint"` (recompute each flow step from its kept input)
    or `"reversible"` (rebuild each step's input from its output with the
    inverse; keeps no step's activations). See the module docstring.
    Works eagerly and inside `tf.function` (XLA included), under
    `tf.distribute` strategies and with mixed-precision networks.
    """
    backprop = checks.choice(backprop, BACKPROP_MODES, "backprop")
    if backprop == "standard":
        return _base.forward_and_log_det(flow, x, event_ndims, **kwargs)
    x, units = _start(flow, x, event_ndims)
    return _run(units, x, kwargs, backprop, custom_gradient_block)


def _relative_max(a, b):
    scale = tf.reduce_max(tf.abs(b))
    return float(tf.reduce_max(tf.abs(a - b)) / tf.maximum(scale, np.finfo(np.float64).tiny))


@_no_autograph
def reconstruction_errors(flow, x, event_ndims=None, **kwargs):
    """How exactly `"reversible"` rebuilds each block's input, eagerly, on `x`.

    For every block that `"reversible"` forms, the input is rebuilt from the
    block's output through every step's inverse (the steps whose input is
    kept excepted), as the backward pass does. Returns one dict per block:
    `steps` (how many), `rel_max = max|x' - x| / max|x|` and `max_abs`.
    Relative errors near the dtype's precision (float32: ~1e-6) mean the
    gradients equal standard backprop's to about that precision.
    """
    x, units = _start(flow, x, event_ndims)
    report = []

    def probe(steps, h, kw, backprop):
        del backprop
        inputs, total = [], tf.zeros([], h.dtype)
        for step in steps:
            inputs.append(h)
            h, ldj = step.apply(h, kw)
            total = total + ldj
        rebuilt = h
        for step, kept in zip(reversed(steps), reversed(inputs)):
            rebuilt = kept if step.stored else step.undo(rebuilt, kw)
        report.append(
            {
                "steps": len(steps),
                "rel_max": _relative_max(rebuilt, inputs[0]),
                "max_abs": float(tf.reduce_max(tf.abs(rebuilt - inputs[0]))),
            }
        )
        return h, total

    _run(units, x, kwargs, "reversible", probe)
    return report
