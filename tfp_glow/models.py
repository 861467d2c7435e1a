"""Glow, RealNVP and NICE as `FlowModel`s built from a config.

Each builder returns the normalizing bijector `f` (data to latent) as a
`MultiScaleFlow`; the classes are Keras-serialisable (`get_config` holds the
constructor arguments, so `.keras` files reload).
"""

import functools
import inspect

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_glow import checks, nets
from tfp_glow.bijectors import (ActNorm, AdditiveCoupling, AffineCoupling,
                                FactorOut, InvertibleConv1x1, LearnedPrior,
                                LogisticMixtureCoupling, LogitPreprocess, MultiScaleFlow,
                                RationalQuadraticSplineCoupling, Squeeze,
                                channel_permutation)
from tfp_glow.flow_model import FlowModel
from tfp_glow.variational_dequantization import VariationalDequantizer

tfb = tfp.bijectors

__all__ = ["Glow", "RealNVP", "NICE", "COUPLINGS", "PERMUTATIONS", "DEQUANTIZATIONS",
           "DEFAULT_DROPOUT"]

COUPLINGS = ("affine", "additive", "spline", "mol")
PERMUTATIONS = ("conv_lu", "conv", "reverse", "shuffle")
DEQUANTIZATIONS = ("uniform", "variational")
# Glow's default regularisation (`Glow(dropout=None)`), Flow++'s rate; measured
# on the digits protocol with variational dequantization (BENCHMARKS.md).
DEFAULT_DROPOUT = 0.2


# Each coupling with its own defaults (spline: 8 bins on [-4, 4]; mol: 4 logistics).
COUPLING_CLASSES = {"affine": AffineCoupling, "additive": AdditiveCoupling,
                    "spline": RationalQuadraticSplineCoupling,
                    "mol": LogisticMixtureCoupling}

_choice = checks.choice
_positive_int = checks.positive_int


def _net_dtype(policy):
    """The networks' dtype: the model's policy name, so a mixed policy
    (`"mixed_bfloat16"`) runs them in low precision while the flow stays float32."""
    return policy.name


def _image_shape(shape, levels, arg_name="image_shape"):
    try:
        shape = checks.shape(shape, arg_name, rank=3)
    except (TypeError, ValueError):
        raise ValueError(
            f"`{arg_name}` must be (height, width, channels); got {shape!r}.") from None
    step = 2 ** levels
    if shape[0] % step or shape[1] % step:
        raise ValueError(
            f"`{arg_name}` {shape} cannot be squeezed {levels} times: height and "
            f"width must be divisible by 2**levels = {step}. Use fewer `levels` "
            f"or resize the images.")
    return tuple(int(d) for d in shape)


_SET_BY_THE_MODEL = ("net", "mask", "parity", "event_shape", "event_ndims", "dtype",
                     "validate_args", "name")


def _options(cls, kwargs, arg_name, owner, set_by_the_model=_SET_BY_THE_MODEL):
    """`kwargs` as a dict of `cls`'s own constructor options, checked against its
    signature before anything is built (`owner` names the choice, for the message)."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise TypeError(f"`{arg_name}` must be None or a dict of keyword arguments; "
                        f"received {kwargs!r}.")
    allowed = [name for name in inspect.signature(cls).parameters
               if name not in set_by_the_model and name != "kwargs"]
    for key in kwargs:
        if key not in allowed:
            raise ValueError(
                f"`{arg_name}` key {key!r} is not an option of {owner}; "
                f"expected some of {allowed}.")
    return dict(kwargs)


def _coupling_kwargs(kind, kwargs):
    """`coupling_kwargs`: the coupling's own options (e.g. a spline's `num_bins`)."""
    return _options(COUPLING_CLASSES[kind], kwargs, "coupling_kwargs",
                    f"coupling={kind!r}")


def _dequantizer_kwargs(dequantization, kwargs):
    """`dequantizer_kwargs`: `VariationalDequantizer`'s width and steps."""
    if dequantization != "variational":
        if kwargs:
            raise ValueError(f"`dequantizer_kwargs` needs dequantization='variational'; "
                             f"got dequantization={dequantization!r}.")
        return {}
    return _options(VariationalDequantizer, kwargs, "dequantizer_kwargs",
                    "dequantization='variational'", ("event_shape", "num_bins"))


