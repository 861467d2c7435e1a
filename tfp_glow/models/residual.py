"""Residual Flows (Chen et al. 2019; i-ResNet, Behrmann et al. 2019) as a `FlowModel`."""

from collections.abc import Sequence
from typing import Any

import keras
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_glow import checks, nets
from tfp_glow.bijectors import (
    ActNorm,
    FactorOut,
    LogitPreprocess,
    MultiScaleFlow,
    ResidualBlock,
    Squeeze,
)
from tfp_glow.bijectors.residual_block import LOG_DET_MODES
from tfp_glow.models._common import _image_shape, _maybe_prior, _positive_int, _refuse_context
from tfp_glow.training.flow_model import FlowModel

tfb = tfp.bijectors

__all__ = ["ResidualFlow", "build_residual_flow"]


@keras.saving.register_keras_serializable(package="tfp_glow")
class ResidualFlow(FlowModel):
    """Residual Flows (Chen et al. 2019): stacks of `ActNorm` and invertible
    residual blocks `y = x + g(x)`, `Lip(g) <= lipschitz ** 3 < 1`.

    Vectors (`input_shape=(D,)`, e.g. 2-D toy densities): `blocks` x (ActNorm,
    `ResidualBlock(ResidualMLP(D, hidden_units, num_hidden_layers))`).

    Images (`input_shape=(H, W, C)`, Chen et al.'s multi-scale architecture
    scaled down): data in [-0.5, 0.5] first goes through `LogitPreprocess` of
    `x + 0.5` (`logit_alpha`; None skips it); each of `levels` scales applies
    `blocks` x (ActNorm, `ResidualBlock(ResidualCNN(hidden_channels))`: LipSwish
    3x3 - 1x1 - 3x3 convolutions), and every scale but the last then squeezes
    and factors out half of the channels.

    The log-det (`log_det`, see `tfp_glow.bijectors.ResidualBlock`): `"auto"`
    (default) is exact for blocks of at most 16 dimensions (the 2-D toy
    densities) and the unbiased Russian-roulette estimate above (images), with
    `n_exact` terms always computed. What `log_prob`, `evaluate`, `sample` and
    a served SavedModel (`tfp_glow.export_saved_model`) compute is
    deterministic: exact where the block is exact, otherwise the estimator at
    each block's fixed seed (an unbiased estimate over that seed, the same
    number at every call); training steps draw afresh from the step's seed.
    Sampling inverts each block by fixed-point iteration (`atol`).

    The networks compute in the model's variable dtype (a mixed policy's
    low-precision compute is not used: the power series and the fixed-point
    inverse need the flow's precision).

    #### References

    [1] Ricky T. Q. Chen, Jens Behrmann, David Duvenaud, Joern-Henrik Jacobsen.
        Residual Flows for Invertible Generative Modeling. NeurIPS 2019.
    [2] Jens Behrmann et al. Invertible Residual Networks. ICML 2019.
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (2,),
        blocks: int = 4,
        hidden_units: int = 64,
        num_hidden_layers: int = 2,
        hidden_channels: int = 32,
        levels: int = 2,
        lipschitz: float = 0.97,
        log_det: str = "auto",
        n_exact: int = 2,
        atol: float | None = None,
        logit_alpha: float | None = 0.05,
        num_classes: int | None = None,
        num_bins: int | None = 256,
        context_shape: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> None:
        _refuse_context("ResidualFlow", context_shape)
        input_shape = checks.shape(input_shape, "input_shape", rank=(1, 3))
        levels = _positive_int(levels, "levels")
        if len(input_shape) == 3:
            _image_shape(input_shape, levels - 1, "input_shape")
        self._config = dict(
            input_shape=input_shape,
            blocks=_positive_int(blocks, "blocks"),
            hidden_units=_positive_int(hidden_units, "hidden_units"),
            num_hidden_layers=_positive_int(num_hidden_layers, "num_hidden_layers"),
            hidden_channels=_positive_int(hidden_channels, "hidden_channels"),
            levels=levels,
            lipschitz=checks.number(
                lipschitz,
                "lipschitz",
                minimum=0.0,
                maximum=1.0,
                exclusive_minimum=True,
                exclusive_maximum=True,
            ),
            log_det=checks.choice(log_det, LOG_DET_MODES, "log_det"),
            n_exact=_positive_int(n_exact, "n_exact", 0),
            atol=checks.number(atol, "atol", minimum=0.0, exclusive_minimum=True, allow_none=True),
            logit_alpha=logit_alpha,
            num_classes=num_classes,
            num_bins=num_bins,
        )
        cfg = self._config
        super().__init__(
            flow=lambda: build_residual_flow(
                **{k: v for k, v in cfg.items() if k != "num_bins"},
                dtype=self.dtype_policy.variable_dtype,
            ),
            event_shape=input_shape,
            num_bins=num_bins,
            num_classes=num_classes,
            **kwargs,
        )

    def get_config(self) -> dict:
        return {**self._base_config(), **self._config}


def build_residual_flow(
    input_shape: Sequence[int],
    blocks: int = 4,
    hidden_units: int = 64,
    num_hidden_layers: int = 2,
    hidden_channels: int = 32,
    levels: int = 2,
    lipschitz: float = 0.97,
    log_det: str = "auto",
    n_exact: int = 2,
    atol: float | None = None,
    logit_alpha: float | None = 0.05,
    num_classes: int | None = None,
    dtype: Any = "float32",
) -> MultiScaleFlow:
    """The normalizing bijector of `ResidualFlow` (see its docstring)."""
    dtype = tf.as_dtype(dtype)
    counter = iter(range(10**6))

    def residual_steps(shape, count, tag):
        steps = []
        for i in range(count):
            k = next(counter)
            if len(shape) == 1:
                net = nets.ResidualMLP(
                    shape[0],
                    hidden_units,
                    num_hidden_layers,
                    lipschitz=lipschitz,
                    seed=k,
                    dtype=dtype.name,
                    name=f"residual_net_{tag}_{i}",
                )
            else:
                net = nets.ResidualCNN(
                    shape,
                    hidden_channels,
                    lipschitz=lipschitz,
                    seed=k,
                    dtype=dtype.name,
                    name=f"residual_net_{tag}_{i}",
                )
            steps += [
                ActNorm(shape[-1], event_ndims=len(shape), dtype=dtype, name=f"act_norm_{tag}_{i}"),
                ResidualBlock(
                    net,
                    log_det=log_det,
                    n_exact=n_exact,
                    atol=atol,
                    seed=k,
                    dtype=dtype,
                    name=f"residual_block_{tag}_{i}",
                ),
            ]
        return steps

    shape = tuple(input_shape)
    if len(shape) == 1:
        steps = residual_steps(shape, blocks, "0")
        return MultiScaleFlow(
            shape,
            [(tfb.Chain(list(reversed(steps))), None)],
            top_prior=_maybe_prior(shape, num_classes, dtype),
            name="residual_flow",
        )
    stages: list[tuple[tfp.bijectors.Bijector, FactorOut | None]] = []
    for level in range(levels):
        steps = []
        if level == 0 and logit_alpha is not None:
            steps += [tfb.Shift(tf.constant(0.5, dtype)), LogitPreprocess(logit_alpha)]
        steps += residual_steps(shape, blocks, str(level))
        if level == levels - 1:
            stages.append((tfb.Chain(list(reversed(steps)), name=f"scale_{level}"), None))
            break
        steps.append(Squeeze(event_shape=shape))
        shape = (shape[0] // 2, shape[1] // 2, shape[2] * 4)
        fo = FactorOut(shape[-1], 0.5, num_classes=num_classes, dtype=dtype)
        stages.append((tfb.Chain(list(reversed(steps)), name=f"scale_{level}"), fo))
        shape = shape[:-1] + (shape[-1] - fo.num_factored,)
    return MultiScaleFlow(
        input_shape, stages, top_prior=_maybe_prior(shape, num_classes, dtype), name="residual_flow"
    )
