"""Mixture-of-logistics CDF coupling (Flow++)."""

import numpy as np
import tensorflow as tf

from tfp_glow import checks
from tfp_glow.bijectors.coupling import CouplingBase

__all__ = ["LogisticMixtureCoupling"]

# Bounds of the per-component log scales and of the final log scale, so that
# no network output can make a CDF a step function, overflow a scale to inf
# (the inverse's bracket multiplies by it) or overflow the affine part.
_MAX_LOG_SCALE = 7.0
_MAX_LOG_SCALE_OUT = 3.0


class LogisticMixtureCoupling(CouplingBase):
    """Flow++ coupling: the logit of a mixture-of-logistics CDF, then an affine map.

    The network returns `3K + 2` values per transformed channel (grouped by
    channel): `K` mixture logits `l_k`, `K` means `m~_k`, `K` raw log scales
    `r_k`, a shift `t` and a raw log scale `q`. With

        pi = softmax(l),   mu_k = m~_k + o_k,   o_k = linspace(-1, 1, K)_k
        log s_k = 7 tanh(r_k / 7)                      (|log s_k| < 7)
        a = 3 tanh(q / 3)                              (|a| < 3)
        z_k = (x - mu_k) / s_k

    the elementwise map and its derivative are

        F(x) = sum_k pi_k sigmoid(z_k)                 (mixture CDF)
        u    = logit F(x) = log F - log(1 - F)
        y    = u exp(a) + t
        log dy/dx = log f(x) - log F - log(1 - F) + a,
        f(x) = sum_k pi_k sigmoid(z_k) sigmoid(-z_k) / s_k

    with `log F = logsumexp_k(log pi_k + log_sigmoid(z_k))`, `log(1 - F) =
    logsumexp_k(log pi_k + log_sigmoid(-z_k))` and `log f` likewise, so no
    term underflows in the tails (there `u` is linear in `x`: the map is a
    bijection of R). The fixed offsets `o_k` break the symmetry between the
    components: with the network's last layer zero-initialised they would
    otherwise stay identical forever.

    The inverse has no closed form: `u = (y - t) exp(-a)` is inverted by
    bisection on the exact bracket

        lo = min_k(mu_k + s_k u) <= x <= max_k(mu_k + s_k u) = hi

    (at `hi` every `z_k >= u`, so `F >= sigmoid(u)`; likewise at `lo`), run
    for a fixed `bisection_steps` iterations (static shapes, no data-dependent
    loop), which leaves `|x - x*| <= (hi - lo) 2^-steps` (about 1e-14 of the
    bracket at the default 48), followed by one Newton step
    `x <- x - (logit F(x) - u) / (d logit F / dx)` whose gradient is the
    implicit-function gradient, so `inverse` is differentiable in the network
    outputs too. The log-det of the inverse is minus the forward's at the
    recovered `x`.

    Args:
      net: a factory `fn(output_units) -> keras.layers.Layer`, or a Keras
        layer mapping the conditioning part to `outputs_per_channel(K) * C_a`
        channels; zero-initialise its last layer.
      num_components: `K >= 1`.
      bisection_steps: iterations of the inverse's bisection (>= 1).
      mask, parity, event_shape, event_ndims, dtype: as `AffineCoupling`.

    #### Examples

    ```python
    # The coupling calls the factory with its output size, (3K + 2) C_a.
    net = functools.partial(tfp_glow.nets.GlowCouplingNet, 64)
    coupling = LogisticMixtureCoupling(net, num_components=4, event_shape=(4, 4, 4))
    ```

    #### References

    [1] Jonathan Ho, Xi Chen, Aravind Srinivas, Yan Duan, Pieter Abbeel.
        Flow++: Improving Flow-Based Generative Models with Variational
        Dequantization and Architecture Design. ICML 2019.
        https://arxiv.org/abs/1902.00275
    """

    def __init__(self, net, num_components=4, bisection_steps=48, mask="channel",
                 parity=0, event_shape=None, event_ndims=3, dtype=tf.float32,
                 validate_args=False, name="logistic_mixture_coupling"):
        parameters = dict(locals())
        self._num_components = checks.positive_int(num_components, "num_components")
        self._bisection_steps = checks.positive_int(bisection_steps, "bisection_steps")
        self._outputs_per_channel = self.outputs_per_channel(self._num_components)
        super().__init__(net, mask=mask, parity=parity, event_shape=event_shape,
                         event_ndims=event_ndims, dtype=dtype, validate_args=validate_args,
                         parameters=parameters, name=name)

    @staticmethod
    def outputs_per_channel(num_components):
        """`3 K + 2`: K logits, K means, K log scales, a shift and a log scale."""
        return 3 * checks.positive_int(num_components, "num_components") + 2

    @property
    def num_components(self):
        return self._num_components

    @property
    def bisection_steps(self):
        return self._bisection_steps

    def _mixture(self, x, h):
        k = self._num_components
        params = tf.reshape(h, tf.concat([tf.shape(x), [3 * k + 2]], 0))
        logits, means, raw_scales, shift, raw_a = tf.split(params, [k, k, k, 1, 1], axis=-1)
        offsets = np.linspace(-1.0, 1.0, k) if k > 1 else np.zeros(1)
        means = means + tf.constant(offsets, x.dtype)
        log_scales = _MAX_LOG_SCALE * tf.tanh(raw_scales / _MAX_LOG_SCALE)
        log_pi = tf.nn.log_softmax(logits, axis=-1)
        a = _MAX_LOG_SCALE_OUT * tf.tanh(raw_a[..., 0] / _MAX_LOG_SCALE_OUT)
        return log_pi, means, log_scales, shift[..., 0], a

    @staticmethod
    def _logit_cdf(x, log_pi, means, log_scales):
        """`(logit F(x), log d logit F / dx)`, elementwise, stable in the tails."""
        z = (x[..., None] - means) * tf.exp(-log_scales)
        log_sig_pos = tf.math.log_sigmoid(z)
        log_sig_neg = tf.math.log_sigmoid(-z)
        log_cdf = tf.reduce_logsumexp(log_pi + log_sig_pos, axis=-1)
        log_sf = tf.reduce_logsumexp(log_pi + log_sig_neg, axis=-1)
        log_pdf = tf.reduce_logsumexp(log_pi + log_sig_pos + log_sig_neg - log_scales,
                                      axis=-1)
        return log_cdf - log_sf, log_pdf - log_cdf - log_sf

    def _transform(self, x_a, h):
        log_pi, means, log_scales, shift, a = self._mixture(x_a, h)
        u, log_du = self._logit_cdf(x_a, log_pi, means, log_scales)
        return u * tf.exp(a) + shift, log_du + a

    def _untransform(self, y_a, h):
        log_pi, means, log_scales, shift, a = self._mixture(y_a, h)
        u = (y_a - shift) * tf.exp(-a)
        scales = tf.exp(log_scales)
        ends = means + scales * u[..., None]
        lo0, hi0 = tf.reduce_min(ends, axis=-1), tf.reduce_max(ends, axis=-1)
        # The bisection only locates the root; the Newton step below carries
        # the gradient (implicit function theorem), so none is kept here.
        lo0, hi0 = tf.stop_gradient(lo0), tf.stop_gradient(hi0)
        consts = [tf.stop_gradient(t) for t in (log_pi, means, log_scales, u)]

        def body(i, lo, hi):
            mid = 0.5 * (lo + hi)
            too_high = self._logit_cdf(mid, *consts[:3])[0] > consts[3]
            return i + 1, tf.where(too_high, lo, mid), tf.where(too_high, mid, hi)

        _, lo, hi = tf.while_loop(
            lambda i, lo, hi: i < self._bisection_steps, body,
            (tf.constant(0), lo0, hi0), maximum_iterations=self._bisection_steps)
        x0 = tf.stop_gradient(0.5 * (lo + hi))
        u0, log_du0 = self._logit_cdf(x0, log_pi, means, log_scales)
        x = x0 - (u0 - u) * tf.exp(-tf.stop_gradient(log_du0))
        # Where the map is nearly flat a rounding error in u0 - u would throw the
        # step far: keep its value inside the final bracket (its gradient is kept).
        x = x + tf.stop_gradient(tf.clip_by_value(x, lo, hi) - x)
        # Minus the forward log-det at the recovered x (with its gradient).
        _, log_du = self._logit_cdf(x, log_pi, means, log_scales)
        return x, -(log_du + a)
