"""tfp_glow bijectors: `tfp.bijectors.Bijector` subclasses for flows.

Forward is the normalizing direction (data to latent), as in the Glow paper's
table; models wrap the whole chain in `tfb.Invert` to sample with `forward`.
"""

from tfp_glow.bijectors.actnorm import ActNorm, data_dependent_init
from tfp_glow.bijectors.additive_coupling import AdditiveCoupling
from tfp_glow.bijectors.affine_coupling import AffineCoupling
from tfp_glow.bijectors.base import (
    FlowBijector,
    forward_and_log_det,
    inverse_and_log_det,
    keras_layers_of,
)
from tfp_glow.bijectors.coupling import MASKS, checkerboard_mask
from tfp_glow.bijectors.factor_out import FactorOut
from tfp_glow.bijectors.invertible_conv1x1 import InvertibleConv1x1
from tfp_glow.bijectors.learned_prior import LearnedPrior
from tfp_glow.bijectors.logistic_mixture_coupling import LogisticMixtureCoupling
from tfp_glow.bijectors.logit_preprocess import LogitPreprocess
from tfp_glow.bijectors.multi_scale import MultiScaleFlow
from tfp_glow.bijectors.permutation import channel_permutation
from tfp_glow.bijectors.planar import PlanarFlow
from tfp_glow.bijectors.radial import RadialFlow
from tfp_glow.bijectors.residual_block import ResidualBlock
from tfp_glow.bijectors.spline_coupling import RationalQuadraticSplineCoupling
from tfp_glow.bijectors.squeeze import Squeeze

__all__ = [
    "ActNorm",
    "AdditiveCoupling",
    "AffineCoupling",
    "FactorOut",
    "FlowBijector",
    "InvertibleConv1x1",
    "LearnedPrior",
    "LogisticMixtureCoupling",
    "LogitPreprocess",
    "MASKS",
    "MultiScaleFlow",
    "PlanarFlow",
    "RadialFlow",
    "RationalQuadraticSplineCoupling",
    "ResidualBlock",
    "Squeeze",
    "channel_permutation",
    "checkerboard_mask",
    "data_dependent_init",
    "forward_and_log_det",
    "inverse_and_log_det",
    "keras_layers_of",
]
