"""The Keras plumbing of training a flow, and the training helpers.

Modules (one idea each):

* `flow_model`: `FlowModel(keras.Model)`: train/test step, fit, compile.
* `flow_variables`, `initialization`, `flow_config`: every variable a flow holds
  as a Keras weight; ActNorm's data-dependent init; get_config/save/export.
* `optimizers`: `WarmupSchedule`, `WarmupAdam`, `adamw`, `recommended_optimizer`.
* `guard`: the NaN/inf guard of a step (`NonfiniteGuard`, ...), re-exported here.
* `reversible`: backprop without stored activations; `distributed`: tf.distribute;
  `xla`: the partial-batch warning; `callbacks`: `SampleGrid`, `WithAveragedWeights`.
"""

from tfp_glow.training.distributed import multi_worker_strategy
from tfp_glow.training.guard import (
    NONFINITE_MODES,
    NonfiniteCounter,
    NonfiniteGuard,
    TrainPosition,
    all_finite,
    any_replica,
    apply_if,
    check_nonfinite_mode,
    nonfinite_error_message,
)
from tfp_glow.training.optimizers import (
    RECOMMENDED_EMA_MOMENTUM,
    RECOMMENDED_LEARNING_RATE,
    RECOMMENDED_WARMUP_STEPS,
    WarmupAdam,
    WarmupSchedule,
    adamw,
    network_variables,
    recommended_optimizer,
)

__all__ = [
    "NONFINITE_MODES",
    "NonfiniteCounter",
    "NonfiniteGuard",
    "TrainPosition",
    "WarmupAdam",
    "WarmupSchedule",
    "adamw",
    "all_finite",
    "any_replica",
    "apply_if",
    "check_nonfinite_mode",
    "multi_worker_strategy",
    "nonfinite_error_message",
    "recommended_optimizer",
]
