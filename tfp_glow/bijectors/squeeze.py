"""Squeeze: trade spatial resolution for channels (RealNVP section 3.6)."""

from collections.abc import Sequence

import tensorflow as tf

from tfp_glow.bijectors import _shapes
from tfp_glow.bijectors.base import FlowBijector

__all__ = ["Squeeze"]


class Squeeze(FlowBijector):
    """Space-to-depth: `[H, W, C] -> [H/f, W/f, f*f*C]`, a permutation.

        forward = tf.nn.space_to_depth(x, f)    log|det J| = 0
        inverse = tf.nn.depth_to_space(y, f)

    `H` and `W` must be divisible by `factor`; with `event_shape` given this
    is checked at construction, otherwise on the first call (and, with
    `validate_args=True`, at run time for sizes unknown while tracing).
    `forward_event_shape` keeps any batch prefix, as `tfb.Reshape` does.
    """

    def __init__(
        self,
        factor: int = 2,
        event_shape: Sequence[int] | None = None,
        validate_args: bool = False,
        name: str = "squeeze",
    ) -> None:
        parameters = dict(locals())
        factor = _shapes.validate_positive_int(factor, "factor")
        if factor < 2:
            raise ValueError(f"`factor` must be >= 2; got {factor}.")
        self._factor = factor
        if event_shape is not None:
            self._check_shape(tuple(event_shape), "event_shape")
        super().__init__(
            forward_min_event_ndims=3,
            is_constant_jacobian=True,
            validate_args=validate_args,
            parameters=parameters,
            name=name,
        )

    @property
    def factor(self):
        return self._factor

    def _check_shape(self, shape, arg_name):
        if len(shape) < 3:
            raise ValueError(f"`{arg_name}` must be an image shape [..., H, W, C]; got {shape}.")
        h, w = shape[-3], shape[-2]
        for size, axis in ((h, "height"), (w, "width")):
            if size is not None and size % self._factor:
                raise ValueError(
                    f"Squeeze(factor={self._factor}) needs {axis} divisible by "
                    f"{self._factor}; `{arg_name}` has shape {tuple(shape)}."
                )

    @property
    def _is_permutation(self):
        return True  # TFP's contract: a permutation of the elements, log-det 0

    # Event shapes keep any batch prefix, as tfb.Reshape and tfb.Split do:
    # forward_event_shape([N, H, W, C]) == [N, H/f, W/f, f*f*C].
    def _forward_event_shape(self, input_shape):
        parts = _shapes.event_shape_parts(input_shape, 3, "input_shape")
        if parts is None:
            return tf.TensorShape(None)
        self._check_shape(tuple(input_shape), "input_shape")
        (h, w, c), f = parts[1], self._factor
        return parts[0].concatenate(
            [
                None if h is None else h // f,
                None if w is None else w // f,
                None if c is None else c * f * f,
            ]
        )

    def _inverse_event_shape(self, output_shape):
        parts = _shapes.event_shape_parts(output_shape, 3, "output_shape")
        if parts is None:
            return tf.TensorShape(None)
        (h, w, c), f = parts[1], self._factor
        self._check_channels(c, "output_shape", output_shape)
        return parts[0].concatenate(
            [
                None if h is None else h * f,
                None if w is None else w * f,
                None if c is None else c // (f * f),
            ]
        )

    def _forward_event_shape_tensor(self, input_shape):
        f = self._factor
        return tf.concat(
            [
                input_shape[:-3],
                tf.stack([input_shape[-3] // f, input_shape[-2] // f, input_shape[-1] * f * f]),
            ],
            0,
        )

    def _inverse_event_shape_tensor(self, output_shape):
        f = self._factor
        return tf.concat(
            [
                output_shape[:-3],
                tf.stack([output_shape[-3] * f, output_shape[-2] * f, output_shape[-1] // (f * f)]),
            ],
            0,
        )

    def _check_channels(self, c, arg_name, shape):
        if c is not None and c % (self._factor**2):
            raise ValueError(
                f"Squeeze inverse needs channels divisible by {self._factor**2}; "
                f"`{arg_name}` has shape {tf.TensorShape(shape)}."
            )

    def _input_assertions(self, t, inverse, **kwargs):
        # With validate_args, a height or width known only at run time must
        # divide by the factor too (the static check covers known sizes).
        checks = super()._input_assertions(t, inverse, **kwargs)
        if inverse:
            return checks
        shape = tf.shape(t)
        for axis, size in (("height", -3), ("width", -2)):
            if t.shape[size] is None:
                checks.append(
                    tf.debugging.assert_equal(
                        shape[size] % self._factor,
                        0,
                        message=f"Squeeze(factor={self._factor}) needs {axis} divisible "
                        f"by {self._factor} (validate_args=True).",
                    )
                )
        return checks

    @staticmethod
    def _batch_as_4d(x, fn):
        # space_to_depth wants exactly one batch axis; fold any others.
        if x.shape.rank == 4:
            return fn(x)
        shape = tf.shape(x)
        flat = tf.reshape(x, tf.concat([[-1], shape[-3:]], 0))
        out = fn(flat)
        return tf.reshape(out, tf.concat([shape[:-3], tf.shape(out)[1:]], 0))

    def _forward_and_log_det(self, x, **kwargs):
        _shapes.check_event_rank(x, 3)
        self._check_shape(tuple(x.shape), "x")
        y = self._batch_as_4d(x, lambda t: tf.nn.space_to_depth(t, self._factor))
        return y, tf.zeros([], x.dtype)

    def _inverse_and_log_det(self, y, **kwargs):
        _shapes.check_event_rank(y, 3)
        self._check_channels(y.shape[-1], "y", y.shape)
        x = self._batch_as_4d(y, lambda t: tf.nn.depth_to_space(t, self._factor))
        return x, tf.zeros([], y.dtype)
