"""Keras 3 networks: the conditioners of tfp_glow's couplings (`coupling`) and
of TFP's own flows: `MADE` and `AutoregressiveSplineFn` for
`tfb.MaskedAutoregressiveFlow`, `RealNVPNet` for `tfb.RealNVP`, `ODENet` and
`ffjord_trace` for `tfb.FFJORD` (all conditional through `context_size` /
TFP's `conditional_input`).

`tfp_glow.nets` was one module; it is a package so that each family of
network lives in its own small module. Every name that module had (including
`_dropout`, which tests use) stays reachable here.
"""

from tfp_glow.nets.coupling import (
    GlowCouplingNet,
    MLPCouplingNet,
    ResNetCouplingNet,
    ZeroConv2D,
    _dropout,  # noqa: F401 (tests call nets._dropout)
    dropout_active,
    is_dropout_active,
)
from tfp_glow.nets.made import MADE
from tfp_glow.nets.ode import ODENet, ffjord_trace
from tfp_glow.nets.realnvp import RealNVPNet
from tfp_glow.nets.residual import LipSwish, ResidualCNN, ResidualMLP, SpectralConv2D, SpectralDense
from tfp_glow.nets.spline import AutoregressiveSplineFn

__all__ = [
    "AutoregressiveSplineFn",
    "GlowCouplingNet",
    "LipSwish",
    "MADE",
    "MLPCouplingNet",
    "ODENet",
    "RealNVPNet",
    "ResidualCNN",
    "ResidualMLP",
    "ResNetCouplingNet",
    "SpectralConv2D",
    "SpectralDense",
    "ZeroConv2D",
    "dropout_active",
    "ffjord_trace",
    "is_dropout_active",
]
