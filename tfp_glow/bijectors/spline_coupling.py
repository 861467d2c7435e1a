"""Rational-quadratic spline coupling (neural spline flows)."""

import math

import tensorflow as tf

from tfp_glow import checks
from tfp_glow.bijectors.coupling import CouplingBase

__all__ = ["RationalQuadraticSplineCoupling", "rational_quadratic_spline"]


def _bin_parameters(raw_w, raw_h, raw_d, tail_bound, min_width, min_height, min_derivative):
    """Knots `(x_k, y_k)`, `k = 0..K`, and knot derivatives `d_k` from raw outputs."""
    dtype = raw_w.dtype
    num_bins = raw_w.shape[-1]
    two_b = tf.constant(2.0 * tail_bound, dtype)
    lo = tf.constant(-tail_bound, dtype)

    def knots(raw, minimum):
        # exp(log_softmax), not softmax: oneDNN's softmax kernel refuses more
        # than 5 dimensions, which images with two sample axes have.
        frac = minimum + (1.0 - minimum * num_bins) * tf.exp(tf.nn.log_softmax(raw, axis=-1))
        inner = lo + two_b * tf.math.cumsum(frac, axis=-1)[..., :-1]
        # The end knots are exactly -B and B (cumsum rounding must not move them).
        ones = tf.ones_like(raw[..., :1])
        return tf.concat([lo * ones, inner, -lo * ones], axis=-1)

    # softplus(c) = 1 - min_derivative, so a zero output gives d = 1 (identity).
    offset = math.log(math.expm1(1.0 - min_derivative))
    inner_d = min_derivative + tf.nn.softplus(raw_d + tf.constant(offset, dtype))
    ones = tf.ones_like(raw_d[..., :1])
    derivatives = tf.concat([ones, inner_d, ones], axis=-1)  # linear tails: d = 1
    return (knots(raw_w, min_width), knots(raw_h, min_height), derivatives)


def rational_quadratic_spline(x, raw_w, raw_h, raw_d, tail_bound=4.0, inverse=False,
                              min_width=1e-3, min_height=1e-3, min_derivative=1e-3):
    """Elementwise monotone RQ spline on `[-B, B]`, identity outside.

    `raw_w`, `raw_h`: `[..., K]` (bin widths and heights before a softmax),
    `raw_d`: `[..., K - 1]` (interior knot derivatives before a softplus); `x`
    has their shape without the last axis. Returns `(y, log|dy/dx|)` (or
    `(x, log|dx/dy|)` with `inverse=True`), both shaped like `x`.
    See `RationalQuadraticSplineCoupling` for the formulas.
    """
    xs, ys, ds = _bin_parameters(raw_w, raw_h, raw_d, tail_bound, min_width, min_height,
                                 min_derivative)
    b = tf.constant(tail_bound, x.dtype)
    inside = (x >= -b) & (x <= b)
    # The spline branch is evaluated on clipped values so that the branch
    # `where` discards can never be NaN (it would poison the gradient).
    v = tf.clip_by_value(x, -b, b)
    knots_in = ys if inverse else xs
    num_bins = raw_w.shape[-1]
    k = tf.reduce_sum(tf.cast(v[..., None] >= knots_in[..., 1:-1], tf.int32), axis=-1)
    onehot = tf.one_hot(k, num_bins, dtype=x.dtype)
    # The six per-bin quantities of bin k selected with one product and one sum
    # (fewer ops than six gathers: on CPU the step time is mostly per-op cost).
    table = tf.stack([xs[..., :-1], ys[..., :-1], xs[..., 1:] - xs[..., :-1],
                      ys[..., 1:] - ys[..., :-1], ds[..., :-1], ds[..., 1:]], axis=-2)
    x_k, y_k, w_k, h_k, d_k, d_k1 = tf.unstack(
        tf.reduce_sum(table * onehot[..., None, :], axis=-1), axis=-1)
    s = h_k / w_k
    curvature = d_k1 + d_k - 2.0 * s
    if inverse:
        dy = v - y_k
        a = h_k * (s - d_k) + dy * curvature
        bq = h_k * d_k - dy * curvature
        c = -s * dy
        disc = tf.maximum(bq * bq - 4.0 * a * c, 0.0)
        # The root in [0, 1] of a xi^2 + b xi + c = 0, in the form that does
        # not cancel (Durkan et al. 2019, eq. 6-8).
        xi = tf.clip_by_value(2.0 * c / (-bq - tf.sqrt(disc)), 0.0, 1.0)
    else:
        xi = tf.clip_by_value((v - x_k) / w_k, 0.0, 1.0)
    one_m = 1.0 - xi
    denom = s + curvature * xi * one_m
    if inverse:
        out = xi * w_k + x_k
    else:
        out = y_k + h_k * (s * xi * xi + d_k * xi * one_m) / denom
    log_slope = (2.0 * tf.math.log(s)
                 + tf.math.log(d_k1 * xi * xi + 2.0 * s * xi * one_m + d_k * one_m * one_m)
                 - 2.0 * tf.math.log(denom))
    if inverse:
        log_slope = -log_slope
    return (tf.where(inside, out, x), tf.where(inside, log_slope, tf.zeros_like(log_slope)))


