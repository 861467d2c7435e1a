"""Invertible residual block (i-ResNet, Behrmann et al. 2019; Residual Flows,
Chen et al. 2019)."""

import zlib
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tfp_glow import checks
from tfp_glow.bijectors import _residual_math
from tfp_glow.bijectors.base import FlowBijector

__all__ = ["ResidualBlock"]

LOG_DET_MODES = ("auto", "exact", "roulette")
# log_det="auto" is exact up to this event size: the Jacobian costs D backward
# passes (vectorised) and a D x D QR per example; above it, the estimator.
EXACT_MAX_DIMS = 16
# The fixed-point inverse stops when no element moves by more than this.
DEFAULT_ATOL = {tf.float16: 1e-3, tf.bfloat16: 1e-2, tf.float32: 1e-6, tf.float64: 1e-12}
_PROTOCOL = (
    "normalized_weights",
    "call_with",
    "lipschitz_bound",
    "event_shape",
    "training_step_seed",
)


class ResidualBlock(FlowBijector):
    """`y = x + g(x)` with `Lip(g) < 1`: an invertible residual block.

    Forward (data to latent) and its log-det (Behrmann et al. 2019, eq. 6):

        y = x + g(x)
        log|det dy/dx| = log det(I + J_g(x)) = sum_{k>=1} (-1)^(k+1) tr(J_g^k) / k

    the series converging because `|J_g| <= Lip(g) < 1`.

    * `log_det="exact"`: from the full Jacobian (autodiff, then a QR
      decomposition): exact, for small events (cost `D` backward passes).
    * `log_det="roulette"`: Chen et al.'s unbiased Russian-roulette estimate:
      terms `1..n_exact` always, then `N ~ Geometric(geometric_p)` more, each
      reweighted by `1 / P(computed)`, traces by Hutchinson's `v^T J^k v`
      (`noise`: `"normal"` or `"rademacher"` probes); its gradient is the
      Neumann series estimate of `tr((I + J)^-1 dJ)` (eq. 8), in a custom
      gradient whose memory does not grow with the number of terms. See
      `_residual_math.roulette_log_det`.
    * `"auto"` (default): exact for events of at most `EXACT_MAX_DIMS` (16)
      elements, roulette above.

    The estimator's randomness is stateless. Inside a training step
    (`nets.dropout_active(seed)`, entered by `FlowModel.train_step`) the draw
    is keyed by the step's seed and this block's `seed`: a fresh draw every
    step, the same on a resumed run. Everywhere else (`log_prob`, evaluation,
    sampling, a served SavedModel) it uses the fixed seed `[seed, 0]`: a
    deterministic function of `x`, an unbiased estimate over the draw of that
    seed, not the exact value.

    Inverse: the fixed point of `x <- y - g(x)` from `x = y`, a contraction by
    `Lip(g)`, iterated until no element moves by more than `atol` (default 1e-6
    in float32, 1e-12 in float64) or `max_iterations`; then `|x - x*| <= L / (1
    - L) * (last step)` with `L = Lip(g)`. Its gradient is the implicit
    function's (`dx/dy = (I + J)^-1`), by a second fixed point, not by
    backprop through the iterations. The inverse log-det is `-log det(I +
    J_g(x))` at the solution (estimated as the forward one).

    Args:
      residual_fn: `g`, a layer from `tfp_glow.nets.residual` (`ResidualMLP`
        for vectors, `ResidualCNN` for images), or a factory
        `fn(event_shape) -> layer` (then `event_shape` is required). It holds
        its Lipschitz bound (spectral normalisation, LipSwish).
      event_shape: `(D,)` or `(H, W, C)`; default the network's.
      log_det: `"auto"`, `"exact"` or `"roulette"`.
      n_exact: terms always computed by the estimator (>= 0).
      geometric_p: `p` of the number of extra terms, in (0, 1); `1 / p` extra
        terms on average.
      noise: the Hutchinson probe, `"normal"` or `"rademacher"`.
      atol: tolerance of the fixed-point inverse (default by dtype).
      max_iterations: cap of the fixed-point iterations.
      seed: keys the estimator's draws (default: a CRC-32 of `name`).
      dtype: the flow's dtype; the network must compute in it.

    #### Examples

    ```python
    g = tfp_glow.nets.residual.ResidualMLP(2, hidden_units=64)
    block = tfp_glow.bijectors.ResidualBlock(g)        # D = 2: exact log-det
    y, ldj = block.forward_and_log_det(x)               # x: [N, 2]
    ```

    #### References

    [1] Jens Behrmann, Will Grathwohl, Ricky T. Q. Chen, David Duvenaud,
        Joern-Henrik Jacobsen. Invertible Residual Networks. ICML 2019.
        https://arxiv.org/abs/1811.00995
    [2] Ricky T. Q. Chen, Jens Behrmann, David Duvenaud, Joern-Henrik Jacobsen.
        Residual Flows for Invertible Generative Modeling. NeurIPS 2019.
        https://arxiv.org/abs/1906.02735
    """

    def __init__(
        self,
        residual_fn: Any,
        event_shape: Sequence[int] | None = None,
        log_det: str = "auto",
        n_exact: int = 2,
        geometric_p: float = 0.5,
        noise: str = "normal",
        atol: float | None = None,
        max_iterations: int = 500,
        seed: int | None = None,
        dtype: Any = tf.float32,
        validate_args: bool = False,
        name: str = "residual_block",
    ) -> None:
        parameters = dict(locals())
        dtype = tf.as_dtype(dtype)
        if event_shape is not None:
            event_shape = checks.shape(event_shape, "event_shape", rank=(1, 3))
        net = self._network_from(residual_fn, event_shape)
        if event_shape is None:
            event_shape = tuple(net.event_shape)
        elif tuple(net.event_shape) != event_shape:
            raise ValueError(
                f"`residual_fn` was built for event shape {net.event_shape}; "
                f"`event_shape` is {event_shape}."
            )
        if not 0.0 < float(net.lipschitz_bound) < 1.0:
            raise ValueError(
                f"`residual_fn` must have a Lipschitz bound in (0, 1); its "
                f"lipschitz_bound is {net.lipschitz_bound}."
            )
        if tf.as_dtype(net.compute_dtype) != dtype:
            raise ValueError(
                f"`residual_fn` computes in {net.compute_dtype}, the block in {dtype.name}: "
                f"build the network with dtype={dtype.name!r} (the power series and the "
                f"fixed-point inverse need the flow's precision)."
            )
        self._net = net
        self._event_shape = event_shape
        self._log_det_mode = checks.choice(log_det, LOG_DET_MODES, "log_det")
        size = int(np.prod(event_shape))
        self._exact = log_det == "exact" or (log_det == "auto" and size <= EXACT_MAX_DIMS)
        self._n_exact = checks.positive_int(n_exact, "n_exact", minimum=0)
        self._geometric_p = checks.number(
            geometric_p,
            "geometric_p",
            minimum=0.0,
            maximum=1.0,
            exclusive_minimum=True,
            exclusive_maximum=True,
        )
        self._noise = checks.choice(noise, _residual_math.NOISES, "noise")
        self._atol = (
            DEFAULT_ATOL[dtype]
            if atol is None
            else checks.number(atol, "atol", minimum=0.0, exclusive_minimum=True)
        )
        self._max_iterations = checks.positive_int(max_iterations, "max_iterations")
        self._seed = (
            zlib.crc32(name.encode())
            if seed is None
            else checks.positive_int(seed, "seed", minimum=0)
        ) % 2**31
        super().__init__(
            forward_min_event_ndims=len(event_shape),
            dtype=dtype,
            validate_args=validate_args,
            parameters=parameters,
            name=name,
        )
        self._track_layers(net)

    @staticmethod
    def _network_from(residual_fn, event_shape):
        net = residual_fn
        if not isinstance(residual_fn, keras.layers.Layer):
            if not callable(residual_fn):
                raise TypeError(
                    f"`residual_fn` must be a residual network layer or a "
                    f"factory `fn(event_shape)`; got {residual_fn!r}."
                )
            if event_shape is None:
                raise ValueError("`event_shape` is required when `residual_fn` is a factory.")
            net = residual_fn(event_shape)
        missing = [a for a in _PROTOCOL if not hasattr(net, a)]
        if missing:
            raise TypeError(
                f"`residual_fn` must be a Lipschitz-constrained residual network such as "
                f"tfp_glow.nets.residual.ResidualMLP / ResidualCNN (an unconstrained network "
                f"need not be invertible); {type(net).__name__} lacks {missing}."
            )
        return net

    # -- properties -------------------------------------------------------------
    @property
    def residual_fn(self):
        """The network `g`."""
        return self._net

    @property
    def event_shape(self):
        return self._event_shape

    @property
    def log_det_mode(self):
        """`"exact"` or `"roulette"`: what this block computes (`"auto"` resolved)."""
        return "exact" if self._exact else "roulette"

    @property
    def lipschitz_bound(self):
        """A bound of `Lip(g)` (the network's)."""
        return float(self._net.lipschitz_bound)

    @property
    def atol(self):
        return self._atol

    @property
    def max_iterations(self):
        return self._max_iterations

    # -- math -----------------------------------------------------------------
    def _fold(self, t):
        """`t` as `[N, *event]`, and a function putting its batch shape back."""
        nd = len(self._event_shape)
        batch_static = t.shape[: t.shape.rank - nd]
        batch = tf.shape(t)[: t.shape.rank - nd]

        def unfold(out, event=True):
            tail = list(self._event_shape) if event else []
            out = tf.reshape(out, tf.concat([batch, tf.constant(tail, tf.int32)], 0))
            out.set_shape(batch_static.concatenate(tail))
            return out

        return tf.reshape(t, [-1] + list(self._event_shape)), unfold

    def _noise_seed(self, step_seed):
        fold = tf.random.experimental.stateless_fold_in
        if step_seed is None:
            return tf.constant([self._seed, 0], tf.int64)
        return fold(step_seed, self._seed)

    def _log_det(self, x, weights, step_seed):
        """`log det(I + J_g(x))` for `x` of shape `[N, *event]`."""
        fn = self._net.call_with
        if self._exact:
            return _residual_math.exact_log_det(fn, x, weights)
        return _residual_math.roulette_log_det(
            fn,
            x,
            weights,
            self._noise_seed(step_seed),
            n_exact=self._n_exact,
            geometric_p=self._geometric_p,
            noise=self._noise,
        )

    def _forward_and_log_det(self, x, **kwargs):
        x = tf.convert_to_tensor(x, self.dtype)
        flat, unfold = self._fold(x)
        step_seed = self._net.training_step_seed()
        weights = self._net.normalized_weights(update=step_seed is not None)
        y = flat + self._net.call_with(flat, weights)
        return unfold(y), unfold(self._log_det(flat, weights, step_seed), event=False)

    def _inverse_and_log_det(self, y, **kwargs):
        y = tf.convert_to_tensor(y, self.dtype)
        flat, unfold = self._fold(y)
        step_seed = self._net.training_step_seed()
        weights = self._net.normalized_weights(update=False)
        x = _residual_math.fixed_point_inverse(
            self._net.call_with,
            flat,
            weights,
            self._atol,
            self._max_iterations,
            adjoint="solve" if self._exact else "iterate",
        )
        return unfold(x), unfold(-self._log_det(x, weights, step_seed), event=False)
