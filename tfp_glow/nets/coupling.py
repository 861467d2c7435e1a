"""Keras 3 layers used as coupling and prior networks.

Every network ends in a zero-initialised layer, so a coupling layer starts
as the identity (additive) or a fixed contraction `sigmoid(2)` (affine) and a
deep flow is well conditioned at init (Glow section 3.3; distrax's examples).
All are Keras-serialisable (`get_config` returns constructor arguments).

The last argument of each is its output size, so a coupling can size it:
`functools.partial(GlowCouplingNet, 64)` is a factory `fn(output_units)` for
`AffineCoupling` / `AdditiveCoupling`.

Mixed precision: every network takes Keras's `dtype` (a dtype policy name
such as `"mixed_bfloat16"` or `"mixed_float16"`, or None for the global
policy set by `keras.mixed_precision.set_global_policy`) and hands it to all
of its sublayers: variables stay float32 and the arithmetic runs in the
policy's compute dtype. The couplings cast the network's input to that
compute dtype and its output back to the flow's dtype.
"""

import contextlib
import zlib
from collections.abc import Iterator
from typing import Any

import keras
import tensorflow as tf
from keras import layers

from tfp_glow import checks
from tfp_glow.thread_flag import ThreadFlag

__all__ = [
    "GlowCouplingNet",
    "ResNetCouplingNet",
    "MLPCouplingNet",
    "ZeroConv2D",
    "dropout_active",
    "is_dropout_active",
]

_DROPOUT = ThreadFlag()


@contextlib.contextmanager
def dropout_active(seed: tf.Tensor | None = None) -> Iterator[None]:
    """Inside the block, networks built with `dropout > 0` drop units.

    `FlowModel.train_step` computes its loss and its gradient inside this
    block; everything else (`log_prob`, `sample`, `encode`, `decode`,
    evaluation, export) runs outside it, so those are deterministic and the
    flow stays exactly invertible there. The flag is read when a network is
    called (so when a `tf.function` is traced): a traced training step keeps
    its dropout. Keras' `training` argument cannot do this job: the networks
    are called by bijectors inside `train_step`, not by `model(x, training=True)`.

    Args:
      seed: the step's dropout seed, a `[2]` integer tensor. Each network
        draws its masks statelessly from `(seed, its own seed, which dropout)`,
        so a network called twice in one step (the recomputation of
        `backprop="checkpoint"` or `"reversible"`) drops the same units, and a
        run resumed from a checkpoint draws the masks the uninterrupted run
        drew. `FlowModel` passes `(optimizer.iterations, replica id)`. None:
        fresh (stateful) random masks at every call.
    """
    with _DROPOUT.on(True if seed is None else seed):
        yield


def is_dropout_active() -> bool:
    """True inside `dropout_active()` (in this thread)."""
    return _DROPOUT.is_on()


def _dropout(h, rate, seed=0, position=0):
    """Inverted dropout, `h * m / (1 - rate)`, `m ~ Bernoulli(1 - rate)`, only
    inside `dropout_active()`; `seed` (the network's) and `position` (which of
    its dropouts) key the stateless mask together with the step's seed."""
    if not rate or not is_dropout_active():
        return h
    step_seed = _DROPOUT.value
    if step_seed is True:
        uniform = tf.random.uniform(tf.shape(h), dtype=tf.float32)
    else:
        fold = tf.random.experimental.stateless_fold_in
        key = fold(fold(tf.cast(step_seed, tf.int64), seed), position)
        uniform = tf.random.stateless_uniform(tf.shape(h), seed=key, dtype=tf.float32)
    keep = uniform >= rate
    return h * tf.cast(keep, h.dtype) * tf.cast(1.0 / (1.0 - rate), h.dtype)


_PACKAGE = "tfp_glow"


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ZeroConv2D(layers.Layer):
    """openai/glow's `conv2d_zeros`: `conv(x) * exp(logscale_factor * logs)`,
    all zero at init.

    The learned per-channel `logs` (scaled by `logscale_factor`, 3) lets the
    last layer of a coupling network grow its output quickly once training
    starts. `logs` is a float32 variable read in the compute dtype.
    """

    def __init__(
        self, filters: int, kernel_size: int = 3, logscale_factor: float = 3.0, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.filters = checks.positive_int(filters, "filters")
        self.kernel_size = checks.positive_int(kernel_size, "kernel_size")
        self.logscale_factor = checks.number(logscale_factor, "logscale_factor")
        self.conv = layers.Conv2D(
            filters,
            kernel_size,
            padding="same",
            kernel_initializer="zeros",
            dtype=self.dtype_policy,
        )

    def build(self, input_shape):
        self.conv.build(input_shape)
        self.logs = self.add_weight(name="logs", shape=(self.filters,), initializer="zeros")

    def call(self, x):
        scale = keras.ops.exp(keras.ops.cast(self.logs, self.compute_dtype) * self.logscale_factor)
        return self.conv(x) * scale

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.filters,)

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "kernel_size": self.kernel_size,
            "logscale_factor": self.logscale_factor,
        }


