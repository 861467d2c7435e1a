"""Lipschitz-constrained residual functions `g` for invertible residual blocks.

`y = x + g(x)` is invertible when `Lip(g) < 1` (Behrmann et al. 2019). These
layers build `g` from linear maps whose spectral norm is held below `c`
(`lipschitz`) and LipSwish activations (Lipschitz constant 1), so

    Lip(g) <= c ** (number of linear layers) < 1.

Spectral normalisation (Miyato et al. 2018, as used by i-ResNet): the largest
singular value `sigma` of a linear map `A` (a Dense kernel, or a 3x3 / 1x1
convolution as an operator on inputs of the layer's spatial size) is estimated
by power iteration,

    v <- A^T u / |A^T u|,   u <- A v / |A v|,   sigma ~ u^T A v,

and the layer uses `W / max(1, sigma / c)`. `u` and `v` are non-trainable
weights, saved with the model. Every call iterates from the stored vectors
until `sigma` changes by less than `1e-7` of itself (at most
`max_power_iterations` steps); a training call (inside `nets.dropout_active`,
which `FlowModel.train_step` enters) stores the vectors it reached, so the
next step starts warm and needs only a few steps; every other call
(evaluation, sampling, serving) stores nothing, so it is a deterministic
function of the weights, and the bound holds even after the weights were set
from elsewhere. The constructor iterates the same way from a random start.
A fixed count per training step (2) was not enough: after 8 Adam steps at
learning rate 0.05 the stored estimate lagged the trained kernel's norm by
17%, so the "normalised" kernel had norm 1.09 (tests/test_residual_flow.py
measures the bound by SVD). Power iteration approaches `sigma` from below:
the bound holds to the iteration's tolerance (within 2e-5 of `c` in most runs,
measured by SVD on trained convolutions, whose top singular values lie close
together; a `1e-5` tolerance left 5e-3; the settled value varies between runs
with the threads' float sums: 1.2e-4 and 2.5e-3 above `c` in two runs of five).
`sigma` is read with `u` and `v` held constant, so its gradient is `u v^T`,
the gradient of the largest singular value.

LipSwish (Chen et al. 2019): `f(x) = x * sigmoid(beta x) / 1.1`, `beta =
softplus(raw) > 0` trainable; `|f'| <= 1` for every `beta`, since the largest
slope of `t sigmoid(t)` is 1.0998.

A residual function exposes its normalised weights as tensors
(`normalized_weights(update)`) and a pure function of them (`call_with(x,
weights)`): the `ResidualBlock` bijector normalises once per call and reuses
the weights in its power series, Jacobian and fixed-point loops.

#### References

[1] Jens Behrmann, Will Grathwohl, Ricky T. Q. Chen, David Duvenaud, Joern-Henrik
    Jacobsen. Invertible Residual Networks. ICML 2019. https://arxiv.org/abs/1811.00995
[2] Ricky T. Q. Chen, Jens Behrmann, David Duvenaud, Joern-Henrik Jacobsen.
    Residual Flows for Invertible Generative Modeling. NeurIPS 2019.
    https://arxiv.org/abs/1906.02735 (code: rtqichen/residual-flows)
[3] Takeru Miyato, Toshiki Kataoka, Masanori Koyama, Yuichi Yoshida. Spectral
    Normalization for Generative Adversarial Networks. ICLR 2018.
"""

import math
import zlib
from collections.abc import Sequence
from typing import Any

import keras
import tensorflow as tf
from keras import layers

from tfp_glow import checks
from tfp_glow.nets import coupling as _coupling

__all__ = ["LipSwish", "ResidualCNN", "ResidualMLP", "SpectralConv2D", "SpectralDense",
           "training_step_seed"]

_PACKAGE = "tfp_glow"
_SETTLE_RTOL = 1e-7  # non-training calls iterate until sigma moves by less than this


def training_step_seed() -> tf.Tensor | None:
    """Inside a training step (`nets.dropout_active(seed)`), the step's seed, a
    `[2]` int64 tensor (a fresh random one when the step gave none); None outside."""
    value = _coupling._DROPOUT.value
    if value is None:
        return None
    if value is True:
        return tf.random.uniform([2], maxval=2**31 - 1, dtype=tf.int64)
    return tf.cast(value, tf.int64)


def _lipschitz(value):
    return checks.number(value, "lipschitz", minimum=0.0, maximum=1.0,
                         exclusive_minimum=True, exclusive_maximum=True)


