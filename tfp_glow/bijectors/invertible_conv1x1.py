"""Invertible 1x1 convolution (Glow, section 3.2), full or LU-decomposed."""

import numpy as np
import scipy.linalg
import tensorflow as tf

from tfp_glow.bijectors import _shapes
from tfp_glow.bijectors._state import ParameterLayer
from tfp_glow.bijectors.base import FlowBijector

__all__ = ["InvertibleConv1x1"]


def random_rotation(channels, seed=None):
    """A random orthogonal matrix (QR of a Gaussian matrix), as float64."""
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.standard_normal((channels, channels)))
    # Fix the signs so the draw is Haar-distributed and deterministic.
    return q * np.sign(np.diag(r))[None, :]


def _log_abs_det(matrix):
    """`log|det M|` = `sum_i log|R_ii|` from `M = QR` (`|det Q| = 1`).

    Used instead of `tf.linalg.slogdet` because XLA cannot compile
    `LogMatrixDeterminant`; QR and its gradient compile.
    """
    r = tf.linalg.qr(matrix, full_matrices=False)[1]
    return tf.reduce_sum(tf.math.log(tf.abs(tf.linalg.diag_part(r))), axis=-1)


class InvertibleConv1x1(FlowBijector):
    """A learned invertible linear map of the channels, shared by all pixels.

    Forward, per pixel: `y = W x`, i.e. `y = x @ W^T` on the last axis.

    `lu=True` (default) parameterises

        W = P L (U + diag(sign * exp(log_s)))
        log|det J| = H * W * sum(log_s)

    with `P` a frozen permutation, `L` unit lower-triangular, `U` strictly
    upper-triangular and `sign` frozen; the diagonal `sign * exp(log_s)` is
    never zero, so `W` can never become singular. The inverse uses two
    triangular solves, `W^-1 = (U + diag)^-1 L^-1 P^T`, never a general
    matrix inverse.

    `lu=False` keeps a full `W` with `log|det J| = H * W * log|det W|` (by
    a QR decomposition, which XLA compiles) and inverts it with `tf.linalg.inv`.

    With `validate_args=True`, a non-finite variable or a singular full `W`
    raises `tf.errors.InvalidArgumentError` on the next call.

    Both start as a random rotation drawn from `seed`; `P` and `sign` are
    saved as non-trainable variables, so a reloaded model is exact even when
    `seed=None`. For vectors (`event_ndims=1`) it is a learned invertible
    linear map with `log|det J| = sum(log_s)` (LU) or `log|det W|` (full).

    #### References

    [1] Kingma & Dhariwal. Glow: Generative Flow with Invertible 1x1
        Convolutions. NeurIPS 2018, table 1. https://arxiv.org/abs/1807.03039
    """

    def __init__(
        self,
        channels: int,
        lu: bool = True,
        event_ndims: int = 3,
        seed: int | None = None,
        dtype: tf.DType | str = tf.float32,
        validate_args: bool = False,
        name: str = "invertible_conv1x1",
    ) -> None:
        parameters = dict(locals())
        self._channels, self._event_ndims = _shapes.channels_and_event_ndims(channels, event_ndims)
        if not isinstance(lu, bool):
            raise TypeError(f"`lu` must be a bool; got {lu!r}.")
        self._lu = lu
        dtype = tf.as_dtype(dtype)
        super().__init__(
            forward_min_event_ndims=event_ndims,
            is_constant_jacobian=True,
            validate_args=validate_args,
            dtype=dtype,
            parameters=parameters,
            name=name,
        )
        w = random_rotation(channels, seed)
        state = ParameterLayer(dtype=dtype.name, name=f"{self.name}_params")

        def const(value):  # a Keras initializer returning `value`
            return lambda shape, dtype=None: tf.constant(value, dtype=dtype)

        if lu:
            p, lower, upper = scipy.linalg.lu(w)
            diag = np.diag(upper)
            self.permutation = state.add(
                "permutation", [channels, channels], const(p), trainable=False
            )
            self.sign = state.add("sign", [channels], const(np.sign(diag)), trainable=False)
            self.lower = state.add("lower", [channels, channels], const(np.tril(lower, -1)))
            self.upper = state.add("upper", [channels, channels], const(np.triu(upper, 1)))
            self.log_s = state.add("log_s", [channels], const(np.log(np.abs(diag))))
        else:
            self.kernel = state.add("kernel", [channels, channels], const(w))
        self._state = state
        self._track_layers(state)

    @property
    def channels(self):
        return self._channels

    @property
    def lu(self):
        return self._lu

    def _lu_factors(self):
        """(P, L, U') with the masks applied: W = P L U'."""
        lower = tf.linalg.band_part(tf.convert_to_tensor(self.lower), -1, 0)
        lower = tf.linalg.set_diag(lower, tf.ones([self._channels], self.dtype))
        log_s = tf.convert_to_tensor(self.log_s)
        upper = tf.linalg.band_part(tf.convert_to_tensor(self.upper), 0, -1)
        upper = tf.linalg.set_diag(upper, tf.convert_to_tensor(self.sign) * tf.exp(log_s))
        return tf.convert_to_tensor(self.permutation), lower, upper, log_s

    def weight(self):
        """The current `W` (a [C, C] tensor)."""
        return self._matrix_and_log_det(inverse=False)[0]

    def inverse_weight(self):
        """`W^-1`: by triangular solves for LU, by `inv` for the full map."""
        return self._matrix_and_log_det(inverse=True)[0]

    def _matrix_and_log_det(self, inverse):
        """`(W or W^-1, log|det W|)`, reading each variable once.

        The log-det comes from the same reads as the matrix, so a training
        step reads `log_s` (or `kernel`) once, not once per use.
        """
        if not self._lu:
            kernel = tf.convert_to_tensor(self.kernel)
            log_det = _log_abs_det(kernel)
            return (tf.linalg.inv(kernel) if inverse else kernel), log_det
        p, lower, upper, log_s = self._lu_factors()
        if inverse:
            l_inv_pt = tf.linalg.triangular_solve(lower, tf.transpose(p), lower=True)
            matrix = tf.linalg.triangular_solve(upper, l_inv_pt, lower=False)
        else:
            matrix = p @ lower @ upper
        return matrix, tf.reduce_sum(log_s)

    def _log_abs_det_w(self):
        return self._matrix_and_log_det(inverse=False)[1]

    def _parameter_control_dependencies(self, is_init):
        # Finite variables (the base class); a full W must also be invertible
        # (the LU form cannot be singular: its diagonal is sign * exp(log_s)).
        deps = super()._parameter_control_dependencies(is_init)
        if deps and not self._lu:
            deps.append(
                tf.debugging.assert_all_finite(
                    _log_abs_det(tf.convert_to_tensor(self.kernel)),
                    f"{self.name}: the kernel W is singular (log|det W| is not finite).",
                )
            )
        return deps

    def _apply(self, x, matrix):
        _shapes.check_event_rank(x, self._event_ndims)
        _shapes.check_channels(x, self._channels)
        if x.shape.rank == 1:  # one unbatched vector (dist.sample()): matmul needs rank 2
            return tf.linalg.matvec(matrix, x)
        # x @ M^T per pixel as one 2-D MatMul over all pixels: on CPU this is
        # about twice as fast, forward and backward, as the broadcasting
        # BatchMatMulV2 of [..., C] @ [C, C] (see BENCHMARKS.md).
        y = tf.matmul(tf.reshape(x, [-1, self._channels]), matrix, transpose_b=True)
        y = tf.reshape(y, tf.shape(x))
        y.set_shape(x.shape)
        return y

    def _log_det(self, x, log_abs_det_w):
        spatial = _shapes.event_size(x, range(-self._event_ndims, -1))
        return spatial * log_abs_det_w

    def _forward_and_log_det(self, x, **kwargs):
        matrix, log_abs_det_w = self._matrix_and_log_det(inverse=False)
        return self._apply(x, matrix), self._log_det(x, log_abs_det_w)

    def _inverse_and_log_det(self, y, **kwargs):
        matrix, log_abs_det_w = self._matrix_and_log_det(inverse=True)
        return self._apply(y, matrix), -self._log_det(y, log_abs_det_w)
