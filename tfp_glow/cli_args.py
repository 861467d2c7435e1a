"""The argument parser of the `tfp-glow` command (`tfp_glow.cli` runs it).

Per-flag checks live here, as argparse types that say what they expected
(`--epochs 0` -> "argument --epochs: expected a positive integer, got '0'");
checks across flags are `tfp_glow.cli.check_train_args`.
"""

import argparse
import math

from tfp_glow import recipe
from tfp_glow.models import COUPLINGS, DEQUANTIZATIONS, PERMUTATIONS
from tfp_glow.training import RECOMMENDED_EMA_MOMENTUM

PROG = "tfp-glow"
# The vector families (maf, iaf, nsf, ffjord) flatten images to vectors.
MODELS = ("glow", "realnvp", "nice", "maf", "iaf", "nsf", "ffjord", "resflow")
NSF_VARIANTS = ("autoregressive", "coupling")
FFJORD_TRACES = ("auto", "exact", "hutchinson")
SAMPLE_TEMPERATURE = recipe.SAMPLE_TEMPERATURE


def _number_type(parse, is_valid, expected):
    """An argparse `type` parsing with `parse` and accepting `is_valid` values."""

    def convert(text):
        try:
            value = parse(text)
        except ValueError:
            value = None
        if value is None or not is_valid(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return convert


_positive_int = _number_type(int, lambda v: v >= 1, "a positive integer")
_nonnegative_int = _number_type(int, lambda v: v >= 0, "an integer >= 0")
_positive_float = _number_type(float, lambda v: math.isfinite(v) and v > 0, "a positive number")
_nonnegative_float = _number_type(float, lambda v: math.isfinite(v) and v >= 0, "a number >= 0")
_rate = _number_type(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
_momentum = _number_type(float, lambda v: 0 <= v < 1, "a number in [0, 1)")


def _n_bits(text):
    value = _positive_int(text)
    if value > 8:
        raise argparse.ArgumentTypeError(f"expected an integer in 1..8, got {text!r}")
    return value


class _HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" where a default says something (not None/flags)."""

    def _get_help_string(self, action):
        text = action.help or ""
        # `is`, not `in`: 0 == False would hide a default of 0.
        if (
            not any(action.default is v for v in (None, True, False, argparse.SUPPRESS))
            and "default" not in text
        ):
            text += " (default: %(default)s)"
        return text


# The architecture's size flags of `train`.
_SIZE_FLAGS = (
    ("--levels", "scales L (glow, realnvp, resflow: 2)"),
    (
        "--steps",
        "flow steps per level K (glow: 8); coupling layers for realnvp on "
        "vectors (8) and nice (4); autoregressive or spline layers for maf, "
        "iaf (5) and nsf (autoregressive 3, coupling 4); residual blocks per "
        "scale for resflow (4)",
    ),
    (
        "--width",
        "hidden channels of the coupling networks (glow, realnvp: 64; nice: "
        "256 hidden units); hidden units of each of the 2 layers of the maf/iaf "
        "MADEs (100) and nsf networks (autoregressive 32, coupling 48), of each "
        "of the 3 layers of ffjord's ODE network (240); resflow: hidden channels "
        "on images (32), hidden units on vectors (64)",
    ),
)


def _add_train_parser(sub):
    p = sub.add_parser(
        "train",
        help="train a flow with Keras fit",
        description="Train Glow, RealNVP, NICE, MAF, IAF, a neural spline flow (nsf) or "
        "FFJORD or a residual flow (resflow) with Keras fit. With no arguments: "
        "Glow on the built-in 8x8 digits (a few minutes on a laptop CPU).",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--model", choices=MODELS, default="glow", help="flow architecture")
    p.add_argument(
        "--dataset",
        default="digits",
        help="'digits' (built in), a tensorflow-datasets image data set "
        "(mnist, fashion_mnist, cifar10, celeb_a, svhn_cropped, ...) or a "
        "2-D toy density for every model but glow (two_moons, 8gaussians, "
        "checkerboard)",
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="folder holding the prepared tensorflow-datasets data set (`tfds "
        "build NAME --data_dir DIR` on a machine with internet); never "
        "downloaded",
    )
    p.add_argument(
        "--n-bits",
        type=_n_bits,
        default=None,
        help="bits per channel kept from 8-bit tfds images (default 8); the "
        "digits have 17 native levels",
    )
    p.add_argument(
        "--image-size",
        type=_positive_int,
        default=None,
        help="resize tfds images to SIZE x SIZE (celeb_a defaults to 64)",
    )
    p.add_argument("--test-split", default="test", help="tfds split used for evaluation")
    for flag, text in _SIZE_FLAGS:  # each a positive int; None = the model's default
        p.add_argument(flag, type=_positive_int, default=None, help=text)
    p.add_argument("--coupling", choices=COUPLINGS, default=None, help="glow only (default affine)")
    p.add_argument(
        "--permutation",
        choices=PERMUTATIONS,
        default=None,
        help="glow (default conv_lu); maf, iaf, nsf between layers: reverse (default) or shuffle",
    )
    p.add_argument(
        "--variant",
        choices=NSF_VARIANTS,
        default=None,
        help="nsf only: autoregressive (default, NSF-AR) or coupling splines",
    )
    p.add_argument(
        "--trace",
        choices=FFJORD_TRACES,
        default=None,
        help="ffjord only: the divergence's trace, exact or Hutchinson's "
        "estimate; auto (default) is exact up to 16 features",
    )
    p.add_argument(
        "--dropout",
        type=_rate,
        default=None,
        help="glow only: dropout rate in the coupling networks while training "
        "(default 0.2; 0 turns it off)",
    )
    p.add_argument(
        "--dequantization",
        choices=DEQUANTIZATIONS,
        default=None,
        help="glow only: variational (default; Flow++: a learned q(u|k), "
        "bits/dim is the variational bound, with the uniform figure "
        "beside it) or uniform (openai/glow's)",
    )
    p.add_argument(
        "--conditional",
        action="store_true",
        help="class-conditional priors (needs a labelled data set)",
    )
    p.add_argument("--epochs", type=_positive_int, default=60, help="passes over the data")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="training batch size")
    p.add_argument(
        "--lr",
        type=_positive_float,
        default=None,
        help="peak learning rate (default: the model's, 3e-3 for most; MAF 1e-3, "
        "vector RealNVP 5e-4)",
    )
    p.add_argument(
        "--warmup-steps", type=_nonnegative_int, default=100, help="linear learning-rate warmup"
    )
    p.add_argument(
        "--lr-decay",
        choices=recipe.LR_DECAYS,
        default="none",
        help="after the warmup: constant (default; the weights' average does "
        "the annealing) or cosine decay to 0 at the last step",
    )
    p.add_argument(
        "--clipnorm",
        type=_positive_float,
        default=None,
        help="clip the global gradient norm (off by default: Adam's steps are "
        "already normalised; non-finite steps stop training either way)",
    )
    p.add_argument(
        "--weight-decay",
        type=_nonnegative_float,
        default=None,
        help="AdamW's decoupled weight decay of the networks' weights (0: Adam; "
        "ActNorm, 1x1 conv and prior parameters are never decayed; default: the "
        "model's, 0 for most, MAF 0.3, vector RealNVP 0.1)",
    )
    p.add_argument(
        "--ema",
        type=_momentum,
        default=RECOMMENDED_EMA_MOMENTUM,
        metavar="MOMENTUM",
        help="Polyak averaging: momentum of the weights' moving average, "
        "which validation, checkpoints, samples, the test figure, "
        "model.keras and the export use (default 0.99; 0 turns it off)",
    )
    p.add_argument(
        "--steps-per-epoch",
        type=_positive_int,
        default=None,
        help="cap the batches per epoch (smoke runs)",
    )
    p.add_argument(
        "--strategy",
        choices=("default", "mirrored", "multiworker"),
        default="default",
        help="tf.distribute strategy ('mirrored': every local GPU; 'multiworker': "
        "every worker of the cluster in TF_CONFIG or the Slurm job)",
    )
    p.add_argument(
        "--backprop",
        choices=("standard", "checkpoint", "reversible"),
        default="standard",
        help="how gradients are computed: keep every activation, recompute each "
        "flow step from its input, or rebuild inputs with the inverse "
        "(training memory independent of depth; same gradients)",
    )
    jit = p.add_mutually_exclusive_group()
    jit.add_argument(
        "--jit",
        dest="jit",
        action="store_true",
        help="compile the train step with XLA (faster steps, slower start)",
    )
    jit.add_argument("--no-jit", dest="jit", action="store_false", help="(the default)")
    p.set_defaults(jit=False)
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds weights, shuffling, dequantization noise and samples",
    )
    p.add_argument(
        "--sample-every",
        type=_nonnegative_int,
        default=5,
        help="write samples/samples_epoch_NNN.png every N epochs (0: never)",
    )
    p.add_argument(
        "--output",
        "--run",
        dest="output",
        default=None,
        help="run directory (default runs/<dataset>-<model>); re-running with "
        "the same one resumes an interrupted run",
    )
    p.add_argument(
        "--no-export",
        dest="export",
        action="store_false",
        help="skip the SavedModel export at the end",
    )
    p.add_argument(
        "--verbose",
        type=int,
        choices=(0, 1, 2),
        default=None,
        help="Keras fit verbosity (default: progress bar on a terminal, "
        "one line per epoch otherwise)",
    )


def _add_model_source(p):
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run directory written by `tfp-glow train`")
    src.add_argument("--model-file", help="a .keras file saved from a tfp_glow model")


def build_parser():
    """The `tfp-glow` argument parser: one sub-command per `cmd_*` function."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Glow, RealNVP, NICE, MAF, IAF, neural spline, FFJORD and "
        "residual normalizing flows for TensorFlow Probability with "
        "Keras 3.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_train_parser(sub)

    p = sub.add_parser(
        "sample", help="write a PNG of samples from a trained model", formatter_class=_HelpFormatter
    )
    _add_model_source(p)
    p.add_argument("--num", type=_positive_int, default=64, help="number of samples")
    p.add_argument(
        "--temperature",
        type=_nonnegative_float,
        default=SAMPLE_TEMPERATURE,
        help="scales the latent: 0 gives the mode, 1 the model itself",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the (stateless) draw")
    p.add_argument(
        "--label",
        type=_nonnegative_int,
        default=None,
        help="class of every sample (conditional models; default: all classes in turn)",
    )
    p.add_argument(
        "--upscale",
        type=_positive_int,
        default=None,
        help="enlarge each image (default: to about 32 pixels)",
    )
    p.add_argument(
        "--output", default=None, help="PNG path (default <run>/samples_T<temperature>.png)"
    )

    p = sub.add_parser(
        "evaluate", help="test bits/dim of a trained run", formatter_class=_HelpFormatter
    )
    p.add_argument("--run", required=True, help="run directory written by `tfp-glow train`")
    p.add_argument("--split", default=None, help="split to evaluate (default: the test split)")
    p.add_argument("--data-dir", default=None, help="override the run's tfds data_dir")
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=256,
        help="evaluation batch (any size gives the same figure: each test "
        "example has its own fixed dequantization noise)",
    )
    p.add_argument("--json", action="store_true", help="print a JSON object")

    p = sub.add_parser(
        "export", help="write a TF Serving SavedModel", formatter_class=_HelpFormatter
    )
    p.add_argument("--run", required=True, help="run directory written by `tfp-glow train`")
    p.add_argument("--export-dir", default=None, help="model base path (default <run>/export)")
    p.add_argument(
        "--version",
        type=_nonnegative_int,
        default=None,
        help="version subdirectory (default: one more than the largest)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing version")

    p = sub.add_parser(
        "interpolate",
        help="PNG of latent interpolations between test images",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--run", required=True, help="run directory written by `tfp-glow train`")
    p.add_argument("--output", default=None, help="PNG path (default <run>/interpolation.png)")
    p.add_argument(
        "--steps", type=_positive_int, default=8, help="images per row, both ends included"
    )
    p.add_argument("--pairs", type=_positive_int, default=8, help="rows (pairs of images)")
    p.add_argument("--seed", type=int, default=0, help="chooses the pairs")
    p.add_argument("--data-dir", default=None, help="override the run's tfds data_dir")
    return parser


def _version():
    try:
        from importlib.metadata import version

        return version("tfp-glow")
    except Exception:  # not installed: running from a source tree
        return "0.1.0"
