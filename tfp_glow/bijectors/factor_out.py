"""The learned split prior of Glow's multi-scale architecture."""

from collections.abc import Sequence

import keras
import tensorflow as tf

from tfp_glow.bijectors import _precision, _shapes
from tfp_glow.bijectors.standardize import StandardizeBase

__all__ = ["FactorOut"]


class FactorOut(StandardizeBase):
    """Standardises the channels about to be factored out, given the rest.

    With `x = [z, h]` split on channels (`z` the first `num_factored`):

        (mu, log_sigma) = prior_net(h)           (+ class offsets)
        forward:  [z, h] -> [(z - mu) * exp(-log_sigma), h]
        log|det J| = -sum(log_sigma)

    i.e. `z | h ~ N(mu(h), sigma(h)^2)`, openai/glow's `split2d` prior. The
    default `prior_net` is a zero-initialised 3x3 convolution (a dense layer
    for vectors), so the layer is the identity at init. The multi-scale flow
    then removes `z` with `tfb.Split` and keeps transforming `h`.

    Conditional (`num_classes` or `context_shape`, the context passed as
    `conditional_input`): a zero-initialised map of the context adds to
    `(mu, log_sigma)`, per channel (vector context) or per position (image
    context, resized to the event's height and width); see
    `tfp_glow.bijectors.standardize`.

    `split_fraction` picks `num_factored = round(channels * split_fraction)`
    (any value leaving at least one channel on each side).

    `net_dtype` is the Keras dtype policy of the default `prior_net`: None
    (the bijector's dtype) or e.g. `"mixed_bfloat16"` (float32 variables,
    bfloat16 arithmetic). The prior net's input is cast to its compute dtype
    and `(mu, log_sigma)` back to the bijector's dtype, where the
    standardisation and its log-det are computed.
    """

    def __init__(
        self,
        channels: int,
        split_fraction: float = 0.5,
        prior_net: keras.layers.Layer | None = None,
        num_classes: int | None = None,
        event_ndims: int = 3,
        dtype: tf.DType | str = tf.float32,
        validate_args: bool = False,
        name: str = "factor_out",
        net_dtype: str | keras.DTypePolicy | None = None,
        context_shape: Sequence[int] | None = None,
    ) -> None:
        parameters = dict(locals())
        _shapes.validate_positive_int(channels, "channels")
        if not 0.0 < float(split_fraction) < 1.0:
            raise ValueError(f"`split_fraction` must be in (0, 1); got {split_fraction!r}.")
        k = int(round(channels * float(split_fraction)))
        if not 0 < k < channels:
            raise ValueError(
                f"`split_fraction`={split_fraction} of {channels} channels leaves "
                f"nothing on one side; choose a fraction giving 1..{channels - 1}."
            )
        self._channels = channels
        self._num_factored = k
        super().__init__(
            num_classes,
            k,
            event_ndims,
            dtype,
            parameters,
            name,
            validate_args,
            context_shape=context_shape,
        )
        policy = _precision.net_policy(net_dtype, dtype)
        if prior_net is not None and net_dtype is not None:
            raise ValueError(
                "`net_dtype` sets the dtype policy of the default prior net only; with "
                "your own `prior_net`, give that layer its dtype instead."
            )
        if prior_net is None:
            layer_cls = keras.layers.Conv2D if event_ndims == 3 else keras.layers.Dense
            kwargs = dict(kernel_size=3, padding="same") if event_ndims == 3 else {}
            prior_net = layer_cls(
                2 * k,
                kernel_initializer="zeros",
                bias_initializer="zeros",
                dtype=policy,
                name=f"{self.name}_prior",
                **kwargs,
            )
            prior_net.build((None,) + (None,) * (event_ndims - 1) + (channels - k,))
        self._prior_net = prior_net
        self._track_layers(prior_net)

    @property
    def channels(self):
        """Channels of the input, factored and kept together."""
        return self._channels

    @property
    def num_factored(self):
        """Channels standardised here and factored out by the flow."""
        return self._num_factored

    @property
    def prior_net(self):
        """Network from the kept channels to `(mu, log_sigma)` (default: a zero-initialised
        3x3 conv, or Dense for vectors, so the prior starts as N(0, I))."""
        return self._prior_net

    def _parts(self, x):
        _shapes.check_event_rank(x, self._event_ndims)
        _shapes.check_channels(x, self._channels)
        # One Split op (its gradient is a concat, not two zero-filled scatters).
        return tf.split(x, [self._num_factored, self._channels - self._num_factored], axis=-1)

    def _join(self, z, rest):
        return tf.concat([z, rest], axis=-1)

    def _mean_and_log_scale(self, rest):
        h = _shapes.call_with_one_batch_axis(
            self._prior_net, _precision.to_net_dtype(self._prior_net, rest), self._event_ndims
        )
        h = _precision.to_flow_dtype(h, rest.dtype)
        return tf.split(h, 2, axis=-1)
