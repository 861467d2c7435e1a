"""`FlowModel`: the Keras 3 plumbing around a `FlowDensity`.

The density (`tfp_glow.density.FlowDensity`) holds the flow and answers
`log_prob`, `bits_per_dim`, `encode`, `decode`, `sample` and `interpolate`;
the input rules live in its `InputSpec`; the NaN/inf guard of the training
step is a `tfp_glow.guard.NonfiniteGuard`. This class only makes a Keras
model of them: it tracks every Keras layer inside the flow, so stock `fit`,
`evaluate`, `save_weights`, `ModelCheckpoint`, `BackupAndRestore` and
`tf.distribute` need no custom variable plumbing, and trains on the negative
log-likelihood

    loss = -mean_i log p(x_i),   log p(x) = log N(f(x); 0, I) + log|det df/dx|,

or, with a `VariationalDequantizer` `q(u | k)` (Flow++), on the negative
variational bound `-(log p(x_q) - log q(u | k))`, `x_q = (k + u) / B - 0.5`.
"""

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_glow import checks, flow_config, nets
from tfp_glow.bijectors import ActNorm, data_dependent_init
from tfp_glow.bijectors.base import walk_bijectors
from tfp_glow.density import BACKPROP_MODES, FlowDensity
from tfp_glow.density_methods import DensityMethods
from tfp_glow.distributed import (first_step_batch, fit_callbacks, step_logs,
                                  symbolic_build_iterator)
from tfp_glow.flow_variables import FlowVariables, collect
from tfp_glow.guard import NonfiniteGuard
from tfp_glow.variational_dequantization import VariationalDequantizer
from tfp_glow.xla import warn_if_partial_last_batch

tfb = tfp.bijectors

__all__ = ["FlowModel"]


def _flow_dtype(flow, policy, explicit_dtype):
    """The float dtype of the flow: its own, the model's if given, else its variables'."""
    if flow.dtype is not None:
        return tf.as_dtype(flow.dtype)
    if explicit_dtype:
        return tf.as_dtype(policy.variable_dtype)
    layers, plain = collect(flow)  # no probe: the variables that exist now
    for v in [w for layer in layers for w in layer.weights] + plain:
        if tf.as_dtype(v.dtype) in (tf.float32, tf.float64):
            return tf.as_dtype(v.dtype)
    return tf.float32


def _is_actnorm(bijector):
    # TFP's own ActNorm (inside `tfb.Glow`) initialises itself on its first
    # call; run eagerly by `initialize`, that call sees the global batch, where
    # inside a distributed step each replica would see its own half.
    return isinstance(bijector, ActNorm) or type(bijector).__name__ == "ActivationNormalization"


def _actnorm_initialized(actnorm):
    if isinstance(actnorm, ActNorm):
        return actnorm.is_initialized
    return bool(actnorm._initialized.numpy())  # TFP's saved init flag


def _dropout_seed(optimizer):
    """The training step's dropout seed: `(optimizer.iterations, replica id)`.

    A function of the step, so a run resumed from a checkpoint (which restores
    `iterations`) drops the units the uninterrupted run dropped, and the
    recomputing backprop modes see the forward pass's masks; replicas of a
    `tf.distribute` strategy draw masks of their own.
    """
    replica = tf.distribute.get_replica_context()
    replica_id = 0 if replica is None else replica.replica_id_in_sync_group
    return tf.stack([tf.cast(optimizer.iterations, tf.int64),
                     tf.cast(replica_id, tf.int64)])


def _check_dequantizer(dequantizer, event_shape, num_bins):
    if dequantizer is None:
        return None
    if not isinstance(dequantizer, VariationalDequantizer):
        raise TypeError(f"`dequantizer` must be None or a "
                        f"tfp_glow.VariationalDequantizer; got {dequantizer!r}.")
    if tuple(dequantizer.event_shape) != tuple(event_shape) or \
            dequantizer.num_bins != num_bins:
        raise ValueError(
            f"`dequantizer` is for event shape {tuple(dequantizer.event_shape)} with "
            f"num_bins={dequantizer.num_bins}; the model has event shape "
            f"{tuple(event_shape)} with num_bins={num_bins}.")
    return dequantizer


