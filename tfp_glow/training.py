"""Training stability: a guard against non-finite steps and a warmup schedule.

Flows blow up in two ways that cost users days: a step with a NaN/inf loss or
gradient silently poisons every weight (and every checkpoint written after
it), and a large learning rate at the start of training overshoots before
ActNorm and the coupling scales have settled. This module holds the pieces
`FlowModel` uses against both:

* `all_finite(loss, grads)` and `apply_if(optimizer, ok, grads, variables)`:
  the optimizer update (weights, moments *and* the step counter) is applied
  only when `ok`, on one device and under `tf.distribute` strategies alike.
* `NonfiniteCounter`: a metric counting the skipped steps, and
  `nonfinite_error_message`, the message of the `FloatingPointError` raised
  in `nonfinite="raise"` mode.
* `WarmupSchedule`: linear warmup to a base learning rate, then constant or
  cosine decay.

Gradient clipping needs nothing new: Keras optimizers take `clipnorm=` or
`global_clipnorm=`, and `FlowModel` applies it like any other optimizer.
"""

import math

import keras
import numpy as np
import tensorflow as tf

__all__ = [
    "NONFINITE_MODES",
    "NonfiniteCounter",
    "TrainPosition",
    "WarmupSchedule",
    "all_finite",
    "apply_if",
    "check_nonfinite_mode",
    "nonfinite_error_message",
]

NONFINITE_MODES = ("raise", "skip")


def check_nonfinite_mode(mode):
    """Validates the `nonfinite` option of `FlowModel`."""
    if mode not in NONFINITE_MODES:
        raise ValueError(f"`nonfinite` must be one of {NONFINITE_MODES}; got {mode!r}.")
    return mode


# ---------------------------------------------------------------- the guard


def _values(g):
    return g.values if isinstance(g, tf.IndexedSlices) else g


def all_finite(tensors):
    """Scalar bool: every element of every (non-None) tensor is finite."""
    checks = [tf.reduce_all(tf.math.is_finite(_values(t))) for t in tensors
              if t is not None]
    if not checks:
        return tf.constant(True)
    return tf.reduce_all(tf.stack(checks))


def any_replica(flag):
    """`flag` OR-ed over the replicas of the current strategy (replica context).

    A replica whose batch is poisoned must stop the update on *every* replica,
    or the mirrored weights would drift apart.
    """
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return flag
    total = ctx.all_reduce(tf.distribute.ReduceOp.SUM, tf.cast(flag, tf.float32))
    return total > 0.0


def apply_if(optimizer, ok, grads, variables):
    """`optimizer.apply(grads, variables)` only when the scalar bool `ok` holds.

    When `ok` is False nothing changes: not the weights, not Adam's moments,
    not `optimizer.iterations` (so learning-rate schedules do not advance
    either). Zeroing the gradients instead would still move Adam's moments
    and step count.

    `ok` must have the same value on every replica (see `any_replica`). On a
    strategy that synchronises through `merge_call` (MirroredStrategy outside
    XLA), a `tf.cond` in replica context whose branch calls `merge_call` (as
    `optimizer.apply` does) is not supported, so the condition is taken in
    cross-replica context and the update re-entered per replica; this is the
    pattern of `keras.optimizers.LossScaleOptimizer`.
    """
    if tf.__internal__.distribute.strategy_supports_no_merge_call():
        def apply_fn():
            optimizer.apply(grads, variables)
            return tf.constant(True)

        return tf.cond(ok, apply_fn, lambda: tf.constant(False))

    def cross_replica(strategy, ok, grads):
        ok_first = strategy.experimental_local_results(ok)[0]

        def apply_fn():
            strategy.extended.call_for_each_replica(
                lambda g: optimizer.apply(g, variables), args=(grads,))
            return tf.constant(True)

        return tf.cond(ok_first, apply_fn, lambda: tf.constant(False))

    return tf.distribute.get_replica_context().merge_call(cross_replica, args=(ok, grads))


@keras.saving.register_keras_serializable(package="tfp_glow")
class NonfiniteCounter(keras.metrics.Metric):
    """Counts training steps skipped for a non-finite loss or gradient.

    `update_state(loss_finite, step_finite)` adds one skipped step when
    `step_finite` is False, and one step with a non-finite *loss* when
    `loss_finite` is False. `result()` is the number of skipped steps.

    The flags are the same on every replica (they are reduced before the
    update), so each replica adds the same amount and the variables read the
    first replica's copy (`aggregation="only_first_replica"`) instead of
    summing over replicas.
    """

    def __init__(self, name="nonfinite_steps", **kwargs):
        super().__init__(name=name, **kwargs)
        self.steps = self.add_variable(shape=(), initializer="zeros", dtype="float32",
                                       aggregation="only_first_replica", name="steps")
        self.loss_steps = self.add_variable(
            shape=(), initializer="zeros", dtype="float32",
            aggregation="only_first_replica", name="loss_steps")

    def update_state(self, loss_finite, step_finite):
        self.steps.assign_add(1.0 - tf.cast(step_finite, tf.float32))
        self.loss_steps.assign_add(1.0 - tf.cast(loss_finite, tf.float32))

    def result(self):
        return tf.convert_to_tensor(self.steps)

    def reset_state(self):
        self.steps.assign(0.0)
        self.loss_steps.assign(0.0)


