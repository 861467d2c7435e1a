"""Glow (Kingma & Dhariwal 2018) as a `FlowModel`: multi-scale ActNorm, 1x1 conv, coupling."""

from collections.abc import Sequence
from typing import Any

import keras
import tensorflow_probability as tfp

from tfp_glow import checks
from tfp_glow.bijectors import ActNorm, FactorOut, LearnedPrior, MultiScaleFlow, Squeeze
from tfp_glow.models._common import (
    COUPLINGS,
    DEFAULT_DROPOUT,
    DEQUANTIZATIONS,
    PERMUTATIONS,
    _choice,
    _context_options,
    _coupling,
    _coupling_kwargs,
    _dequantizer_kwargs,
    _flow_context,
    _image_shape,
    _net_dtype,
    _permutation,
    _positive_int,
)
from tfp_glow.training.flow_model import FlowModel
from tfp_glow.variational_dequantization import VariationalDequantizer

tfb = tfp.bijectors

__all__ = ["Glow", "build_glow_flow"]


@keras.saving.register_keras_serializable(package="tfp_glow")
class Glow(FlowModel):
    """Glow (Kingma & Dhariwal 2018): `levels` x [squeeze, `steps_per_level` x
    (ActNorm, 1x1 conv, coupling), split], a learned top prior.

    Args:
      image_shape: `(H, W, C)`, with H and W divisible by `2**levels`.
      levels: number of scales `L`.
      steps_per_level: flow steps `K` per scale.
      hidden_channels: width of every coupling network.
      coupling: `"affine"` (bounded scale, Glow), `"additive"` (NICE-style),
        `"spline"` (rational-quadratic spline, Durkan et al. 2019) or `"mol"`
        (mixture-of-logistics CDF, Flow++).
      permutation: `"conv_lu"` (LU 1x1 conv), `"conv"` (full 1x1 conv),
        `"reverse"` or `"shuffle"` (fixed permutations).
      learn_top_prior: learn the top prior's mean and scale.
      num_classes: class-conditional priors (`sample(labels=...)`), openai/glow's
        `ycond`: a per-class offset of every learned prior; the couplings stay
        unconditional (the shorthand of `context_shape=(K,)` at the model's
        interface, int class ids allowed).
      context_shape: a conditional Glow `p(x | c)` for contexts of this shape
        (`(k,)` for a vector, `(h, w, c)` for an image): every coupling network
        also sees the context (a vector broadcast over the positions, an image
        resized to each level's height and width) and every learned prior gets
        a zero-initialised offset from it; the density methods and `fit` take
        the context second. Not with `num_classes`.
      split_fraction: fraction of channels factored out at each split.
      num_bins: data levels (256 for 8-bit, 17 for the built-in digits).
      seed: seeds the 1x1 conv rotations and shuffles.
      dropout: dropout rate in [0, 1) after each hidden ReLU of the coupling
        networks, active only in the training step; its masks are a function
        of the step (`nets.dropout_active`), so every `backprop` mode gives
        the same gradients and a resumed run the same weights. Default None:
        `DEFAULT_DROPOUT` (0.2, Flow++'s rate).
      last_kernel: kernel size of each coupling network's zero-initialised
        last conv (3, Glow's; 1 keeps the spline and mol couplings, which
        need many outputs per channel, at a small parameter count).
      coupling_kwargs: the coupling's own options, e.g. `{"num_bins": 6}` for
        `coupling="spline"` (see its class).
      dequantization: `"variational"` (Flow++: a `VariationalDequantizer`
        `q(u | k)` trained jointly; `fit` and `evaluate` report the
        variational bound as `bits_per_dim` and `evaluate` the uniform figure
        beside it as `uniform_bits_per_dim`) or `"uniform"` (train on the
        data's own noise, openai/glow's). Default None: `"variational"` for
        discrete data, `"uniform"` with `num_bins=None`.
      dequantizer_kwargs: `VariationalDequantizer` options
        (`hidden_channels`, `num_steps`).
      **kwargs: `FlowModel` options: `nonfinite="raise"|"skip"` (the NaN/inf
        guard of `fit`), `validate_args`, and `dtype="float32"|"float64"`
        (every bijector and network is built in it).

    The defaults of `dropout` and `dequantization` won the digits protocol
    (BENCHMARKS.md, "Held-out likelihood by default"); `dropout=0.0,
    dequantization="uniform"` is the Glow of the paper (and of `tfb.Glow`).

    #### Examples

    ```python
    model = tfp_glow.Glow(image_shape=(8, 8, 1), levels=2, steps_per_level=4,
                          hidden_channels=32, num_bins=17)
    model.compile(keras.optimizers.Adam(1e-3))
    model.fit(tfp_glow.data.digits_dataset(), epochs=10)
    images = model.sample(16, temperature=0.7, seed=1)
    ```
    """

    def __init__(
        self,
        image_shape: Sequence[int] = (32, 32, 3),
        levels: int = 3,
        steps_per_level: int = 8,
        hidden_channels: int = 512,
        coupling: str = "affine",
        permutation: str = "conv_lu",
        learn_top_prior: bool = True,
        num_classes: int | None = None,
        split_fraction: float = 0.5,
        num_bins: int | None = 256,
        seed: int = 0,
        dropout: float | None = None,
        last_kernel: int = 3,
        coupling_kwargs: dict[str, Any] | None = None,
        dequantization: str | None = None,
        dequantizer_kwargs: dict[str, Any] | None = None,
        context_shape: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> None:
        levels = _positive_int(levels, "levels")
        dropout = DEFAULT_DROPOUT if dropout is None else dropout
        dropout = checks.number(
            dropout, "dropout", minimum=0.0, maximum=1.0, exclusive_maximum=True
        )
        if dequantization is None:
            dequantization = "uniform" if num_bins is None else "variational"
        last_kernel = _positive_int(last_kernel, "last_kernel")
        image_shape = _image_shape(image_shape, levels)
        steps_per_level = _positive_int(steps_per_level, "steps_per_level")
        hidden_channels = _positive_int(hidden_channels, "hidden_channels")
        _choice(coupling, COUPLINGS, "coupling")
        coupling_kwargs = _coupling_kwargs(coupling, coupling_kwargs)
        _choice(permutation, PERMUTATIONS, "permutation")
        context_shape, num_classes = _context_options(context_shape, num_classes)
        _choice(dequantization, DEQUANTIZATIONS, "dequantization")
        if dequantization == "variational" and num_bins is None:
            raise ValueError(
                "`dequantization='variational'` needs discrete data: pass "
                "`num_bins` (the number of levels) or use "
                "dequantization='uniform' for continuous data."
            )
        dequantizer_kwargs = _dequantizer_kwargs(dequantization, dequantizer_kwargs)
        self._config = dict(
            image_shape=image_shape,
            levels=levels,
            steps_per_level=steps_per_level,
            hidden_channels=hidden_channels,
            coupling=coupling,
            permutation=permutation,
            learn_top_prior=bool(learn_top_prior),
            num_classes=num_classes,
            split_fraction=float(split_fraction),
            num_bins=num_bins,
            seed=seed,
            dropout=dropout,
            last_kernel=last_kernel,
            coupling_kwargs=coupling_kwargs,
            dequantization=dequantization,
            dequantizer_kwargs=dequantizer_kwargs,
            context_shape=context_shape,
        )
        flow_options = {
            k: v
            for k, v in self._config.items()
            if k not in ("num_bins", "dequantization", "dequantizer_kwargs")
        }
        flow_options["context_shape"] = _flow_context(context_shape, num_classes, kwargs)

        def build():
            # `dtype` is keras.Model's dtype policy, already in its config: every
            # bijector is built in its variable dtype, every network in the policy.
            return build_glow_flow(
                **flow_options,
                dtype=self.dtype_policy.variable_dtype,
                net_dtype=_net_dtype(self.dtype_policy),
            )

        def build_dequantizer():
            if dequantization == "uniform":
                return None
            return VariationalDequantizer(
                image_shape,
                num_bins,
                **dequantizer_kwargs,
                dtype=self.dtype_policy.variable_dtype,
                name="dequantizer",
            )

        super().__init__(
            flow=build,
            event_shape=image_shape,
            num_bins=num_bins,
            num_classes=num_classes,
            context_shape=context_shape,
            dequantizer=build_dequantizer,
            **kwargs,
        )

    def get_config(self):
        return {**self._base_config(), **self._config}

    @classmethod
    def from_config(cls, config):
        # Files saved before these options existed hold neither key: they
        # are Glows without dropout and with uniform dequantization, not the
        # defaults of today.
        config = {"dropout": 0.0, "dequantization": "uniform", **config}
        return super().from_config(config)


def build_glow_flow(
    image_shape,
    levels,
    steps_per_level,
    hidden_channels,
    coupling="affine",
    permutation="conv_lu",
    learn_top_prior=True,
    num_classes=None,
    split_fraction=0.5,
    seed=0,
    dtype="float32",
    net_dtype=None,
    dropout=0.0,
    last_kernel=3,
    coupling_kwargs=None,
    context_shape=None,
):
    """The normalizing bijector of `Glow` (see its docstring); `net_dtype` (a Keras
    dtype policy name, default `dtype`) is the coupling networks' dtype;
    `context_shape` makes every coupling and prior conditional."""
    shape = tuple(image_shape)
    stages = []
    for level in range(levels):
        squeeze = Squeeze(event_shape=shape)
        shape = (shape[0] // 2, shape[1] // 2, shape[2] * 4)
        c = shape[-1]
        steps = [squeeze]
        for k in range(steps_per_level):
            step_seed = None if seed is None else seed * 100003 + level * 1000 + k
            steps += [
                ActNorm(c, dtype=dtype, name=f"act_norm_{level}_{k}"),
                _permutation(
                    permutation, c, step_seed, dtype=dtype, name=f"invertible_conv1x1_{level}_{k}"
                ),
                _coupling(
                    coupling,
                    shape,
                    hidden_channels,
                    dtype=dtype,
                    net_dtype=net_dtype,
                    dropout=dropout,
                    last_kernel=last_kernel,
                    coupling_kwargs=coupling_kwargs,
                    net_seed=step_seed,
                    context_shape=context_shape,
                ),
            ]
        fo = None
        if level < levels - 1:
            fo = FactorOut(
                c,
                split_fraction,
                num_classes=num_classes,
                dtype=dtype,
                net_dtype=net_dtype,
                name=f"factor_out_{level}",
                context_shape=context_shape,
            )
            shape = shape[:-1] + (c - fo.num_factored,)
        stages.append((tfb.Chain(list(reversed(steps)), name=f"level_{level}"), fo))
    top = None
    if learn_top_prior or num_classes is not None or context_shape is not None:
        top = LearnedPrior(shape, num_classes=num_classes, dtype=dtype, context_shape=context_shape)
    return MultiScaleFlow(image_shape, stages, top_prior=top, name="glow")