def _coupling(kind, shape, hidden, mask="channel", parity=0, net="glow", dtype="float32",
              num_blocks=2, net_dtype=None, dropout=0.0, last_kernel=3,
              coupling_kwargs=None, net_seed=None):
    """A coupling whose network is built by a factory: the coupling sizes it."""
    if len(shape) == 1:
        factory = functools.partial(nets.MLPCouplingNet, hidden, dtype=net_dtype or dtype)
    elif net == "resnet":
        factory = functools.partial(nets.ResNetCouplingNet, hidden, num_blocks=num_blocks,
                                    dtype=net_dtype or dtype)
    else:
        factory = functools.partial(nets.GlowCouplingNet, hidden, dropout=dropout,
                                    last_kernel=last_kernel, seed=net_seed,
                                    dtype=net_dtype or dtype)
    return COUPLING_CLASSES[kind](factory, mask=mask, parity=parity, event_shape=shape,
                                  dtype=dtype, **(coupling_kwargs or {}))


def _permutation(kind, channels, seed, event_ndims=3, dtype="float32",
                 name="invertible_conv1x1"):
    if kind in ("conv_lu", "conv"):
        return InvertibleConv1x1(channels, lu=(kind == "conv_lu"), seed=seed,
                                 event_ndims=event_ndims, dtype=dtype, name=name)
    return channel_permutation(kind, channels, seed=seed)


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
      num_classes: class-conditional priors (`sample(labels=...)`).
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

    def __init__(self, image_shape=(32, 32, 3), levels=3, steps_per_level=8,
                 hidden_channels=512, coupling="affine", permutation="conv_lu",
                 learn_top_prior=True, num_classes=None, split_fraction=0.5,
                 num_bins=256, seed=0, dropout=None, last_kernel=3, coupling_kwargs=None,
                 dequantization=None, dequantizer_kwargs=None, **kwargs):
        levels = _positive_int(levels, "levels")
        dropout = DEFAULT_DROPOUT if dropout is None else dropout
        dropout = checks.number(dropout, "dropout", minimum=0.0, maximum=1.0,
                                exclusive_maximum=True)
        if dequantization is None:
            dequantization = "uniform" if num_bins is None else "variational"
        last_kernel = _positive_int(last_kernel, "last_kernel")
        image_shape = _image_shape(image_shape, levels)
        steps_per_level = _positive_int(steps_per_level, "steps_per_level")
        hidden_channels = _positive_int(hidden_channels, "hidden_channels")
        _choice(coupling, COUPLINGS, "coupling")
        coupling_kwargs = _coupling_kwargs(coupling, coupling_kwargs)
        _choice(permutation, PERMUTATIONS, "permutation")
        if num_classes is not None:
            num_classes = _positive_int(num_classes, "num_classes")
        _choice(dequantization, DEQUANTIZATIONS, "dequantization")
        if dequantization == "variational" and num_bins is None:
            raise ValueError("`dequantization='variational'` needs discrete data: pass "
                             "`num_bins` (the number of levels) or use "
                             "dequantization='uniform' for continuous data.")
        dequantizer_kwargs = _dequantizer_kwargs(dequantization, dequantizer_kwargs)
        self._config = dict(
            image_shape=image_shape, levels=levels, steps_per_level=steps_per_level,
            hidden_channels=hidden_channels, coupling=coupling,
            permutation=permutation, learn_top_prior=bool(learn_top_prior),
            num_classes=num_classes, split_fraction=float(split_fraction),
            num_bins=num_bins, seed=seed, dropout=dropout, last_kernel=last_kernel,
            coupling_kwargs=coupling_kwargs, dequantization=dequantization,
            dequantizer_kwargs=dequantizer_kwargs)
        flow_options = {k: v for k, v in self._config.items()
                        if k not in ("num_bins", "dequantization", "dequantizer_kwargs")}

        def build():
            # `dtype` is keras.Model's dtype policy, already in its config: every
            # bijector is built in its variable dtype, every network in the policy.
            return build_glow_flow(**flow_options, dtype=self.dtype_policy.variable_dtype,
                                   net_dtype=_net_dtype(self.dtype_policy))

        def build_dequantizer():
            if dequantization == "uniform":
                return None
            return VariationalDequantizer(image_shape, num_bins, **dequantizer_kwargs,
                                          dtype=self.dtype_policy.variable_dtype,
                                          name="dequantizer")

        super().__init__(flow=build, event_shape=image_shape, num_bins=num_bins,
                         num_classes=num_classes, dequantizer=build_dequantizer, **kwargs)

    def get_config(self):
        return {**self._base_config(), **self._config}

    @classmethod
    def from_config(cls, config):
        # Files saved before these options existed hold neither key: they
        # are Glows without dropout and with uniform dequantization, not the
        # defaults of today.
        config = {"dropout": 0.0, "dequantization": "uniform", **config}
        return super().from_config(config)


