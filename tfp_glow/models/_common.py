"""What the model builders share: the coupling and permutation choices, their
argument checks, and the default regularisation."""

import functools
import inspect

from tfp_glow import checks, nets
from tfp_glow.bijectors import (
    AdditiveCoupling,
    AffineCoupling,
    InvertibleConv1x1,
    LearnedPrior,
    LogisticMixtureCoupling,
    RationalQuadraticSplineCoupling,
    channel_permutation,
)
from tfp_glow.bijectors._context import context_shape_of
from tfp_glow.context_encoder import context_encoder_of, flow_context_shape
from tfp_glow.variational_dequantization import VariationalDequantizer

COUPLINGS = ("affine", "additive", "spline", "mol")
PERMUTATIONS = ("conv_lu", "conv", "reverse", "shuffle")
DEQUANTIZATIONS = ("uniform", "variational")
# Glow's default regularisation (`Glow(dropout=None)`), Flow++'s rate; measured
# on the digits protocol with variational dequantization (BENCHMARKS.md).
DEFAULT_DROPOUT = 0.2


# Each coupling with its own defaults (spline: 8 bins on [-4, 4]; mol: 4 logistics).
COUPLING_CLASSES = {
    "affine": AffineCoupling,
    "additive": AdditiveCoupling,
    "spline": RationalQuadraticSplineCoupling,
    "mol": LogisticMixtureCoupling,
}

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
            f"`{arg_name}` must be (height, width, channels); got {shape!r}."
        ) from None
    step = 2**levels
    if shape[0] % step or shape[1] % step:
        raise ValueError(
            f"`{arg_name}` {shape} cannot be squeezed {levels} times: height and "
            f"width must be divisible by 2**levels = {step}. Use fewer `levels` "
            f"or resize the images."
        )
    return tuple(int(d) for d in shape)


_SET_BY_THE_MODEL = (
    "net",
    "mask",
    "parity",
    "event_shape",
    "event_ndims",
    "dtype",
    "validate_args",
    "name",
    "context_shape",
)


def _options(cls, kwargs, arg_name, owner, set_by_the_model=_SET_BY_THE_MODEL):
    """`kwargs` as a dict of `cls`'s own constructor options, checked against its
    signature before anything is built (`owner` names the choice, for the message)."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise TypeError(
            f"`{arg_name}` must be None or a dict of keyword arguments; received {kwargs!r}."
        )
    allowed = [
        name
        for name in inspect.signature(cls).parameters
        if name not in set_by_the_model and name != "kwargs"
    ]
    for key in kwargs:
        if key not in allowed:
            raise ValueError(
                f"`{arg_name}` key {key!r} is not an option of {owner}; expected some of {allowed}."
            )
    return dict(kwargs)


def _coupling_kwargs(kind, kwargs):
    """`coupling_kwargs`: the coupling's own options (e.g. a spline's `num_bins`)."""
    return _options(COUPLING_CLASSES[kind], kwargs, "coupling_kwargs", f"coupling={kind!r}")


def _dequantizer_kwargs(dequantization, kwargs):
    """`dequantizer_kwargs`: `VariationalDequantizer`'s width and steps."""
    if dequantization != "variational":
        if kwargs:
            raise ValueError(
                f"`dequantizer_kwargs` needs dequantization='variational'; "
                f"got dequantization={dequantization!r}."
            )
        return {}
    return _options(
        VariationalDequantizer,
        kwargs,
        "dequantizer_kwargs",
        "dequantization='variational'",
        ("event_shape", "num_bins"),
    )


def _coupling(
    kind,
    shape,
    hidden,
    mask="channel",
    parity=0,
    net="glow",
    dtype="float32",
    num_blocks=2,
    net_dtype=None,
    dropout=0.0,
    last_kernel=3,
    coupling_kwargs=None,
    net_seed=None,
    context_shape=None,
):
    """A coupling whose network is built by a factory: the coupling sizes it
    (for the context's extra input channels too, with `context_shape`)."""
    if len(shape) == 1:
        factory = functools.partial(nets.MLPCouplingNet, hidden, dtype=net_dtype or dtype)
    elif net == "resnet":
        factory = functools.partial(
            nets.ResNetCouplingNet, hidden, num_blocks=num_blocks, dtype=net_dtype or dtype
        )
    else:
        factory = functools.partial(
            nets.GlowCouplingNet,
            hidden,
            dropout=dropout,
            last_kernel=last_kernel,
            seed=net_seed,
            dtype=net_dtype or dtype,
        )
    return COUPLING_CLASSES[kind](
        factory,
        mask=mask,
        parity=parity,
        event_shape=shape,
        dtype=dtype,
        context_shape=context_shape,
        **(coupling_kwargs or {}),
    )


def _permutation(kind, channels, seed, event_ndims=3, dtype="float32", name="invertible_conv1x1"):
    if kind in ("conv_lu", "conv"):
        return InvertibleConv1x1(
            channels,
            lu=(kind == "conv_lu"),
            seed=seed,
            event_ndims=event_ndims,
            dtype=dtype,
            name=name,
        )
    return channel_permutation(kind, channels, seed=seed)


def _maybe_prior(shape, num_classes, dtype="float32", context_shape=None):
    """The learned prior of a conditional model (None for an unconditional one)."""
    if num_classes is None and context_shape is None:
        return None
    return LearnedPrior(shape, num_classes=num_classes, dtype=dtype, context_shape=context_shape)


def _refuse_context(model, context_shape):
    """Families whose networks cannot take a context yet: a clear ValueError
    (else `context_shape` would reach `FlowModel` and be silently ignored)."""
    if context_shape is not None:
        raise ValueError(
            f"{model}(context_shape={context_shape!r}) is not supported yet: its flow "
            "cannot take a context. Use Glow, RealNVP, NICE, MAF, IAF, "
            "NeuralSplineFlow or FFJORD for a conditional model p(x | context), or num_classes= "
            "for class-conditional priors."
        )


def _flow_context(context_shape, num_classes, kwargs):
    """The context shape the flow's layers are built for: `context_shape`, or the
    output shape of `kwargs["context_encoder"]` (a FlowModel option, resolved in
    place: a `.keras` config dict becomes the layer; tfp_glow.context_encoder)."""
    encoder = context_encoder_of(kwargs.get("context_encoder"), context_shape, num_classes)
    if "context_encoder" in kwargs:
        kwargs["context_encoder"] = encoder
    return flow_context_shape(encoder, context_shape)


def _context_options(context_shape, num_classes):
    """`(context_shape, num_classes)` checked: a tuple of positive ints or None,
    and not both (`num_classes=K` is the shorthand for `context_shape=(K,)`)."""
    context_shape = context_shape_of(context_shape)
    if num_classes is not None:
        num_classes = _positive_int(num_classes, "num_classes")
        if context_shape is not None:
            raise ValueError(
                f"Give `num_classes` ({num_classes}) or `context_shape` ({context_shape}), "
                "not both: num_classes=K is the shorthand for context_shape=(K,)."
            )
    return context_shape, num_classes