def _normalize(t):
    norm = tf.sqrt(tf.reduce_sum(tf.square(t)))
    return t / tf.maximum(norm, tf.constant(1e-12, t.dtype))


class _SpectralLinear(layers.Layer):
    """A linear layer `x -> A_W x + b` whose `A_W` has spectral norm <= `lipschitz`.

    Subclasses create `kernel` and give the operator `_apply(kernel, x)` and its
    adjoint `_adjoint(kernel, y)`, and the shapes of `v` (an input) and `u` (an
    output); the base class holds the power iteration.
    """

    def __init__(self, lipschitz: float = 0.97, max_power_iterations: int = 300,
                 seed: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.lipschitz = _lipschitz(lipschitz)
        self.max_power_iterations = checks.positive_int(max_power_iterations,
                                                        "max_power_iterations")
        self.seed = zlib.crc32(self.name.encode()) if seed is None else \
            checks.positive_int(seed, "seed", minimum=0)

    def _create_weights(self, kernel_shape, bias_units, v_shape, u_shape, initializer):
        self.kernel = self.add_weight(name="kernel", shape=kernel_shape,
                                      initializer=initializer)
        self.bias = self.add_weight(name="bias", shape=(bias_units,), initializer="zeros")
        # Same on every replica (no data in them): the first replica's update is kept.
        self.u = self.add_weight(name="u", shape=u_shape, initializer="zeros",
                                 trainable=False, aggregation="only_first_replica")
        self.v = self.add_weight(name="v", shape=v_shape, initializer="zeros",
                                 trainable=False, aggregation="only_first_replica")
        self.built = True
        with tf.init_scope():
            start = tf.random.stateless_normal(u_shape, seed=[self.seed % 2**31, 17],
                                               dtype=self.variable_dtype)
            self.u.assign(_normalize(start))
            self.v.assign(_normalize(self._adjoint(tf.convert_to_tensor(self.kernel),
                                                   self.u)))
            u, v = self._settled(tf.convert_to_tensor(self.kernel))
            self.u.assign(u)
            self.v.assign(v)

    def _step(self, kernel, u):
        v = _normalize(self._adjoint(kernel, u))
        return _normalize(self._apply(kernel, v)), v

    def _sigma(self, kernel, u, v):
        u, v = tf.stop_gradient(u), tf.stop_gradient(v)
        return tf.reduce_sum(u * self._apply(kernel, v))

    @tf.function(autograph=False)
    def _settled(self, kernel):
        """`(u, v)` iterated from the stored vectors until sigma settles.

        A `tf.function` (one trace per layer): in eager mode the loop runs as
        one graph instead of op by op; inside a traced step it is inlined.
        """
        u0, v0 = tf.convert_to_tensor(self.u), tf.convert_to_tensor(self.v)
        sigma0 = self._sigma(kernel, u0, v0)

        def moving(i, u, v, previous, sigma):
            return tf.abs(sigma - previous) > _SETTLE_RTOL * tf.abs(sigma)

        def body(i, u, v, previous, sigma):
            u, v = self._step(kernel, u)
            return i + 1, u, v, sigma, self._sigma(kernel, u, v)

        _, u, v, _, _ = tf.while_loop(
            moving, body, (tf.constant(0), u0, v0, sigma0 + 1.0 + tf.abs(sigma0), sigma0),
            maximum_iterations=self.max_power_iterations)
        return u, v

    def sigma_estimate(self):
        """`u^T A v` from the stored vectors (no iteration)."""
        return self._sigma(tf.convert_to_tensor(self.kernel), self.u, self.v)

    def normalized_kernel(self, update=False):
        """`W / max(1, sigma / c)` in the compute dtype; `update=True` (a
        training call) stores the power iteration's vectors."""
        kernel = tf.convert_to_tensor(self.kernel)
        # Held constant outside the call: under a tape, a watched input would
        # make TF build the function's gradient variant (a second trace).
        u, v = self._settled(tf.stop_gradient(kernel))
        if update:
            self.u.assign(u)
            self.v.assign(v)
        sigma = self._sigma(kernel, u, v)
        scale = tf.maximum(tf.constant(1.0, kernel.dtype), sigma / self.lipschitz)
        return tf.cast(kernel / scale, self.compute_dtype)

    def apply_linear(self, x, kernel, bias):
        """`A_kernel x + bias` (the pure function `call` uses)."""
        return self._apply(kernel, x) + bias

    def call(self, x):
        update = _coupling.is_dropout_active()
        return self.apply_linear(x, self.normalized_kernel(update),
                                 tf.cast(self.bias, self.compute_dtype))

    def get_config(self):
        return {**super().get_config(), "lipschitz": self.lipschitz,
                "max_power_iterations": self.max_power_iterations, "seed": self.seed}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class SpectralDense(_SpectralLinear):
    """Dense `x W + b` with `W`'s largest singular value held <= `lipschitz`.

    Args:
      units: output size.
      input_units: input size (the weights are built at construction).
      lipschitz: `c` in (0, 1).
      max_power_iterations: cap of the power iteration of one call.
      seed: the start of the power iteration (default: a CRC-32 of the name).
    """

    def __init__(self, units: int, input_units: int, kernel_initializer: Any = "glorot_uniform",
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.units = checks.positive_int(units, "units")
        self.input_units = checks.positive_int(input_units, "input_units")
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self._create_weights((self.input_units, self.units), self.units,
                             (self.input_units,), (self.units,), self.kernel_initializer)

    def _apply(self, kernel, x):
        if x.shape.rank == 1:  # a power-iteration vector
            return tf.linalg.matvec(kernel, x, transpose_a=True)
        return tf.matmul(x, kernel)

    def _adjoint(self, kernel, y):
        return tf.linalg.matvec(kernel, y)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    def get_config(self):
        return {**super().get_config(), "units": self.units, "input_units": self.input_units,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer)}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class SpectralConv2D(_SpectralLinear):
    """Conv2D (stride 1, "same" zero padding) whose operator norm on inputs of
    `input_shape = (H, W, C)` is held <= `lipschitz`.

    The power iteration runs on the convolution itself (`u`: `[H, W,
    filters]`, `v`: `[H, W, C]`; the adjoint is the transposed convolution),
    so `sigma` is the norm of the map the layer applies, not of its reshaped
    kernel. Other arguments as `SpectralDense`.
    """

    def __init__(self, filters: int, kernel_size: int, input_shape: Sequence[int],
                 kernel_initializer: Any = "glorot_uniform", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.filters = checks.positive_int(filters, "filters")
        self.kernel_size = checks.positive_int(kernel_size, "kernel_size")
        self.input_event_shape = checks.shape(input_shape, "input_shape", rank=3)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        h, w, c = self.input_event_shape
        k = self.kernel_size
        self._create_weights((k, k, c, self.filters), self.filters, (h, w, c),
                             (h, w, self.filters), self.kernel_initializer)

    def _apply(self, kernel, x):
        single = x.shape.rank == 3
        out = tf.nn.conv2d(x[None] if single else x, kernel, 1, "SAME")
        return out[0] if single else out

    def _adjoint(self, kernel, y):
        shape = [1] + list(self.input_event_shape)
        return tf.nn.conv2d_transpose(y[None], kernel, shape, 1, "SAME")[0]

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.filters,)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters,
                "kernel_size": self.kernel_size, "input_shape": self.input_event_shape,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer)}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class LipSwish(layers.Layer):
    """`x * sigmoid(beta x) / 1.1` with `beta = softplus(raw) > 0` trainable
    (initially 1); Lipschitz constant <= 1 for every `beta`."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.raw_beta = self.add_weight(name="raw_beta", shape=(),
                                        initializer=keras.initializers.Constant(
                                            math.log(math.e - 1.0)))
        self.built = True

    def beta(self):
        return tf.cast(tf.nn.softplus(tf.convert_to_tensor(self.raw_beta)), self.compute_dtype)

    @staticmethod
    def activate(x, beta):
        return x * tf.sigmoid(beta * x) / tf.constant(1.1, x.dtype)

    def call(self, x):
        return self.activate(x, self.beta())

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)


class _LipschitzResidual(layers.Layer):
    """`g = L_n o f o ... o L_1 o f` (LipSwish `f` before every linear `L_i`)."""

    def _check_common(self, lipschitz, seed):
        self.lipschitz = _lipschitz(lipschitz)
        self.seed = zlib.crc32(self.name.encode()) if seed is None else \
            checks.positive_int(seed, "seed", minimum=0)

    def _linear_options(self, i):
        return dict(lipschitz=self.lipschitz, seed=(self.seed + 7919 * i) % 2**31,
                    dtype=self.dtype_policy, name=f"{self.name}_linear_{i}")

    def _finish(self, linears):
        self.linears = linears
        self.activations = [LipSwish(dtype=self.dtype_policy, name=f"{self.name}_lipswish_{i}")
                            for i in range(len(linears))]
        self.built = True

    @property
    def lipschitz_bound(self):
        """`c ** n`: a bound of `Lip(g)` (`n` linear layers, each <= c)."""
        return self.lipschitz ** len(self.linears)

    @property
    def event_shape(self):
        return self._event_shape

    def training_step_seed(self):
        """The training step's seed inside one, else None (`training_step_seed`)."""
        return training_step_seed()

    def normalized_weights(self, update=None):
        """`[beta_1, W_1, b_1, ..., beta_n, W_n, b_n]` as tensors (compute dtype).

        `update` None: a training call (power iteration stored) exactly when
        inside `nets.dropout_active()`.
        """
        if update is None:
            update = _coupling.is_dropout_active()
        weights = []
        for act, linear in zip(self.activations, self.linears):
            weights += [act.beta(), linear.normalized_kernel(update),
                        tf.cast(linear.bias, self.compute_dtype)]
        return weights

    def call_with(self, x, weights):
        """`g(x)` from `normalized_weights()`: a pure function of `x` and them."""
        for i, linear in enumerate(self.linears):
            beta, kernel, bias = weights[3 * i:3 * i + 3]
            x = linear.apply_linear(LipSwish.activate(x, beta), kernel, bias)
        return x

    def call(self, x):
        return self.call_with(x, self.normalized_weights())

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ResidualMLP(_LipschitzResidual):
    """`g` for vectors `[D]`: `num_hidden_layers + 1` spectrally normalised
    Dense layers (`hidden_units` wide), each after a LipSwish:

        g(x) = L_n(f(... L_2(f(L_1(f(x)))))),   Lip(g) <= lipschitz ** n

    Args:
      event_size: `D`.
      hidden_units: width of the hidden layers.
      num_hidden_layers: hidden layers (>= 1).
      lipschitz: `c` in (0, 1), the bound of each layer.
      seed: starts of the power iterations (default: a CRC-32 of the name).
    """

    def __init__(self, event_size: int, hidden_units: int = 64, num_hidden_layers: int = 2,
                 lipschitz: float = 0.97, seed: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.event_size = checks.positive_int(event_size, "event_size")
        self.hidden_units = checks.positive_int(hidden_units, "hidden_units")
        self.num_hidden_layers = checks.positive_int(num_hidden_layers, "num_hidden_layers")
        self._check_common(lipschitz, seed)
        self._event_shape = (self.event_size,)
        sizes = [self.event_size] + [self.hidden_units] * self.num_hidden_layers \
            + [self.event_size]
        self._finish([SpectralDense(out, inp, **self._linear_options(i))
                      for i, (inp, out) in enumerate(zip(sizes[:-1], sizes[1:]))])

    def get_config(self):
        return {**super().get_config(), "event_size": self.event_size,
                "hidden_units": self.hidden_units,
                "num_hidden_layers": self.num_hidden_layers, "lipschitz": self.lipschitz,
                "seed": self.seed}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ResidualCNN(_LipschitzResidual):
    """`g` for images `[H, W, C]` (Residual Flows' block, Chen et al. 2019):

        LipSwish -> 3x3 conv (hidden) -> LipSwish -> 1x1 conv (hidden)
        -> LipSwish -> 3x3 conv (C),          Lip(g) <= lipschitz ** 3

    each convolution spectrally normalised as an operator on `[H, W, .]`.
    Other arguments as `ResidualMLP`; `event_shape` is `(H, W, C)`.
    """

    def __init__(self, event_shape: Sequence[int], hidden_channels: int = 32,
                 lipschitz: float = 0.97, seed: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._event_shape = checks.shape(event_shape, "event_shape", rank=3)
        self.hidden_channels = checks.positive_int(hidden_channels, "hidden_channels")
        self._check_common(lipschitz, seed)
        h, w, c = self._event_shape
        hidden = self.hidden_channels
        plan = [(hidden, 3, (h, w, c)), (hidden, 1, (h, w, hidden)), (c, 3, (h, w, hidden))]
        self._finish([SpectralConv2D(filters, k, shape, **self._linear_options(i))
                      for i, (filters, k, shape) in enumerate(plan)])

    def get_config(self):
        return {**super().get_config(), "event_shape": self._event_shape,
                "hidden_channels": self.hidden_channels, "lipschitz": self.lipschitz,
                "seed": self.seed}
