"""Mixture-of-logistics CDF coupling (Flow++)."""

from collections.abc import Callable, Sequence

import keras
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
        y    = u exp(a) + t + m x
        dy/dx = exp(log du/dx + a) + m >= m,
        log du/dx = log f(x) - log F - log(1 - F),
        f(x) = sum_k pi_k sigmoid(z_k) sigmoid(-z_k) / s_k

    with `log F = logsumexp_k(log pi_k + log_sigmoid(z_k))`, `log(1 - F) =
    logsumexp_k(log pi_k + log_sigmoid(-z_k))` and `log f` likewise, so no
    term underflows in the tails (there `u` is linear in `x`: the map is a
    bijection of R). The fixed offsets `o_k` break the symmetry between the
    components: with the network's last layer zero-initialised they would
    otherwise stay identical forever.

    `m x` (`m = min_derivative`) bounds the derivative below. Without it,
    between two narrow components `F` is nearly constant and `dy/dx` as small
    as 1e-14 (seen after a 0.3 perturbation of a net's weights; it underflows
    to 0 too): there `x` is lost in the rounding of `y` and float32 round
    trips fail. With it the round trip of a float32 `x` is good to about
    `ulp(y) / m`, and the log-det above (`logaddexp(log du/dx + a, log m)`)
    is that of this map. `min_derivative=0` gives the map of models saved
    before the option existed.

    The inverse has no closed form: with `c = m exp(-a)`, `v = (y - t) exp(-a)`
    it solves `u(x) + c x = v` by bisection on the exact bracket

        lo = min_k (mu_k + s_k v) / (1 + c s_k) <= x <= max_k (...) = hi

    (at `hi` every `z_k >= v - c hi`, so `u(hi) >= v - c hi`; likewise at
    `lo`), run for a fixed `bisection_steps` iterations (static shapes, no
    data-dependent loop), which leaves `|x - x*| <= (hi - lo) 2^-steps`
    (about 1e-14 of the bracket at the default 48), followed by one Newton
    step `x <- x - (u(x) + c x - v) / (du/dx + c)` whose gradient is the
    implicit-function gradient, so `inverse` is differentiable in the network
    outputs too. The log-det of the inverse is minus the forward's at the
    recovered `x`.

    Args:
      net: a factory `fn(output_units) -> keras.layers.Layer`, or a Keras
        layer mapping the conditioning part to `outputs_per_channel(K) * C_a`
        channels; zero-initialise its last layer.
      num_components: `K >= 1`.
      bisection_steps: iterations of the inverse's bisection (>= 1).
      min_derivative: `m` in `[0, 1)` (default 1e-3), the least `dy/dx`.
      mask, parity, event_shape, event_ndims, dtype, context_shape: as
        `AffineCoupling`.

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

    def __init__(
        self,
        net: keras.layers.Layer | Callable[[int], keras.layers.Layer],
        num_components: int = 4,
        bisection_steps: int = 48,
        mask: str = "channel",
        parity: int = 0,
        event_shape: Sequence[int] | None = None,
        event_ndims: int = 3,
        dtype: tf.DType | str = tf.float32,
        validate_args: bool = False,
        name: str = "logistic_mixture_coupling",
        min_derivative: float = 1e-3,
        context_shape: Sequence[int] | None = None,
    ) -> None:
        parameters = dict(locals())
        self._num_components = checks.positive_int(num_components, "num_components")
        self._bisection_steps = checks.positive_int(bisection_steps, "bisection_steps")
        self._min_derivative = checks.number(
            min_derivative, "min_derivative", minimum=0.0, maximum=1.0, exclusive_maximum=True
        )
        self._outputs_per_channel = self.outputs_per_channel(self._num_components)
        super().__init__(
            net,
            mask=mask,
            parity=parity,
            event_shape=event_shape,
            event_ndims=event_ndims,
            dtype=dtype,
            validate_args=validate_args,
            parameters=parameters,
            name=name,
            context_shape=context_shape,
        )

    @staticmethod
    def outputs_per_channel(num_components):
        """`3 K + 2`: K logits, K means, K log scales, a shift and a log scale."""
        return 3 * checks.positive_int(num_components, "num_components") + 2

    @classmethod
    def output_units_for(cls, event_shape, mask="channel", num_components=4):
        """Output channels the network needs for inputs of `event_shape`:
        `(3 K + 2) C_a`, `C_a = C // 2` (mask="channel") or `C` ("checkerboard")."""
        return cls.outputs_per_channel(num_components) * cls._transformed_channels(
            event_shape, mask
        )

    @property
    def num_components(self):
        return self._num_components

    @property
    def bisection_steps(self):
        return self._bisection_steps

    @property
    def min_derivative(self):
        return self._min_derivative

    def _log_slope(self, log_du, a):
        """`log dy/dx = log(exp(log du/dx + a) + m)`."""
        if not self._min_derivative:
            return log_du + a
        log_m = tf.constant(np.log(self._min_derivative), log_du.dtype)
        return tf.reduce_logsumexp(tf.stack([log_du + a, log_m + tf.zeros_like(a)]), axis=0)

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
        log_pdf = tf.reduce_logsumexp(log_pi + log_sig_pos + log_sig_neg - log_scales, axis=-1)
        return log_cdf - log_sf, log_pdf - log_cdf - log_sf

    def _transform(self, x_a, h):
        log_pi, means, log_scales, shift, a = self._mixture(x_a, h)
        u, log_du = self._logit_cdf(x_a, log_pi, means, log_scales)
        y = u * tf.exp(a) + shift
        if self._min_derivative:
            y = y + tf.constant(self._min_derivative, x_a.dtype) * x_a
        return y, self._log_slope(log_du, a)

    def _untransform(self, y_a, h):
        log_pi, means, log_scales, shift, a = self._mixture(y_a, h)
        # Solve u(x) + c x = v (module docstring).
        v = (y_a - shift) * tf.exp(-a)
        c = tf.constant(self._min_derivative, y_a.dtype) * tf.exp(-a)
        scales = tf.exp(log_scales)
        ends = (means + scales * v[..., None]) / (1.0 + c[..., None] * scales)
        lo0, hi0 = tf.reduce_min(ends, axis=-1), tf.reduce_max(ends, axis=-1)
        # The bisection only locates the root; the Newton step below carries
        # the gradient (implicit function theorem), so none is kept here.
        lo0, hi0 = tf.stop_gradient(lo0), tf.stop_gradient(hi0)
        consts = [tf.stop_gradient(t) for t in (log_pi, means, log_scales, v, c)]

        def body(i, lo, hi):
            mid = 0.5 * (lo + hi)
            too_high = self._logit_cdf(mid, *consts[:3])[0] + consts[4] * mid > consts[3]
            return i + 1, tf.where(too_high, lo, mid), tf.where(too_high, mid, hi)

        _, lo, hi = tf.while_loop(
            lambda i, lo, hi: i < self._bisection_steps,
            body,
            (tf.constant(0), lo0, hi0),
            maximum_iterations=self._bisection_steps,
        )
        x0 = tf.stop_gradient(0.5 * (lo + hi))
        u0, log_du0 = self._logit_cdf(x0, log_pi, means, log_scales)
        slope0 = tf.stop_gradient(tf.exp(log_du0) + c)
        x = x0 - (u0 + c * x0 - v) / slope0
        # Where the map is nearly flat a rounding error in u0 - v would throw the
        # step far: keep its value inside the final bracket (its gradient is kept).
        x = x + tf.stop_gradient(tf.clip_by_value(x, lo, hi) - x)
        # Minus the forward log-det at the recovered x (with its gradient).
        _, log_du = self._logit_cdf(x, log_pi, means, log_scales)
        return x, -self._log_slope(log_du, a)
