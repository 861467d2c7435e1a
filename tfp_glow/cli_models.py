"""Which model `tfp-glow train`'s flags build: the per-model defaults of the
architecture flags, which flags apply to which model, and the builders
(`tfp_glow.cli` checks the flags against these tables first)."""

from tfp_glow.cli_args import MODELS
from tfp_glow.models import DEFAULT_DROPOUT

__all__ = [
    "APPLIES_TO",
    "ARCHITECTURE_FLAGS",
    "MODEL_DEFAULTS",
    "VECTOR_MODELS",
    "VECTOR_PERMUTATIONS",
    "build_model",
]

# Per-model defaults of the architecture flags (None on the command line means
# "not given", so flags that do not apply to a model can be refused).
MODEL_DEFAULTS = {
    "glow": dict(
        levels=2,
        steps=8,
        width=64,
        coupling="affine",
        permutation="conv_lu",
        dropout=DEFAULT_DROPOUT,
        dequantization="variational",
    ),
    "realnvp": dict(levels=2, steps=8, width=64),
    "nice": dict(steps=4, width=256),
    "maf": dict(steps=5, width=100, permutation="reverse"),
    "iaf": dict(steps=5, width=100, permutation="reverse"),
    # None: NeuralSplineFlow's per-variant default.
    "nsf": dict(steps=None, width=None, permutation="reverse", variant="autoregressive"),
    "ffjord": dict(width=240, trace="auto"),
    # width None: ResidualFlow's default (hidden channels on images, units on vectors).
    "resflow": dict(levels=2, steps=4, width=None),
}
# The vector families flatten images; their permutations are fixed ones.
VECTOR_MODELS = ("maf", "iaf", "nsf", "ffjord")
VECTOR_PERMUTATIONS = ("reverse", "shuffle")
APPLIES_TO = {
    "levels": ("glow", "realnvp", "resflow"),
    "coupling": ("glow",),
    "steps": tuple(m for m in MODELS if m != "ffjord"),
    "permutation": ("glow", "maf", "iaf", "nsf"),
    "dropout": ("glow",),
    "dequantization": ("glow",),
    "variant": ("nsf",),
    "trace": ("ffjord",),
}
ARCHITECTURE_FLAGS = (
    "levels",
    "steps",
    "width",
    "coupling",
    "permutation",
    "dropout",
    "dequantization",
    "variant",
    "trace",
)


def build_model(args, info, arch):
    """The model `args` asks for on data described by `info`, with the
    architecture `arch` from `check_train_args`."""
    from tfp_glow import NICE, Glow, RealNVP

    shape = tuple(info["image_shape"])
    num_classes = info["num_classes"] if args.conditional else None
    if args.model == "glow":
        return Glow(
            image_shape=shape,
            levels=arch["levels"],
            steps_per_level=arch["steps"],
            hidden_channels=arch["width"],
            coupling=arch["coupling"],
            permutation=arch["permutation"],
            num_classes=num_classes,
            num_bins=info["num_bins"],
            seed=args.seed,
            dropout=arch["dropout"],
            dequantization=arch["dequantization"],
            backprop=args.backprop,
        )
    if args.model == "realnvp":
        return RealNVP(
            input_shape=shape,
            levels=arch["levels"],
            hidden_channels=arch["width"],
            coupling_layers=arch["steps"],
            num_classes=num_classes,
            num_bins=info["num_bins"],
            backprop=args.backprop,
        )
    if args.model == "nice":
        return NICE(
            input_shape=shape,
            coupling_layers=arch["steps"],
            hidden_units=arch["width"],
            num_classes=num_classes,
            num_bins=info["num_bins"],
            backprop=args.backprop,
        )
    if args.model == "resflow":
        from tfp_glow import ResidualFlow

        width = (
            {}
            if arch["width"] is None
            else {"hidden_channels" if len(shape) == 3 else "hidden_units": arch["width"]}
        )
        return ResidualFlow(
            input_shape=shape,
            levels=arch["levels"],
            blocks=arch["steps"],
            num_classes=num_classes,
            num_bins=info["num_bins"],
            backprop=args.backprop,
            **width,
        )
    return _build_vector_model(args, shape, num_classes, info["num_bins"], arch)


def _build_vector_model(args, shape, num_classes, num_bins, arch):
    """MAF, IAF, NeuralSplineFlow or FFJORD (images flattened to vectors)."""
    from tfp_glow import FFJORD, IAF, MAF, NeuralSplineFlow

    common = dict(
        input_shape=shape, num_classes=num_classes, num_bins=num_bins, backprop=args.backprop
    )
    width = arch["width"]
    if args.model in ("maf", "iaf"):
        cls = MAF if args.model == "maf" else IAF
        return cls(
            num_layers=arch["steps"],
            hidden_units=[width, width],
            permutation=arch["permutation"],
            seed=args.seed,
            **common,
        )
    if args.model == "nsf":
        return NeuralSplineFlow(
            variant=arch["variant"],
            num_layers=arch["steps"],
            hidden_units=None if width is None else [width, width],
            permutation=arch["permutation"],
            seed=args.seed,
            **common,
        )
    return FFJORD(hidden_units=[width] * 3, trace=arch["trace"], **common)
