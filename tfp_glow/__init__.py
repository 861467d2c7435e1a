"""tfp_glow: Glow, RealNVP and NICE for TensorFlow Probability and Keras 3.

Bijectors live in `tfp_glow.bijectors` (forward = data to latent, as in the
Glow paper); complete models are Keras 3 `FlowModel`s trained with `fit`.
"""


def _require_tensorflow_backend():
    """TFP bijectors and the models' variables need Keras' TensorFlow backend:
    say so before importing keras under another one (an import error about
    jax or torch, or worse, a model whose variables are not tf.Variables)."""
    import os
    import sys

    keras = sys.modules.get("keras")
    # Once keras is imported its backend is fixed; before, KERAS_BACKEND picks it.
    backend = keras.config.backend() if keras is not None else os.environ.get("KERAS_BACKEND")
    if backend and backend != "tensorflow":
        raise ImportError(
            f"tfp_glow needs Keras' TensorFlow backend, but the Keras backend is "
            f"{backend!r}: set KERAS_BACKEND=tensorflow (or unset it) before importing keras."
        )


_require_tensorflow_backend()

from tfp_glow import bijectors, data, models, nets, training
from tfp_glow.export import export_saved_model, load_exported
from tfp_glow.images import image_grid, save_image_grid, save_png, to_uint8
from tfp_glow.models import (
    DEFAULT_DROPOUT,
    FFJORD,
    IAF,
    MAF,
    NICE,
    Glow,
    NeuralSplineFlow,
    RealNVP,
    ResidualFlow,
)
from tfp_glow.training.callbacks import SampleGrid, WithAveragedWeights
from tfp_glow.training.flow_model import FlowModel
from tfp_glow.variational_dequantization import VariationalDequantizer

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_DROPOUT",
    "FFJORD",
    "FlowModel",
    "Glow",
    "IAF",
    "MAF",
    "NICE",
    "NeuralSplineFlow",
    "RealNVP",
    "ResidualFlow",
    "SampleGrid",
    "VariationalDequantizer",
    "WithAveragedWeights",
    "bijectors",
    "data",
    "export_saved_model",
    "image_grid",
    "load_exported",
    "models",
    "nets",
    "save_image_grid",
    "save_png",
    "to_uint8",
    "training",
]
