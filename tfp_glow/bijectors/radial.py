"""Radial flow (Rezende & Mohamed 2015, section 4.1), both directions in closed form."""

import numpy as np
import tensorflow as tf

from tfp_glow.bijectors import _vector_event
from tfp_glow.bijectors._state import ParameterLayer
from tfp_glow.bijectors.base import FlowBijector

__all__ = ["RadialFlow"]

# softplus^-1(1): alpha = 1 at init, and beta_raw equal to it makes beta = 0.
_SOFTPLUS_INVERSE_1 = float(np.log(np.expm1(1.0)))


def _safe_norm(v):
    """`||v||` over the last axis, with a zero (not NaN) gradient at v = 0."""
    squared = tf.reduce_sum(tf.square(v), axis=-1)
    positive = squared > 0
    return tf.where(
        positive,
        tf.sqrt(tf.where(positive, squared, tf.ones_like(squared))),
        tf.zeros_like(squared),
    )


class RadialFlow(FlowBijector):
    """`f(z) = z + beta * h(alpha, r) * (z - z0)` on vectors `[D]`.

    With `h(alpha, r) = 1 / (alpha + r)` and `r = ||z - z0||`:

        forward:  y = z + beta (z - z0) / (alpha + r)
        log|det df/dz| = (D - 1) log(1 + beta h) + log(1 + beta h + beta h'(r) r)
                       = (D - 1) [log(s + r) - log(alpha + r)]
                         + log(r (2 alpha + r) + alpha s) - 2 log(alpha + r)

    where `alpha = softplus(alpha_raw) > 0` and `beta = -alpha + s`,
    `s = softplus(beta_raw) > 0`, so `beta > -alpha`, the paper's condition
    for invertibility (appendix A). Written with `s = alpha + beta` the
    log-det has only positive terms (no cancellation), since
    `1 + beta h = (s + r) / (alpha + r)` and
    `1 + beta h + beta h' r = 1 + alpha beta / (alpha + r)^2`.

    Inverse, in closed form: `y - z0 = (z - z0) (s + r) / (alpha + r)`, so
    `rho = ||y - z0|| = r (s + r) / (alpha + r)`, an increasing map of
    `r >= 0` onto `[0, inf)`. Its root `r >= 0` solves
    `r^2 + (s - rho) r - alpha rho = 0`:

        r = (sqrt(B^2 + 4 alpha rho) - B) / 2     (B = s - rho < 0)
          = 2 alpha rho / (B + sqrt(B^2 + 4 alpha rho))   (B >= 0; no cancellation)
        z = z0 + (y - z0) (alpha + r) / (s + r)

    and the inverse log-det is minus the forward one at that `r`.

    Direction: `forward` is the paper's generative map, as for `PlanarFlow`
    (what a TFP surrogate posterior samples with); both directions are exact.

    Starts as the identity (`alpha = 1`, `beta = 0`) with `z0 ~ N(0, I)`
    (seeded), so layers of a stack contract or expand about different points.

    #### Examples

    ```python
    flow = tfb.Chain([RadialFlow(2, seed=k) for k in range(8)])
    q = tfd.TransformedDistribution(tfd.Sample(tfd.Normal(0., 1.), [2]), flow)
    ```

    #### References

    [1] Danilo Rezende, Shakir Mohamed. Variational Inference with Normalizing
        Flows. ICML 2015, section 4.1 and appendix A. https://arxiv.org/abs/1505.05770
    [2] Esteban Tabak, Cristina Turner. A Family of Nonparametric Density
        Estimation Algorithms. Communications on Pure and Applied Mathematics, 2013.
    """

    def __init__(
        self,
        event_size: int,
        seed: int | None = None,
        dtype: tf.DType | str = tf.float32,
        validate_args: bool = False,
        name: str = "radial_flow",
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
        state = ParameterLayer(dtype=dtype.name, name=f"{self.name}_params")
        self.z0 = state.add("z0", [self._event_size])
        self.alpha_raw = state.add("alpha_raw", [])
        self.beta_raw = state.add("beta_raw", [])
        self.z0.assign(rng.standard_normal(self._event_size))
        self.alpha_raw.assign(_SOFTPLUS_INVERSE_1)
        self.beta_raw.assign(_SOFTPLUS_INVERSE_1)
        self._track_layers(state)

    @property
    def event_size(self) -> int:
        return self._event_size

    def alpha_and_beta(self) -> tuple[tf.Tensor, tf.Tensor]:
        """`(alpha, beta)` with `alpha > 0` and `beta > -alpha`."""
        alpha, s = self._alpha_and_s()
        return alpha, s - alpha

    def _alpha_and_s(self):
        return (
            tf.math.softplus(tf.convert_to_tensor(self.alpha_raw)),
            tf.math.softplus(tf.convert_to_tensor(self.beta_raw)),
        )

    def _log_det(self, r, alpha, s):
        log_alpha_r = tf.math.log(alpha + r)
        radial = tf.math.log(r * (2.0 * alpha + r) + alpha * s) - 2.0 * log_alpha_r
        if self._event_size == 1:
            return radial
        return (self._event_size - 1) * (tf.math.log(s + r) - log_alpha_r) + radial

    def _forward_and_log_det(self, x, **kwargs):
        _vector_event.check(x, self._event_size, "x", type(self).__name__)
        alpha, s = self._alpha_and_s()
        z0 = tf.convert_to_tensor(self.z0)
        d = x - z0
        r = _safe_norm(d)
        y = z0 + d * ((s + r) / (alpha + r))[..., None]
        return y, self._log_det(r, alpha, s)

    def _inverse_and_log_det(self, y, **kwargs):
        _vector_event.check(y, self._event_size, "y", type(self).__name__)
        alpha, s = self._alpha_and_s()
        z0 = tf.convert_to_tensor(self.z0)
        e = y - z0
        rho = _safe_norm(e)
        b = s - rho
        root = tf.sqrt(tf.square(b) + 4.0 * alpha * rho)
        # Pick the form of the quadratic's root that does not subtract.
        r = tf.where(
            b >= 0, 2.0 * alpha * rho / tf.where(b + root > 0, b + root, 1.0), 0.5 * (root - b)
        )
        x = z0 + e * ((alpha + r) / (s + r))[..., None]
        return x, -self._log_det(r, alpha, s)
