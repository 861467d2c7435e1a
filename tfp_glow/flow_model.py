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

import logging
import math

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_glow.bijectors import (ActNorm, data_dependent_init, forward_and_log_det,
                                inverse_and_log_det, keras_layers_of)
from tfp_glow.bijectors.base import sub_bijectors
from tfp_glow import training

tfb = tfp.bijectors
tfd = tfp.distributions

__all__ = ["FlowModel"]

_LOG = logging.getLogger("tfp_glow")
# Data scaled by `tfp_glow.data.preprocess` lies in [-0.5, 0.5]; float32 rounding
# stays far below this slack, raw pixels ([0, 1] or [0, 255]) far above it.
_RANGE_SLACK = 1e-3


def _check_num_samples(num_samples):
    if isinstance(num_samples, (tf.Tensor, tf.Variable)):
        if not num_samples.dtype.is_integer:
            raise TypeError(
                f"`num_samples` must be an int; got a {num_samples.dtype.name} tensor.")
        if not tf.executing_eagerly():
            return
        num_samples = int(num_samples.numpy())
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)):
        raise TypeError(f"`num_samples` must be an int; got {num_samples!r}.")
    if num_samples < 1:
        raise ValueError(f"`num_samples` must be >= 1; got {num_samples}.")


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
      nonfinite: what a training step with a NaN/inf loss or gradient does.
        Either way the update is not applied (weights, optimizer moments and
        step count stay as they were). `"raise"` (default) then stops `fit`
        with a `FloatingPointError` naming the batch; `"skip"` counts the
        step (`nonfinite_steps` in the logs) and keeps training.
      validate_args: also check input *values* (finite; inside the data range
        [-0.5, 0.5] for discretised images) inside `tf.function` and
        `train_step`, with `tf.debugging` assertions. Eager calls of the
        public methods always check them.
      dtype: `"float32"` (default) or `"float64"`: the dtype of the base
        distribution and of the inputs (a Keras dtype policy; the builders
        of `Glow`, `RealNVP` and `NICE` build every bijector and network in
        it). Left out, a custom `flow`'s own variables decide.

    `call(x)` returns `log_prob(x)` per example. `Glow`, `RealNVP` and `NICE`
    are subclasses that build `flow` from a config.
    """

    def __init__(self, flow=None, event_shape=None, num_bins=256, num_classes=None,
                 nonfinite="raise", validate_args=False, **kwargs):
        training.check_nonfinite_mode(nonfinite)
        if not isinstance(validate_args, bool):
            raise TypeError(f"`validate_args` must be a bool; got {validate_args!r}.")
        explicit_dtype = kwargs.get("dtype") is not None
        super().__init__(**kwargs)
        if not tf.as_dtype(self.dtype_policy.variable_dtype).is_floating:
            raise ValueError(
                "`dtype` must be a float dtype such as 'float32' or 'float64'; got "
                f"{self.dtype_policy.name!r}.")
        self._nonfinite = nonfinite
        self.validate_args = validate_args
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
        self._base = tfd.Sample(
            tfd.Normal(tf.constant(0.0, self._flow_dtype(flow, explicit_dtype)), 1.0),
            self._latent_shape)
        self._distribution = tfd.TransformedDistribution(
            self._base, tfb.Invert(flow), name="flow_distribution")
        # Keras tracks layers assigned as a list attribute: every variable of
        # the flow becomes a model weight (fit, saving, checkpoints, strategies).
        self.flow_layers = keras_layers_of(flow)
        self._actnorms = [b for b in _walk(flow) if isinstance(b, ActNorm)]
        self._nll_tracker = keras.metrics.Mean(name="loss")
        self._bpd_tracker = keras.metrics.Mean(name="bits_per_dim")
        self._nonfinite_counter = training.NonfiniteCounter()
        self._nonfinite_reported = 0.0
        self._train_position = None
        self.built = True

    def _flow_dtype(self, flow, explicit_dtype):
        if flow.dtype is not None:
            return flow.dtype
        if explicit_dtype:
            return tf.as_dtype(self.dtype_policy.variable_dtype)
        for layer in keras_layers_of(flow):
            for v in layer.weights:
                if v.dtype in ("float32", "float64", "float16", "bfloat16"):
                    return tf.as_dtype(v.dtype)
        return tf.float32

    def _base_config(self):
        """`keras.Model`'s config plus FlowModel's options (for subclasses)."""
        return {**super().get_config(), "nonfinite": self._nonfinite,
                "validate_args": self.validate_args}

    @property
    def nonfinite(self):
        """`"raise"` or `"skip"`: what a step with a NaN/inf loss or gradient does."""
        return self._nonfinite

    @nonfinite.setter
    def nonfinite(self, mode):
        self._nonfinite = training.check_nonfinite_mode(mode)
        self.train_function = None  # the mode is baked into the traced step

    @property
    def nonfinite_steps(self):
        """Training steps skipped for a NaN/inf loss or gradient in the latest `fit`."""
        return int(self._nonfinite_counter.result())

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
        """Shape of one data point, e.g. `(8, 8, 1)`."""
        return self._event_shape

    @property
    def latent_shape(self):
        """Shape of one latent `z = encode(x)` (the base distribution's event)."""
        return self._latent_shape

    @property
    def num_dims(self):
        """Number of data dimensions `D` (the bits/dim denominator)."""
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

    # -- input validation --------------------------------------------------
    # Static checks (dtype, rank, shape) run everywhere and cost nothing at run
    # time. Value checks (finite, in range) need the data: they run in eager
    # calls of the public methods, and inside graphs only with validate_args,
    # so the compiled `train_step` does not pay for them by default.

    @property
    def data_range(self):
        """`(-0.5, 0.5)` for discretised image models (`num_bins` set), else None."""
        if self.num_bins is not None and len(self._event_shape) == 3:
            return (-0.5, 0.5)
        return None

    def _check_input(self, x, arg_name="x", values=True):
        """`x` as a tensor of the model's dtype; raises on bad dtype/shape/values."""
        if x is None:
            raise TypeError(f"`{arg_name}` must be a float tensor of data; got None.")
        x = tf.convert_to_tensor(x)
        if not x.dtype.is_floating:
            if self.num_bins is not None:
                hint = (f" Map integer levels to [-0.5, 0.5] first with "
                        f"`tfp_glow.data.preprocess(images, num_bins={self.num_bins})` "
                        "(8-bit pixels: `tfp_glow.data.reduce_bits` first).")
            else:
                hint = " Cast it to a float dtype first."
            raise TypeError(
                f"`{arg_name}` must be a floating tensor (preprocessed data); got "
                f"dtype {x.dtype.name}.{hint}")
        x = tf.cast(x, self._base.dtype)
        rank = len(self._event_shape)
        if x.shape.rank is not None and (
                x.shape.rank != rank + 1 or any(
                    a is not None and a != b
                    for a, b in zip(x.shape[1:], self._event_shape))):
            hint = ""
            if tuple(x.shape) == self._event_shape:
                hint = f" Add a batch axis, e.g. `{arg_name}[None]`."
            raise ValueError(
                f"`{arg_name}` must have shape [batch, "
                f"{', '.join(map(str, self._event_shape))}]; got {x.shape}.{hint}")
        if values:
            x = self._check_values(x, arg_name, self.data_range)
        return x

    def _check_values(self, x, arg_name, data_range=None):
        """Finite (and within `data_range` + slack) values, eagerly or by assertion."""
        if tf.executing_eagerly():
            if tf.size(x) == 0:
                return x
            finite = tf.math.is_finite(x)
            safe = tf.where(finite, x, tf.zeros_like(x))
            num_bad, lo, hi = tf.stack([
                tf.reduce_sum(tf.cast(tf.logical_not(finite), x.dtype)),
                tf.reduce_min(safe), tf.reduce_max(safe)]).numpy().tolist()
            if num_bad:
                raise ValueError(
                    f"`{arg_name}` contains {int(num_bad)} non-finite values (NaN or "
                    "inf); a flow cannot score or invert them.")
            if data_range is not None and (lo < data_range[0] - _RANGE_SLACK
                                           or hi > data_range[1] + _RANGE_SLACK):
                raise ValueError(
                    f"`{arg_name}` must lie in the data range [{data_range[0]}, "
                    f"{data_range[1]}] of this model (num_bins={self.num_bins}); got "
                    f"values in [{lo:.4g}, {hi:.4g}]. Scale images with "
                    "`tfp_glow.data.preprocess` (raw pixels in [0, 255] or [0, 1] are "
                    "outside the support).")
            return x
        if not self.validate_args:
            return x
        checks = [tf.debugging.Assert(
            tf.reduce_all(tf.math.is_finite(x)),
            [f"`{arg_name}` contains non-finite values (NaN or inf)."])]
        if data_range is not None:
            checks.append(tf.debugging.Assert(
                tf.reduce_all((x >= data_range[0] - _RANGE_SLACK)
                              & (x <= data_range[1] + _RANGE_SLACK)),
                [f"`{arg_name}` must lie in the data range [{data_range[0]}, "
                 f"{data_range[1]}]; got min and max:", tf.reduce_min(x), tf.reduce_max(x)]))
        with tf.control_dependencies(checks):
            return tf.identity(x)

    def _check_labels(self, labels, x, values=True):
        """Labels for a class-conditional model: int `[batch]` or one-hot `[batch, K]`."""
        if self.num_classes is None:
            if labels is not None:
                raise ValueError(
                    "`labels` were given but this model is not class-conditional "
                    "(num_classes=None); build it with `num_classes` or drop `labels`.")
            return None
        if labels is None:
            raise ValueError(
                f"This model is class-conditional (num_classes={self.num_classes}): "
                "pass `labels`.")
        labels = tf.convert_to_tensor(labels)
        k = self.num_classes
        if labels.dtype.is_integer:
            if labels.shape.rank not in (None, 1):
                raise ValueError(
                    f"Integer `labels` must have shape [batch]; got {labels.shape}.")
        elif labels.dtype.is_floating:
            if labels.shape.rank is not None and (
                    labels.shape.rank != 2 or labels.shape[-1] not in (None, k)):
                raise ValueError(
                    f"Float (one-hot) `labels` must have shape [batch, {k}]; got "
                    f"{labels.shape}.")
        else:
            raise TypeError(
                f"`labels` must be int class ids or float one-hot vectors; got dtype "
                f"{labels.dtype.name}.")
        n, m = labels.shape[0] if labels.shape.rank else None, x.shape[0] if x.shape.rank else None
        if n is not None and m is not None and n != m:
            raise ValueError(f"`labels` has {n} entries but the batch has {m} examples.")
        if values and labels.dtype.is_integer and tf.executing_eagerly() and tf.size(labels):
            lo, hi = tf.reduce_min(labels).numpy(), tf.reduce_max(labels).numpy()
            if lo < 0 or hi >= k:
                raise ValueError(
                    f"`labels` must be class ids in [0, {k - 1}] (num_classes={k}); got "
                    f"values in [{lo}, {hi}].")
        return labels

    def log_prob(self, x, labels=None):
        """`log p(x)` per example, in one pass through the flow."""
        x = self._check_input(x, "x")
        return self._log_prob(x, self._check_labels(labels, x))

    def _log_prob(self, x, labels):
        """`log p(x)` of already validated inputs (the hot path of train_step)."""
        z, ldj = forward_and_log_det(self._flow, x, **self._condition(labels))
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
        return self.log_prob(x, labels if self.num_classes is not None else None)

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
        if z is None:
            raise TypeError("`z` must be a float tensor of latents; got None.")
        z = tf.convert_to_tensor(z)
        if not z.dtype.is_floating:
            raise TypeError(
                f"`z` must be a floating tensor of latents (from `encode` or N(0, I)); "
                f"got dtype {z.dtype.name}.")
        z = tf.cast(z, self._base.dtype)
        if z.shape.rank is not None and (
                z.shape.rank != 2 or tuple(z.shape[1:]) != self._latent_shape):
            raise ValueError(
                f"`z` must have shape [batch, {', '.join(map(str, self._latent_shape))}]; "
                f"got {z.shape}.")
        z = self._check_values(z, "z")
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
        _check_num_samples(num_samples)
        if isinstance(temperature, (int, float, np.number)) and not (
                math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"`temperature` must be finite and >= 0; got {temperature!r}.")
        if labels is not None and self.num_classes is not None:
            labels = tf.convert_to_tensor(labels)
            if labels.dtype.is_integer and labels.shape.rank == 0:
                labels = tf.fill([num_samples], labels)
        shape = tf.concat([[num_samples], self._latent_shape], 0)
        dtype = self._base.dtype
        if seed is None:
            eps = tf.random.normal(shape, dtype=dtype)
        else:
            seed = tf.stack([tf.cast(seed, tf.int64), tf.constant(0, tf.int64)])
            eps = tf.random.stateless_normal(shape, seed=seed, dtype=dtype)
        return self.decode(eps * tf.cast(temperature, dtype), labels)

    def interpolate(self, x_start, x_end, num_steps=8, labels=None):
        """Decodes `(1 - t) f(x_start) + t f(x_end)` for `t` in [0, 1].

        Returns `[num_steps, batch, *event_shape]`; the first and last steps
        reconstruct the inputs.
        """
        if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) \
                or num_steps < 2:
            raise ValueError(f"`num_steps` must be an int >= 2; got {num_steps!r}.")
        z0 = self.encode(x_start, labels)
        z1 = self.encode(x_end, labels)
        if z0.shape.is_fully_defined() and z1.shape.is_fully_defined() \
                and z0.shape != z1.shape:
            raise ValueError(
                f"`x_start` and `x_end` must have the same batch size; got "
                f"{z0.shape[0]} and {z1.shape[0]}.")
        t = tf.reshape(tf.linspace(0.0, 1.0, num_steps), [-1, 1, 1])
        t = tf.cast(t, z0.dtype)
        z = (1.0 - t) * z0[None] + t * z1[None]
        flat = tf.reshape(z, (-1,) + self._latent_shape)
        flat_labels = None
        if labels is not None:
            # Step-major like `flat`; works for int [batch] and one-hot [batch, K].
            flat_labels = tf.concat([tf.convert_to_tensor(labels)] * num_steps, axis=0)
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

    def _update_metrics(self, log_prob, applied=None):
        if applied is not None:
            # A skipped (non-finite) step must not poison the epoch's means.
            weight = tf.broadcast_to(tf.cast(applied, log_prob.dtype), tf.shape(log_prob))
            log_prob = tf.where(weight > 0, log_prob, tf.zeros_like(log_prob))
        else:
            weight = None
        self._nll_tracker.update_state(-log_prob, sample_weight=weight)
        self._bpd_tracker.update_state(self._bits_per_dim_from_log_prob(log_prob),
                                       sample_weight=weight)
        return {m.name: m.result() for m in self.metrics}

    def _checked_batch(self, x, labels):
        """Static checks only; value checks (assertions) only with validate_args."""
        x = self._check_input(x, "x", values=self.validate_args)
        return x, self._check_labels(labels, x, values=False)

    def train_step(self, data):
        x, labels = self._checked_batch(*self._unpack(data))
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        with tf.GradientTape() as tape:
            log_prob = self._log_prob(x, labels)
            loss = -tf.reduce_mean(log_prob)
            if self.losses:
                loss = loss + tf.add_n(self.losses)
            # Gradients are summed over replicas: divide so the step is the
            # gradient of the global mean NLL.
            scaled = self.optimizer.scale_loss(loss / replicas)
        grads = tape.gradient(scaled, self.trainable_variables)
        # The NaN/inf guard: the update is applied only if the loss and every
        # gradient are finite on every replica (a LossScaleOptimizer skips
        # overflowing scaled gradients itself, so only the loss is checked).
        loss_finite = training.all_finite([loss])
        step_finite = loss_finite
        if not isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            step_finite = tf.logical_and(step_finite, training.all_finite(grads))
        loss_finite = tf.logical_not(training.any_replica(tf.logical_not(loss_finite)))
        step_finite = tf.logical_not(training.any_replica(tf.logical_not(step_finite)))
        apply = step_finite
        if self._nonfinite == "raise":
            # Stay frozen after a bad step until `fit` raises (it checks after
            # each call of the train function, which may run several steps).
            apply = tf.logical_and(
                apply, tf.equal(tf.convert_to_tensor(self._nonfinite_counter.steps), 0.0))
        training.apply_if(self.optimizer, apply, grads, self.trainable_variables)
        self._nonfinite_counter.update_state(loss_finite, step_finite)
        logs = self._update_metrics(log_prob, applied=step_finite)
        logs["nonfinite_steps"] = self._nonfinite_counter.result()
        return logs

    def test_step(self, data):
        x, labels = self._checked_batch(*self._unpack(data))
        return self._update_metrics(self._log_prob(x, labels))

    def make_train_function(self, force=False):
        """Keras' train function, followed by the check of the NaN/inf guard.

        The traced step never applies a non-finite update; this Python check
        after each call raises (`nonfinite="raise"`) or logs (`"skip"`), before
        any callback sees the batch, so no checkpoint callback runs after a
        bad step in raise mode.
        """
        super().make_train_function(force=force)
        function = self.train_function
        if function is not None and not getattr(function, "_nonfinite_guard", False):
            def guarded(iterator):
                logs = function(iterator)
                self._check_nonfinite_steps()
                return logs

            guarded._nonfinite_guard = True
            self.train_function = guarded
        return self.train_function

    def _check_nonfinite_steps(self):
        count = float(self._nonfinite_counter.steps.numpy())
        if count <= self._nonfinite_reported:
            return
        new = count - self._nonfinite_reported
        self._nonfinite_reported = count
        where = "a training batch"
        if self._train_position is not None:
            epoch, batch = self._train_position
            spe = int(getattr(self, "steps_per_execution", 1) or 1)
            if spe > 1:  # Keras reports the first batch of each execution
                where = f"epoch {epoch + 1}, one of batches {batch}-{batch + spe - 1}"
            else:
                where = f"epoch {epoch + 1}, batch {batch}"
        if self._nonfinite == "raise":
            loss_bad = float(self._nonfinite_counter.loss_steps.numpy()) > 0
            self._nonfinite_counter.reset_state()
            self._nonfinite_reported = 0.0
            raise FloatingPointError(training.nonfinite_error_message(where, loss_bad))
        _LOG.warning("Skipped %d training step(s) with a non-finite loss or gradient at "
                     "%s (nonfinite='skip'; %d skipped in this fit).", new, where, count)

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
        """`keras.Model.fit`, initialising ActNorm on the first batch if needed.

        A step whose loss or gradient is NaN/inf is never applied; see the
        `nonfinite` option for what happens next.
        """
        if not self.is_initialized:
            batch_x, batch_y = self._first_batch(x, y, batch_size)
            self.initialize(batch_x, batch_y)
        if getattr(self, "optimizer", None) is not None and not self.optimizer.built:
            # Built here, eagerly: built inside the first trace of the train step,
            # its new variables make tf.function trace the whole step twice.
            with self.distribute_strategy.scope():
                self.optimizer.build(self.trainable_variables)
        self._nonfinite_counter.reset_state()
        self._nonfinite_reported = 0.0
        callbacks = kwargs.get("callbacks")
        if not isinstance(callbacks, keras.callbacks.CallbackList):
            if callbacks is None:
                callbacks = []
            elif isinstance(callbacks, keras.callbacks.Callback):
                callbacks = [callbacks]
            kwargs["callbacks"] = [training.TrainPosition()] + list(callbacks)
        try:
            return super().fit(x, y, batch_size=batch_size, **kwargs)
        finally:
            self._train_position = None

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
