"""RealNVP (Dinh et al. 2017) as a `FlowModel`, on images (multi-scale) and vectors."""

from collections.abc import Sequence
from typing import Any

import keras
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_glow.bijectors import ActNorm, FactorOut, LogitPreprocess, MultiScaleFlow, Squeeze
from tfp_glow.models._common import (
    COUPLINGS,
    _choice,
    _context_options,
    _coupling,
    _flow_context,
    _image_shape,
    _maybe_prior,
    _net_dtype,
    _positive_int,
)
from tfp_glow.training.flow_model import FlowModel

tfb = tfp.bijectors

__all__ = ["RealNVP", "build_realnvp_flow"]


@keras.saving.register_keras_serializable(package="tfp_glow")
class RealNVP(FlowModel):
    """RealNVP (Dinh et al. 2017).

    Images (`input_shape=(H, W, C)`): each of `levels - 1` scales applies 3
    checkerboard affine couplings, a squeeze, 3 channel couplings and factors
    out half of the channels; the last scale applies 4 checkerboard
    couplings. ActNorm follows every coupling (in place of batch norm), the
    networks are residual (`num_blocks`), and data in [-0.5, 0.5] first goes
    through `LogitPreprocess(logit_alpha)` of `x + 0.5` (None to skip).

    Vectors (`input_shape=(D,)`, e.g. 2-D toy densities):
    `coupling_layers` affine couplings with MLPs (alternating halves; for an
    odd `D`, alternating even and odd features) and ActNorm between them.
    `coupling_layers` is used for vectors only (images follow the fixed
    per-scale pattern above); `levels` and `num_blocks` for
    images only. `coupling` is `"affine"` (the paper's) or one of `COUPLINGS`.

    `num_classes`: class-conditional learned priors (the couplings stay
    unconditional). `context_shape`: a conditional model `p(x | c)` for
    contexts of that shape: every coupling network also sees the context (a
    vector broadcast over the positions, an image resized to each scale;
    flattened for vectors) and every learned prior gets a zero-initialised
    offset from it; not with `num_classes`.
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (8, 8, 1),
        levels: int = 2,
        hidden_channels: int = 64,
        num_blocks: int = 2,
        coupling_layers: int = 8,
        logit_alpha: float = 0.05,
        num_classes: int | None = None,
        num_bins: int | None = 256,
        coupling: str = "affine",
        context_shape: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> None:
        input_shape = tuple(int(d) for d in input_shape)
        context_shape, num_classes = _context_options(context_shape, num_classes)
        levels = _positive_int(levels, "levels")
        if len(input_shape) == 3:
            _image_shape(input_shape, levels - 1, "input_shape")
        elif len(input_shape) != 1:
            raise ValueError(f"`input_shape` must be (H, W, C) or (D,); got {input_shape!r}.")
        self._config = dict(
            input_shape=input_shape,
            levels=levels,
            hidden_channels=_positive_int(hidden_channels, "hidden_channels"),
            num_blocks=_positive_int(num_blocks, "num_blocks"),
            coupling_layers=_positive_int(coupling_layers, "coupling_layers", 2),
            logit_alpha=logit_alpha,
            num_classes=num_classes,
            num_bins=num_bins,
            coupling=_choice(coupling, COUPLINGS, "coupling"),
            context_shape=context_shape,
        )
        cfg = self._config
        flow_context = _flow_context(context_shape, num_classes, kwargs)
        super().__init__(
            flow=lambda: build_realnvp_flow(
                cfg["input_shape"],
                cfg["levels"],
                cfg["hidden_channels"],
                cfg["num_blocks"],
                cfg["coupling_layers"],
                cfg["logit_alpha"],
                cfg["num_classes"],
                dtype=self.dtype_policy.variable_dtype,
                net_dtype=_net_dtype(self.dtype_policy),
                coupling=cfg["coupling"],
                context_shape=flow_context,
            ),
            event_shape=input_shape,
            num_bins=num_bins,
            num_classes=num_classes,
            context_shape=context_shape,
            **kwargs,
        )

    def get_config(self):
        return {**self._base_config(), **self._config}

    def recommended_optimizer_settings(self):
        """`compile()` with no optimizer. Vectors: 5e-4 with AdamW's decay 0.1
        of the coupling MLPs (on the digits as 64-D vectors: 2.574 test
        bits/dim at epoch 100 against 2.946 at the library's 3e-3; zuko's
        RealNVP 2.634; BENCHMARKS.md, "The family table"). Images: the
        library's (3e-3, no decay)."""
        if len(self._config["input_shape"]) == 1:
            return {"learning_rate": 5e-4, "weight_decay": 0.1}
        return {}


