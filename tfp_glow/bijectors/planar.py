"""Planar flow (Rezende & Mohamed 2015, section 4.1), both directions exact."""

import numpy as np
import tensorflow as tf

from tfp_glow.bijectors import _vector_event
from tfp_glow.bijectors._state import ParameterLayer
from tfp_glow.bijectors.base import FlowBijector

__all__ = ["PlanarFlow"]

# The root solve of the inverse stops when a Newton step moves `s` by at most
# this many machine epsilons (relative to max(1, |s|)), or after _MAX_ITERATIONS.
_TOLERANCE_EPS = 4.0
_MAX_ITERATIONS = 100
# log(e - 1): softplus of it is 1, so `m(a) = 0` there (the identity init).
_LOG_E_MINUS_1 = float(np.log(np.expm1(1.0)))


class PlanarFlow(FlowBijector):
    """`f(z) = z + u_hat * tanh(w . z + b)` on vectors `[D]`.

    Forward is the paper's map `f` (explicit, one pass); inverse solves a
    scalar equation. With `a = w . z + b` and `c = w . u_hat`:

        forward:   y = z + u_hat * tanh(a)
        log|det df/dz| = log|1 + u_hat . psi(z)|,  psi(z) = tanh'(a) w
                       = log(1 + c * (1 - tanh(a)^2))
        inverse:   s = w . z solves  g(s) = s + c * tanh(s + b) = w . y,
                   z = y - u_hat * tanh(s + b)

    Invertibility (paper, appendix A): `f` is invertible iff `c >= -1`, so
    the raw parameter `u` is mapped to

        u_hat = u + (m(w . u) - w . u) * w / ||w||^2,   m(t) = -1 + softplus(t)

    giving `w . u_hat = m(w . u) > -1` for any `u, w` (computed as
    `-1 + softplus(-w . u)` for the correction, which cannot cancel). Then
    `g'(s) = 1 + c * tanh'(s + b) >= tanh(s + b)^2`: `g` is strictly
    increasing and onto R, and `s` lies in `[w . y - |c|, w . y + |c|]`
    (`|tanh| <= 1`). The inverse runs a vectorised Newton iteration
    safeguarded by bisection on that bracket until a step moves `s` by at
    most 4 machine epsilons of `max(1, |s|)` (at most 100 iterations), then
    one more Newton step with gradients: from the converged root `s*`
    (gradient stopped), `s = s* - (g(s*) - w . y) / g'(s*)` has the
    derivative of the implicit function theorem, so gradients of the
    inverse (and of its log-det) are exact without differentiating the loop.

    Direction: unlike the Glow-style bijectors of this package (forward =
    data to latent), `forward` here is the paper's generative map `z -> f(z)`,
    the explicit one, which is what a TFP surrogate posterior samples with
    (`tfd.TransformedDistribution(base, PlanarFlow(...))`; the ELBO never
    needs the root solve). Wrap in `tfb.Invert` to put the root solve on the
    sampling path instead.

    Starts as the identity: `w` is drawn from `N(0, 1/D)` (seeded), `b = 0`
    and `u = log(e - 1) w / ||w||^2`, where `m(w . u) = 0` makes `u_hat = 0`.

    #### Examples

    ```python
    flow = tfb.Chain([PlanarFlow(2, seed=k) for k in range(8)])
    q = tfd.TransformedDistribution(tfd.Sample(tfd.Normal(0., 1.), [2]), flow)
    tfp.vi.fit_surrogate_posterior(target_log_prob, q, keras.optimizers.Adam(1e-2), 2000)
    ```

    #### References

    [1] Danilo Rezende, Shakir Mohamed. Variational Inference with Normalizing
        Flows. ICML 2015, section 4.1 and appendix A. https://arxiv.org/abs/1505.05770
    """

    def __init__(
        self,
        event_size: int,
        seed: int | None = None,
        dtype: tf.DType | str = tf.float32,
        validate_args: bool = False,
        name: str = "planar_flow",
    ) -> None:
        parameters = dict(locals())
        self._event_size = _vector_event.event_size(event_size, type(self).__name__)
        dtype = tf.as_dtype(dtype)
        super().__init__(
            forward_min_event_ndims=1,
            validate_args=validate_args,
            dtype=dtype,
            parameters=parameters,
            name=name,
        )
        rng = np.random.default_rng(_vector_event.seed(seed))
        d = self._event_size
        w = rng.standard_normal(d) / np.sqrt(d)
        state = ParameterLayer(dtype=dtype.name, name=f"{self.name}_params")
        self.w = state.add("w", [d])
        self.u = state.add("u", [d])
        self.b = state.add("b", [])
        self.w.assign(w)
        self.u.assign(_LOG_E_MINUS_1 * w / np.dot(w, w))
        self._track_layers(state)

    @property
    def event_size(self) -> int:
        return self._event_size

    def constrained_u(self) -> tf.Tensor:
        """`u_hat`, with `w . u_hat = -1 + softplus(w . u) > -1` (appendix A)."""
        w = tf.convert_to_tensor(self.w)
        u = tf.convert_to_tensor(self.u)
        wu = tf.reduce_sum(w * u)
        # m(t) - t = -1 + softplus(t) - t = -1 + softplus(-t): no cancellation.
        correction = -1.0 + tf.math.softplus(-wu)
        # divide_no_nan: at w = 0 the map is a shift and needs no correction.
        return u + correction * tf.math.divide_no_nan(w, tf.reduce_sum(w * w))

    def w_dot_u_hat(self) -> tf.Tensor:
        """`c = w . u_hat = -1 + softplus(w . u)`, from the formula: `>= -1` in
        floating point too (the dot product of the rounded `u_hat` with `w` may
        fall below by rounding when `|w . u|` is large)."""
        wu = tf.reduce_sum(tf.convert_to_tensor(self.w) * tf.convert_to_tensor(self.u))
        return -1.0 + tf.math.softplus(wu)

    def _constrained_parameters(self):
        # The log-det and the root solve read `c` from the formula, so
        # `1 + c (1 - tanh^2)` stays >= 0 whatever the rounding of `u_hat`.
        return (
            tf.convert_to_tensor(self.w),
            self.constrained_u(),
            tf.convert_to_tensor(self.b),
            self.w_dot_u_hat(),
        )

    @staticmethod
    def _log_det(a, c):
        # 1 - tanh^2 underflows to 0 for large |a|, where the log-det is 0.
        return tf.math.log(tf.abs(1.0 + c * (1.0 - tf.square(tf.tanh(a)))))

    def _forward_and_log_det(self, x, **kwargs):
        _vector_event.check(x, self._event_size, "x", type(self).__name__)
        w, u_hat, b, c = self._constrained_parameters()
        a = tf.reduce_sum(x * w, axis=-1) + b
        return x + u_hat * tf.tanh(a)[..., None], self._log_det(a, c)

    def _inverse_and_log_det(self, y, **kwargs):
        _vector_event.check(y, self._event_size, "y", type(self).__name__)
        w, u_hat, b, c = self._constrained_parameters()
        target = tf.reduce_sum(y * w, axis=-1)
        s_root = tf.stop_gradient(
            _solve(tf.stop_gradient(target), tf.stop_gradient(b), tf.stop_gradient(c))
        )
        # One Newton step with gradients: the implicit-function derivative.
        t = tf.tanh(s_root + b)
        slope = 1.0 + c * (1.0 - tf.square(t))
        tiny = np.finfo(y.dtype.as_numpy_dtype).tiny
        s = s_root - (s_root + c * t - target) / tf.maximum(slope, tiny)
        a = s + b
        return y - u_hat * tf.tanh(a)[..., None], -self._log_det(a, c)


