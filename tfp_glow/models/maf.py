"""MAF (Papamakarios et al. 2017) and IAF (Kingma et al. 2016) as `FlowModel`s:
affine autoregressive layers with `MADE` conditioners on (flattened) vectors."""

from collections.abc import Sequence
from typing import Any

import keras
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_glow import checks, nets
from tfp_glow.bijectors import ActNorm
from tfp_glow.models import _vectors
from tfp_glow.models._common import _context_options, _flow_context, _net_dtype, _positive_int
from tfp_glow.training.flow_model import FlowModel

tfb = tfp.bijectors

__all__ = ["IAF", "MAF", "build_maf_flow"]

# On the digits protocol (64 features) 5 layers of MADE [100, 100] hold
# 147,640 parameters (the masked-out weights included, as zuko and TFP count them).
DEFAULT_HIDDEN_UNITS = (100, 100)
# The bound B of each layer's log-scale, B tanh(s / B) (`_BoundedShiftAndLogScale`).
DEFAULT_LOG_SCALE_BOUND = 3.0


class _BoundedShiftAndLogScale(tf.Module):
    """A `MADE`'s two outputs per feature as TFP's `(shift, log_scale)`, the
    log-scale bounded softly to `(-B, B)`:

        shift, s = MADE(y)[..., 0], MADE(y)[..., 1]
        log_scale = B tanh(s / B)            (= s near 0: the zero-initialised
                                              MADE still starts at the identity)

    Why: IAF's density solves `z_i = x_i exp(log_scale_i(z_<i)) + shift_i(z_<i)`
    feature after feature; with an unbounded log-scale (linear in `z` through
    the ReLU MADE) a large `z_i` makes a larger scale for the features after
    it, a feedback that overflowed float32 at feature 62 of 64 on the digits
    at the default 3e-3 (a NaN loss at epoch 3; BENCHMARKS.md, "The family
    table"). Bounded, each feature can grow by at most `exp(B)` times its data.
    It is a `tf.Module` holding the MADE as `made`, so the variable walker and
    `tf.train.Checkpoint` find the network (as for `AutoregressiveSplineFn`).
    """

    def __init__(self, made: nets.MADE, bound: float) -> None:
        super().__init__(name="bounded_shift_and_log_scale")
        self.made = made
        self.bound = bound

    @property
    def trainable_variables(self):
        """The MADE's (tf.Module's own walk does not see Keras 3 variables)."""
        return self.made.trainable_variables

    def __call__(self, y, **kwargs):
        params = self.made(y, **kwargs)
        shift, s = params[..., 0], params[..., 1]
        return shift, self.bound * tf.math.tanh(s / self.bound)


class _AutoregressiveModel(FlowModel):
    """What MAF and IAF share: the arguments, the config and the flow; they
    differ only in which direction of the autoregressive layer normalizes."""

    _INVERSE_AUTOREGRESSIVE = False

    def __init__(
        self,
        input_shape: Sequence[int] = (8, 8, 1),
        num_layers: int = 5,
        hidden_units: Sequence[int] = DEFAULT_HIDDEN_UNITS,
        permutation: str = "reverse",
        actnorm: bool = False,
        activation: str = "relu",
        seed: int = 0,
        num_classes: int | None = None,
        num_bins: int | None = 256,
        log_scale_bound: float | None = DEFAULT_LOG_SCALE_BOUND,
        context_shape: Sequence[int] | None = None,
        dropout: float = 0.0,
        direct_connections: bool = False,
        **kwargs: Any,
    ) -> None:
        input_shape = _vectors.input_shape_of(input_shape)
        context_shape, num_classes = _context_options(context_shape, num_classes)
        self._config = dict(
            input_shape=input_shape,
            num_layers=_positive_int(num_layers, "num_layers"),
            hidden_units=_vectors.hidden_units_of(hidden_units),
            permutation=checks.choice(permutation, _vectors.VECTOR_PERMUTATIONS, "permutation"),
            actnorm=checks.boolean(actnorm, "actnorm"),
            activation=activation,
            seed=_vectors.seed_of(seed),
            num_classes=num_classes,
            num_bins=num_bins,
            log_scale_bound=checks.number(
                log_scale_bound,
                "log_scale_bound",
                minimum=0.0,
                exclusive_minimum=True,
                allow_none=True,
            ),
            context_shape=context_shape,
            dropout=checks.number(
                dropout, "dropout", minimum=0.0, maximum=1.0, exclusive_maximum=True
            ),
            direct_connections=checks.boolean(direct_connections, "direct_connections"),
        )
        options = {k: v for k, v in self._config.items() if k != "num_bins"}
        options["context_shape"] = _flow_context(context_shape, num_classes, kwargs)
        super().__init__(
            flow=lambda: build_maf_flow(
                **options,
                inverse_autoregressive=self._INVERSE_AUTOREGRESSIVE,
                dtype=self.dtype_policy.variable_dtype,
                net_dtype=_net_dtype(self.dtype_policy),
            ),
            event_shape=input_shape,
            num_bins=num_bins,
            num_classes=num_classes,
            context_shape=context_shape,
            **kwargs,
        )

    def get_config(self):
        return {**self._base_config(), **self._config}

    @classmethod
    def from_config(cls, config):
        # A config saved before `log_scale_bound` existed is an unbounded model.
        return super().from_config({"log_scale_bound": None, **config})