class TrainPosition(keras.callbacks.Callback):
    """Tells the model which epoch and batch it is training on, so the
    non-finite guard's error can name the batch. `FlowModel.fit` adds it."""

    def on_epoch_begin(self, epoch, logs=None):
        self.model._train_position = (epoch, 0)

    def on_train_batch_begin(self, batch, logs=None):
        epoch = (self.model._train_position or (0, 0))[0]
        self.model._train_position = (epoch, batch)


def nonfinite_error_message(where, loss_nonfinite, mode="raise"):
    """The text of the `FloatingPointError` of `nonfinite="raise"`."""
    what = ("a non-finite loss (NaN or inf)" if loss_nonfinite
            else "a finite loss but a non-finite gradient (NaN or inf)")
    return (
        f"Training stopped: {where} produced {what}. The update was not applied: "
        "the weights and optimizer state are those from before this batch, so no "
        "checkpoint written now holds NaN/inf. Try a lower learning rate or a "
        "warmup (tfp_glow.training.WarmupSchedule), gradient clipping (the "
        "optimizer's `clipnorm=` or `global_clipnorm=`), and check this batch for "
        "NaN/inf or values outside the data range (`model.log_prob(batch)` "
        "validates its input). Pass `nonfinite='skip'` to the model to skip such "
        "steps and keep training.")


# ----------------------------------------------------------------- warmup


@keras.saving.register_keras_serializable(package="tfp_glow")
class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup to `learning_rate`, then constant or cosine decay.

    With `step` the optimizer's (0-based) iteration count, `W = warmup_steps`:

        step < W:          lr = learning_rate * (step + 1) / W
        no decay_steps:    lr = learning_rate                         (step >= W)
        decay_steps = T:   lr = learning_rate * (alpha + (1 - alpha)
                                 * (1 + cos(pi * min(step - W, T) / T)) / 2)

    so the first update uses `learning_rate / W` (never zero), the rate
    reaches `learning_rate` at step `W - 1`, and cosine decay ends at
    `alpha * learning_rate` after `T` more steps. `warmup_steps=0` disables
    the warmup. openai/glow warms up linearly over its first epochs for the
    same reason: Adam's first steps, taken before its second-moment estimate
    settles, are the ones that blow up a freshly initialised flow.

    #### Examples

    ```python
    schedule = tfp_glow.training.WarmupSchedule(1e-3, warmup_steps=500)
    model.compile(keras.optimizers.Adam(schedule, global_clipnorm=50.0))
    ```
    """

    def __init__(self, learning_rate, warmup_steps, decay_steps=None, alpha=0.0,
                 name="warmup"):
        super().__init__()
        if isinstance(learning_rate, bool) or not isinstance(
                learning_rate, (int, float, np.integer, np.floating)) or not (
                math.isfinite(learning_rate) and learning_rate > 0):
            raise ValueError(
                f"`learning_rate` must be a positive finite number; got {learning_rate!r}.")
        if isinstance(warmup_steps, bool) or not isinstance(
                warmup_steps, (int, np.integer)) or warmup_steps < 0:
            raise ValueError(f"`warmup_steps` must be an int >= 0; got {warmup_steps!r}.")
        if decay_steps is not None and (
                isinstance(decay_steps, bool) or not isinstance(decay_steps, (int, np.integer))
                or decay_steps < 1):
            raise ValueError(
                f"`decay_steps` must be None or an int >= 1; got {decay_steps!r}.")
        if isinstance(alpha, bool) or not isinstance(
                alpha, (int, float, np.integer, np.floating)) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"`alpha` must be in [0, 1]; got {alpha!r}.")
        self.learning_rate = float(learning_rate)
        self.warmup_steps = int(warmup_steps)
        self.decay_steps = None if decay_steps is None else int(decay_steps)
        self.alpha = float(alpha)
        self.name = name

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        lr = tf.constant(self.learning_rate, tf.float32)
        if self.warmup_steps > 0:
            warm = tf.minimum((step + 1.0) / float(self.warmup_steps), 1.0)
        else:
            warm = tf.constant(1.0)
        if self.decay_steps is None:
            return lr * warm
        t = tf.clip_by_value(step - float(self.warmup_steps), 0.0, float(self.decay_steps))
        cosine = 0.5 * (1.0 + tf.cos(math.pi * t / float(self.decay_steps)))
        decay = self.alpha + (1.0 - self.alpha) * cosine
        # Before the warmup ends t = 0 and decay = 1: the two factors never overlap.
        return lr * warm * decay

    def get_config(self):
        return {"learning_rate": self.learning_rate, "warmup_steps": self.warmup_steps,
                "decay_steps": self.decay_steps, "alpha": self.alpha, "name": self.name}
