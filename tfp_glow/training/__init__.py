"""The Keras plumbing of training a flow, and the training helpers.

Modules (one idea each):

* `flow_model`: `FlowModel(keras.Model)`: train/test step, fit, compile.
* `flow_variables`, `initialization`, `flow_config`: every variable a flow holds
  as a Keras weight; ActNorm's data-dependent init; get_config/save/export.
* `optimizers`: `WarmupSchedule`, `WarmupAdam`, `adamw`, `recommended_optimizer`.
* `guard`: the NaN/inf guard of a step (`NonfiniteGuard`, ...), re-exported here.
* `reversible`: backprop without stored activations; `distributed`: tf.distribute;
  `xla`: the partial-batch warning; `callbacks`: `SampleGrid`, `WithAveragedWeights`;
  `epoch_checkpoint`: `EpochCheckpoint`, resume state and best weights written off the
  step loop.
"""

from tfp_glow.training.distributed import multi_worker_strategy
from tfp_glow.training.epoch_checkpoint import EpochCheckpoint
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

# The `X as X` imports re-export names that are not public (not in __all__) for
# cli_args, recipe and the tests, which read them from here.
from tfp_glow.training.optimizers import RECOMMENDED_EMA_MOMENTUM as RECOMMENDED_EMA_MOMENTUM
from tfp_glow.training.optimizers import RECOMMENDED_LEARNING_RATE as RECOMMENDED_LEARNING_RATE
from tfp_glow.training.optimizers import RECOMMENDED_WARMUP_STEPS as RECOMMENDED_WARMUP_STEPS
from tfp_glow.training.optimizers import (
    WarmupAdam,
    WarmupSchedule,
    adamw,
    recommended_optimizer,
)
from tfp_glow.training.optimizers import network_variables as network_variables

__all__ = [
    "EpochCheckpoint",
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
