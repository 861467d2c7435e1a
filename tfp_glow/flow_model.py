"""`FlowModel`: a Keras 3 model around a flow distribution.

The model holds a normalizing bijector `f` (data to latent) and exposes the
distribution `TransformedDistribution(N(0, I), Invert(f))`. It tracks every
Keras layer inside `f`, so stock `fit`, `evaluate`, `save_weights`,
`ModelCheckpoint`, `BackupAndRestore` and `tf.distribute` need no custom
variable plumbing. The loss is the negative log-likelihood

    log p(x) = log N(f(x); 0, I) + log|det df/dx|

computed in one pass (`forward_and_log_det`), and the reported metric is
openai/glow's bits per dimension for data on `num_bins` levels scaled to
[-0.5, 0.5] and dequantized:

    bits/dim = (-log p(x) + D log(num_bins)) / (D ln 2).
"""

import math

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_glow.bijectors import (ActNorm, data_dependent_init, forward_and_log_det,
                                inverse_and_log_det, keras_layers_of)
from tfp_glow.bijectors.base import sub_bijectors

tfb = tfp.bijectors
tfd = tfp.distributions

__all__ = ["FlowModel"]


def _walk(bijector):
    yield bijector
    for child in sub_bijectors(bijector):
        yield from _walk(child)


