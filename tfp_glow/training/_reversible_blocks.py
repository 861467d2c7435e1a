"""The custom-gradient block behind `tfp_glow.training.reversible` ("checkpoint", "reversible").

A block is a list of steps (objects with `apply(x, kwargs) -> (y, ldj)`,
`undo(y, kwargs) -> x` and a `stored` flag; see `tfp_glow.training.reversible.Step`).
Its forward runs with every gradient tape paused and returns `(y, ldj)`; its
gradient function recomputes what it needs:

* "checkpoint": the whole block from its kept input `x`;
* "reversible": step by step from the kept output `y`, rebuilding each input
  with `undo` (or taking the kept input of a `stored` step). The block keeps
  one scalar more, the input's sum of squares: if the rebuilt input's
  differs by more than `rebuild_tolerance`, the input was lost (the flow is
  not numerically invertible there) and the block's gradients are NaN.

The gradient function follows `tf.custom_gradient`'s contract with variables:
`grad_fn(dy, dldj, variables=None)` returns `(dL/dx, [dL/dv for v in
variables])`, the variables being those the forward read.
"""

import contextlib

import numpy as np
import tensorflow as tf

try:
    # What tf.recompute_grad uses: pauses every active GradientTape. Without
    # it an eager tape records each op of the block's forward and keeps its
    # inputs for a backward pass that never runs (the custom gradient replaces
    # it), so the block would save no memory. No public API does this.
    from tensorflow.python.eager.record import stop_recording as _stop_recording
except ImportError:  # pragma: no cover (another TF layout: correct, saves less eagerly)
    _stop_recording = contextlib.nullcontext

__all__ = ["custom_gradient_block", "rebuild_tolerance"]

_no_autograph = tf.autograph.experimental.do_not_convert  # static Python only


def _after(t, g):
    """`t` (same value), made to depend on `g` when building a graph.

    A graph executor (tf.function, XLA) runs an op as soon as its inputs
    exist. The rebuild and the recomputation need only the block's output
    (or kept input), so they would run during the forward pass and hold every
    step's activations at once. A zero computed from `g`, the incoming
    gradient, orders them after it (as `tf.recompute_grad` does); it is NaN
    only when `g` starts with a NaN, and then the gradient is NaN anyway.
    """
    if tf.executing_eagerly():
        return t
    first = tf.reduce_max(tf.reshape(g, [-1])[:1])
    zero = tf.where(tf.equal(first, first), tf.zeros([], t.dtype), tf.constant(np.nan, t.dtype))
    return t + zero


def rebuild_tolerance(dtype):
    """`10 sqrt(eps)`: the largest relative change of a block input's sum of
    squares the rebuild may show (float32: 3.5e-3, float64: 1.5e-7).

    A rebuild that is merely rounded stays far inside it (float32, 96 Glow
    steps: ~1e-5); one that lost the input (a shift that swamped it, an
    inverse that explodes) lands far outside (measured: 1e16).
    """
    return 10.0 * float(np.sqrt(np.finfo(tf.as_dtype(dtype).as_numpy_dtype).eps))


def _fingerprint(x):
    return tf.reduce_sum(tf.square(x))


def _poison_unless_rebuilt(grads, rebuilt, fingerprint):
    """`grads` unchanged if `rebuilt` has the block input's fingerprint, else NaN.

    The backward pass cannot recover a lost input; a NaN gradient is never
    applied by `FlowModel.fit` (its non-finite guard raises or skips), where a
    silently wrong one would be.
    """
    tol = rebuild_tolerance(rebuilt.dtype)
    tiny = np.finfo(rebuilt.dtype.as_numpy_dtype).tiny
    ok = tf.abs(_fingerprint(rebuilt) - fingerprint) <= tol * fingerprint + tiny
    return [g * tf.where(ok, tf.ones([], g.dtype), tf.constant(np.nan, g.dtype)) for g in grads]


def _vjp(steps, x, dy, dldj, kwargs, grads):
    """Recomputes `steps` from `x` under a tape; returns dL/dx.

    `L` is linearised as `<y, dy> + <ldj, dldj>`, the log-det broadcast to the
    block's log-det shape first (a constant-Jacobian step returns a scalar,
    others one value per example). The variables' gradients are added into
    `grads` (keyed by `Variable.ref()`).
    """
    x = tf.identity(x)  # a fresh tensor, so no bijector cache can answer for it
    with tf.GradientTape() as tape:
        tape.watch(x)
        h, total = x, tf.zeros([], x.dtype)
        for step in steps:
            h, ldj = step.apply(h, kwargs)
            total = total + ldj
        total = total + tf.zeros_like(dldj)
    variables = list(tape.watched_variables())
    out = tape.gradient(
        [h, total],
        [x] + variables,
        output_gradients=[dy, dldj],
        unconnected_gradients=tf.UnconnectedGradients.ZERO,
    )
    for variable, grad in zip(variables, out[1:]):
        if isinstance(grad, tf.IndexedSlices):
            grad = tf.convert_to_tensor(grad)
        key = variable.ref()
        grads[key] = grad if key not in grads else grads[key] + grad
    return out[0]


@_no_autograph
def custom_gradient_block(steps, x, kwargs, backprop):
    """`(y, ldj)` of `steps` on `x`, keeping only `x` ("checkpoint") or only `y`
    and the inputs of `stored` steps ("reversible") for the gradient."""
    reversible = backprop == "reversible"

    @tf.custom_gradient
    @_no_autograph
    def block(x):
        # What the gradient keeps, and nothing else: `grad_fn` must not close
        # over `x` itself, or "reversible" would keep every block's input.
        kept = {} if reversible else {"input": x}
        with _stop_recording():
            if reversible and not all(step.stored for step in steps):
                kept["fingerprint"] = _fingerprint(x)
            h, total = x, tf.zeros([], x.dtype)
            for i, step in enumerate(steps):
                if reversible and step.stored:
                    kept[i] = h
                h, ldj = step.apply(h, kwargs)
                total = total + ldj
        y = h

        @_no_autograph
        def grad_fn(dy, dldj, variables=None):
            dy = tf.zeros_like(y) if dy is None else dy
            dldj = tf.zeros_like(total) if dldj is None else dldj
            grads = {}
            if reversible:
                out, g = y, dy
                for i in reversed(range(len(steps))):
                    if i in kept:
                        src = _after(kept[i], g)
                    else:
                        src = steps[i].undo(_after(out, g), kwargs)
                    g = _vjp(steps[i : i + 1], src, g, dldj, kwargs, grads)
                    out = src
                if "fingerprint" in kept:
                    keys = list(grads)
                    g, *values = _poison_unless_rebuilt(
                        [g] + [grads[k] for k in keys], out, kept["fingerprint"]
                    )
                    grads = dict(zip(keys, values))
            else:
                g = _vjp(steps, _after(kept["input"], dy), dy, dldj, kwargs, grads)
            if variables is None:
                return g
            return g, [grads.get(v.ref(), tf.zeros(v.shape, v.dtype)) for v in variables]

        return (y, total), grad_fn

    return block(x)
