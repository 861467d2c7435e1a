"""Neural spline flows (Durkan et al. 2019) as a `FlowModel`: monotone
rational-quadratic splines, autoregressive (NSF-AR) or coupling (NSF-C), on
(flattened) vectors."""

import functools
from collections.abc import Sequence
from typing import Any

import keras
import tensorflow_probability as tfp

from tfp_glow import checks, nets
from tfp_glow.bijectors import ActNorm, RationalQuadraticSplineCoupling
from tfp_glow.models import _vectors
from tfp_glow.models._common import _context_options, _flow_context, _net_dtype, _positive_int
from tfp_glow.training.flow_model import FlowModel

tfb = tfp.bijectors

__all__ = ["NeuralSplineFlow", "build_nsf_flow"]

VARIANTS = ("autoregressive", "coupling")
# Per variant, (num_layers, hidden_units): about 150k parameters on the digits
# protocol (64 features, 8 bins; the count is in docs/guide/families.md). The
# spline's 3K - 1 = 23 outputs per feature dominate: the autoregressive MADE's
# last layer is hidden x 64 x 23, the coupling net's hidden x 32 x 23.
DEFAULTS = {"autoregressive": (3, (32, 32)), "coupling": (4, (48, 48))}


@keras.saving.register_keras_serializable(package="tfp_glow")
class NeuralSplineFlow(FlowModel):
    """Neural spline flow (Durkan et al. 2019) on vectors.

    Every layer maps each transformed feature through a monotone
    rational-quadratic spline of `spline_bins` bins on `[-B, B]` (B =
    `tail_bound`; identity outside), whose knots come from a network:

        z_i = RQS(x_i; theta_i),   log|det dz/dx| = sum_i log RQS'(x_i; theta_i)

    `variant="autoregressive"` (NSF-AR): `theta_i = MADE(x_<i)`
    (`AutoregressiveSplineFn` in TFP's MAF), every feature transformed per
    layer; the density is one network pass, sampling D passes.
    `variant="coupling"` (NSF-C): `RationalQuadraticSplineCoupling`,
    `theta = MLP(x_A)` for the other half `x_B` (`hidden_units`: equal widths,
    one per hidden layer); density and sampling are one pass each, so it
    needs more layers. A fixed permutation (`"reverse"` or a seeded
    `"shuffle"`) follows every layer but the last; `actnorm=True` adds an
    `ActNorm` after each.

    Images (`input_shape=(H, W, C)`) are flattened to `H W C` features. The
    defaults per variant (None picks them): autoregressive 3 layers, MADE
    [32, 32]; coupling 4 layers, MLP [48, 48]; both about 150k parameters on
    64 features with 8 bins.

    Args:
      input_shape: `(D,)` or `(H, W, C)` (coupling: D >= 2).
      variant: `"autoregressive"` or `"coupling"`.
      num_layers: spline layers (>= 1); None: the variant's default.
      hidden_units: the networks' hidden sizes; None: the variant's default.
      spline_bins: K >= 2 bins per spline (the paper's K; `num_bins` is, as
        in every model, the number of discrete levels of the data).
      tail_bound: B > 0; the splines act on `[-B, B]`.
      permutation: `"reverse"` or `"shuffle"`, between layers.
      actnorm: an `ActNorm` after every layer.
      seed: seeds the `"shuffle"` permutations (stored in the config).
      num_classes, num_bins: see `MAF` (data levels; None for continuous data).
      context_shape: see `MAF`: every spline's network (MADE or coupling MLP)
        also sees the flattened context.
      **kwargs: `FlowModel`'s.

    #### Examples

    ```python
    model = tfp_glow.NeuralSplineFlow(input_shape=(2,), variant="coupling",
                                      num_layers=6, hidden_units=[64, 64],
                                      num_bins=None)
    ```

    #### References

    [1]: Durkan, Bekasov, Murray, Papamakarios. Neural Spline Flows.
         NeurIPS 2019. https://arxiv.org/abs/1906.04032
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (8, 8, 1),
        variant: str = "autoregressive",
        num_layers: int | None = None,
        hidden_units: Sequence[int] | None = None,
        spline_bins: int = 8,
        tail_bound: float = 4.0,
        permutation: str = "reverse",
        actnorm: bool = False,
        seed: int = 0,
        num_classes: int | None = None,
        num_bins: int | None = 256,
        context_shape: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> None:
        input_shape = _vectors.input_shape_of(input_shape)
        context_shape, num_classes = _context_options(context_shape, num_classes)
        variant = checks.choice(variant, VARIANTS, "variant")
        default_layers, default_units = DEFAULTS[variant]
        num_layers = _positive_int(
            default_layers if num_layers is None else num_layers, "num_layers"
        )
        hidden_units = _vectors.hidden_units_of(
            default_units if hidden_units is None else hidden_units
        )
        if variant == "coupling":
            if _vectors.num_features(input_shape) < 2:
                raise ValueError(
                    f"`input_shape` {input_shape} has one feature: "
                    f"variant='coupling' needs at least 2 (one half "
                    f"conditions the other); use variant='autoregressive'."
                )
            if len(set(hidden_units)) != 1:
                raise ValueError(
                    f"`hidden_units` of variant='coupling' must be equal "
                    f"widths (an MLP of len(hidden_units) layers); got "
                    f"{hidden_units!r}."
                )
        self._config = dict(
            input_shape=input_shape,
            variant=variant,
            num_layers=num_layers,
            hidden_units=hidden_units,
            spline_bins=_positive_int(spline_bins, "spline_bins", minimum=2),
            tail_bound=checks.number(tail_bound, "tail_bound", minimum=0.0, exclusive_minimum=True),
            permutation=checks.choice(permutation, _vectors.VECTOR_PERMUTATIONS, "permutation"),
            actnorm=checks.boolean(actnorm, "actnorm"),
            seed=_vectors.seed_of(seed),
            num_classes=num_classes,
            num_bins=num_bins,
            context_shape=context_shape,
        )
        options = {k: v for k, v in self._config.items() if k != "num_bins"}
        options["context_shape"] = _flow_context(context_shape, num_classes, kwargs)
        super().__init__(
            flow=lambda: build_nsf_flow(
                **options,
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


def _autoregressive_layer(dim, hidden_units, num_bins, tail_bound, net_dtype, index, context):
    spline = nets.AutoregressiveSplineFn.build(
        event_size=dim,
        hidden_units=list(hidden_units),
        num_bins=num_bins,
        bound=tail_bound,
        dtype=net_dtype,
        name=f"spline_made_{index}",
        context_shape=context,
    )
    # TFP's MAF runs latent -> data; its one-pass inverse normalizes.
    return tfb.Invert(tfb.MaskedAutoregressiveFlow(bijector_fn=spline, name=f"nsf_{index}"))


def _coupling_layer(dim, hidden_units, num_bins, tail_bound, dtype, net_dtype, index, context):
    net = functools.partial(
        nets.MLPCouplingNet, hidden_units[0], num_hidden_layers=len(hidden_units), dtype=net_dtype
    )
    # Parity fixed: the permutation between layers decides which features
    # condition which (alternating parity after a reversal would transform
    # the same features again).
    return RationalQuadraticSplineCoupling(
        net,
        num_bins=num_bins,
        tail_bound=tail_bound,
        mask="channel",
        parity=0,
        event_shape=(dim,),
        event_ndims=1,
        dtype=dtype,
        name=f"spline_coupling_{index}",
        context_shape=context,
    )


def build_nsf_flow(
    input_shape,
    variant="autoregressive",
    num_layers=3,
    hidden_units=(32, 32),
    spline_bins=8,
    tail_bound=4.0,
    permutation="reverse",
    actnorm=False,
    seed=0,
    num_classes=None,
    dtype="float32",
    net_dtype=None,
    context_shape=None,
):
    """The normalizing bijector of `NeuralSplineFlow` (see its docstring);
    `context_shape`: every network also sees the flattened context."""
    dim = _vectors.num_features(input_shape)
    net_dtype = net_dtype or dtype
    layers = []
    for i in range(num_layers):
        if variant == "autoregressive":
            layer = _autoregressive_layer(
                dim, hidden_units, spline_bins, tail_bound, net_dtype, i, context_shape
            )
        else:
            layer = _coupling_layer(
                dim, hidden_units, spline_bins, tail_bound, dtype, net_dtype, i, context_shape
            )
        if actnorm:
            layer = tfb.Chain(
                [ActNorm(dim, event_ndims=1, dtype=dtype, name=f"actnorm_{i}"), layer]
            )
        layers.append(layer)
    steps = _vectors.interleave(layers, permutation, dim, seed)
    return _vectors.vector_flow(
        input_shape, steps, num_classes, dtype, name="nsf", context_shape=context_shape
    )
