"""`ODENet` and `ffjord_trace`: a Keras 3 vector field for TFP's `tfb.FFJORD`."""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import keras
import tensorflow as tf
import tensorflow_probability as tfp
from keras import layers

from tfp_glow import checks
from tfp_glow.nets._tfp_base import TFPConditioner, units_list

__all__ = ["ODENet", "ffjord_trace"]


@keras.saving.register_keras_serializable(package="tfp_glow")
class ODENet(TFPConditioner):
    """Time-conditioned MLP `f(t, z, c) = dz/dt` for a continuous flow:

        h_0 = [z, t, c]
        h_l = activation(Dense_l([h_{l-1}, t]))       l = 1..L  (h_1 from h_0)
        dz/dt = Dense_out([h_L, t])

    Time is one more input feature of every layer (the plain concatenation
    variant of FFJORD's networks), so the field can change along the
    trajectory. `tfb.FFJORD` calls `net(time, state, **condition_kwargs)`
    with a scalar `time`; `state` may have any batch shape. A smooth
    activation ("tanh", the default) keeps the field differentiable, which
    the ODE solver's step control and the trace's derivative rely on.

    The network computes in its dtype policy's compute dtype and returns the
    dtype of `state`.

    Args:
      event_size: D, the size of the state's last axis.
      hidden_units: list of hidden layer sizes (may be empty: a linear field).
      activation: hidden activation, a Keras activation name or function.
      context_size: size of `conditional_input`, or None for none.
      dtype: Keras dtype policy, None for the global one.

    #### Examples

    ```python
    net = tfp_glow.nets.ODENet(event_size=2, hidden_units=[32, 32])
    ffjord = tfb.FFJORD(state_time_derivative_fn=net,
                        trace_augmentation_fn=tfp_glow.nets.ffjord_trace(exact=True))
    ffjord.forward(tf.zeros([8, 2]))
    ```

    #### References

    [1]: Grathwohl, Chen, Bettencourt, Sutskever, Duvenaud. FFJORD: Free-form
         Continuous Dynamics for Scalable Reversible Generative Models.
         ICLR 2019. https://arxiv.org/abs/1810.01367
    """

    LISTED_SUBLAYERS = ("hidden",)

    def __init__(
        self,
        event_size: int,
        hidden_units: int | Sequence[int],
        activation: str | Callable = "tanh",
        context_size: int | None = None,
        dtype: str | tf.DType | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(context_size=context_size, dtype=dtype, **kwargs)
        self.event_size = checks.positive_int(event_size, "event_size")
        self.hidden_units = units_list(hidden_units, "hidden_units")
        self.activation = self._get_activation(activation)
        policy = self.dtype_policy
        self.hidden = [
            layers.Dense(units, activation=self.activation, dtype=policy)
            for units in self.hidden_units
        ]
        self.dense_out = layers.Dense(self.event_size, dtype=policy)
        # Built now: every variable exists at construction. Each layer's input
        # is the layer below plus the time feature.
        size = self.event_size + (self.context_size or 0)
        for layer in self.hidden + [self.dense_out]:
            layer.build((None, size + 1))
            size = layer.units
        self.built = True

    def call(self, time, state, conditional_input=None):
        z, context, batch, static_batch, dtype = self._flatten(
            state, self.event_size, conditional_input, "state"
        )
        # `time` is a scalar (TFP's solver) or anything broadcasting to the batch.
        time = tf.cast(self._to_compute(time, "time"), self.compute_dtype)
        t = tf.reshape(tf.broadcast_to(time, batch), [-1, 1])
        h = z if context is None else tf.concat([z, context], axis=-1)
        for layer in self.hidden:
            h = layer(tf.concat([h, t], axis=-1))
        dz = self.dense_out(tf.concat([h, t], axis=-1))
        return self._unflatten(dz, batch, static_batch, [self.event_size], dtype)

    def compute_output_shape(self, time_shape, state_shape):
        return tuple(state_shape)

    def get_config(self):
        return {
            **super().get_config(),
            "event_size": self.event_size,
            "hidden_units": list(self.hidden_units),
            "activation": self._activation_config(),
            "context_size": self.context_size,
        }


def ffjord_trace(
    exact: bool = True, num_samples: int = 1, seed: int | None = None
) -> Callable[..., Any]:
    """The `trace_augmentation_fn` for `tfb.FFJORD`.

    The log-det of a continuous flow is `integral of tr(df/dz) dt`.
    `exact=True`: `tfb.ffjord.trace_jacobian_exact`, the diagonal of the
    Jacobian by D backward passes (cost grows with D; exact). `exact=False`:
    Hutchinson's estimator (`tfb.ffjord.trace_jacobian_hutchinson`),
    `tr(A) ~ mean_i r_i^T A r_i` with `num_samples` standard normal `r_i` per
    solve, unbiased, one vector-Jacobian product per sample: FFJORD's choice
    for large D, at the price of a noisy log-det (fine for a training loss,
    not for reporting a density).

    Args:
      exact: True for the exact trace, False for Hutchinson's estimate.
      num_samples: number of probe vectors per ODE solve (only with exact=False).
      seed: int seed for the probes (`tf.random.normal`'s op seed), or None.

    #### Examples

    ```python
    tfb.FFJORD(state_time_derivative_fn=net,
               trace_augmentation_fn=ffjord_trace(exact=False, num_samples=4))
    ```
    """
    exact = checks.boolean(exact, "exact")
    num_samples = checks.positive_int(num_samples, "num_samples")
    seed = checks.positive_int(seed, "seed", minimum=0, allow_none=True)
    if exact:
        return tfp.bijectors.ffjord.trace_jacobian_exact
    return functools.partial(
        tfp.bijectors.ffjord.trace_jacobian_hutchinson, num_samples=num_samples, seed=seed
    )
