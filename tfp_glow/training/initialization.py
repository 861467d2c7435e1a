"""Data-dependent initialisation of a flow's ActNorms, once, from one batch.

tfp_glow's `ActNorm` sets its scale and bias from the moments of the batch it
sees inside `data_dependent_init()`; TFP's own (`tfb.Glow`'s
`ActivationNormalization`) initialises itself on its first call. Either way
`initialize(batch)` runs the batch through the flow eagerly, in
cross-replica context, so under a `tf.distribute` strategy every ActNorm
sees the global batch (inside a distributed step each replica would see its
own part and the replicas would silently differ).
"""

import tensorflow as tf

from tfp_glow.bijectors import ActNorm, data_dependent_init
from tfp_glow.bijectors.base import walk_bijectors
from tfp_glow.context_spec import context_argument

__all__ = ["ActNormInitialization", "actnorms_of"]


def _is_actnorm(bijector):
    return isinstance(bijector, ActNorm) or type(bijector).__name__ == "ActivationNormalization"


def _actnorm_initialized(actnorm):
    if isinstance(actnorm, ActNorm):
        return actnorm.is_initialized
    return bool(actnorm._initialized.numpy())  # TFP's saved init flag


def actnorms_of(flow):
    """Every ActNorm inside `flow` (tfp_glow's and TFP's)."""
    return [b for b in walk_bijectors(flow) if _is_actnorm(b)]


class ActNormInitialization:
    """`is_initialized` and `initialize` of a `FlowModel` (mixed in)."""

    @property
    def is_initialized(self):
        """True once every ActNorm (TFP's in `tfb.Glow` too) was initialised (or restored)."""
        return all(_actnorm_initialized(a) for a in self._actnorms)

    def initialize(self, x, context=None, *, labels=None):
        """Data-dependent init of every ActNorm from one batch, once.

        Runs `x` (with its `context` `[batch, *context_shape]` for a conditional
        flow; `labels=` its older name) through the normalizing direction with
        `data_dependent_init()`, so each ActNorm standardises the activations
        that actually reach it. Runs eagerly; under a `tf.distribute` strategy
        each ActNorm uses the moments of the global batch (all workers' `x`).
        ActNorms already initialised (e.g. restored from a checkpoint) are
        left alone.
        """
        if not tf.executing_eagerly():
            raise RuntimeError("`initialize` must run eagerly, outside tf.function.")
        spec = self._density.spec
        x = spec.training_data(x, "x")
        value, name = context_argument(context, labels)
        context = spec.context(value, x, arg_name=name)
        if self.dequantizer is not None:
            x = self.dequantizer(x)[0]  # ActNorm sees what training feeds the flow
        with self.distribute_strategy.scope(), data_dependent_init():
            self._density.forward_and_log_det(x, context)
        return self

    def _initialize_for_fit(self, first, source):
        """`fit`'s first batch `(x, context)` initialises the ActNorms (once) and is
        checked eagerly either way; `first` is None for a source `fit` cannot peek at."""
        if self.is_initialized:
            if first is not None:
                spec = self._density.spec
                spec.context(first[1], spec.training_data(first[0], "x"))
            return
        if first is None:
            raise ValueError(
                "The model is not initialised and `fit` cannot take a first batch "
                f"from {type(source).__name__}: call `model.initialize(batch)` first."
            )
        self.initialize(*first)
