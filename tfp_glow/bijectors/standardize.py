"""Learned Gaussian priors written as bijectors (standardisations).

A prior `z ~ N(mu, sigma^2)` is the same model as a standard normal on

    z' = (z - mu) / sigma,        log|det J| = -sum(log sigma),
    log sigma = 10 tanh(raw / 10)  (bounded: no prior amplifies by more than e^10)

so every learned prior of Glow (the split priors and the top prior) becomes a
bijector in front of one standard normal base. Temperature `T` then means
sampling `z' ~ N(0, T^2)`, which is exactly `z ~ N(mu, (T sigma)^2)` for every
prior at once.

Conditioning on a context `c` (`context_shape=`, passed as
`conditional_input`): a zero-initialised map of the context adds an offset to
`(mu, log sigma)`, so a conditional prior starts as the unconditional one:

* a vector context (any context of a vector event, or a non-image context
  of an image event): `[d_mu, d_log_sigma] = flatten(c) @ W`, one offset per
  channel, `W` of shape `[prod(context_shape), 2 C]`;
* an image context `[h, w, c]` of an image event: per-position offsets
  `conv3x3(resize(c, (H, W)))` with `2 C` zero-initialised filters.

`num_classes=K` is the shorthand for `context_shape=(K,)` whose context may
also be int labels `[N]` (one-hot encoded here): `W` is then exactly
openai/glow's per-class table of offsets (`ycond`).
"""

import keras
import numpy as np
import tensorflow as tf

from tfp_glow.bijectors import _context, _shapes
from tfp_glow.bijectors._state import ParameterLayer
from tfp_glow.bijectors.base import FlowBijector

__all__ = ["StandardizeBase", "one_hot_labels", "MAX_LOG_SCALE"]

# Bound on |log sigma| of every learned prior: sigma in [e^-10, e^10].
MAX_LOG_SCALE = 10.0


def one_hot_labels(labels, num_classes, dtype):
    """Int labels `[N]` or one-hot `[N, K]` -> float one-hot `[N, K]`."""
    if labels is None:
        raise ValueError(
            f"This flow is class-conditional (num_classes={num_classes}): pass "
            f"the labels as `conditional_input` (int [batch] or one-hot "
            f"[batch, {num_classes}])."
        )
    labels = tf.convert_to_tensor(labels)
    if labels.dtype.is_integer:
        if labels.shape.rank not in (None, 1):
            raise ValueError(
                f"Integer `conditional_input` labels must have shape [batch]; got {labels.shape}."
            )
        return tf.one_hot(labels, num_classes, dtype=dtype)
    if labels.shape.rank is not None and (
        labels.shape.rank != 2 or labels.shape[-1] not in (None, num_classes)
    ):
        raise ValueError(
            f"One-hot `conditional_input` must have shape [batch, {num_classes}]; "
            f"got {labels.shape}."
        )
    return tf.cast(labels, dtype)