def _vector_steps(
    dim, coupling, layers, hidden, mask, dtype="float32", net_dtype=None, context_shape=None
):
    steps = []
    for i in range(layers):
        steps += [
            _coupling(
                coupling,
                (dim,),
                hidden,
                mask=mask,
                parity=i % 2,
                dtype=dtype,
                net_dtype=net_dtype,
                context_shape=context_shape,
            ),
            ActNorm(dim, event_ndims=1, dtype=dtype),
        ]
    return steps


def build_realnvp_flow(
    input_shape,
    levels=2,
    hidden_channels=64,
    num_blocks=2,
    coupling_layers=8,
    logit_alpha=0.05,
    num_classes=None,
    dtype="float32",
    net_dtype=None,
    coupling="affine",
    context_shape=None,
):
    """The normalizing bijector of `RealNVP` (see its docstring)."""
    if len(input_shape) == 1:
        steps = _vector_steps(
            input_shape[0],
            coupling,
            coupling_layers,
            hidden_channels,
            # Halves for an even D; for an odd D (e.g. a 5-D posterior) the
            # alternating features (zuko's mask), which need no even split.
            "channel" if input_shape[0] % 2 == 0 else "checkerboard",
            dtype=dtype,
            net_dtype=net_dtype,
            context_shape=context_shape,
        )
        return MultiScaleFlow(
            input_shape,
            [(tfb.Chain(list(reversed(steps))), None)],
            top_prior=_maybe_prior(input_shape, num_classes, dtype, context_shape),
            name="realnvp",
        )

    def block(shape, mask, count, first_parity=0):
        out = []
        for i in range(count):
            out += [
                _coupling(
                    coupling,
                    shape,
                    hidden_channels,
                    mask=mask,
                    parity=(first_parity + i) % 2,
                    net="resnet",
                    num_blocks=num_blocks,
                    dtype=dtype,
                    net_dtype=net_dtype,
                    context_shape=context_shape,
                ),
                ActNorm(shape[-1], dtype=dtype),
            ]
        return out

    shape = tuple(input_shape)
    stages = []
    for level in range(levels):
        steps = []
        if level == 0 and logit_alpha is not None:
            steps += [tfb.Shift(tf.constant(0.5, dtype)), LogitPreprocess(logit_alpha)]
        if level == levels - 1:
            steps += block(shape, "checkerboard", 4)
            stages.append((tfb.Chain(list(reversed(steps)), name=f"scale_{level}"), None))
            break
        steps += block(shape, "checkerboard", 3)
        steps.append(Squeeze(event_shape=shape))
        shape = (shape[0] // 2, shape[1] // 2, shape[2] * 4)
        steps += block(shape, "channel", 3)
        fo = FactorOut(
            shape[-1],
            0.5,
            num_classes=num_classes,
            dtype=dtype,
            net_dtype=net_dtype,
            context_shape=context_shape,
        )
        stages.append((tfb.Chain(list(reversed(steps)), name=f"scale_{level}"), fo))
        shape = shape[:-1] + (shape[-1] - fo.num_factored,)
    return MultiScaleFlow(
        input_shape,
        stages,
        top_prior=_maybe_prior(shape, num_classes, dtype, context_shape),
        name="realnvp",
    )
