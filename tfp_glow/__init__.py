"""tfp_glow: Glow, RealNVP and NICE for TensorFlow Probability and Keras 3."""

from tfp_glow import bijectors
from tfp_glow import nets

__version__ = "0.1.0"
