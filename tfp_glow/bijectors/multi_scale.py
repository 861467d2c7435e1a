"""Multi-scale architecture (RealNVP section 3.6, Glow figure 2b)."""

from collections.abc import Sequence

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_glow import checks
from tfp_glow.bijectors import _shapes
from tfp_glow.bijectors.base import FlowBijector, forward_and_log_det, inverse_and_log_det
from tfp_glow.bijectors.factor_out import FactorOut

tfb = tfp.bijectors

__all__ = ["MultiScaleFlow"]


class MultiScaleFlow(FlowBijector):
    """Maps an event `[H, W, C]` (or `[D]`) to one flat latent vector.

    Normalizing direction, for each level `l`:

        h = steps_l(h)                          (squeeze, K flow steps, ...)
        h = factor_out_l(h)                     (split prior standardises z_l)
        z_l, h = tfb.Split([k_l, C_l - k_l])(h) (z_l leaves the flow)

    then `z_top = top_prior(h)` and the output is
    `concat([flatten(z_1), ..., flatten(z_L), flatten(z_top)])`, a vector of
    the same size `D` as the input, whose standard normal density is the
    model's prior. The log-det is the sum over every stage. Factored latents
    skip the remaining levels, which is where multi-scale flows save compute.

    `levels` is a sequence of `(steps, factor_out)` pairs: `steps` any
    bijector on the level's event (a `tfb.Chain` of tfp_glow bijectors),
    `factor_out` a `FactorOut` or `None` (no split at that level). kwargs such
    as `conditional_input` reach every tfp_glow bijector inside.
    """

    def __init__(
        self,
        event_shape: Sequence[int],
        levels: Sequence[tuple[tfp.bijectors.Bijector, FactorOut | None]],
        top_prior: tfp.bijectors.Bijector | None = None,
        validate_args: bool = False,
        name: str = "multi_scale_flow",
    ) -> None:
        parameters = dict(locals())
        event_shape = checks.shape(event_shape, "event_shape", rank=(1, 3))
        if not levels:
            raise ValueError("`levels` must contain at least one (steps, factor_out) pair.")
        self._event_shape_in = event_shape
        self._levels = [(steps, fo) for steps, fo in levels]
        self._top_prior = top_prior
        self._event_ndims = len(event_shape)
        shape = tf.TensorShape(event_shape)
        self._latent_shapes, self._splits = [], []
        self._level_ndims, self._level_out_ndims = [], []
        for i, (steps, fo) in enumerate(self._levels):
            self._level_ndims.append(len(shape))
            shape = steps.forward_event_shape(shape)
            self._level_out_ndims.append(len(shape))
            if not shape.is_fully_defined():
                raise ValueError(f"Level {i} gives an undefined event shape {shape}.")
            if fo is not None:
                if not isinstance(fo, FactorOut):
                    raise TypeError(f"Level {i}: factor_out must be a FactorOut; got {fo!r}.")
                if fo.channels != shape[-1]:
                    raise ValueError(
                        f"Level {i}: FactorOut expects {fo.channels} channels but "
                        f"the steps produce event shape {shape}."
                    )
                k = fo.num_factored
                self._splits.append(tfb.Split([k, shape[-1] - k], axis=-1))
                self._latent_shapes.append(tuple(shape[:-1]) + (k,))
                shape = tf.TensorShape(tuple(shape[:-1]) + (shape[-1] - k,))
            else:
                self._splits.append(None)
        self._latent_shapes.append(tuple(shape))
        self._latent_sizes = [int(np.prod(s)) for s in self._latent_shapes]
        if sum(self._latent_sizes) != int(np.prod(event_shape)):
            raise ValueError("The levels do not preserve the number of dimensions.")
        super().__init__(
            forward_min_event_ndims=self._event_ndims,
            inverse_min_event_ndims=1,
            validate_args=validate_args,
            parameters=parameters,
            name=name,
        )
        self._bijectors = [
            b for steps, fo in self._levels for b in (steps, fo) if b is not None
        ] + ([top_prior] if top_prior else [])

    @property
    def bijectors(self):
        """Every stage, in normalizing order (for layer discovery)."""
        return list(self._bijectors)

    @property
    def levels(self):
        """`(Chain of flow steps, FactorOut or None)` per level, data side first."""
        return list(self._levels)

    @property
    def top_prior(self):
        """The `LearnedPrior` on the last level's output, or None."""
        return self._top_prior

    @property
    def latent_shapes(self):
        """Shapes of `z_1, ..., z_L, z_top` inside the flat latent."""
        return list(self._latent_shapes)

    @property
    def latent_size(self):
        """Length of the flat latent vector (= the number of data dimensions)."""
        return sum(self._latent_sizes)

    # Event shapes keep any batch prefix, as tfb.Reshape and tfb.Split do:
    # forward_event_shape([N, H, W, C]) == [N, D].
    def _forward_event_shape(self, input_shape):
        parts = _shapes.event_shape_parts(input_shape, self._event_ndims, "input_shape")
        if parts is None:
            return tf.TensorShape(None)
        if not parts[1].is_compatible_with(self._event_shape_in):
            raise ValueError(
                f"`input_shape` must end in the event shape "
                f"{self._event_shape_in}; got {tf.TensorShape(input_shape)}."
            )
        return parts[0].concatenate([self.latent_size])

    def _inverse_event_shape(self, output_shape):
        parts = _shapes.event_shape_parts(output_shape, 1, "output_shape")
        if parts is None:
            return tf.TensorShape(None)
        if not parts[1].is_compatible_with([self.latent_size]):
            raise ValueError(
                f"`output_shape` must end in the latent size "
                f"{self.latent_size}; got {tf.TensorShape(output_shape)}."
            )
        return parts[0].concatenate(self._event_shape_in)

    def _forward_event_shape_tensor(self, input_shape):
        return tf.concat(
            [input_shape[: tf.size(input_shape) - self._event_ndims], [self.latent_size]], 0
        )

    def _inverse_event_shape_tensor(self, output_shape):
        return tf.concat([output_shape[:-1], self._event_shape_in], 0)

    def _flatten(self, z, ndims):
        return tf.reshape(z, tf.concat([tf.shape(z)[:-ndims], [-1]], 0))

    def split_latent(self, z):
        """Flat latent `[..., D]` -> `[z_1, ..., z_L, z_top]` in their shapes."""
        parts = tf.split(z, self._latent_sizes, axis=-1)
        batch = tf.shape(z)[:-1]
        return [tf.reshape(p, tf.concat([batch, s], 0)) for p, s in zip(parts, self._latent_shapes)]

    def _check(self, x):
        shape = tuple(x.shape[-self._event_ndims :]) if x.shape.rank else ()
        if x.shape.rank is not None and (
            x.shape.rank < self._event_ndims
            or not all(a is None or a == b for a, b in zip(shape, self._event_shape_in))
        ):
            raise ValueError(
                f"`x` must have shape [batch, {', '.join(map(str, self._event_shape_in))}]; "
                f"got {x.shape}."
            )

    def _forward_and_log_det(self, x, **kwargs):
        self._check(x)
        h, total, latents = x, tf.zeros([], x.dtype), []
        for (steps, fo), split, nd in zip(self._levels, self._splits, self._level_ndims):
            h, ldj = forward_and_log_det(steps, h, nd, **kwargs)
            total += ldj
            nd = steps.forward_event_ndims(nd)
            if fo is not None:
                h, ldj = fo.forward_and_log_det(h, **kwargs)
                total += ldj
                z, h = split.forward(h)
                latents.append(self._flatten(z, nd))
        if self._top_prior is not None:
            h, ldj = self._top_prior.forward_and_log_det(h, **kwargs)
            total += ldj
        latents.append(self._flatten(h, len(self._latent_shapes[-1])))
        z = tf.concat(latents, axis=-1)
        # The reshapes lose the static latent size; callers (and the next
        # bijector's static checks) need it.
        z.set_shape(x.shape[: x.shape.rank - self._event_ndims].concatenate([self.latent_size]))
        return z, total

    def _inverse_and_log_det(self, y, **kwargs):
        if y.shape.rank is not None and y.shape[-1] not in (None, self.latent_size):
            raise ValueError(
                f"The latent must have shape [batch, {self.latent_size}]; got {y.shape}."
            )
        parts = self.split_latent(y)
        h, total = parts[-1], tf.zeros([], y.dtype)
        if self._top_prior is not None:
            h, ldj = self._top_prior.inverse_and_log_det(h, **kwargs)
            total += ldj
        for i in reversed(range(len(self._levels))):
            steps, fo = self._levels[i]
            if fo is not None:
                h = self._splits[i].inverse([parts[i], h])
                h, ldj = fo.inverse_and_log_det(h, **kwargs)
                total += ldj
            h, ldj = inverse_and_log_det(steps, h, self._level_out_ndims[i], **kwargs)
            total += ldj
        h.set_shape(y.shape[:-1].concatenate(self._event_shape_in))
        return h, total