@keras.saving.register_keras_serializable(package="tfp_glow")
class FlowModel(keras.Model):
    """Trains any flow made of tfp_glow bijectors with `Model.fit`.

    Args:
      flow: the normalizing bijector `f` (or a zero-argument function building
        it, run after `keras.Model.__init__`), mapping an event of `event_shape` to
        a flat latent (e.g. a `MultiScaleFlow`) or to a same-shaped latent.
      event_shape: shape of one data point, e.g. `(8, 8, 1)` or `(2,)`.
      num_bins: number of discrete levels of the data (256 for 8-bit images,
        17 for the built-in digits); used by `bits_per_dim`. For continuous
        data (2-D toy densities) pass `None`: `bits_per_dim` then reports the
        negative log-likelihood in bits without a discretisation term.
      num_classes: when set, the flow is class-conditional: labels reach its
        priors as `conditional_input`, and `fit` takes `(image, label)` data.

    `call(x)` returns `log_prob(x)` per example. `Glow`, `RealNVP` and `NICE`
    are subclasses that build `flow` from a config.
    """

    def __init__(self, flow=None, event_shape=None, num_bins=256, num_classes=None,
                 **kwargs):
        super().__init__(**kwargs)
        if callable(flow) and not isinstance(flow, tfb.Bijector):
            flow = flow()  # subclasses pass a builder, run after Model.__init__
        if not isinstance(flow, tfb.Bijector):
            raise TypeError(f"`flow` must be a tfp bijector (data to latent); got {flow!r}.")
        if event_shape is None:
            raise ValueError("`event_shape` is required (the shape of one data point).")
        self._event_shape = tuple(int(d) for d in event_shape)
        if num_bins is not None and (not isinstance(num_bins, (int, np.integer))
                                     or num_bins < 2):
            raise ValueError(f"`num_bins` must be an int >= 2 or None; got {num_bins!r}.")
        self.num_bins = None if num_bins is None else int(num_bins)
        self.num_classes = num_classes
        self._flow = flow
        latent_shape = flow.forward_event_shape(self._event_shape)
        self._latent_shape = tuple(int(d) for d in latent_shape)
        self._base = tfd.Sample(tfd.Normal(tf.constant(0.0, flow.dtype or tf.float32),
                                           1.0), self._latent_shape)
        self._distribution = tfd.TransformedDistribution(
            self._base, tfb.Invert(flow), name="flow_distribution")
        # Keras tracks layers assigned as a list attribute: every variable of
        # the flow becomes a model weight (fit, saving, checkpoints, strategies).
        self.flow_layers = keras_layers_of(flow)
        self._actnorms = [b for b in _walk(flow) if isinstance(b, ActNorm)]
        self._nll_tracker = keras.metrics.Mean(name="loss")
        self._bpd_tracker = keras.metrics.Mean(name="bits_per_dim")
        self.built = True

    # -- structure ---------------------------------------------------------
    @property
    def flow(self):
        """The normalizing bijector `f` (data to latent)."""
        return self._flow

    @property
    def bijector(self):
        """The generative bijector `Invert(f)` (latent to data)."""
        return self._distribution.bijector

    @property
    def distribution(self):
        """`tfd.TransformedDistribution(N(0, I), Invert(f))`."""
        return self._distribution

    @property
    def event_shape(self):
        return self._event_shape

    @property
    def latent_shape(self):
        return self._latent_shape

    @property
    def num_dims(self):
        return int(np.prod(self._event_shape))

    def build(self, input_shape=None):
        self.built = True  # Every variable is created in the constructor.

    # -- data-dependent initialisation -------------------------------------
    @property
    def is_initialized(self):
        """True once every ActNorm was initialised (or restored)."""
        return all(a.is_initialized for a in self._actnorms)

    def initialize(self, x, labels=None):
        """Data-dependent init of every ActNorm from one batch, once.

        Runs `x` through the normalizing direction with
        `data_dependent_init()`, so each ActNorm standardises the activations
        that actually reach it. Runs eagerly in cross-replica context: under a
        `tf.distribute` strategy every replica gets identical statistics.
        ActNorms already initialised (e.g. restored from a checkpoint) are
        left alone.
        """
        if not tf.executing_eagerly():
            raise RuntimeError("`initialize` must run eagerly, outside tf.function.")
        x = self._check_input(x, "x")
        labels = self._check_labels(labels, x)
        with self.distribute_strategy.scope(), data_dependent_init():
            self._flow.forward_and_log_det(x, **self._condition(labels))
        return self

    # -- density -----------------------------------------------------------
    def _condition(self, labels):
        return {} if self.num_classes is None else {"conditional_input": labels}

    def _check_input(self, x, arg_name):
        x = tf.convert_to_tensor(x)
        if not x.dtype.is_floating:
            raise TypeError(
                f"`{arg_name}` must be a floating tensor (preprocessed data); got "
                f"dtype {x.dtype.name}.")
        x = tf.cast(x, self._base.dtype)
        rank = len(self._event_shape)
        if x.shape.rank is not None and (
                x.shape.rank != rank + 1 or any(
                    a is not None and a != b
                    for a, b in zip(x.shape[1:], self._event_shape))):
            raise ValueError(
                f"`{arg_name}` must have shape [batch, "
                f"{', '.join(map(str, self._event_shape))}]; got {x.shape}.")
        return x

    def _check_labels(self, labels, x):
        if self.num_classes is None:
            return None
        if labels is None:
            raise ValueError(
                f"This model is class-conditional (num_classes={self.num_classes}): "
                "pass `labels`.")
        return tf.convert_to_tensor(labels)

    def log_prob(self, x, labels=None):
        """`log p(x)` per example, in one pass through the flow."""
        x = self._check_input(x, "x")
        z, ldj = forward_and_log_det(self._flow, x, **self._condition(
            self._check_labels(labels, x)))
        return self._base.log_prob(z) + ldj

    def bits_per_dim(self, x, labels=None):
        """openai/glow's bits/dim: `(-log p(x) + D log(num_bins)) / (D ln 2)`."""
        return self._bits_per_dim_from_log_prob(self.log_prob(x, labels))

    def _bits_per_dim_from_log_prob(self, log_prob):
        d = float(self.num_dims)
        discretisation = 0.0 if self.num_bins is None else d * math.log(self.num_bins)
        return (-log_prob + discretisation) / (d * math.log(2.0))

    def call(self, inputs, training=False):
        x, labels = self._split_inputs(inputs)
        return self.log_prob(x, labels)

    def _split_inputs(self, inputs, y=None):
        if isinstance(inputs, dict):
            return inputs["image"], inputs.get("label", y)
        if isinstance(inputs, (tuple, list)) and len(inputs) == 2:
            return inputs[0], inputs[1]
        return inputs, y

    # -- latent space --------------------------------------------------------
    def encode(self, x, labels=None):
        """`z = f(x)`, the flat standard-normal latent."""
        x = self._check_input(x, "x")
        return self._flow.forward_and_log_det(
            x, **self._condition(self._check_labels(labels, x)))[0]

    def decode(self, z, labels=None):
        """`x = f^-1(z)`."""
        z = tf.convert_to_tensor(z, self._base.dtype)
        if z.shape.rank is not None and tuple(z.shape[1:]) != self._latent_shape:
            raise ValueError(
                f"`z` must have shape [batch, {', '.join(map(str, self._latent_shape))}]; "
                f"got {z.shape}.")
        labels = self._check_labels(labels, z)
        return inverse_and_log_det(self._flow, z, **self._condition(labels))[0]

    def sample(self, num_samples, temperature=1.0, seed=None, labels=None):
        """Draws `x = f^-1(T * eps)`, `eps ~ N(0, I)`.

        Scaling the standard-normal latent by the temperature `T` scales the
        standard deviation of the base *and of every learned prior* by `T`
        (the priors are standardisations inside `f`), which is openai/glow's
        temperature. `T = 0` gives the mode of every prior. With an int `seed`
        the draw is stateless and reproducible.
        """
        if isinstance(temperature, (int, float)) and temperature < 0:
            raise ValueError(f"`temperature` must be >= 0; got {temperature!r}.")
        shape = tf.concat([[num_samples], self._latent_shape], 0)
        dtype = self._base.dtype
        if seed is None:
            eps = tf.random.normal(shape, dtype=dtype)
        else:
            seed = tf.stack([tf.cast(seed, tf.int64), tf.constant(0, tf.int64)])
            eps = tf.random.stateless_normal(shape, seed=seed, dtype=dtype)
        if labels is not None:
            labels = tf.broadcast_to(tf.convert_to_tensor(labels), [num_samples])
        return self.decode(eps * tf.cast(temperature, dtype), labels)

    def interpolate(self, x_start, x_end, num_steps=8, labels=None):
        """Decodes `(1 - t) f(x_start) + t f(x_end)` for `t` in [0, 1].

        Returns `[num_steps, batch, *event_shape]`; the first and last steps
        reconstruct the inputs.
        """
        z0 = self.encode(x_start, labels)
        z1 = self.encode(x_end, labels)
        t = tf.reshape(tf.linspace(0.0, 1.0, num_steps), [-1, 1, 1])
        t = tf.cast(t, z0.dtype)
        z = (1.0 - t) * z0[None] + t * z1[None]
        flat = tf.reshape(z, (-1,) + self._latent_shape)
        flat_labels = None
        if labels is not None:
            flat_labels = tf.tile(tf.convert_to_tensor(labels), [num_steps])
        x = self.decode(flat, flat_labels)
        return tf.reshape(x, (num_steps, -1) + self._event_shape)

    # -- training ----------------------------------------------------------
    @property
    def metrics(self):
        return [self._nll_tracker, self._bpd_tracker]

    def _unpack(self, data):
        x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        x, labels = self._split_inputs(x, y)
        return x, (labels if self.num_classes is not None else None)

    def _update_metrics(self, log_prob):
        self._nll_tracker.update_state(-log_prob)
        self._bpd_tracker.update_state(self._bits_per_dim_from_log_prob(log_prob))
        return {m.name: m.result() for m in self.metrics}

    def train_step(self, data):
        x, labels = self._unpack(data)
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        with tf.GradientTape() as tape:
            log_prob = self.log_prob(x, labels)
            loss = -tf.reduce_mean(log_prob)
            if self.losses:
                loss = loss + tf.add_n(self.losses)
            # Gradients are summed over replicas: divide so the step is the
            # gradient of the global mean NLL.
            scaled = self.optimizer.scale_loss(loss / replicas)
        grads = tape.gradient(scaled, self.trainable_variables)
        self.optimizer.apply(grads, self.trainable_variables)
        return self._update_metrics(log_prob)

    def test_step(self, data):
        x, labels = self._unpack(data)
        return self._update_metrics(self.log_prob(x, labels))

    def compile(self, optimizer="adam", **kwargs):
        """`compile` with Adam by default; the loss is always `-log p(x)`."""
        if kwargs.get("loss") is not None:
            raise ValueError("FlowModel trains on -log_prob; do not pass `loss`.")
        kwargs.pop("loss", None)
        super().compile(optimizer=optimizer, **kwargs)

    def compile_from_config(self, config):
        """Recompiles a model loaded from `.keras` (optimizer state included).

        Keras skips this for models that override `compile` (with a warning),
        so a reloaded model would come back without its optimizer and a
        resumed `fit` would restart Adam from zero moments.
        """
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if getattr(self, "optimizer", None) is not None and self.built:
            self.optimizer.build(self.trainable_variables)  # so its state loads

    def fit(self, x=None, y=None, batch_size=None, **kwargs):
        """`keras.Model.fit`, initialising ActNorm on the first batch if needed."""
        if not self.is_initialized:
            batch_x, batch_y = self._first_batch(x, y, batch_size)
            self.initialize(batch_x, batch_y)
        return super().fit(x, y, batch_size=batch_size, **kwargs)

    def _first_batch(self, x, y, batch_size):
        if isinstance(x, tf.data.Dataset):
            data = next(iter(x))
            return self._unpack(data)
        if isinstance(x, (np.ndarray, tf.Tensor)):
            n = batch_size or 256
            labels = None if (y is None or self.num_classes is None) else y[:n]
            return x[:n], labels
        raise ValueError(
            "The model is not initialised and `fit` cannot take a first batch "
            f"from {type(x).__name__}: call `model.initialize(batch)` first.")

    # -- config ------------------------------------------------------------
    def get_config(self):
        raise NotImplementedError(
            "A FlowModel around an arbitrary flow has no config; use Glow, RealNVP "
            "or NICE (or subclass FlowModel with get_config) for .keras saving.")
