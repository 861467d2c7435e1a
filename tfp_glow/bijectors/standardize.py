"""Learned Gaussian priors written as bijectors (standardisations).

A prior `z ~ N(mu, sigma^2)` is the same model as a standard normal on

    z' = (z - mu) / sigma,        log|det J| = -sum(log sigma),
    log sigma = 10 tanh(raw / 10)  (bounded: no prior amplifies by more than e^10)

so every learned prior of Glow (the split priors and the top prior) becomes a
bijector in front of one standard normal base. Temperature `T` then means
sampling `z' ~ N(0, T^2)`, which is exactly `z ~ N(mu, (T sigma)^2)` for every
prior at once.

Class conditioning (`num_classes`): a zero-initialised table adds a
per-class, per-channel offset to `(mu, log sigma)`; pass the labels as
`conditional_input` (int labels `[N]` or one-hot `[N, K]`).
"""

import tensorflow as tf

from tfp_glow.bijectors import _shapes
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
    ):
        _shapes.validate_event_ndims(event_ndims)
        if num_classes is not None:
            _shapes.validate_positive_int(num_classes, "num_classes")
        self._num_classes = num_classes
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
        self._class_table = None
        if num_classes is not None:
            state = ParameterLayer(dtype=dtype.name, name=f"{self.name}_classes")
            self._class_table = state.add("class_offsets", [num_classes, 2 * channels])
            self._track_layers(state)

    @property
    def num_classes(self):
        return self._num_classes

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

    def _class_offsets(self, x, conditional_input):
        """Per-example `(d_mu, d_log_sigma)` broadcastable to the event."""
        if self._num_classes is None:
            return 0.0, 0.0
        onehot = one_hot_labels(conditional_input, self._num_classes, x.dtype)
        offsets = onehot @ tf.convert_to_tensor(self._class_table)
        # A static channel count (2 * channels), so shapes stay known in graphs.
        offsets = tf.reshape(
            offsets, [-1] + [1] * (self._event_ndims - 1) + [self._class_table.shape[-1]]
        )
        return tf.split(offsets, 2, axis=-1)

    def _stats(self, rest, x, conditional_input):
        mean, log_scale = self._mean_and_log_scale(rest)
        d_mean, d_log_scale = self._class_offsets(x, conditional_input)
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
        mean, log_scale = self._stats(rest, x, conditional_input)
        z_std = (z - mean) * tf.exp(-log_scale)
        return self._join(z_std, rest), -self._reduce_event(log_scale, z)

    def _inverse_and_log_det(self, y, conditional_input=None, **kwargs):
        z_std, rest = self._parts(y)
        mean, log_scale = self._stats(rest, y, conditional_input)
        z = z_std * tf.exp(log_scale) + mean
        return self._join(z, rest), self._reduce_event(log_scale, z_std)
