"""`FlowModel`: the Keras 3 plumbing around a `FlowDensity`.

The density (`tfp_glow.density.FlowDensity`) holds the flow and answers
`log_prob`, `bits_per_dim`, `encode`, `decode`, `sample` and `interpolate`;
the input rules live in its `InputSpec`; the NaN/inf guard of the training
step is a `tfp_glow.training.guard.NonfiniteGuard`. This class only makes a Keras
model of them: it tracks every Keras layer inside the flow, so stock `fit`,
`evaluate`, `save_weights`, `ModelCheckpoint`, `BackupAndRestore` and
`tf.distribute` need no custom variable plumbing, and trains on the negative
log-likelihood

    loss = -mean_i log p(x_i),   log p(x) = log N(f(x); 0, I) + log|det df/dx|,

or, with a `VariationalDequantizer` `q(u | k)` (Flow++), on the negative
variational bound `-(log p(x_q) - log q(u | k))`, `x_q = (k + u) / B - 0.5`.
"""

from collections.abc import Callable, Sequence
from typing import Any

import keras
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_glow import checks, nets
from tfp_glow.density import BACKPROP_MODES, FlowDensity
from tfp_glow.density_methods import DensityMethods
from tfp_glow.training.batches import first_batch, split_inputs, unpack
from tfp_glow.training.distributed import fit_callbacks, step_logs, symbolic_build_iterator
from tfp_glow.training.flow_config import FlowConfigMethods, unique_layer_names
from tfp_glow.training.flow_variables import (
    FlowVariables,
    check_trainable,
    collect,
    flow_dtype,
    zeros_batch,
)
from tfp_glow.training.guard import NonfiniteGuard
from tfp_glow.training.initialization import ActNormInitialization, actnorms_of
from tfp_glow.training.xla import warn_if_partial_last_batch
from tfp_glow.variational_dequantization import VariationalDequantizer

tfb = tfp.bijectors

