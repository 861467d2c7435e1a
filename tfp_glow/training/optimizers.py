"""Optimizers and schedules for flows (the NaN/inf guard is `tfp_glow.training.guard`).

Flows blow up in two ways that cost users days: a step with a NaN/inf loss or
gradient silently poisons every weight (and every checkpoint written after
it), and a large learning rate at the start of training overshoots before
ActNorm and the coupling scales have settled.

* The guard against the first lives in `tfp_glow.training.guard` (`NonfiniteGuard`,
  `NonfiniteCounter`, `all_finite`, `apply_if`, ...), re-exported by `tfp_glow.training`.
* `WarmupSchedule`: linear warmup to a base learning rate, then constant or
  cosine decay, against the second.
* `adamw`: AdamW whose weight decay reaches the networks only (a regulariser
  for small data sets).
* `WarmupAdam`: Adam on that schedule with a settable peak rate (a variable),
  so Keras's `ReduceLROnPlateau` and `LearningRateScheduler` work with it.
* `recommended_optimizer`: what `FlowModel.compile()` with no optimizer and
  `tfp-glow train` use: `WarmupAdam`, 100-step warmup to 3e-3, then constant,
  with Polyak averaging of the weights (momentum 0.99). `compile()` passes the
  model's `recommended_optimizer_settings()`: MAF and the vector RealNVP name
  a lower rate with weight decay of their networks (they overfit at 3e-3).

Gradient clipping needs nothing new: Keras optimizers take `clipnorm=` or
`global_clipnorm=`, and `FlowModel` applies it like any other optimizer.
"""

import math
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tfp_glow import checks

__all__ = [
    "WarmupAdam",
    "WarmupSchedule",
    "adamw",
    "network_variables",
    "recommended_optimizer",
]

# The recommended schedule and averaging (`recommended_optimizer`, `tfp-glow train`).
RECOMMENDED_LEARNING_RATE = 3e-3
RECOMMENDED_WARMUP_STEPS = 100
RECOMMENDED_EMA_MOMENTUM = 0.99


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

    def __init__(
        self,
        learning_rate: float,
        warmup_steps: int,
        decay_steps: int | None = None,
        alpha: float = 0.0,
        name: str = "warmup",
    ) -> None:
        super().__init__()
        if (
            isinstance(learning_rate, bool)
            or not isinstance(learning_rate, (int, float, np.integer, np.floating))
            or not (math.isfinite(learning_rate) and learning_rate > 0)
        ):
            raise ValueError(
                f"`learning_rate` must be a positive finite number; got {learning_rate!r}."
            )
        if (
            isinstance(warmup_steps, bool)
            or not isinstance(warmup_steps, (int, np.integer))
            or warmup_steps < 0
        ):
            raise ValueError(f"`warmup_steps` must be an int >= 0; got {warmup_steps!r}.")
        if decay_steps is not None and (
            isinstance(decay_steps, bool)
            or not isinstance(decay_steps, (int, np.integer))
            or decay_steps < 1
        ):
            raise ValueError(f"`decay_steps` must be None or an int >= 1; got {decay_steps!r}.")
        if (
            isinstance(alpha, bool)
            or not isinstance(alpha, (int, float, np.integer, np.floating))
            or not 0.0 <= alpha <= 1.0
        ):
            raise ValueError(f"`alpha` must be in [0, 1]; got {alpha!r}.")
        self.learning_rate = float(learning_rate)
        self.warmup_steps = int(warmup_steps)
        self.decay_steps = None if decay_steps is None else int(decay_steps)
        self.alpha = float(alpha)
        self.name = name

    def __call__(self, step):
        return self.scaled(tf.constant(self.learning_rate, tf.float32), step)

    def scaled(self, learning_rate, step):
        """The schedule with `learning_rate` (a float32 tensor or variable) as
        its peak: `WarmupAdam` passes its settable rate here."""
        step = tf.cast(step, tf.float32)
        lr = learning_rate
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
        return {
            "learning_rate": self.learning_rate,
            "warmup_steps": self.warmup_steps,
            "decay_steps": self.decay_steps,
            "alpha": self.alpha,
            "name": self.name,
        }


