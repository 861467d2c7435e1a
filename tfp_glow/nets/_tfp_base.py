"""`TFPConditioner`: what every network that TFP's own bijectors call shares.

TFP's `MaskedAutoregressiveFlow`, `RealNVP` and `FFJORD` call their networks
with TFP's tensors (any batch shape, the flow's dtype), sometimes with a Python
int positionally (RealNVP's `output_units`), and build `Shift`/`Scale`/spline
bijectors from the result, which must have the flow's dtype. A Keras layer
does neither by default: it refuses non-tensor positional arguments and casts
every input to its compute dtype, losing the caller's. So these layers take
their inputs as they come, compute in the policy's compute dtype (float32
variables, bfloat16/float16 arithmetic under a mixed policy) and cast their
outputs back to the input's dtype, the job the couplings do for the nets in
`coupling.py`.

The optional context (`context_size`, TFP's `conditional_input`) is a vector
per example whose batch shape broadcasts against the input's. A context of
any shape is given as `context_shape=` instead (e.g. `(4, 4, 1)`, an image):
its last `len(context_shape)` axes are flattened into `prod(context_shape)`
features, so a conditional flow hands every network the same context.
"""

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from tfp_glow import checks
from tfp_glow._checkpoint_tracking import ListedSublayers

__all__ = ["TFPConditioner", "units_list"]


def units_list(value, arg_name):
    """`value` as a list of positive Python ints (possibly empty: no hidden layer)."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(f"`{arg_name}` must be a list of positive ints; received {value!r}.")
    return [checks.positive_int(units, arg_name) for units in value]


class TFPConditioner(ListedSublayers, layers.Layer):
    """Base layer: input flattening, context checks, dtype handling.

    Subclasses create every variable in `__init__` (the input sizes are
    constructor arguments) and set `self.built = True`, so the variables exist
    before the first call, as the rest of the library expects. Whatever they
    keep in lists (layers, variables) they name in `LISTED_SUBLAYERS`:
    `tf.train.Checkpoint` does not follow a Keras layer's lists by itself.
    """

    def __init__(self, context_size=None, context_shape=None, **kwargs):
        super().__init__(**kwargs)
        self.context_size = checks.positive_int(context_size, "context_size", allow_none=True)
        self.context_shape = None
        if context_shape is not None:
            shape = checks.shape(context_shape, "context_shape")
            if not shape or not all(d > 0 for d in shape):
                raise ValueError(
                    f"`context_shape` must be a non-empty shape of positive ints; "
                    f"received {context_shape!r}."
                )
            size = int(np.prod(shape))
            if self.context_size not in (None, size):
                raise ValueError(
                    f"`context_size` ({self.context_size}) must be prod(context_shape) = "
                    f"{size} when both are given; received context_shape={context_shape!r}."
                )
            self.context_shape, self.context_size = tuple(int(d) for d in shape), size
        # See the module docstring: keep the caller's dtype, accept Python ints.
        self._convert_input_args = False
        self._allow_non_tensor_positional_args = True

    @staticmethod
    def _get_activation(activation):
        try:
            return keras.activations.get(activation)
        except (ValueError, TypeError) as error:
            raise ValueError(
                f"`activation` must be a Keras activation name or function; "
                f"received {activation!r} ({error})."
            ) from None

    def _activation_config(self):
        return keras.activations.serialize(self.activation)

    def _to_compute(self, value, arg_name):
        value = tf.convert_to_tensor(value, dtype_hint=self.compute_dtype)
        if not value.dtype.is_floating:
            raise TypeError(
                f"`{arg_name}` must be a floating tensor; received dtype {value.dtype.name}."
            )
        return value

    def _flatten(self, x, size, conditional_input, arg_name="x"):
        """`x [..., size]` (and the context) as 2-D compute-dtype tensors.

        Returns `(x_2d, context_2d or None, batch_shape, static_batch_shape,
        dtype)`: the broadcast batch shape of `x` and the context, and `x`'s
        dtype, the one the outputs are cast back to.
        """
        x = self._to_compute(x, arg_name)
        if x.shape.rank == 0 or x.shape[-1] not in (None, size):
            raise ValueError(
                f"`{arg_name}` must have shape [..., {size}] for {self.name}; "
                f"received shape {x.shape}."
            )
        dtype = x.dtype
        batch, static_batch = tf.shape(x)[:-1], x.shape[:-1]
        context = self._check_context(conditional_input)
        if context is not None:
            batch = tf.broadcast_dynamic_shape(batch, tf.shape(context)[:-1])
            static_batch = tf.broadcast_static_shape(static_batch, context.shape[:-1])
            context = tf.reshape(
                tf.broadcast_to(context, tf.concat([batch, [self.context_size]], 0)),
                [-1, self.context_size],
            )
            context = tf.cast(context, self.compute_dtype)
            x = tf.broadcast_to(x, tf.concat([batch, [size]], 0))
        x = tf.cast(tf.reshape(x, [-1, size]), self.compute_dtype)
        return x, context, batch, static_batch, dtype

    def _check_context(self, conditional_input):
        if self.context_size is None:
            if conditional_input is not None:
                raise ValueError(
                    f"{self.name} got a `conditional_input` but was built with "
                    "`context_size=None`; pass `context_size=` to condition it."
                )
            return None
        if conditional_input is None:
            raise ValueError(
                f"{self.name} was built with `context_size={self.context_size}`: "
                "pass `conditional_input=` (TFP's `bijector_kwargs`)."
            )
        context = self._to_compute(conditional_input, "conditional_input")
        if self.context_shape is not None:
            context = self._flatten_context(context)
        if context.shape.rank == 0 or context.shape[-1] not in (None, self.context_size):
            raise ValueError(
                f"`conditional_input` must have shape [..., {self.context_size}] "
                f"(`context_size`); received shape {context.shape}."
            )
        return context

    def _flatten_context(self, context):
        """`[batch..., *context_shape]` -> `[batch..., prod(context_shape)]`."""
        n = len(self.context_shape)
        rank = context.shape.rank
        if rank is None or rank < n + 1 or tuple(context.shape[rank - n :]) != self.context_shape:
            raise ValueError(
                f"`conditional_input` must have shape [batch, "
                f"{', '.join(map(str, self.context_shape))}] (`context_shape`) for "
                f"{self.name}; received shape {context.shape}."
            )
        flat = tf.reshape(context, tf.concat([tf.shape(context)[: rank - n], [-1]], 0))
        flat.set_shape(context.shape[: rank - n].concatenate([self.context_size]))
        return flat

    def get_config(self):
        config = super().get_config()
        if self.context_shape is not None:
            config["context_shape"] = list(self.context_shape)
        return config

    @staticmethod
    def _unflatten(y, batch, static_batch, event, dtype):
        """`y [N, prod(event)]` back to `batch + event` in `dtype`."""
        y = tf.reshape(y, tf.concat([batch, event], 0))
        y.set_shape(static_batch.concatenate(event))
        return tf.cast(y, dtype)
