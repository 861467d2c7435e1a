"""`RealNVPNet`: a Keras 3 `shift_and_log_scale_fn` for TFP's `tfb.RealNVP`."""

from collections.abc import Callable, Sequence
from typing import Any

import keras
import tensorflow as tf
from keras import layers

from tfp_glow import checks
from tfp_glow.nets._tfp_base import TFPConditioner, units_list

__all__ = ["RealNVPNet"]


@keras.saving.register_keras_serializable(package="tfp_glow")
class RealNVPNet(TFPConditioner):
    """MLP from the kept half `x0` (and a context) to a bounded affine map:

        h = MLP([x0, c])                                    hidden_units, activation
        shift, raw = split(Dense(2 * output_units)(h))      last layer zero at init
        log_scale = scale_bound * tanh(raw / scale_bound)

    `tfb.RealNVP` calls `net(x0, output_units, **condition_kwargs)` and builds
    `Shift(shift)` then `Scale(log_scale=log_scale)` from the returned pair.
    The soft clamp keeps `|log_scale| < scale_bound`, so `exp(log_scale)` can
    neither overflow nor vanish in either direction however far training
    pushes the raw output, and it is the identity near 0. With
    `zero_init_last` the flow starts as the identity.

    The network computes in its dtype policy's compute dtype and returns the
    dtype of `x0`.

    Args:
      hidden_units: list of hidden layer sizes (may be empty).
      output_units: the size of the transformed part (TFP passes it at each call).
      input_units: the size of `x0`, the part that is kept (RealNVP's `num_masked`).
      activation: hidden activation, a Keras activation name or function.
      context_size: size of `conditional_input`, or None for none.
      scale_bound: the bound of `|log_scale|`, > 0.
      zero_init_last: start the last layer's kernel and bias at zero.
      dtype: Keras dtype policy, None for the global one.

    #### Examples

    ```python
    net = tfp_glow.nets.RealNVPNet([64, 64], output_units=2, input_units=2)
    flow = tfb.RealNVP(num_masked=2, shift_and_log_scale_fn=net)
    flow.forward(tf.zeros([8, 4]))

    net = tfp_glow.nets.RealNVPNet([64], 2, 2, context_size=3)
    tfb.RealNVP(num_masked=2, shift_and_log_scale_fn=net).forward(
        x, conditional_input=c)
    ```
    """

    LISTED_SUBLAYERS = ("hidden",)

    def __init__(
        self,
        hidden_units: int | Sequence[int],
        output_units: int,
        input_units: int,
        activation: str | Callable = "relu",
        context_size: int | None = None,
        scale_bound: float = 3.0,
        zero_init_last: bool = True,
        dtype: str | tf.DType | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(context_size=context_size, dtype=dtype, **kwargs)
        self.hidden_units = units_list(hidden_units, "hidden_units")
        self.output_units = checks.positive_int(output_units, "output_units")
        self.input_units = checks.positive_int(input_units, "input_units")
        self.activation = self._get_activation(activation)
        self.scale_bound = checks.number(
            scale_bound, "scale_bound", minimum=0.0, exclusive_minimum=True
        )
        self.zero_init_last = checks.boolean(zero_init_last, "zero_init_last")
        policy = self.dtype_policy
        self.hidden = [
            layers.Dense(units, activation=self.activation, dtype=policy)
            for units in self.hidden_units
        ]
        self.dense_out = layers.Dense(
            2 * self.output_units,
            dtype=policy,
            kernel_initializer="zeros" if self.zero_init_last else "glorot_uniform",
        )
        # Built now: every variable exists at construction.
        size = self.input_units + (self.context_size or 0)
        for layer in self.hidden + [self.dense_out]:
            layer.build((None, size))
            size = layer.units
        self.built = True

    def call(self, x, output_units=None, conditional_input=None):
        if tf.is_tensor(output_units):
            output_units = tf.get_static_value(output_units)
        if output_units is not None and output_units != self.output_units:
            raise ValueError(
                f"`output_units` must be {self.output_units} (this net's "
                f"`output_units`); received {output_units!r}. Build the net with "
                "the size of the part the RealNVP transforms."
            )
        h, context, batch, static_batch, dtype = self._flatten(
            x, self.input_units, conditional_input
        )
        if context is not None:
            h = tf.concat([h, context], axis=-1)
        for layer in self.hidden:
            h = layer(h)
        shift, raw = tf.split(self.dense_out(h), 2, axis=-1)
        log_scale = self.scale_bound * tf.math.tanh(raw / self.scale_bound)
        event = [self.output_units]
        return (
            self._unflatten(shift, batch, static_batch, event, dtype),
            self._unflatten(log_scale, batch, static_batch, event, dtype),
        )

    def compute_output_shape(self, input_shape):
        shape = tuple(input_shape[:-1]) + (self.output_units,)
        return shape, shape

    def get_config(self):
        return {
            **super().get_config(),
            "hidden_units": list(self.hidden_units),
            "output_units": self.output_units,
            "input_units": self.input_units,
            "activation": self._activation_config(),
            "context_size": self.context_size,
            "scale_bound": self.scale_bound,
            "zero_init_last": self.zero_init_last,
        }
