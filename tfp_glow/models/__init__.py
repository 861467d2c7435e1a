"""The model families, one module each: `FlowModel`s built from a config.

Each class builds its normalizing bijector `f` (data to latent) and is
Keras-serialisable (`get_config` holds the constructor arguments, so `.keras`
files reload).
"""

from tfp_glow.models._common import COUPLINGS, DEFAULT_DROPOUT, DEQUANTIZATIONS, PERMUTATIONS
from tfp_glow.models.ffjord import FFJORD, build_ffjord_flow
from tfp_glow.models.glow import Glow, build_glow_flow
from tfp_glow.models.maf import IAF, MAF, build_maf_flow
from tfp_glow.models.nice import NICE, build_nice_flow
from tfp_glow.models.nsf import NeuralSplineFlow, build_nsf_flow
from tfp_glow.models.realnvp import RealNVP, build_realnvp_flow
from tfp_glow.models.residual import ResidualFlow, build_residual_flow

__all__ = [
    "COUPLINGS",
    "DEFAULT_DROPOUT",
    "DEQUANTIZATIONS",
    "FFJORD",
    "Glow",
    "IAF",
    "MAF",
    "NICE",
    "NeuralSplineFlow",
    "PERMUTATIONS",
    "RealNVP",
    "ResidualFlow",
    "build_ffjord_flow",
    "build_glow_flow",
    "build_maf_flow",
    "build_nice_flow",
    "build_nsf_flow",
    "build_realnvp_flow",
    "build_residual_flow",
]