class StandardizeBase(FlowBijector):
    """`z' = (z - mu) * exp(-log_sigma)` on some channels; subclasses say which
    channels and how `(mu, log_sigma)` are computed.

    Subclasses implement `_mean_and_log_scale(rest)` (the statistics from the
    part that is not standardised; class offsets from `conditional_input` are
    added by this base class) returning tensors that broadcast against the
    standardised part, and `_parts(x)` / `_join(z, rest)`. A subclass whose
    statistics do not depend on `x` (only on its variables and the labels)
    passes `is_constant_jacobian=True`: the map is then affine in `x`.
    """

    def __init__(
        self,
        num_classes,
        channels,
        event_ndims,
        dtype,
        parameters,
        name,
        validate_args=False,
        is_constant_jacobian=False,
        context_shape=None,
    ):
        _shapes.validate_event_ndims(event_ndims)
        context_shape = _context.context_shape_of(context_shape)
        if num_classes is not None:
            _shapes.validate_positive_int(num_classes, "num_classes")
            if context_shape is not None:
                raise ValueError(
                    f"Give `num_classes` ({num_classes}) or `context_shape` "
                    f"({context_shape}), not both: num_classes=K is context_shape=(K,) "
                    "with int labels allowed."
                )
            context_shape = (int(num_classes),)
        self._num_classes = num_classes
        self._context_shape = context_shape
        self._event_ndims = event_ndims
        dtype = tf.as_dtype(dtype)
        super().__init__(
            forward_min_event_ndims=event_ndims,
            dtype=dtype,
            is_constant_jacobian=is_constant_jacobian,
            validate_args=validate_args,
            parameters=parameters,
            name=name,
        )
        self._class_table = None  # the vector context's map W (the class table)
        self._context_conv = None  # the image context's conv
        if context_shape is None:
            return
        if _context.is_image(context_shape, event_ndims):
            # No bias: the offset is linear in the context, as for a vector.
            self._context_conv = keras.layers.Conv2D(
                2 * channels,
                3,
                padding="same",
                use_bias=False,
                kernel_initializer="zeros",
                dtype=dtype.name,
                name=f"{self.name}_context",
            )
            self._context_conv.build((None, None, None, context_shape[-1]))
            self._track_layers(self._context_conv)
            return
        # The names of the class table of files saved before `context_shape`.
        layer_name, weight = (
            (f"{self.name}_classes", "class_offsets")
            if num_classes
            else (f"{self.name}_context", "context_weights")
        )
        state = ParameterLayer(dtype=dtype.name, name=layer_name)
        self._class_table = state.add(weight, [int(np.prod(context_shape)), 2 * channels])
        self._track_layers(state)

    @property
    def num_classes(self):
        return self._num_classes

    @property
    def context_shape(self):
        """The shape of one context (`(num_classes,)` for class labels), or None."""
        return self._context_shape

    def _input_assertions(self, t, inverse, conditional_input=None, **kwargs):
        # tf.one_hot maps an out-of-range label to all zeros (the offset of no
        # class) without a word; with validate_args it is an error.
        checks = super()._input_assertions(t, inverse, **kwargs)
        if self._num_classes is not None and conditional_input is not None:
            labels = tf.convert_to_tensor(conditional_input)
            if labels.dtype.is_integer:
                message = (
                    f"{self.name}: `conditional_input` labels must lie in "
                    f"[0, {self._num_classes}) (validate_args=True)."
                )
                checks += [
                    tf.debugging.assert_non_negative(labels, message=message),
                    tf.debugging.assert_less(
                        labels, tf.constant(self._num_classes, labels.dtype), message=message
                    ),
                ]
        return checks

    def _context_of(self, conditional_input, dtype):
        if self._num_classes is not None:  # int labels or one-hot rows
            return one_hot_labels(conditional_input, self._num_classes, dtype)
        owner = f"{type(self).__name__} ({self.name!r})"
        return _context.check_context(conditional_input, self._context_shape, owner, dtype)

    def _context_offsets(self, z, conditional_input):
        """Per-example `(d_mu, d_log_sigma)` broadcastable to `z`, the
        standardised part."""
        if self._context_shape is None:
            return 0.0, 0.0
        context = self._context_of(conditional_input, z.dtype)
        if self._context_conv is not None:
            resized = _context.resize(context, tuple(z.shape[-3:-1]))
            offsets = _shapes.call_with_one_batch_axis(self._context_conv, resized, 3)
            return tf.split(tf.cast(offsets, z.dtype), 2, axis=-1)
        flat = _context.features(context, self._context_shape, (1,) * self._event_ndims)
        # One offset per channel: every spatial axis of length 1 (broadcast).
        offsets = tf.einsum("...k,kc->...c", flat, tf.convert_to_tensor(self._class_table))
        return tf.split(offsets, 2, axis=-1)

    def _stats(self, rest, z, conditional_input):
        mean, log_scale = self._mean_and_log_scale(rest)
        d_mean, d_log_scale = self._context_offsets(z, conditional_input)
        # log sigma = B tanh(raw / B) with B = MAX_LOG_SCALE: the identity near 0
        # (so init and training are unchanged), bounded so the sampling direction
        # z = z' sigma + mu can amplify by at most e^B per prior. Unbounded, a
        # large input h gave an inf sample in about 17 of 1e6 draws of a trained
        # digits Glow (benchmarks/nonfinite_samples.py); bounded, none.
        raw = log_scale + d_log_scale
        bound = tf.constant(MAX_LOG_SCALE, raw.dtype)
        return mean + d_mean, bound * tf.tanh(raw / bound)

    def _reduce_event(self, ldj, like):
        ldj = ldj + tf.zeros_like(like)  # broadcast per-channel stats first
        return tf.reduce_sum(ldj, axis=list(range(-self._event_ndims, 0)))

    def _forward_and_log_det(self, x, conditional_input=None, **kwargs):
        z, rest = self._parts(x)
        mean, log_scale = self._stats(rest, z, conditional_input)
        z_std = (z - mean) * tf.exp(-log_scale)
        return self._join(z_std, rest), -self._reduce_event(log_scale, z)

    def _inverse_and_log_det(self, y, conditional_input=None, **kwargs):
        z_std, rest = self._parts(y)
        mean, log_scale = self._stats(rest, z_std, conditional_input)
        z = z_std * tf.exp(log_scale) + mean
        return self._join(z, rest), self._reduce_event(log_scale, z_std)