class RationalQuadraticSplineCoupling(CouplingBase):
    """Coupling with a monotone rational-quadratic spline per transformed element.

    The network returns `(3K - 1)` values per transformed channel (grouped by
    channel: `h[..., c (3K-1) : (c+1) (3K-1)]`): `K` raw widths `w~`, `K` raw
    heights `h~` and `K - 1` raw interior derivatives `d~`. On `[-B, B]`
    (`B = tail_bound`) they define `K` bins with knots `(x_k, y_k)`:

        w_k = 2B (m_w + (1 - K m_w) softmax(w~)_k),   x_0 = -B, x_K = B
        h_k = 2B (m_h + (1 - K m_h) softmax(h~)_k),   y_0 = -B, y_K = B
        d_k = m_d + softplus(d~_k + log(e^(1 - m_d) - 1)),  d_0 = d_K = 1

    (`m_w, m_h, m_d` the minimum width, height and derivative). In bin `k`,
    with `s_k = h_k / w_k` and `xi = (x - x_k) / w_k` in [0, 1]:

        y = y_k + h_k (s_k xi^2 + d_k xi (1 - xi)) / D,
        D = s_k + (d_{k+1} + d_k - 2 s_k) xi (1 - xi)
        dy/dx = s_k^2 (d_{k+1} xi^2 + 2 s_k xi (1 - xi) + d_k (1 - xi)^2) / D^2

    and `y = x` outside `[-B, B]` (linear tails; `d_0 = d_K = 1` keeps the
    map C^1). The inverse solves `a xi^2 + b xi + c = 0` in bin `k` of `y`:

        a = h_k (s_k - d_k) + (y - y_k)(d_{k+1} + d_k - 2 s_k)
        b = h_k d_k - (y - y_k)(d_{k+1} + d_k - 2 s_k)
        c = -s_k (y - y_k),          xi = 2c / (-b - sqrt(b^2 - 4ac))

    exactly (no iteration). The log-det is `sum log(dy/dx)` over the
    transformed elements (minus that in the inverse, evaluated at the
    recovered `xi`). With the network's last layer zero-initialised, the
    bins are equal and every `d_k = 1`: the coupling starts as the identity.

    Args:
      net: a factory `fn(output_units) -> keras.layers.Layer`, or a Keras
        layer mapping the conditioning part to
        `outputs_per_channel(num_bins) * C_a` channels (`C_a = C/2` for
        `mask="channel"`, `C` for `"checkerboard"`); zero-initialise its
        last layer.
      num_bins: `K >= 2`.
      tail_bound: `B > 0`; the spline acts on `[-B, B]`.
      min_bin_width, min_bin_height: in `(0, 1/K)`, fractions of `2B`.
      min_derivative: `m_d` in `(0, 1)`.
      mask, parity, event_shape, event_ndims, dtype: as `AffineCoupling`.

    #### Examples

    ```python
    coupling = RationalQuadraticSplineCoupling(
        lambda output_units: tfp_glow.nets.GlowCouplingNet(64, output_units),
        num_bins=8, event_shape=(4, 4, 4))  # the factory gets (3K - 1) C_a
    ```

    #### References

    [1] Conor Durkan, Artur Bekasov, Iain Murray, George Papamakarios. Neural
        Spline Flows. NeurIPS 2019. https://arxiv.org/abs/1906.04032
    [2] J. A. Gregory, R. Delbourgo. Piecewise rational quadratic
        interpolation to monotonic data. IMA J. Numer. Anal. 2(2), 1982.
    """

    def __init__(self, net, num_bins=8, tail_bound=4.0, min_bin_width=1e-3,
                 min_bin_height=1e-3, min_derivative=1e-3, mask="channel", parity=0,
                 event_shape=None, event_ndims=3, dtype=tf.float32, validate_args=False,
                 name="spline_coupling"):
        parameters = dict(locals())
        num_bins = checks.positive_int(num_bins, "num_bins", minimum=2)
        self._tail_bound = checks.number(tail_bound, "tail_bound", minimum=0.0,
                                         exclusive_minimum=True)
        self._min_width = checks.number(min_bin_width, "min_bin_width", minimum=0.0,
                                        maximum=1.0 / num_bins, exclusive_minimum=True,
                                        exclusive_maximum=True)
        self._min_height = checks.number(min_bin_height, "min_bin_height", minimum=0.0,
                                         maximum=1.0 / num_bins, exclusive_minimum=True,
                                         exclusive_maximum=True)
        self._min_derivative = checks.number(min_derivative, "min_derivative", minimum=0.0,
                                             maximum=1.0, exclusive_minimum=True,
                                             exclusive_maximum=True)
        self._num_bins = num_bins
        # Per instance: the number of network outputs depends on `num_bins`.
        self._outputs_per_channel = self.outputs_per_channel(num_bins)
        super().__init__(net, mask=mask, parity=parity, event_shape=event_shape,
                         event_ndims=event_ndims, dtype=dtype, validate_args=validate_args,
                         parameters=parameters, name=name)

    @staticmethod
    def outputs_per_channel(num_bins):
        """`3 K - 1`: K widths, K heights, K - 1 interior derivatives."""
        return 3 * checks.positive_int(num_bins, "num_bins", minimum=2) - 1

    @property
    def num_bins(self):
        return self._num_bins

    @property
    def tail_bound(self):
        return self._tail_bound

    def _spline(self, x, h, inverse):
        k = self._num_bins
        params = tf.reshape(h, tf.concat([tf.shape(x), [3 * k - 1]], 0))
        raw_w, raw_h, raw_d = tf.split(params, [k, k, k - 1], axis=-1)
        return rational_quadratic_spline(
            x, raw_w, raw_h, raw_d, self._tail_bound, inverse=inverse,
            min_width=self._min_width, min_height=self._min_height,
            min_derivative=self._min_derivative)

    def _transform(self, x_a, h):
        return self._spline(x_a, h, inverse=False)

    def _untransform(self, y_a, h):
        return self._spline(y_a, h, inverse=True)
