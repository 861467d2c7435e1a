"""NICE (Dinh et al. 2014) as a `FlowModel`: additive couplings on the flattened data."""

import functools
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow_probability as tfp

from tfp_glow import nets
from tfp_glow.bijectors import ActNorm, AdditiveCoupling, MultiScaleFlow
from tfp_glow.models._common import (
    _context_options,
    _flow_context,
    _maybe_prior,
    _net_dtype,
    _positive_int,
)
from tfp_glow.training.flow_model import FlowModel

tfb = tfp.bijectors

__all__ = ["NICE", "build_nice_flow"]


@keras.saving.register_keras_serializable(package="tfp_glow")
class NICE(FlowModel):
    """NICE (Dinh et al. 2014): the data flattened to a vector, `coupling_layers`
    additive couplings with MLPs on alternating features, then a learned
    diagonal scaling (an `ActNorm` on the vector, NICE's `exp(S)` layer).
    Works on images (`input_shape=(H, W, C)`) and vectors (`(D,)`).

    `num_classes`: a class-conditional learned prior. `context_shape`: a
    conditional model `p(x | c)`: every coupling network also sees the
    flattened context, and the learned prior gets a zero-initialised offset
    from it; not with `num_classes`.
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (8, 8, 1),
        coupling_layers: int = 4,
        hidden_units: int = 256,
        num_hidden_layers: int = 3,
        num_classes: int | None = None,
        num_bins: int | None = 256,
        context_shape: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> None:
        input_shape = tuple(int(d) for d in input_shape)
        context_shape, num_classes = _context_options(context_shape, num_classes)
        if len(input_shape) not in (1, 3):
            raise ValueError(f"`input_shape` must be (H, W, C) or (D,); got {input_shape!r}.")
        self._config = dict(
            input_shape=input_shape,
            coupling_layers=_positive_int(coupling_layers, "coupling_layers", 2),
            hidden_units=_positive_int(hidden_units, "hidden_units"),
            num_hidden_layers=_positive_int(num_hidden_layers, "num_hidden_layers"),
            num_classes=num_classes,
            num_bins=num_bins,
            context_shape=context_shape,
        )
        cfg = self._config
        flow_context = _flow_context(context_shape, num_classes, kwargs)
        super().__init__(
            flow=lambda: build_nice_flow(
                cfg["input_shape"],
                cfg["coupling_layers"],
                cfg["hidden_units"],
                cfg["num_hidden_layers"],
                cfg["num_classes"],
                dtype=self.dtype_policy.variable_dtype,
                net_dtype=_net_dtype(self.dtype_policy),
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


def build_nice_flow(
    input_shape,
    coupling_layers=4,
    hidden_units=256,
    num_hidden_layers=3,
    num_classes=None,
    dtype="float32",
    net_dtype=None,
    context_shape=None,
):
    """The normalizing bijector of `NICE` (see its docstring)."""
    dim = int(np.prod(input_shape))
    steps = []
    if len(input_shape) > 1:
        steps.append(tfb.Reshape(event_shape_out=[dim], event_shape_in=list(input_shape)))
    for i in range(coupling_layers):
        net = functools.partial(
            nets.MLPCouplingNet,
            hidden_units,
            num_hidden_layers=num_hidden_layers,
            dtype=net_dtype or dtype,
        )
        steps.append(
            AdditiveCoupling(
                net,
                mask="checkerboard",
                parity=i % 2,
                event_shape=(dim,),
                dtype=dtype,
                context_shape=context_shape,
            )
        )
    steps.append(ActNorm(dim, event_ndims=1, dtype=dtype, name="nice_scaling"))
    return MultiScaleFlow(
        input_shape,
        [(tfb.Chain(list(reversed(steps))), None)],
        top_prior=_maybe_prior((dim,), num_classes, dtype, context_shape),
        name="nice",
    )
