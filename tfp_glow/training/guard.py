"""The NaN/inf guard of a training step: `NonfiniteGuard` and its pieces.

A step with a NaN/inf loss or gradient silently poisons every weight, and
every checkpoint written after it. The guard makes sure such a step changes
nothing (weights, optimizer moments and step count stay as they were) on one
device and under `tf.distribute` strategies alike, counts it, and then either
stops `fit` with a `FloatingPointError` naming the batch (`mode="raise"`) or
logs it and goes on (`mode="skip"`).

* `all_finite`, `any_replica`, `apply_if`: the in-graph pieces.
* `NonfiniteCounter`: the metric counting skipped steps.
* `NonfiniteGuard`: owns the counter, the position callback and the messages;
  `FlowModel` calls `guard.apply(...)` in its train step and `guard.check()`
  after each call of the train function.
"""

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import keras
import tensorflow as tf

from tfp_glow import checks

__all__ = [
    "NONFINITE_MODES",
    "NonfiniteCounter",
    "NonfiniteGuard",
    "TrainPosition",
    "all_finite",
    "any_replica",
    "apply_if",
    "check_nonfinite_mode",
    "nonfinite_error_message",
]

_LOG = logging.getLogger("tfp_glow")

NONFINITE_MODES = ("raise", "skip")


def check_nonfinite_mode(mode: str) -> str:
    """Validates the `nonfinite` option of `FlowModel`."""
    return checks.choice(mode, NONFINITE_MODES, "nonfinite")


def _values(g):
    return g.values if isinstance(g, tf.IndexedSlices) else g


def all_finite(tensors: Iterable[tf.Tensor | tf.IndexedSlices | None]) -> tf.Tensor:
    """Scalar bool: every element of every (non-None) tensor is finite."""
    checks = [tf.reduce_all(tf.math.is_finite(_values(t))) for t in tensors if t is not None]
    if not checks:
        return tf.constant(True)
    return tf.reduce_all(tf.stack(checks))


def any_replica(flag: tf.Tensor) -> tf.Tensor:
    """`flag` OR-ed over the replicas of the current strategy (replica context).

    A replica whose batch is poisoned must stop the update on *every* replica,
    or the mirrored weights would drift apart.
    """
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return flag
    total = ctx.all_reduce(tf.distribute.ReduceOp.SUM, tf.cast(flag, tf.float32))
    return total > 0.0


