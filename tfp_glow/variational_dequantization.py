"""Variational dequantization (Flow++, Ho et al. 2019): a conditional flow `q(u | k)`.

Uniform dequantization feeds the flow `x = (k + u) / B - 0.5` with
`u ~ U(0, 1)^D`, which bounds the discrete likelihood of the levels `k`:

    log P(k) >= E_{u ~ U}[log p(x)] - D log B.

A learned noise distribution `q(u | k)` on `(0, 1)^D` gives the bound

    log P(k) >= E_{u ~ q(.|k)}[log p(x) - log q(u | k)] - D log B,

tight when `q(u | k)` is the flow's own density of `u` inside the bin `k`;
with `q = U(0, 1)^D` (`log q = 0`) it is the uniform bound again. Training
`p` and `q` jointly on this bound frees the flow from having to model the
flat boxes that uniform noise draws inside every bin.

`q(u | k)` is itself a flow, conditioned on the bin centres
`c = (k + 1/2) / B - 1/2` through a small convolutional context network `h(c)`:

    eps ~ N(0, I)
    y_0 = eps * exp(s_0(h)) + t_0(h)                     (conditional affine)
    y_i = m_i * y_{i-1} + (1 - m_i) * (y_{i-1} * exp(s_i) + t_i),
          (s_i, t_i) = net_i([m_i * y_{i-1}, h])          (checkerboard couplings)
    u   = a + (1 - 2a) sigmoid(y_n)                       (a = 1e-4: u stays in its bin)
    log q(u | k) = log N(eps; 0, I) - sum(s_0) - sum_i sum((1 - m_i) s_i)
                   - sum(log sigmoid(y_n) + log sigmoid(-y_n)) - D log(1 - 2a),

with log-scales `s = tanh(raw)` (each step scales by at most e) and every last
convolution zero-initialised, so at the start `u = a + (1 - 2a) sigmoid(eps)`. The margin
`a` is the data pipelines' (`tfp_glow.dequantization`): float32 rounding of `(k + u) / B - 0.5`
keeps every value inside bin `k`, and a `q` that saturates the sigmoid is
penalised by its own `log q`, never credited.

The noise `eps` is not drawn here: it is read off the data. The pipelines
(`tfp_glow.data`, and any that feed `x = (k + v) / B - 0.5` with
`v ~ U(0, 1)`) already carry a uniform draw `v = (x + 1/2) B - k` in every
value, and `eps = Phi^-1(v)` is a standard normal draw. So the bound is
estimated with the pipeline's own noise: fresh each epoch in training, fixed
per example in evaluation (`evaluate` at any batch size gives one figure),
and the bin-centre images (`v = 1/2`, `dequantize=False`) map to `eps = 0`.
"""

import math
from collections.abc import Sequence
from typing import Any

import keras
import tensorflow as tf
from keras import layers

from tfp_glow import checks
from tfp_glow._checkpoint_tracking import ListedSublayers
from tfp_glow.dequantization import EDGE_MARGIN
from tfp_glow.nets import ZeroConv2D

__all__ = ["VariationalDequantizer"]

# `v` is clipped into [_V_EDGE, 1 - _V_EDGE] before `Phi^-1`, so a value on a
# bin edge (v = 0 from a protocol drawing U[0, 1)) gives a finite eps (|eps| < 4.8).
_V_EDGE = 1e-6


def _checkerboard(shape, parity, dtype):
    """`[H, W, 1]` mask, 1 where `(i + j) % 2 == parity` (kept, conditions the rest)."""
    h, w = shape[0], shape[1]
    ij = tf.range(h)[:, None] + tf.range(w)[None, :]
    return tf.cast(tf.equal(ij % 2, parity), dtype)[..., None]