# ----------------------------------------------------------------- WarmupAdam
@keras.saving.register_keras_serializable(package="tfp_glow")
class WarmupAdam(keras.optimizers.Adam):
    """Adam with a `WarmupSchedule` whose peak rate is a settable variable.

    `learning_rate` is the peak (a `keras.Variable`, as for Adam with a float
    rate): Keras's `ReduceLROnPlateau` and `LearningRateScheduler` read and
    set it, and it is saved with the optimizer. Each step uses

        WarmupSchedule(learning_rate, warmup_steps, decay_steps, alpha)(step)

    computed from the variable's current value, so with the rate never set the
    updates are bit-for-bit those of `Adam(WarmupSchedule(...))`; a rate set
    during the warmup (or the decay) becomes the new peak the schedule scales.
    Keras refuses to set the rate of an optimizer built on a schedule (a
    `TypeError`), which is why `compile()` uses this one.
    """

    def __init__(
        self,
        learning_rate: float = RECOMMENDED_LEARNING_RATE,
        warmup_steps: int = RECOMMENDED_WARMUP_STEPS,
        decay_steps: int | None = None,
        alpha: float = 0.0,
        **kwargs: Any,
    ) -> None:
        schedule = WarmupSchedule(learning_rate, warmup_steps, decay_steps, alpha)
        super().__init__(learning_rate=float(learning_rate), **kwargs)
        self.schedule = schedule

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        # `learning_rate` is the variable (the peak); the step uses the schedule.
        rate = self.schedule.scaled(tf.cast(learning_rate, tf.float32), self._iterations)
        return super()._backend_update_step(grads, trainable_variables, rate)

    def get_config(self):
        return {
            **super().get_config(),
            "warmup_steps": self.schedule.warmup_steps,
            "decay_steps": self.schedule.decay_steps,
            "alpha": self.schedule.alpha,
        }


# ----------------------------------------------------------------- AdamW
def network_variables(model):
    """The trainable variables of `model`'s networks: every Keras layer the
    flow holds that is not a bijector's `ParameterLayer` (coupling and prior
    nets, the conditioners TFP's own bijectors call, such as the `MADE` of a
    `tfb.MaskedAutoregressiveFlow` or the `RealNVPNet` of a `tfb.RealNVP`,
    the context maps of conditional models), and a variational dequantizer's.

    Everything else a flow trains is a bijector parameter (ActNorm's scale and
    shift, the 1x1 convs' LU factors, the learned priors' mean and scale),
    and so are the plain `tf.Variable`s of TFP's bijectors
    (`tfb.Shift(tf.Variable(...))`, `model.flow_variables`): never decayed.
    """
    from tfp_glow.bijectors._state import ParameterLayer
    from tfp_glow.training.flow_variables import collect

    # The layers FlowModel tracks: found through tfp_glow's bijectors and
    # through TFP's (attributes, `shift_and_log_scale_fn`, `bijector_fn`, a
    # tf.Module holding a network). `keras_layers_of` sees only the first.
    layers = getattr(model, "flow_layers", None)
    if layers is None:
        layers = collect(model.flow)[0]
    # A ParameterLayer nested inside another layer stays a parameter.
    parameters = {
        id(v)
        for layer in layers
        for sub in layer._flatten_layers(include_self=True)
        if isinstance(sub, ParameterLayer)
        for v in sub.trainable_variables
    }
    dequantizer = getattr(model, "dequantizer", None)
    found, seen = [], set(parameters)
    for layer in list(layers) + ([dequantizer] if dequantizer is not None else []):
        for v in layer.trainable_variables:
            if id(v) not in seen:
                seen.add(id(v))
                found.append(v)
    return found