__all__ = ["FlowModel"]


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
class FlowModel(DensityMethods, ActNormInitialization, FlowConfigMethods, keras.Model):
    """Trains any flow made of tfp_glow and TFP bijectors with `Model.fit` (Keras 3).

    Args:
      flow: the normalizing bijector `f` (or a zero-argument function building
        it, run after `keras.Model.__init__`), mapping an event of
        `event_shape` to a latent: a `MultiScaleFlow`, a plain `tfb.Chain` of
        tfp_glow and TFP bijectors, TFP's own flows (`tfb.Invert` of a
        `MaskedAutoregressiveFlow` for MAF, the flow itself for IAF,
        `tfb.RealNVP`, `tfb.Glow`, `tfb.FFJORD`), elementwise and matrix
        bijectors with `tf.Variable` parameters ... Every variable the flow holds
        becomes a model weight (`training.flow_variables`); the density equals
        `tfd.TransformedDistribution(N(0, I), tfb.Invert(flow))`. A builder registered
        with `@keras.saving.register_keras_serializable()` makes `.keras` saving
        possible (`training.flow_config`).
      event_shape: shape of one data point, e.g. `(8, 8, 1)` or `(2,)`.
      num_bins: discrete levels of the data (256 for 8-bit images, 17 for the
        built-in digits), for `bits_per_dim`; `None` for continuous data (the
        negative log-likelihood in bits, no discretisation term).
      num_classes: when set, the flow is class-conditional: the shorthand for
        `context_shape=(num_classes,)` whose context may be int class ids.
      context_shape: when set, the flow is conditional, `p(x | context)`: every
        density method takes a context `[batch, *context_shape]` (its second
        argument, `labels=` its older name), which reaches every bijector as
        `conditional_input`; `fit` takes `(x, context)` data (`training.batches`).
      context_encoder: a Keras layer whose output all the flow's layers receive
        instead of the context (`tfp_glow.context_encoder`), trained with them.
      nonfinite: what a training step with a NaN/inf loss or gradient does.
        Either way the update is not applied (weights, optimizer moments and
        step count stay as they were). `"raise"` (default) then stops `fit`
        with a `FloatingPointError` naming the batch; `"skip"` counts the
        step (`nonfinite_steps` in the logs) and keeps training.
      validate_args: also check input *values* (finite; in [-0.5, 0.5] for
        discretised images in training) inside `tf.function` and `train_step`
        (`tf.debugging` assertions). Eager calls always check them.
      backprop: how the training step differentiates the flow:
        `"standard"` (keep every activation), `"checkpoint"` (recompute each
        flow step from its stored input) or `"reversible"` (rebuild each
        step's input from its output with the inverse: memory independent of
        depth). All three give the same gradients.
      dequantizer: None (uniform dequantization: the data's own noise) or a
        `VariationalDequantizer` `q(u | k)` (or a zero-argument function building
        one) trained jointly with the flow: `fit` then minimises the variational
        bound, `evaluate` reports it as `bits_per_dim` and the flow's figure on the
        data as given (uniform noise) as `uniform_bits_per_dim`;
        `variational_log_prob` and `variational_bits_per_dim` give them per example.
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

    def __init__(self, flow: tfp.bijectors.Bijector | Callable[[], tfp.bijectors.Bijector]
                 | None = None,
                 event_shape: Sequence[int] | None = None, num_bins: int | None = 256,
                 num_classes: int | None = None, nonfinite: str = "raise",
                 validate_args: bool = False, backprop: str = "standard",
                 dequantizer: VariationalDequantizer | Callable[..., VariationalDequantizer]
                 | None = None, context_shape: Sequence[int] | int | None = None,
                 context_encoder: keras.layers.Layer | None = None,
                 **kwargs: Any) -> None:
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
            dtype=flow_dtype(flow, self.dtype_policy, explicit_dtype),
            validate_args=validate_args, context_shape=context_shape,
            context_encoder=context_encoder)
        self.context_encoder = self._density._encoder  # tracked: trained, saved, exported
        self._guard = guard
        self._backprop = backprop
        # A trackable path to the flow's variables for tf.train.Checkpoint and
        # SavedModel (the density is a plain object they do not walk).
        self._flow = flow
        # Keras tracks layers assigned as a list attribute: every variable of
        # the flow becomes a model weight (fit, saving, checkpoints, strategies),
        # TFP's plain tf.Variables (and tf_keras layers') through FlowVariables.
        layers, plain = collect(flow, *zeros_batch(self._density))
        self.flow_layers = layers
        if plain:
            self.flow_variables = FlowVariables(plain, name="flow_variables")
        self._actnorms = actnorms_of(flow)
        self._nll_tracker = keras.metrics.Mean(name="loss")
        self._bpd_tracker = keras.metrics.Mean(name="bits_per_dim")
        self._uniform_bpd_tracker = keras.metrics.Mean(name="uniform_bits_per_dim")
        self._nonfinite_counter = guard.counter  # tracked, so strategies mirror it
        unique_layer_names(self)  # legacy .h5 needs one name per layer
        self.built = True

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
        x, context = split_inputs(inputs)
        return self.log_prob(x, context if self.context_shape is not None else None)

    # -- training ----------------------------------------------------------
    @property
    def metrics(self):
        trackers = [self._nll_tracker, self._bpd_tracker]
        if self.dequantizer is not None:
            trackers.append(self._uniform_bpd_tracker)
        return trackers

    def _checked_batch(self, data):
        """Static checks always; value checks (assertions) only with validate_args."""
        x, context = unpack(data, self.context_shape is not None)
        spec = self._density.spec
        x = spec.training_data(x, "x", values=spec.validate_args)
        return x, spec.context(context, x, values=False)

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
        x, context = self._checked_batch(data)
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        # Dropout only here, and for the gradient too: the recomputing backprop
        # modes run the networks again there, with the same masks.
        with nets.dropout_active(_dropout_seed(self.optimizer)):
            with tf.GradientTape() as tape:
                log_prob = self._bound_of(x, context, self._backprop)
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
        x, context = self._checked_batch(data)
        if self.dequantizer is None:
            return step_logs(self._update_metrics(self._density.log_prob_of(x, context)))
        # The bound, and beside it the flow's density of the data as given.
        return step_logs(self._update_metrics(
            self._bound_of(x, context), uniform_log_prob=self._density.log_prob_of(x, context)))

    def make_train_function(self, force=False):
        """Keras' train function, followed by the NaN/inf guard's check (`checked`)."""
        super().make_train_function(force=force)
        self.train_function = self._guard.checked(
            self.train_function, lambda: int(getattr(self, "steps_per_execution", 1) or 1))
        return self.train_function

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):  # see the helper
        super()._maybe_symbolic_build(symbolic_build_iterator(self, iterator), data_batch)

    def recommended_optimizer_settings(self) -> dict[str, float]:
        """`recommended_optimizer` arguments of `compile()` with no optimizer:
        none here (3e-3, no weight decay); a family overrides them where that
        rate overfits its networks (measured: BENCHMARKS.md, "The family table")."""
        return {}

    def compile(self, optimizer=None, **kwargs):
        """`keras.Model.compile`; the loss is always `-log p(x)`.

        With no `optimizer`, `tfp_glow.training.recommended_optimizer()`: Adam
        with a 100-step linear warmup to 3e-3, then constant, and Polyak
        averaging of the weights (momentum 0.99; `fit` ends with the average
        in the model, `tfp_glow.WithAveragedWeights` lets validation and
        checkpoints use it during `fit`). Pass
        `recommended_optimizer(decay_steps=...)` for `tfp-glow train`'s cosine
        decay once the number of steps is known. A family whose networks
        overfit at that rate names its own `recommended_optimizer` arguments
        in `recommended_optimizer_settings()` (MAF, the vector RealNVP).
        """
        if kwargs.get("loss") is not None:
            raise ValueError("FlowModel trains on -log_prob; do not pass `loss`.")
        kwargs.pop("loss", None)
        if optimizer is None:
            from tfp_glow.training import recommended_optimizer
            with self.distribute_strategy.scope():
                optimizer = recommended_optimizer(
                    model=self, **self.recommended_optimizer_settings())
        super().compile(optimizer=optimizer, **kwargs)

    def compile_from_config(self, config):
        """Recompiles a model loaded from `.keras` (optimizer state included).

        Keras skips this for models that override `compile` (with a warning),
        so a reloaded model would come back without its optimizer and a
        resumed `fit` would restart Adam from zero moments.
        """
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if getattr(getattr(self, "optimizer", None), "weight_decay", None):
            # Keras saves no exclusions: decay the networks only, as `adamw` did.
            from tfp_glow.training.optimizers import network_variables
            decayed = {id(v) for v in network_variables(self)}
            self.optimizer.exclude_from_weight_decay(
                var_list=[v for v in self.trainable_variables if id(v) not in decayed])
        if getattr(self, "optimizer", None) is not None and self.built:
            self.optimizer.build(self.trainable_variables)  # so its state loads

    def fit(self, x=None, y=None, batch_size=None, **kwargs):
        """`keras.Model.fit`, initialising ActNorm on the first batch if needed.

        The first batch is also checked eagerly (finite; discretised images in
        [-0.5, 0.5]), so raw pixels fail here with a clear message. A step
        whose loss or gradient is NaN/inf is never applied; see the
        `nonfinite` option for what happens next.
        """
        check_trainable(self)
        self._initialize_for_fit(first_batch(self, x, y, batch_size), x)
        if getattr(self, "optimizer", None) is not None and not self.optimizer.built:
            # Built here, eagerly: built inside the first trace of the train step,
            # its new variables make tf.function trace the whole step twice.
            with self.distribute_strategy.scope():
                self.optimizer.build(self.trainable_variables)
        warn_if_partial_last_batch(self, split_inputs(x)[0], batch_size)  # x of (x, context)
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
            first = first_batch(self, x, y, batch_size)
            if first is not None:
                self._density.spec.context(first[1], self._density.spec.training_data(first[0]))
        return super().evaluate(x, y, batch_size=batch_size, **kwargs)