@keras.saving.register_keras_serializable(package="tfp_glow")
class MAF(_AutoregressiveModel):
    """Masked autoregressive flow (Papamakarios et al. 2017) on vectors.

    Each of `num_layers` layers is an affine autoregressive map whose shift
    and log-scale come from a `MADE` (`hidden_units`, ReLU) of the preceding
    features in its order; normalizing (data `x` to latent `z`):

        z_i = (x_i - mu_i(x_<i)) exp(-alpha_i(x_<i))
        log|det dz/dx| = -sum_i alpha_i(x_<i)

    one network pass for the density of a batch (training, `log_prob`);
    sampling inverts it one feature after another, D passes. A fixed
    permutation between layers (`"reverse"`: the order reversed, the paper's;
    `"shuffle"`: a random one drawn from `seed`) lets every feature condition
    on every other across layers; `actnorm=True` puts an `ActNorm` after each
    layer, the batch-statistics-free stand-in for the paper's batch norm
    (off by default: the MADEs start at the identity and need none).

    Images (`input_shape=(H, W, C)`) are flattened to `H W C` features; the
    samples come back as images. The defaults (5 layers, MADE [100, 100]) hold
    147,640 parameters on 64 features.

    Args:
      input_shape: `(D,)` or `(H, W, C)`.
      num_layers: autoregressive layers (>= 1).
      hidden_units: the MADEs' hidden layer sizes.
      permutation: `"reverse"` or `"shuffle"`, between layers.
      actnorm: an `ActNorm` after every layer.
      activation: the MADEs' hidden activation.
      seed: seeds the `"shuffle"` permutations (stored in the config).
      num_classes: class-conditional learned prior, or None.
      context_shape: a conditional model `p(x | c)` for contexts of this shape
        (any: it is flattened): every MADE also sees the whole context, the
        learned prior gets a zero-initialised offset from it; the density
        methods and `fit` take the context second. Not with `num_classes`.
      num_bins: discrete levels of the data (256 for 8-bit images), None for
        continuous data (bits/dim then without the dequantization term).
      log_scale_bound: B: each layer's log-scale is `alpha = B tanh(s / B)` of
        the MADE's output `s` (a scale within `exp(+-B)` per layer); None for
        `alpha = s`, unbounded. Bounded, IAF's feature-by-feature density
        cannot overflow (unbounded it diverged at the default optimizer).
      dropout: the MADEs' dropout rate while training (`nets.MADE`), 0 for none.
      direct_connections: the MADEs' masked linear input-to-output maps
        (`nets.MADE`).
      **kwargs: `FlowModel`'s (`dtype`, `backprop`, `nonfinite`, ...).

    #### Examples

    ```python
    model = tfp_glow.MAF(input_shape=(2,), num_layers=4, hidden_units=[64, 64],
                         num_bins=None)
    model.compile()
    model.fit(points, epochs=20, batch_size=256)
    ```

    #### References

    [1]: Papamakarios, Pavlakou, Murray. Masked Autoregressive Flow for Density
         Estimation. NeurIPS 2017. https://arxiv.org/abs/1705.07057
    """

    def recommended_optimizer_settings(self):
        """`compile()` with no optimizer: `recommended_optimizer` at 1e-3 with
        AdamW's decay 0.3 of the MADEs' weights. At the library's 3e-3 the
        MADEs overfit the digits (2.709 test bits/dim at epoch 100, best 2.521
        at epoch 40); at this setting 2.468 at epoch 100 (zuko's MAF 2.490;
        benchmarks/results/family_table/maf_settings.json)."""
        return {"learning_rate": 1e-3, "weight_decay": 0.3}