# ----------------------------------------------------------------- AdamW
def adamw(
    model: keras.Model,
    learning_rate: float | keras.optimizers.schedules.LearningRateSchedule,
    weight_decay: float,
    **kwargs: Any,
) -> keras.optimizers.AdamW:
    """Keras `AdamW` that decays `model`'s network weights only.

    Decoupled weight decay (Loshchilov & Hutter 2019), at each step besides
    the Adam update:

        w <- w - learning_rate * weight_decay * w      (network weights)

    The bijector parameters are excluded: pulling a log-scale, an LU factor
    or a prior's mean toward 0 changes what the flow computes (its volume, its
    rotation), not how much its networks can fit. `kwargs` go to `AdamW`
    (`global_clipnorm`, `use_ema`, ...). Call it before the optimizer is
    built (before `fit`, as `compile` then `fit` does): Keras reads the
    exclusions when it builds.
    """
    from tfp_glow import checks

    weight_decay = checks.number(weight_decay, "weight_decay", minimum=0.0)
    optimizer = keras.optimizers.AdamW(learning_rate, weight_decay=weight_decay, **kwargs)
    decayed = {id(v) for v in network_variables(model)}
    optimizer.exclude_from_weight_decay(
        var_list=[v for v in model.trainable_variables if id(v) not in decayed]
    )
    return optimizer


# ----------------------------------------------------------------- recommended
def recommended_optimizer(
    decay_steps: int | None = None,
    learning_rate: float = RECOMMENDED_LEARNING_RATE,
    warmup_steps: int = RECOMMENDED_WARMUP_STEPS,
    ema_momentum: float | None = RECOMMENDED_EMA_MOMENTUM,
    weight_decay: float = 0.0,
    model: keras.Model | None = None,
    **kwargs: Any,
) -> keras.optimizers.Optimizer:
    """`WarmupAdam` (Adam on `WarmupSchedule(learning_rate, warmup_steps,
    decay_steps)`, its peak rate a variable that Keras's learning-rate callbacks
    can set) with Polyak averaging of the weights.

    `FlowModel.compile()` with no optimizer uses `recommended_optimizer()`: a
    linear warmup over 100 steps to 3e-3, then constant (the length of the
    training is not known when compiling), and Keras' `use_ema` with
    `ema_momentum=0.99`: after every applied step the optimizer updates
    `avg <- 0.99 avg + 0.01 w` (saved with its state in checkpoints and
    `BackupAndRestore`), and `fit` ends by copying `avg` into the weights, so
    evaluation, sampling, saving and export after `fit` use the average
    (`tfp_glow.WithAveragedWeights` makes validation and checkpoints during
    `fit` use it too). On the digits protocol the average gained 0.04-0.07
    bits/dim over the last weights at the constant rate, and ended 0.044 lower
    than a cosine decay (BENCHMARKS.md, "Held-out likelihood by default").

    Pass `decay_steps` (training steps after the warmup) for a cosine decay to
    0 at the last step (`tfp-glow train --lr-decay cosine`):

        steps = epochs * batches_per_epoch
        model.compile(recommended_optimizer(decay_steps=steps - 100))

    `ema_momentum=None` turns the averaging off. With `weight_decay` > 0 it is
    `adamw(model, ...)` on the schedule itself (needs `model`; its rate cannot be
    set by callbacks). `kwargs` go to the Keras optimizer
    (`global_clipnorm`, ...).
    """
    checks.number(
        ema_momentum,
        "ema_momentum",
        minimum=0,
        maximum=1,
        exclusive_minimum=True,
        exclusive_maximum=True,
        allow_none=True,
    )
    if ema_momentum is not None:
        kwargs.update(use_ema=True, ema_momentum=ema_momentum)
    if weight_decay:
        if model is None:
            raise ValueError(
                "`recommended_optimizer(weight_decay=...)` needs `model` "
                "(only its networks' weights are decayed)."
            )
        schedule = WarmupSchedule(learning_rate, warmup_steps=warmup_steps, decay_steps=decay_steps)
        return adamw(model, schedule, weight_decay, **kwargs)
    return WarmupAdam(learning_rate, warmup_steps=warmup_steps, decay_steps=decay_steps, **kwargs)