def build_glow_flow(image_shape, levels, steps_per_level, hidden_channels,
                    coupling="affine", permutation="conv_lu", learn_top_prior=True,
                    num_classes=None, split_fraction=0.5, seed=0, dtype="float32",
                    net_dtype=None, dropout=0.0, last_kernel=3, coupling_kwargs=None):
    """The normalizing bijector of `Glow` (see its docstring); `net_dtype` (a Keras
    dtype policy name, default `dtype`) is the coupling networks' dtype."""
    shape = tuple(image_shape)
    stages = []
    for level in range(levels):
        squeeze = Squeeze(event_shape=shape)
        shape = (shape[0] // 2, shape[1] // 2, shape[2] * 4)
        c = shape[-1]
        steps = [squeeze]
        for k in range(steps_per_level):
            step_seed = None if seed is None else seed * 100003 + level * 1000 + k
            steps += [ActNorm(c, dtype=dtype, name=f"act_norm_{level}_{k}"),
                      _permutation(permutation, c, step_seed, dtype=dtype,
                                   name=f"invertible_conv1x1_{level}_{k}"),
                      _coupling(coupling, shape, hidden_channels, dtype=dtype,
                                net_dtype=net_dtype, dropout=dropout,
                                last_kernel=last_kernel, coupling_kwargs=coupling_kwargs,
                                net_seed=step_seed)]
        fo = None
        if level < levels - 1:
            fo = FactorOut(c, split_fraction, num_classes=num_classes, dtype=dtype,
                           net_dtype=net_dtype,
                           name=f"factor_out_{level}")
            shape = shape[:-1] + (c - fo.num_factored,)
        stages.append((tfb.Chain(list(reversed(steps)), name=f"level_{level}"), fo))
    top = None
    if learn_top_prior or num_classes is not None:
        top = LearnedPrior(shape, num_classes=num_classes, dtype=dtype)
    return MultiScaleFlow(image_shape, stages, top_prior=top, name="glow")


@keras.saving.register_keras_serializable(package="tfp_glow")
class RealNVP(FlowModel):
    """RealNVP (Dinh et al. 2017).

    Images (`input_shape=(H, W, C)`): each of `levels - 1` scales applies 3
    checkerboard affine couplings, a squeeze, 3 channel couplings and factors
    out half of the channels; the last scale applies 4 checkerboard
    couplings. ActNorm follows every coupling (in place of batch norm), the
    networks are residual (`num_blocks`), and data in [-0.5, 0.5] first goes
    through `LogitPreprocess(logit_alpha)` of `x + 0.5` (None to skip).

    Vectors (`input_shape=(D,)`, e.g. 2-D toy densities):
    `coupling_layers` affine couplings with MLPs (alternating halves) and
    ActNorm between them. `coupling_layers` is used for vectors only (images
    follow the fixed per-scale pattern above); `levels` and `num_blocks` for
    images only. `coupling` is `"affine"` (the paper's) or one of `COUPLINGS`.
    """

    def __init__(self, input_shape=(8, 8, 1), levels=2, hidden_channels=64,
                 num_blocks=2, coupling_layers=8, logit_alpha=0.05,
                 num_classes=None, num_bins=256, coupling="affine", **kwargs):
        input_shape = tuple(int(d) for d in input_shape)
        levels = _positive_int(levels, "levels")
        if len(input_shape) == 3:
            _image_shape(input_shape, levels - 1, "input_shape")
        elif len(input_shape) != 1:
            raise ValueError(
                f"`input_shape` must be (H, W, C) or (D,); got {input_shape!r}.")
        self._config = dict(
            input_shape=input_shape, levels=levels,
            hidden_channels=_positive_int(hidden_channels, "hidden_channels"),
            num_blocks=_positive_int(num_blocks, "num_blocks"),
            coupling_layers=_positive_int(coupling_layers, "coupling_layers", 2),
            logit_alpha=logit_alpha, num_classes=num_classes, num_bins=num_bins,
            coupling=_choice(coupling, COUPLINGS, "coupling"))
        cfg = self._config
        super().__init__(
            flow=lambda: build_realnvp_flow(
                cfg["input_shape"], cfg["levels"], cfg["hidden_channels"],
                cfg["num_blocks"], cfg["coupling_layers"], cfg["logit_alpha"],
                cfg["num_classes"], dtype=self.dtype_policy.variable_dtype,
                net_dtype=_net_dtype(self.dtype_policy), coupling=cfg["coupling"]),
            event_shape=input_shape, num_bins=num_bins, num_classes=num_classes,
            **kwargs)

    def get_config(self):
        return {**self._base_config(), **self._config}


def _vector_steps(dim, coupling, layers, hidden, mask, dtype="float32", net_dtype=None):
    steps = []
    for i in range(layers):
        steps += [_coupling(coupling, (dim,), hidden, mask=mask, parity=i % 2,
                            dtype=dtype, net_dtype=net_dtype),
                  ActNorm(dim, event_ndims=1, dtype=dtype)]
    return steps


def build_realnvp_flow(input_shape, levels=2, hidden_channels=64, num_blocks=2,
                       coupling_layers=8, logit_alpha=0.05, num_classes=None,
                       dtype="float32", net_dtype=None, coupling="affine"):
    """The normalizing bijector of `RealNVP` (see its docstring)."""
    if len(input_shape) == 1:
        steps = _vector_steps(input_shape[0], coupling, coupling_layers,
                              hidden_channels, "channel", dtype=dtype,
                              net_dtype=net_dtype)
        return MultiScaleFlow(input_shape, [(tfb.Chain(list(reversed(steps))), None)],
                              top_prior=_maybe_prior(input_shape, num_classes, dtype),
                              name="realnvp")

    def block(shape, mask, count, first_parity=0):
        out = []
        for i in range(count):
            out += [_coupling(coupling, shape, hidden_channels, mask=mask,
                              parity=(first_parity + i) % 2, net="resnet",
                              num_blocks=num_blocks, dtype=dtype, net_dtype=net_dtype),
                    ActNorm(shape[-1], dtype=dtype)]
        return out

    shape = tuple(input_shape)
    stages = []
    for level in range(levels):
        steps = []
        if level == 0 and logit_alpha is not None:
            steps += [tfb.Shift(tf.constant(0.5, dtype)), LogitPreprocess(logit_alpha)]
        if level == levels - 1:
            steps += block(shape, "checkerboard", 4)
            stages.append((tfb.Chain(list(reversed(steps)), name=f"scale_{level}"), None))
            break
        steps += block(shape, "checkerboard", 3)
        steps.append(Squeeze(event_shape=shape))
        shape = (shape[0] // 2, shape[1] // 2, shape[2] * 4)
        steps += block(shape, "channel", 3)
        fo = FactorOut(shape[-1], 0.5, num_classes=num_classes, dtype=dtype,
                       net_dtype=net_dtype)
        stages.append((tfb.Chain(list(reversed(steps)), name=f"scale_{level}"), fo))
        shape = shape[:-1] + (shape[-1] - fo.num_factored,)
    return MultiScaleFlow(input_shape, stages,
                          top_prior=_maybe_prior(shape, num_classes, dtype), name="realnvp")


def _maybe_prior(shape, num_classes, dtype="float32"):
    if num_classes is None:
        return None
    return LearnedPrior(shape, num_classes=num_classes, dtype=dtype)


@keras.saving.register_keras_serializable(package="tfp_glow")
class NICE(FlowModel):
    """NICE (Dinh et al. 2014): the data flattened to a vector, `coupling_layers`
    additive couplings with MLPs on alternating features, then a learned
    diagonal scaling (an `ActNorm` on the vector, NICE's `exp(S)` layer).
    Works on images (`input_shape=(H, W, C)`) and vectors (`(D,)`).
    """

    def __init__(self, input_shape=(8, 8, 1), coupling_layers=4, hidden_units=256,
                 num_hidden_layers=3, num_classes=None, num_bins=256, **kwargs):
        input_shape = tuple(int(d) for d in input_shape)
        if len(input_shape) not in (1, 3):
            raise ValueError(
                f"`input_shape` must be (H, W, C) or (D,); got {input_shape!r}.")
        self._config = dict(
            input_shape=input_shape,
            coupling_layers=_positive_int(coupling_layers, "coupling_layers", 2),
            hidden_units=_positive_int(hidden_units, "hidden_units"),
            num_hidden_layers=_positive_int(num_hidden_layers, "num_hidden_layers"),
            num_classes=num_classes, num_bins=num_bins)
        cfg = self._config
        super().__init__(
            flow=lambda: build_nice_flow(cfg["input_shape"], cfg["coupling_layers"],
                                         cfg["hidden_units"], cfg["num_hidden_layers"],
                                         cfg["num_classes"],
                                         dtype=self.dtype_policy.variable_dtype,
                                         net_dtype=_net_dtype(self.dtype_policy)),
            event_shape=input_shape, num_bins=num_bins, num_classes=num_classes,
            **kwargs)

    def get_config(self):
        return {**self._base_config(), **self._config}


def build_nice_flow(input_shape, coupling_layers=4, hidden_units=256,
                    num_hidden_layers=3, num_classes=None, dtype="float32", net_dtype=None):
    """The normalizing bijector of `NICE` (see its docstring)."""
    dim = int(np.prod(input_shape))
    steps = []
    if len(input_shape) > 1:
        steps.append(tfb.Reshape(event_shape_out=[dim], event_shape_in=list(input_shape)))
    for i in range(coupling_layers):
        net = functools.partial(nets.MLPCouplingNet, hidden_units,
                                num_hidden_layers=num_hidden_layers, dtype=net_dtype or dtype)
        steps.append(AdditiveCoupling(net, mask="checkerboard", parity=i % 2,
                                      event_shape=(dim,), dtype=dtype))
    steps.append(ActNorm(dim, event_ndims=1, dtype=dtype, name="nice_scaling"))
    return MultiScaleFlow(input_shape, [(tfb.Chain(list(reversed(steps))), None)],
                          top_prior=_maybe_prior((dim,), num_classes, dtype), name="nice")