@keras.saving.register_keras_serializable(package="tfp_glow")
class IAF(_AutoregressiveModel):
    """Inverse autoregressive flow (Kingma et al. 2016): MAF's layer used the
    other way round.

    The autoregressive map now runs from latent to data, conditioned on the
    preceding *latent* features:

        x_i = z_i exp(alpha_i(z_<i)) + mu_i(z_<i)

    so sampling is one network pass per layer, and the density, which must
    recover `z` from `x`, takes D passes per layer (one per feature): about
    D times MAF's training cost (64 on the digits). IAF is the flow for fast
    sampling and for variational posteriors (whose own samples are scored),
    MAF the one for density estimation. Arguments, defaults and parameter
    count are MAF's (see `MAF`).

    #### References

    [1]: Kingma, Salimans, Jozefowicz, Chen, Sutskever, Welling. Improved
         Variational Inference with Inverse Autoregressive Flow. NeurIPS 2016.
         https://arxiv.org/abs/1606.04934
    """

    _INVERSE_AUTOREGRESSIVE = True


def build_maf_flow(
    input_shape,
    num_layers=5,
    hidden_units=DEFAULT_HIDDEN_UNITS,
    permutation="reverse",
    actnorm=False,
    activation="relu",
    seed=0,
    num_classes=None,
    inverse_autoregressive=False,
    dtype="float32",
    net_dtype=None,
    log_scale_bound=DEFAULT_LOG_SCALE_BOUND,
    context_shape=None,
    dropout=0.0,
    direct_connections=False,
):
    """The normalizing bijector of `MAF` (or of `IAF` with
    `inverse_autoregressive=True`; see their docstrings); with `context_shape`
    every MADE also sees the flattened context (all of it, in every layer)
    and the learned prior gets a zero-initialised offset from it."""
    dim = _vectors.num_features(input_shape)
    layers = []
    for i in range(num_layers):
        made = nets.MADE(
            params=2,
            event_size=dim,
            hidden_units=list(hidden_units),
            activation=activation,
            dtype=net_dtype or dtype,
            name=f"made_{i}",
            context_shape=context_shape,
            dropout=dropout,
            direct_connections=direct_connections,
        )
        # TFP's MAF runs latent -> data with the sequential inverse: MAF
        # normalizes with its one-pass inverse, IAF with its D-pass forward.
        conditioner = (
            made if log_scale_bound is None else _BoundedShiftAndLogScale(made, log_scale_bound)
        )
        layer = tfb.MaskedAutoregressiveFlow(shift_and_log_scale_fn=conditioner, name=f"maf_{i}")
        step = [layer if inverse_autoregressive else tfb.Invert(layer)]
        if actnorm:
            step.append(ActNorm(dim, event_ndims=1, dtype=dtype, name=f"actnorm_{i}"))
        layers.append(tfb.Chain(list(reversed(step))) if actnorm else step[0])
    steps = _vectors.interleave(layers, permutation, dim, seed)
    return _vectors.vector_flow(
        input_shape,
        steps,
        num_classes,
        dtype,
        name="iaf" if inverse_autoregressive else "maf",
        context_shape=context_shape,
    )
