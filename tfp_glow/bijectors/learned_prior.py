"""The learned top prior of Glow (`learntop`), as a bijector."""

from collections.abc import Sequence

import tensorflow as tf

from tfp_glow import checks
from tfp_glow.bijectors._state import ParameterLayer
from tfp_glow.bijectors.standardize import StandardizeBase

__all__ = ["LearnedPrior"]


class LearnedPrior(StandardizeBase):
    """`z ~ N(mu, sigma^2)` with `mu`, `log sigma` learned per position.

        forward:  z' = (z - mu) * exp(-log_sigma)
        log|det J| = -sum(log_sigma)

    Both start at zero (the identity). With `num_classes`, a per-class
    per-channel offset is added (openai/glow's `ycond`), so sampling draws the
    chosen class; with `context_shape`, a zero-initialised map of the context
    (`conditional_input`) gives the offsets: linear for a vector context,
    per position from a conv of the resized image context (see
    `tfp_glow.bijectors.standardize`).

    `mu` and `log_sigma` depend on the variables and the labels
    (`conditional_input`), never on `z`: the map is affine in `z` and its
    Jacobian `diag(exp(-log_sigma))` constant (`is_constant_jacobian`), so a
    `tfd.TransformedDistribution` built on it alone or with other affine
    bijectors (ActNorm, the 1x1 convolution, Squeeze) has a `mean`, `mode`
    and `entropy`. Class-conditional: pass the labels `[N]` in
    `bijector_kwargs` and give the base distribution the batch shape `[N]`
    (e.g. `tfd.Sample(tfd.Normal(tf.zeros([N]), 1.0), event_shape)`), one
    distribution per label.
    """

    def __init__(
        self,
        event_shape: Sequence[int],
        num_classes: int | None = None,
        dtype: tf.DType | str = tf.float32,
        validate_args: bool = False,
        name: str = "learned_prior",
        context_shape: Sequence[int] | None = None,
    ) -> None:
        parameters = dict(locals())
        event_shape = checks.shape(event_shape, "event_shape")
        self._event_shape_in = event_shape
        super().__init__(
            num_classes,
            event_shape[-1],
            len(event_shape),
            dtype,
            parameters,
            name,
            validate_args,
            is_constant_jacobian=True,
            context_shape=context_shape,
        )
        state = ParameterLayer(dtype=self.dtype.name, name=f"{self.name}_params")
        self.mean = state.add("mean", event_shape)
        self.log_scale = state.add("log_scale", event_shape)
        self._track_layers(state)

    def _parts(self, x):
        shape = tuple(x.shape[-len(self._event_shape_in) :])
        if x.shape.rank is not None and (
            x.shape.rank < len(self._event_shape_in)
            or not all(a is None or a == b for a, b in zip(shape, self._event_shape_in))
        ):
            raise ValueError(
                f"`x` must end in the event shape {self._event_shape_in}; got shape {x.shape}."
            )
        return x, None

    def _join(self, z, rest):
        return z

    def _mean_and_log_scale(self, rest):
        return (tf.convert_to_tensor(self.mean), tf.convert_to_tensor(self.log_scale))