@keras.saving.register_keras_serializable(package="tfp_glow")
class VariationalDequantizer(ListedSublayers, layers.Layer):
    """The noise distribution `q(u | k)` of variational dequantization (module docstring).

    Args:
      event_shape: `(H, W, C)` of one image.
      num_bins: discrete levels `B` of the data (17 for the built-in digits).
      hidden_channels: width of the context network and of each coupling network.
      num_steps: checkerboard coupling steps after the conditional affine one.

    `call(x)` takes uniformly dequantized (or bin-centre) data in [-0.5, 0.5]
    and returns `(x_q, log_q)`: the same images re-dequantized with
    `u ~ q(u | k)`, `x_q = (k + u) / B - 0.5`, and `log q(u | k)` per example.
    """

    LISTED_SUBLAYERS = ("context", "step_nets")

    def __init__(
        self,
        event_shape: Sequence[int],
        num_bins: int,
        hidden_channels: int = 16,
        num_steps: int = 3,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        shape = checks.shape(event_shape, "event_shape")
        if len(shape) != 3:
            raise ValueError(
                f"Variational dequantization needs image data, `event_shape` (H, W, C); "
                f"got {tuple(shape)}."
            )
        if num_bins is None:
            raise ValueError(
                "Variational dequantization needs discrete data: `num_bins` "
                "must be an int >= 2, not None."
            )
        self.event_shape = tuple(int(d) for d in shape)
        self.num_bins = checks.positive_int(num_bins, "num_bins", minimum=2)
        self.hidden_channels = checks.positive_int(hidden_channels, "hidden_channels")
        self.num_steps = checks.positive_int(num_steps, "num_steps", minimum=0)
        channels = self.event_shape[-1]
        width = self.hidden_channels
        conv = dict(padding="same", dtype=self.dtype_policy)
        self.context = [
            layers.Conv2D(width, 3, activation="relu", **conv),
            layers.Conv2D(width, 3, activation="relu", **conv),
        ]
        self.affine = ZeroConv2D(2 * channels, 3, dtype=self.dtype_policy)
        self.step_nets = [
            [
                layers.Conv2D(width, 3, activation="relu", **conv),
                ZeroConv2D(2 * channels, 3, dtype=self.dtype_policy),
            ]
            for _ in range(self.num_steps)
        ]
        self.build((None, *self.event_shape))

    def build(self, input_shape):
        if self.built:
            return
        channels = self.event_shape[-1]
        image = (None, *self.event_shape[:2])
        h_shape = image + (self.hidden_channels,)
        self.context[0].build(image + (channels,))
        self.context[1].build(h_shape)
        self.affine.build(h_shape)
        for hidden, last in self.step_nets:
            hidden.build(image + (channels + self.hidden_channels,))
            last.build(h_shape)
        self.built = True

    def levels_and_noise(self, x):
        """`(k, v)`: the levels `floor((x + 1/2) B)` and the uniform draw `v` in each value."""
        scaled = (x + 0.5) * float(self.num_bins)
        k = tf.clip_by_value(tf.floor(scaled), 0.0, float(self.num_bins - 1))
        v = tf.clip_by_value(scaled - k, _V_EDGE, 1.0 - _V_EDGE)
        return k, v

    @staticmethod
    def _scale_shift(raw):
        raw_s, shift = tf.split(raw, 2, axis=-1)
        return tf.tanh(raw_s), shift

    def noise_and_log_q(self, k, eps):
        """`(u, log q(u | k))` for levels `k` and standard-normal `eps` (the flow of q)."""
        centre = (k + 0.5) / float(self.num_bins) - 0.5
        h = self.context[1](self.context[0](centre))
        log_s, shift = self._scale_shift(self.affine(h))
        y = eps * tf.exp(log_s) + shift
        log_det = tf.reduce_sum(log_s, axis=[1, 2, 3])
        for i, (hidden, last) in enumerate(self.step_nets):
            mask = _checkerboard(self.event_shape, i % 2, y.dtype)
            log_s, shift = self._scale_shift(last(hidden(tf.concat([y * mask, h], -1))))
            y = mask * y + (1.0 - mask) * (y * tf.exp(log_s) + shift)
            log_det += tf.reduce_sum((1.0 - mask) * log_s, axis=[1, 2, 3])
        d = float(math.prod(self.event_shape))
        u = EDGE_MARGIN + (1.0 - 2.0 * EDGE_MARGIN) * tf.sigmoid(y)
        log_det += tf.reduce_sum(
            tf.math.log_sigmoid(y) + tf.math.log_sigmoid(-y), axis=[1, 2, 3]
        ) + d * math.log1p(-2.0 * EDGE_MARGIN)
        log_normal = -0.5 * tf.reduce_sum(tf.square(eps), axis=[1, 2, 3]) - 0.5 * d * math.log(
            2.0 * math.pi
        )
        return u, log_normal - log_det

    def call(self, x):
        k, v = self.levels_and_noise(x)
        # The data's noise is an input, not a parameter: no gradient flows into it.
        eps = tf.stop_gradient(tf.math.ndtri(v))
        u, log_q = self.noise_and_log_q(k, eps)
        return (k + u) / float(self.num_bins) - 0.5, log_q

    def get_config(self):
        return {
            **super().get_config(),
            "event_shape": self.event_shape,
            "num_bins": self.num_bins,
            "hidden_channels": self.hidden_channels,
            "num_steps": self.num_steps,
        }