def _solve(target, b, c):
    """`s` with `s + c tanh(s + b) = target` (elementwise; c > -1), by Newton
    steps kept inside a shrinking bracket (bisection when a step leaves it)."""
    eps = np.finfo(target.dtype.as_numpy_dtype).eps
    radius = tf.abs(c)
    lo, hi = target - radius, target + radius

    def residual_and_slope(s):
        t = tf.tanh(s + b)
        return s + c * t - target, 1.0 + c * (1.0 - tf.square(t))

    def not_done(i, s, lo, hi, done):
        return tf.logical_and(i < _MAX_ITERATIONS, tf.logical_not(tf.reduce_all(done)))

    def step(i, s, lo, hi, done):
        r, slope = residual_and_slope(s)
        lo = tf.where(r < 0, s, lo)
        hi = tf.where(r > 0, s, hi)
        newton = s - r / slope
        inside = tf.logical_and(newton > lo, newton < hi)
        s_next = tf.where(inside, newton, 0.5 * (lo + hi))
        s_next = tf.where(tf.logical_or(done, r == 0), s, s_next)
        moved = tf.abs(s_next - s) <= _TOLERANCE_EPS * eps * tf.maximum(tf.abs(s), 1.0)
        return i + 1, s_next, lo, hi, tf.logical_or(done, moved)

    start = tf.zeros_like(target, dtype=tf.bool)
    _, s, _, _, _ = tf.while_loop(not_done, step, (0, target, lo, hi, start))
    return s
