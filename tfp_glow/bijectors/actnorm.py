"""Activation normalisation (Glow, Kingma & Dhariwal 2018, section 3.1)."""

import contextlib
from collections.abc import Iterator

import tensorflow as tf

from tfp_glow.bijectors import _shapes
from tfp_glow.bijectors._state import ParameterLayer
from tfp_glow.bijectors.base import FlowBijector
from tfp_glow.thread_flag import ThreadFlag

__all__ = ["ActNorm", "data_dependent_init"]

_INIT_SCOPE = ThreadFlag()


@contextlib.contextmanager
def data_dependent_init() -> Iterator[None]:
    """Inside this context, an uninitialised `ActNorm` initialises itself
    from the first (eager) batch that reaches it, then applies itself.

    This is how a whole flow is initialised in one pass: run the batch through
    the normalizing direction inside the context (`FlowModel.initialize` does
    exactly that). Outside it, `ActNorm` never changes its own variables.
    """
    with _INIT_SCOPE.on():
        yield


class ActNorm(FlowBijector):
    """Per-channel affine map with data-dependent initialisation.

    Forward (data to latent), per channel `c`:

        y = s_c * x + b_c,        s_c = exp(log_scale_c)
        log|det J| = H * W * sum_c log|s_c|     (images, event [H, W, C])
        log|det J| = sum_c log|s_c|             (vectors, event [C])

    Inverse: `x = (y - b_c) / s_c`. Parameterising `s` by its log keeps it
    strictly positive, so the map can never become singular.

    `initialize(x)` sets `s = 1 / (std + eps)` and `b = -mean * s` per channel
    from one batch, so `forward(x)` has zero mean and unit variance per
    channel on that batch, and sets the saved `initialized` flag; a reloaded
    ActNorm therefore never re-initialises.

    #### Examples

    ```python
    act = tfp_glow.bijectors.ActNorm(channels=3)
    act.initialize(images)             # images: [N, H, W, 3]
    z = act.forward(images)            # per-channel mean 0, std 1
    ```

    #### References

    [1] Diederik P. Kingma, Prafulla Dhariwal. Glow: Generative Flow with
        Invertible 1x1 Convolutions. NeurIPS 2018. https://arxiv.org/abs/1807.03039
    """

    def __init__(
        self,
        channels: int,
        event_ndims: int = 3,
        epsilon: float = 1e-6,
        dtype: tf.DType | str = tf.float32,
        validate_args: bool = False,
        name: str = "act_norm",
    ) -> None:
        parameters = dict(locals())
        self._channels, self._event_ndims = _shapes.channels_and_event_ndims(channels, event_ndims)
        self._epsilon = epsilon
        dtype = tf.as_dtype(dtype)
        super().__init__(
            forward_min_event_ndims=event_ndims,
            is_constant_jacobian=True,
            validate_args=validate_args,
            dtype=dtype,
            parameters=parameters,
            name=name,
        )
        self._state = ParameterLayer(dtype=dtype.name, name=f"{self.name}_params")
        self.log_scale = self._state.add("log_scale", [channels])
        self.bias = self._state.add("bias", [channels])
        self.initialized = self._state.add("initialized", [], trainable=False)
        self._track_layers(self._state)

    @property
    def channels(self):
        return self._channels

    @property
    def event_ndims(self):
        return self._event_ndims

    @property
    def is_initialized(self):
        """Python bool (eager) whether `initialize` has run or was restored."""
        return bool(self.initialized.numpy() > 0.5)

    def initialize(self, x):
        """Sets scale and bias so `forward(x)` is standardised per channel."""
        x = tf.convert_to_tensor(x, dtype=self.dtype)
        self._check(x)
        axes = list(range(x.shape.rank - 1))
        # Moments of the global batch under tf.distribute (every replica's and
        # worker's part together), so all replicas and workers get one init.
        from tfp_glow.training.distributed import global_moments

        mean, variance = global_moments(x, axes)
        log_scale = -tf.math.log(tf.sqrt(variance) + self._epsilon)
        self.log_scale.assign(log_scale)
        self.bias.assign(-mean * tf.exp(log_scale))
        self.initialized.assign(tf.ones([], self.dtype))

    def _check(self, x):
        _shapes.check_event_rank(x, self._event_ndims)
        _shapes.check_channels(x, self._channels)

    def _log_det(self, x, log_scale):
        spatial = _shapes.event_size(x, range(-self._event_ndims, -1))
        return spatial * tf.reduce_sum(log_scale)

    def _forward_and_log_det(self, x, **kwargs):
        self._check(x)
        if _INIT_SCOPE.is_on() and tf.executing_eagerly() and not self.is_initialized:
            self.initialize(x)
        log_scale = tf.convert_to_tensor(self.log_scale)
        y = x * tf.exp(log_scale) + tf.convert_to_tensor(self.bias)
        return y, self._log_det(x, log_scale)

    def _inverse_and_log_det(self, y, **kwargs):
        self._check(y)
        log_scale = tf.convert_to_tensor(self.log_scale)
        x = (y - tf.convert_to_tensor(self.bias)) * tf.exp(-log_scale)
        return x, -self._log_det(y, log_scale)