@keras.saving.register_keras_serializable(package=_PACKAGE)
class GlowCouplingNet(layers.Layer):
    """Glow's coupling network `NN()`:

        3x3 conv (hidden) -> ReLU -> [dropout] -> 1x1 conv (hidden) -> ReLU
        -> [dropout] -> ZeroConv2D(out, last_kernel)

    `dropout` (a rate in [0, 1)) drops hidden units only while a training step
    runs (`dropout_active()`), a regulariser for small data sets; `seed` (an
    int, saved in the config) keys this network's masks. Default None: a
    CRC-32 of the layer's name (the `Glow` builder passes one per flow step,
    so a rebuilt model drops the same units).
    `last_kernel` is the zero-initialised output conv's kernel size (Glow's 3;
    1 keeps a coupling with many outputs per channel, such as a spline, small).
    """

    def __init__(
        self,
        hidden_channels: int,
        out_channels: int,
        dropout: float = 0.0,
        last_kernel: int = 3,
        seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.hidden_channels = checks.positive_int(hidden_channels, "hidden_channels")
        self.out_channels = checks.positive_int(out_channels, "out_channels")
        self.dropout = checks.number(
            dropout, "dropout", minimum=0.0, maximum=1.0, exclusive_maximum=True
        )
        self.seed = (
            zlib.crc32(self.name.encode())
            if seed is None
            else checks.positive_int(seed, "seed", minimum=0)
        )
        self.last_kernel = checks.positive_int(last_kernel, "last_kernel")
        policy = self.dtype_policy
        self.conv_in = layers.Conv2D(
            hidden_channels, 3, padding="same", activation="relu", dtype=policy
        )
        self.conv_mid = layers.Conv2D(hidden_channels, 1, activation="relu", dtype=policy)
        self.conv_out = ZeroConv2D(out_channels, self.last_kernel, dtype=policy)

    def build(self, input_shape):
        self.conv_in.build(input_shape)
        hidden_shape = tuple(input_shape[:-1]) + (self.hidden_channels,)
        self.conv_mid.build(hidden_shape)
        self.conv_out.build(hidden_shape)

    def call(self, x):
        h = _dropout(self.conv_in(x), self.dropout, self.seed, 0)
        return self.conv_out(_dropout(self.conv_mid(h), self.dropout, self.seed, 1))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.out_channels,)

    def get_config(self):
        return {
            **super().get_config(),
            "hidden_channels": self.hidden_channels,
            "out_channels": self.out_channels,
            "dropout": self.dropout,
            "last_kernel": self.last_kernel,
            "seed": self.seed,
        }


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ResNetCouplingNet(layers.Layer):
    """RealNVP-style residual network:

    3x3 conv -> num_blocks x [x + conv3x3(ReLU(conv3x3(ReLU(x))))]
    -> ReLU -> ZeroConv2D(out)
    """

    def __init__(
        self, hidden_channels: int, out_channels: int, num_blocks: int = 2, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.hidden_channels = checks.positive_int(hidden_channels, "hidden_channels")
        self.out_channels = checks.positive_int(out_channels, "out_channels")
        self.num_blocks = checks.positive_int(num_blocks, "num_blocks", minimum=0)
        policy = self.dtype_policy
        self.conv_in = layers.Conv2D(hidden_channels, 3, padding="same", dtype=policy)
        self.blocks = [
            (
                layers.Conv2D(hidden_channels, 3, padding="same", activation="relu", dtype=policy),
                layers.Conv2D(hidden_channels, 3, padding="same", dtype=policy),
            )
            for _ in range(num_blocks)
        ]
        self.conv_out = ZeroConv2D(out_channels, 3, dtype=policy)

    def build(self, input_shape):
        self.conv_in.build(input_shape)
        hidden_shape = tuple(input_shape[:-1]) + (self.hidden_channels,)
        for first, second in self.blocks:
            first.build(hidden_shape)
            second.build(hidden_shape)
        self.conv_out.build(hidden_shape)

    def call(self, x):
        h = self.conv_in(x)
        for first, second in self.blocks:
            h = h + second(first(keras.ops.relu(h)))
        return self.conv_out(keras.ops.relu(h))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.out_channels,)

    def get_config(self):
        return {
            **super().get_config(),
            "hidden_channels": self.hidden_channels,
            "out_channels": self.out_channels,
            "num_blocks": self.num_blocks,
        }


@keras.saving.register_keras_serializable(package=_PACKAGE)
class MLPCouplingNet(layers.Layer):
    """Fully connected network for vector data (NICE, 2-D toy densities):

    num_hidden_layers x Dense(hidden_units, ReLU) -> Dense(out, zeros)
    """

    def __init__(
        self, hidden_units: int, out_units: int, num_hidden_layers: int = 2, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.hidden_units = checks.positive_int(hidden_units, "hidden_units")
        self.out_units = checks.positive_int(out_units, "out_units")
        self.num_hidden_layers = checks.positive_int(
            num_hidden_layers, "num_hidden_layers", minimum=0
        )
        policy = self.dtype_policy
        self.hidden = [
            layers.Dense(hidden_units, activation="relu", dtype=policy)
            for _ in range(num_hidden_layers)
        ]
        self.dense_out = layers.Dense(out_units, kernel_initializer="zeros", dtype=policy)

    def build(self, input_shape):
        shape = tuple(input_shape)
        for layer in self.hidden:
            layer.build(shape)
            shape = shape[:-1] + (self.hidden_units,)
        self.dense_out.build(shape)

    def call(self, x):
        for layer in self.hidden:
            x = layer(x)
        return self.dense_out(x)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.out_units,)

    def get_config(self):
        return {
            **super().get_config(),
            "hidden_units": self.hidden_units,
            "out_units": self.out_units,
            "num_hidden_layers": self.num_hidden_layers,
        }