def apply_if(
    optimizer: keras.optimizers.Optimizer,
    ok: tf.Tensor,
    grads: Sequence[tf.Tensor | None],
    variables: Sequence[tf.Variable],
) -> tf.Tensor:
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
                lambda g: optimizer.apply(g, variables), args=(grads,)
            )
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

    def __init__(self, name: str = "nonfinite_steps", **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        self.steps = self.add_variable(
            shape=(),
            initializer="zeros",
            dtype="float32",
            aggregation="only_first_replica",
            name="steps",
        )
        self.loss_steps = self.add_variable(
            shape=(),
            initializer="zeros",
            dtype="float32",
            aggregation="only_first_replica",
            name="loss_steps",
        )

    def update_state(self, loss_finite, step_finite):
        self.steps.assign_add(1.0 - tf.cast(step_finite, tf.float32))
        self.loss_steps.assign_add(1.0 - tf.cast(loss_finite, tf.float32))

    def result(self):
        return tf.convert_to_tensor(self.steps)

    def reset_state(self):
        self.steps.assign(0.0)
        self.loss_steps.assign(0.0)


def nonfinite_error_message(where: str, loss_nonfinite: bool, mode: str = "raise") -> str:
    """The text of the `FloatingPointError` of `nonfinite="raise"`."""
    what = (
        "a non-finite loss (NaN or inf)"
        if loss_nonfinite
        else "a finite loss but a non-finite gradient (NaN or inf)"
    )
    return (
        f"Training stopped: {where} produced {what}. The update was not applied: "
        "the weights and optimizer state are those from before this batch, so no "
        "checkpoint written now holds NaN/inf. Try a lower learning rate or a "
        "warmup (tfp_glow.training.WarmupSchedule), gradient clipping (the "
        "optimizer's `clipnorm=` or `global_clipnorm=`), and check this batch for "
        "NaN/inf or values outside the data range (`model.log_prob(batch)` "
        "validates its input). Pass `nonfinite='skip'` to the model to skip such "
        "steps and keep training."
    )


class TrainPosition(keras.callbacks.Callback):
    """Tells a `NonfiniteGuard` which epoch and batch `fit` is on, so its error
    can name the batch. `FlowModel.fit` adds one for its guard."""

    def __init__(self, guard: "NonfiniteGuard") -> None:
        super().__init__()
        self.guard = guard

    def on_epoch_begin(self, epoch, logs=None):
        self.guard.position = (epoch, 0)

    def on_train_batch_begin(self, batch, logs=None):
        epoch = (self.guard.position or (0, 0))[0]
        self.guard.position = (epoch, batch)

    def on_train_end(self, logs=None):
        self.guard.position = None


class NonfiniteGuard:
    """Applies an update only when it is finite everywhere; reports what it skipped.

    Args:
      mode: `"raise"` (stop `fit` with a `FloatingPointError` after a bad
        step) or `"skip"` (count it, log it, keep training).
    """

    def __init__(self, mode: str = "raise") -> None:
        self._mode = check_nonfinite_mode(mode)
        self.counter = NonfiniteCounter()
        self.position = None  # (epoch, batch), kept up to date by `callback()`
        self._reported = 0.0

    @property
    def mode(self):
        return self._mode

    @mode.setter
    def mode(self, mode):
        self._mode = check_nonfinite_mode(mode)

    @property
    def skipped_steps(self):
        """Steps skipped since the last `reset` (Python int, eager)."""
        return int(self.counter.result())

    def checked(self, train_function, steps_per_call):
        """`train_function` followed by `check(steps_per_call())`, wrapped once.

        The traced step never applies a non-finite update; the check after
        each call raises (`"raise"`) or logs (`"skip"`) before any callback
        sees the batch, so no checkpoint callback runs after a bad step in
        raise mode.
        """
        if train_function is None or getattr(train_function, "_nonfinite_guard", False):
            return train_function

        def guarded(iterator):
            logs = train_function(iterator)
            self.check(steps_per_call())
            return logs

        guarded._nonfinite_guard = True
        return guarded

    def reset(self):
        """Zeroes the counter (at the start of every `fit`)."""
        self.counter.reset_state()
        self._reported = 0.0

    def callback(self):
        """The callback that tells this guard the current epoch and batch."""
        return TrainPosition(self)

    def apply(self, optimizer, loss, grads, variables):
        """In a train step: `optimizer.apply(grads, variables)` only if finite.

        The loss and every gradient must be finite on every replica (a
        `LossScaleOptimizer` skips overflowing scaled gradients itself, so
        then only the loss is checked). In raise mode the step also stays
        frozen after a bad step until `check` raises: the train function may
        run several steps per call. Returns the scalar bool "applied".
        """
        loss_finite = all_finite([loss])
        step_finite = loss_finite
        if not isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            step_finite = tf.logical_and(step_finite, all_finite(grads))
        loss_finite = tf.logical_not(any_replica(tf.logical_not(loss_finite)))
        step_finite = tf.logical_not(any_replica(tf.logical_not(step_finite)))
        ok = step_finite
        if self._mode == "raise":
            ok = tf.logical_and(ok, tf.equal(tf.convert_to_tensor(self.counter.steps), 0.0))
        apply_if(optimizer, ok, grads, variables)
        self.counter.update_state(loss_finite, step_finite)
        return step_finite

    def check(self, steps_per_execution=1):
        """After a train-function call: raise (or log) for steps skipped since the last check."""
        count = float(self.counter.steps.numpy())
        if count <= self._reported:
            return
        new = count - self._reported
        self._reported = count
        where = "a training batch"
        if self.position is not None:
            epoch, batch = self.position
            if steps_per_execution > 1:  # Keras reports the first batch of each execution
                where = (
                    f"epoch {epoch + 1}, one of batches {batch}-{batch + steps_per_execution - 1}"
                )
            else:
                where = f"epoch {epoch + 1}, batch {batch}"
        if self._mode == "raise":
            loss_bad = float(self.counter.loss_steps.numpy()) > 0
            self.reset()
            raise FloatingPointError(nonfinite_error_message(where, loss_bad))
        _LOG.warning(
            "Skipped %d training step(s) with a non-finite loss or gradient at "
            "%s (nonfinite='skip'; %d skipped in this fit).",
            new,
            where,
            count,
        )