@keras.saving.register_keras_serializable(package="tfp_glow")
class FlowModel(DensityMethods, keras.Model):
    """Trains any flow made of tfp_glow and TFP bijectors with `Model.fit` (Keras 3).

    Args:
      flow: the normalizing bijector `f` (or a zero-argument function building
        it, run after `keras.Model.__init__`), mapping an event of
        `event_shape` to a latent: a `MultiScaleFlow`, a plain `tfb.Chain` of
        tfp_glow and TFP bijectors, TFP's own flows (`tfb.Invert` of a
        `MaskedAutoregressiveFlow` for MAF, the flow itself for IAF,
        `tfb.RealNVP`, `tfb.Glow`, `tfb.FFJORD`), elementwise and matrix
        bijectors with `tf.Variable` parameters ... Every variable the flow
        holds becomes a model weight (`tfp_glow.flow_variables`); the density
        equals `tfd.TransformedDistribution(N(0, I), tfb.Invert(flow))`. A
        builder registered with `@keras.saving.register_keras_serializable()`
        makes `.keras` saving possible (`tfp_glow.flow_config`).
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
        [-0.5, 0.5] for discretised images in training) inside `tf.function`
        and `train_step`, with `tf.debugging` assertions. Eager calls always
        check them.
      backprop: how the training step differentiates the flow:
        `"standard"` (keep every activation), `"checkpoint"` (recompute each
        flow step from its stored input) or `"reversible"` (rebuild each
        step's input from its output with the inverse: memory independent of
        depth). All three give the same gradients.
      dequantizer: None (uniform dequantization: the data's own noise) or a
        `VariationalDequantizer` `q(u | k)` (or a zero-argument function
        building one) trained jointly with the flow:
        `fit` then minimises the variational bound, `evaluate` reports it as
        `bits_per_dim` and the flow's figure on the data as given (uniform
        noise) as `uniform_bits_per_dim`; `variational_log_prob` and
        `variational_bits_per_dim` give them per example.
      dtype: `"float32"` (default), `"float64"`, or a mixed policy such as
        `"mixed_bfloat16"` (the builders of `Glow`, `RealNVP` and `NICE` then
        run the networks in bfloat16 and the flow math in float32). Left
        out, a custom `flow`'s own variables decide.

    The data rule: `log_prob`, `bits_per_dim`, `encode`, `decode`, `sample`
    and `interpolate` accept any finite input of the right shape (a flow's
    density is defined on all of R^D); `initialize`, `fit` and `evaluate`
    also refuse discretised images outside [-0.5, 0.5], the sign of raw
    pixels passed by mistake.

    `call(x)` returns `log_prob(x)` per example. `Glow`, `RealNVP` and `NICE`
    are subclasses that build `flow` from a config.
    """

    def __init__(self, flow=None, event_shape=None, num_bins=256, num_classes=None,
                 nonfinite="raise", validate_args=False, backprop="standard",
                 dequantizer=None, **kwargs):
        guard = NonfiniteGuard(nonfinite)
        checks.boolean(validate_args, "validate_args")
        checks.choice(backprop, BACKPROP_MODES, "backprop")
        explicit_dtype = kwargs.get("dtype") is not None
        super().__init__(**kwargs)
        if not tf.as_dtype(self.dtype_policy.variable_dtype).is_floating:
            raise ValueError(
                "`dtype` must be a float dtype such as 'float32' or 'float64'; got "
                f"{self.dtype_policy.name!r}.")
        self._flow_builder = None
        if callable(flow) and not isinstance(flow, tfb.Bijector):
            self._flow_builder = flow  # what a .keras config can name (flow_config)
            flow = flow()  # run after Model.__init__: its layers are tracked
        if not isinstance(flow, tfb.Bijector):
            raise TypeError(f"`flow` must be a tfp bijector (data to latent); got {flow!r}.")
        if event_shape is None:
            raise ValueError("`event_shape` is required (the shape of one data point).")
        event_shape = checks.shape(event_shape, "event_shape")
        if callable(dequantizer) and not isinstance(dequantizer, keras.layers.Layer):
            dequantizer = dequantizer()  # a builder, as for `flow`
        self.dequantizer = _check_dequantizer(dequantizer, event_shape, num_bins)
        self._density = FlowDensity(
            flow, event_shape, num_bins=num_bins, num_classes=num_classes,
            dtype=_flow_dtype(flow, self.dtype_policy, explicit_dtype),
            validate_args=validate_args)
        self._guard = guard
        self._backprop = backprop
        # A trackable path to the flow's variables for tf.train.Checkpoint and
        # SavedModel (the density is a plain object they do not walk).
        self._flow = flow
        # Keras tracks layers assigned as a list attribute: every variable of
        # the flow becomes a model weight (fit, saving, checkpoints, strategies),
        # TFP's plain tf.Variables (and tf_keras layers') through FlowVariables.
        layers, plain = collect(flow, *self._probe(num_classes))
        self.flow_layers = layers
        if plain:
            self.flow_variables = FlowVariables(plain, name="flow_variables")
        self._actnorms = [b for b in walk_bijectors(flow) if _is_actnorm(b)]
        self._nll_tracker = keras.metrics.Mean(name="loss")
        self._bpd_tracker = keras.metrics.Mean(name="bits_per_dim")
        self._uniform_bpd_tracker = keras.metrics.Mean(name="uniform_bits_per_dim")
        self._nonfinite_counter = guard.counter  # tracked, so strategies mirror it
        self.built = True

    def _probe(self, num_classes):
        """One batch of zeros (and labels) to build and watch a TFP flow's variables."""
        x = tf.zeros([1, *self._density.event_shape], self._density.dtype)
        if num_classes is None:
            return x, {}
        return x, {"conditional_input": tf.one_hot([0], num_classes, dtype=x.dtype)}

    def _base_config(self):
        """`keras.Model`'s config plus FlowModel's options (for subclasses)."""
        return {**super().get_config(), "nonfinite": self.nonfinite,
                "validate_args": self.validate_args, "backprop": self._backprop}

    @property
    def backprop(self):
        """`"standard"`, `"checkpoint"` or `"reversible"` (see the class docstring)."""
        return self._backprop

    @backprop.setter
    def backprop(self, mode):
        self._backprop = checks.choice(mode, BACKPROP_MODES, "backprop")
        self.train_function = None  # the mode is baked into the traced step

    @property
    def nonfinite(self):
        """`"raise"` or `"skip"`: what a step with a NaN/inf loss or gradient does."""
        return self._guard.mode

    @nonfinite.setter
    def nonfinite(self, mode):
        self._guard.mode = mode
        self.train_function = None  # the mode is baked into the traced step

    @property
    def nonfinite_steps(self):
        """Training steps skipped for a NaN/inf loss or gradient in the latest `fit`."""
        return self._guard.skipped_steps

    def build(self, input_shape=None):
        self.built = True  # Every variable is created in the constructor.

    def call(self, inputs, training=False):
        x, labels = self._split_inputs(inputs)
        return self.log_prob(x, labels if self.num_classes is not None else None)

    def _split_inputs(self, inputs, y=None):
        if isinstance(inputs, dict):
            return inputs["image"], inputs.get("label", y)
        if isinstance(inputs, (tuple, list)) and len(inputs) == 2:
            return inputs[0], inputs[1]
        return inputs, y

    # -- data-dependent initialisation -------------------------------------
    @property
    def is_initialized(self):
        """True once every ActNorm (TFP's in `tfb.Glow` too) was initialised (or restored)."""
        return all(_actnorm_initialized(a) for a in self._actnorms)

    def initialize(self, x, labels=None):
        """Data-dependent init of every ActNorm from one batch, once.

        Runs `x` through the normalizing direction with
        `data_dependent_init()`, so each ActNorm standardises the activations
        that actually reach it. Runs eagerly; under a `tf.distribute` strategy
        each ActNorm uses the moments of the global batch (all workers' `x`).
        ActNorms already initialised (e.g. restored from a checkpoint) are
        left alone.
        """
        if not tf.executing_eagerly():
            raise RuntimeError("`initialize` must run eagerly, outside tf.function.")
        spec = self._density.spec
        x = spec.training_data(x, "x")
        labels = spec.labels(labels, x)
        if self.dequantizer is not None:
            x = self.dequantizer(x)[0]  # ActNorm sees what training feeds the flow
        with self.distribute_strategy.scope(), data_dependent_init():
            self._density.forward_and_log_det(x, labels)
        return self

    # -- variational dequantization ------------------------------------------
    def _bound_of(self, x, labels=None, backprop="standard"):
        """Per example, `log p(x_q) - log q(u | k)` with the dequantizer, else `log p(x)`."""
        if self.dequantizer is None:
            return self._density.log_prob_of(x, labels, backprop)
        x_q, log_q = self.dequantizer(x)
        return self._density.log_prob_of(x_q, labels, backprop) - log_q

    def variational_log_prob(self, x, labels=None):
        """The variational bound per example: `log p(x_q) - log q(u | k)`.

        `x` is dequantized data in [-0.5, 0.5] (its levels `k` and noise are
        read off it; see `VariationalDequantizer`). Then
        `log P(k) >= variational_log_prob(x) - D log(num_bins)`. Without a
        dequantizer it is `log_prob(x)`, the uniform bound.
        """
        spec = self._density.spec
        x = spec.training_data(x, "x")
        labels = spec.labels(labels, x)
        signature = self._density._signature("data")
        return self._density._call("variational_log_prob", self._bound_of, signature,
                                   *self._density._args(labels, x))

    def variational_bits_per_dim(self, x, labels=None):
        """`variational_log_prob` in bits/dim, `(-bound + D log(num_bins)) / (D ln 2)`:
        the figure `fit` and `evaluate` report as `bits_per_dim`."""
        return self._density.bits_per_dim_of(self.variational_log_prob(x, labels))

    # -- training ----------------------------------------------------------
    @property
    def metrics(self):
        trackers = [self._nll_tracker, self._bpd_tracker]
        if self.dequantizer is not None:
            trackers.append(self._uniform_bpd_tracker)
        return trackers

    def _unpack(self, data):
        x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        x, labels = self._split_inputs(x, y)
        return x, (labels if self.num_classes is not None else None)

    def _checked_batch(self, data):
        """Static checks always; value checks (assertions) only with validate_args."""
        x, labels = self._unpack(data)
        spec = self._density.spec
        x = spec.training_data(x, "x", values=spec.validate_args)
        return x, spec.labels(labels, x, values=False)

    def _update_metrics(self, log_prob, applied=None, uniform_log_prob=None):
        if uniform_log_prob is not None:
            self._uniform_bpd_tracker.update_state(
                self._density.bits_per_dim_of(uniform_log_prob))
        weight = None
        if applied is not None:
            # A skipped (non-finite) step must not poison the epoch's means.
            weight = tf.broadcast_to(tf.cast(applied, log_prob.dtype), tf.shape(log_prob))
            log_prob = tf.where(weight > 0, log_prob, tf.zeros_like(log_prob))
        self._nll_tracker.update_state(-log_prob, sample_weight=weight)
        self._bpd_tracker.update_state(self._density.bits_per_dim_of(log_prob),
                                       sample_weight=weight)
        return {m.name: m.result() for m in self.metrics
                if m is not self._uniform_bpd_tracker or uniform_log_prob is not None}

    def train_step(self, data):
        x, labels = self._checked_batch(data)
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        # Dropout only here, and for the gradient too: the recomputing backprop
        # modes run the networks again there, with the same masks.
        with nets.dropout_active(_dropout_seed(self.optimizer)):
            with tf.GradientTape() as tape:
                log_prob = self._bound_of(x, labels, self._backprop)
                loss = -tf.reduce_mean(log_prob)
                if self.losses:
                    loss = loss + tf.add_n(self.losses)
                # Gradients are summed over replicas: divide so the step is the
                # gradient of the global mean NLL.
                scaled = self.optimizer.scale_loss(loss / replicas)
            grads = tape.gradient(scaled, self.trainable_variables)
        applied = self._guard.apply(self.optimizer, loss, grads, self.trainable_variables)
        logs = self._update_metrics(log_prob, applied=applied)
        logs["nonfinite_steps"] = self._guard.counter.result()
        return step_logs(logs)

    def test_step(self, data):
        x, labels = self._checked_batch(data)
        if self.dequantizer is None:
            return step_logs(self._update_metrics(self._density.log_prob_of(x, labels)))
        # The bound, and beside it the flow's density of the data as given.
        return step_logs(self._update_metrics(
            self._bound_of(x, labels), uniform_log_prob=self._density.log_prob_of(x, labels)))

    def make_train_function(self, force=False):
        """Keras' train function, followed by the NaN/inf guard's check.

        The traced step never applies a non-finite update; the check after
        each call raises (`nonfinite="raise"`) or logs (`"skip"`), before any
        callback sees the batch, so no checkpoint callback runs after a bad
        step in raise mode.
        """
        super().make_train_function(force=force)
        function = self.train_function
        if function is not None and not getattr(function, "_nonfinite_guard", False):
            def guarded(iterator):
                logs = function(iterator)
                self._guard.check(int(getattr(self, "steps_per_execution", 1) or 1))
                return logs

            guarded._nonfinite_guard = True
            self.train_function = guarded
        return self.train_function

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):  # see the helper
        super()._maybe_symbolic_build(symbolic_build_iterator(self, iterator), data_batch)

    def compile(self, optimizer=None, **kwargs):
        """`keras.Model.compile`; the loss is always `-log p(x)`.

        With no `optimizer`, `tfp_glow.training.recommended_optimizer()`: Adam
        with a 100-step linear warmup to 3e-3, then constant, and Polyak
        averaging of the weights (momentum 0.99; `fit` ends with the average
        in the model, `tfp_glow.WithAveragedWeights` lets validation and
        checkpoints use it during `fit`). Pass
        `recommended_optimizer(decay_steps=...)` for `tfp-glow train`'s cosine
        decay once the number of steps is known.
        """
        if kwargs.get("loss") is not None:
            raise ValueError("FlowModel trains on -log_prob; do not pass `loss`.")
        kwargs.pop("loss", None)
        if optimizer is None:
            from tfp_glow.training import recommended_optimizer
            with self.distribute_strategy.scope():
                optimizer = recommended_optimizer()
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

        The first batch is also checked eagerly (finite; discretised images in
        [-0.5, 0.5]), so raw pixels fail here with a clear message. A step
        whose loss or gradient is NaN/inf is never applied; see the
        `nonfinite` option for what happens next.
        """
        if not self.trainable_weights:
            raise ValueError(
                "This FlowModel has no trainable weights, so `fit` would train nothing: "
                f"its flow {type(self.flow).__name__} {self.flow.name!r} holds no "
                "trainable variable (tf.Variable, Keras layer or TFP network). Build the "
                "flow from trainable parts (e.g. tfb.Shift(tf.Variable(0.)), a "
                "tfp_glow.nets.MADE conditioner).")
        first = self._first_batch(x, y, batch_size)
        if not self.is_initialized:
            if first is None:
                raise ValueError(
                    "The model is not initialised and `fit` cannot take a first batch "
                    f"from {type(x).__name__}: call `model.initialize(batch)` first.")
            self.initialize(*first)
        elif first is not None:
            self._density.spec.training_data(first[0], "x")
        if getattr(self, "optimizer", None) is not None and not self.optimizer.built:
            # Built here, eagerly: built inside the first trace of the train step,
            # its new variables make tf.function trace the whole step twice.
            with self.distribute_strategy.scope():
                self.optimizer.build(self.trainable_variables)
        warn_if_partial_last_batch(self, x, batch_size)
        self._guard.reset()
        callbacks = kwargs.get("callbacks")
        if not isinstance(callbacks, keras.callbacks.CallbackList):
            kwargs["callbacks"] = [self._guard.callback()] + fit_callbacks(
                callbacks, self.distribute_strategy)
        if isinstance(x, tf.data.Dataset):
            # `shuffle` does not apply to a Dataset; Keras's default True only warns.
            kwargs.setdefault("shuffle", False)
        try:
            return super().fit(x, y, batch_size=batch_size, **kwargs)
        finally:
            self._guard.position = None

    def evaluate(self, x=None, y=None, batch_size=None, **kwargs):
        """`keras.Model.evaluate`, checking the first batch eagerly as `fit` does."""
        if not kwargs.get("_use_cached_eval_dataset"):  # fit's own validation: checked once
            first = self._first_batch(x, y, batch_size)
            if first is not None:
                self._density.spec.training_data(first[0], "x")
        return super().evaluate(x, y, batch_size=batch_size, **kwargs)

    def _first_batch(self, x, y, batch_size):
        """`(x, labels)` of the first batch, or None for sources we cannot peek at."""
        if isinstance(x, (tf.data.Dataset, tf.distribute.DistributedDataset)):
            return self._unpack(first_step_batch(x, self.distribute_strategy))
        if isinstance(x, (np.ndarray, tf.Tensor, tuple, list, dict)):
            x_all, labels = self._unpack(x if y is None else (x, y))
            n = batch_size or 256
            return x_all[:n], (None if labels is None else labels[:n])
        return None

    # -- config ------------------------------------------------------------
    def get_config(self):
        """The config of a model built from a registered flow builder (see
        `tfp_glow.flow_config`); a flow object has none (`TypeError`)."""
        return {**self._base_config(), **flow_config.builder_config(self)}

    @classmethod
    def from_config(cls, config):
        return super().from_config(flow_config.restore_builder(config))

    def save(self, filepath, *args, **kwargs):
        """`keras.Model.save`; a model without a config is refused before any
        file is written (Keras opens the file first, then asks for the config)."""
        self.get_config()
        return super().save(filepath, *args, **kwargs)
