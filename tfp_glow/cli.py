"""The `tfp-glow` command: train, sample, evaluate, export, interpolate.

    tfp-glow train                       # Glow on the built-in 8x8 digits, a few minutes
    tfp-glow train --dataset mnist --n-bits 5 --data-dir ~/tensorflow_datasets
    tfp-glow train --model realnvp --dataset two_moons
    tfp-glow sample --run runs/digits-glow --temperature 0.7 --output samples.png
    tfp-glow evaluate --run runs/digits-glow --json
    tfp-glow export --run runs/digits-glow --export-dir /models/glow
    tfp-glow interpolate --run runs/digits-glow --output interp.png --steps 8

A run directory (`--output` of `train`) holds:

    config.json          model class + config, and the training arguments
    checkpoints/         last.weights.h5 (every epoch), best.weights.h5 (lowest
                         test bits/dim so far)
    backup/              Keras BackupAndRestore state while training runs: re-run
                         the same command after an interruption and it resumes
    history.csv, history.json   per-epoch metrics (train and test)
    samples/             SampleGrid PNGs every --sample-every epochs
    samples.png          64 samples at temperature 0.7
    temperature_sweep.png  one row per temperature 0, 0.25, 0.5, 0.7, 0.85, 1.0
    model.keras          the trained model (`keras.saving.load_model`)
    metrics.json         final test bits/dim and friends
    export/<version>/    SavedModel with TF Serving signatures

`main(argv)` returns the exit code: 0 on success, 2 for bad arguments (argparse
errors and the library's `ValueError`s, printed as `tfp-glow: error: ...`).
"""

import argparse
import csv
import json
import math
import os
import sys
import time

PROG = "tfp-glow"
MODELS = ("glow", "realnvp", "nice")
COUPLINGS = ("affine", "additive")
PERMUTATIONS = ("conv_lu", "conv", "reverse", "shuffle")
TOY_DATASETS = ("two_moons", "8gaussians", "checkerboard")
TEMPERATURES = (0.0, 0.25, 0.5, 0.7, 0.85, 1.0)
SAMPLE_TEMPERATURE = 0.7

# Per-model defaults of the architecture flags (None on the command line means
# "not given", so flags that do not apply to a model can be refused).
MODEL_DEFAULTS = {
    "glow": dict(levels=2, steps=8, width=64, coupling="affine", permutation="conv_lu"),
    "realnvp": dict(levels=2, steps=8, width=64),
    "nice": dict(steps=4, width=256),
}
_APPLIES_TO = {"levels": ("glow", "realnvp"), "coupling": ("glow",),
               "permutation": ("glow",)}


class UsageError(ValueError):
    """A bad combination of command-line arguments."""


# ---------------------------------------------------------------- arguments


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
_positive_float = _number_type(
    float, lambda v: math.isfinite(v) and v > 0, "a positive number")
_nonnegative_float = _number_type(
    float, lambda v: math.isfinite(v) and v >= 0, "a number >= 0")


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
        if (not any(action.default is v for v in (None, True, False, argparse.SUPPRESS))
                and "default" not in text):
            text += " (default: %(default)s)"
        return text


def _add_train_parser(sub):
    p = sub.add_parser(
        "train", help="train a flow with Keras fit",
        description="Train Glow, RealNVP or NICE with Keras fit. With no arguments: "
                    "Glow on the built-in 8x8 digits (a few minutes on a laptop CPU).",
        formatter_class=_HelpFormatter)
    p.add_argument("--model", choices=MODELS, default="glow", help="flow architecture")
    p.add_argument("--dataset", default="digits",
                   help="'digits' (built in), a tensorflow-datasets image data set "
                        "(mnist, fashion_mnist, cifar10, celeb_a, svhn_cropped, ...) or a "
                        "2-D toy density for realnvp/nice (two_moons, 8gaussians, "
                        "checkerboard)")
    p.add_argument("--data-dir", default=None,
                   help="tensorflow-datasets data_dir holding the prepared data set")
    p.add_argument("--n-bits", type=_n_bits, default=None,
                   help="bits per channel kept from 8-bit tfds images (default 8); the "
                        "digits have 17 native levels")
    p.add_argument("--image-size", type=_positive_int, default=None,
                   help="resize tfds images to SIZE x SIZE (celeb_a defaults to 64)")
    p.add_argument("--test-split", default="test", help="tfds split used for evaluation")
    p.add_argument("--levels", type=_positive_int, default=None,
                   help="scales L (glow: 2, realnvp: 2)")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help="flow steps per level K (glow: 8); coupling layers for realnvp "
                        "on vectors (8) and nice (4)")
    p.add_argument("--width", type=_positive_int, default=None,
                   help="hidden channels of the coupling networks (glow, realnvp: 64; "
                        "nice: 256 hidden units)")
    p.add_argument("--coupling", choices=COUPLINGS, default=None,
                   help="glow only (default affine)")
    p.add_argument("--permutation", choices=PERMUTATIONS, default=None,
                   help="glow only (default conv_lu)")
    p.add_argument("--conditional", action="store_true",
                   help="class-conditional priors (needs a labelled data set)")
    p.add_argument("--epochs", type=_positive_int, default=40, help="passes over the data")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="training batch size")
    p.add_argument("--lr", type=_positive_float, default=3e-3, help="peak learning rate")
    p.add_argument("--warmup-steps", type=_nonnegative_int, default=100,
                   help="linear learning-rate warmup")
    p.add_argument("--lr-decay", choices=("cosine", "none"), default="cosine",
                   help="after the warmup: cosine decay to 0 at the last step, or constant")
    p.add_argument("--clipnorm", type=_positive_float, default=None,
                   help="clip the global gradient norm (off by default: Adam's steps are "
                        "already normalised; non-finite steps stop training either way)")
    p.add_argument("--steps-per-epoch", type=_positive_int, default=None,
                   help="cap the batches per epoch (smoke runs)")
    p.add_argument("--strategy", choices=("default", "mirrored"), default="default",
                   help="tf.distribute strategy ('mirrored': every local GPU)")
    jit = p.add_mutually_exclusive_group()
    jit.add_argument("--jit", dest="jit", action="store_true",
                     help="compile the train step with XLA (faster steps, slower start)")
    jit.add_argument("--no-jit", dest="jit", action="store_false", help="(the default)")
    p.set_defaults(jit=False)
    p.add_argument("--seed", type=int, default=0,
                   help="seeds weights, shuffling, dequantization noise and samples")
    p.add_argument("--sample-every", type=_nonnegative_int, default=5,
                   help="write samples/samples_epoch_NNN.png every N epochs (0: never)")
    p.add_argument("--output", default=None,
                   help="run directory (default runs/<dataset>-<model>)")
    p.add_argument("--no-export", dest="export", action="store_false",
                   help="skip the SavedModel export at the end")
    p.add_argument("--verbose", type=int, choices=(0, 1, 2), default=None,
                   help="Keras fit verbosity (default: progress bar on a terminal, "
                        "one line per epoch otherwise)")
    p.set_defaults(func=cmd_train)


def _add_model_source(p):
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run directory written by `tfp-glow train`")
    src.add_argument("--model-file", help="a .keras file saved from a tfp_glow model")


def build_parser():
    """The `tfp-glow` argument parser: one sub-command per `cmd_*` function."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="Glow, RealNVP and NICE normalizing flows for TensorFlow "
                               "Probability with Keras 3.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_train_parser(sub)

    p = sub.add_parser("sample", help="write a PNG of samples from a trained model",
                       formatter_class=_HelpFormatter)
    _add_model_source(p)
    p.add_argument("--num", type=_positive_int, default=64, help="number of samples")
    p.add_argument("--temperature", type=_nonnegative_float, default=SAMPLE_TEMPERATURE,
                   help="scales the latent: 0 gives the mode, 1 the model itself")
    p.add_argument("--seed", type=int, default=0, help="seed of the (stateless) draw")
    p.add_argument("--label", type=_nonnegative_int, default=None,
                   help="class of every sample (conditional models; default: all classes "
                        "in turn)")
    p.add_argument("--upscale", type=_positive_int, default=None,
                   help="enlarge each image (default: to about 32 pixels)")
    p.add_argument("--output", default=None,
                   help="PNG path (default <run>/samples_T<temperature>.png)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("evaluate", help="test bits/dim of a trained run",
                       formatter_class=_HelpFormatter)
    p.add_argument("--run", required=True, help="run directory written by `tfp-glow train`")
    p.add_argument("--split", default=None, help="split to evaluate (default: the test split)")
    p.add_argument("--data-dir", default=None, help="override the run's tfds data_dir")
    p.add_argument("--batch-size", type=_positive_int, default=256, help="evaluation batch")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help="write a TF Serving SavedModel",
                       formatter_class=_HelpFormatter)
    p.add_argument("--run", required=True, help="run directory written by `tfp-glow train`")
    p.add_argument("--export-dir", default=None, help="model base path (default <run>/export)")
    p.add_argument("--version", type=_nonnegative_int, default=None,
                   help="version subdirectory (default: one more than the largest)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing version")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("interpolate",
                       help="PNG of latent interpolations between test images",
                       formatter_class=_HelpFormatter)
    p.add_argument("--run", required=True, help="run directory written by `tfp-glow train`")
    p.add_argument("--output", default=None, help="PNG path (default <run>/interpolation.png)")
    p.add_argument("--steps", type=_positive_int, default=8,
                   help="images per row, both ends included")
    p.add_argument("--pairs", type=_positive_int, default=8, help="rows (pairs of images)")
    p.add_argument("--seed", type=int, default=0, help="chooses the pairs")
    p.add_argument("--data-dir", default=None, help="override the run's tfds data_dir")
    p.set_defaults(func=cmd_interpolate)
    return parser


def _version():
    try:
        from importlib.metadata import version
        return version("tfp-glow")
    except Exception:  # not installed: running from a source tree
        return "0.1.0"


def main(argv=None):
    """Runs `tfp-glow` with `argv` (default `sys.argv[1:]`); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else 2
    # TensorFlow's C++ start-up chatter is noise for a command-line user.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted. Re-run the same command to resume from the "
              f"last completed epoch.", file=sys.stderr)
        return 130


# --------------------------------------------------------------- data sets


def _dataset_kind(name):
    if name == "digits":
        return "digits"
    if name in TOY_DATASETS:
        return "toy"
    return "tfds"


def _dataset_info(cfg):
    from tfp_glow import data
    kind = _dataset_kind(cfg["dataset"])
    if kind != "tfds":
        return data.dataset_info(cfg["dataset"])
    try:
        return data.dataset_info(cfg["dataset"], n_bits=cfg["n_bits"] or 8,
                                 image_size=cfg["image_size"])
    except ValueError as e:
        raise UsageError(f"--dataset {cfg['dataset']!r}: {e}") from e


def _make_dataset(cfg, split, batch_size, training, dequantize=True, data_dir=None):
    """`tf.data` pipeline for a run's data set (`cfg`: the training arguments)."""
    from tfp_glow import data
    name = cfg["dataset"]
    kind = _dataset_kind(name)
    common = dict(split=split, batch_size=batch_size, seed=cfg["seed"], shuffle=training)
    labels = bool(cfg.get("conditional"))
    if kind == "toy":
        return data.make_dataset(name, **common)
    if kind == "digits":
        return data.digits_dataset(dequantize=dequantize, with_labels=labels, **common)
    return data.tfds_dataset(
        name, n_bits=cfg["n_bits"] or 8, image_size=cfg["image_size"],
        data_dir=data_dir or cfg["data_dir"], dequantize=dequantize, with_labels=labels,
        **common)


def _num_batches(ds):
    import tensorflow as tf
    n = int(ds.cardinality())
    return None if n in (int(tf.data.INFINITE_CARDINALITY),
                         int(tf.data.UNKNOWN_CARDINALITY)) else n


# ------------------------------------------------------------------- models


def _resolve_architecture(args, kind):
    """Per-model defaults; refuses flags that do not apply to `--model` on
    data of `kind` (`_dataset_kind`)."""
    defaults = MODEL_DEFAULTS[args.model]
    arch = {}
    for key in ("levels", "steps", "width", "coupling", "permutation"):
        value = getattr(args, key)
        if value is not None and args.model not in _APPLIES_TO.get(key, MODELS):
            raise UsageError(
                f"--{key} does not apply to --model {args.model} (it applies to "
                f"{', '.join(_APPLIES_TO[key])}).")
        arch[key] = defaults.get(key) if value is None else value
    if args.model == "realnvp" and args.steps is not None and kind != "toy":
        raise UsageError(
            "--steps does not apply to --model realnvp on images (each scale has the "
            "paper's fixed checkerboard and channel couplings; use --levels); it sets "
            "the number of couplings on 2-D toy data.")
    if args.model == "nice" and arch["steps"] < 2:
        raise UsageError(
            f"--steps for --model nice must be >= 2 (NICE alternates which half is "
            f"transformed); got {arch['steps']}.")
    return arch


def _build_model(args, info, arch):
    """The model `args` asks for on data described by `info`, with the
    architecture `arch` from `_resolve_architecture`."""
    from tfp_glow import NICE, Glow, RealNVP
    shape = tuple(info["image_shape"])
    num_classes = info["num_classes"] if args.conditional else None
    if args.model == "glow":
        if len(shape) != 3:
            raise UsageError(
                f"--model glow needs images; --dataset {args.dataset} is a 2-D toy "
                f"density (use --model realnvp or nice).")
        return Glow(image_shape=shape, levels=arch["levels"], steps_per_level=arch["steps"],
                    hidden_channels=arch["width"], coupling=arch["coupling"],
                    permutation=arch["permutation"], num_classes=num_classes,
                    num_bins=info["num_bins"], seed=args.seed)
    if args.model == "realnvp":
        return RealNVP(input_shape=shape, levels=arch["levels"],
                       hidden_channels=arch["width"], coupling_layers=arch["steps"],
                       num_classes=num_classes, num_bins=info["num_bins"])
    return NICE(input_shape=shape, coupling_layers=arch["steps"],
                hidden_units=arch["width"], num_classes=num_classes,
                num_bins=info["num_bins"])


def _strategy(name):
    import tensorflow as tf
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def _paths(run):
    return dict(
        config=os.path.join(run, "config.json"),
        model=os.path.join(run, "model.keras"),
        checkpoints=os.path.join(run, "checkpoints"),
        last=os.path.join(run, "checkpoints", "last.weights.h5"),
        best=os.path.join(run, "checkpoints", "best.weights.h5"),
        backup=os.path.join(run, "backup"),
        history_csv=os.path.join(run, "history.csv"),
        history_json=os.path.join(run, "history.json"),
        samples_dir=os.path.join(run, "samples"),
        samples=os.path.join(run, "samples.png"),
        sweep=os.path.join(run, "temperature_sweep.png"),
        metrics=os.path.join(run, "metrics.json"),
        export=os.path.join(run, "export"),
    )


def _write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def _read_config(run):
    if run is None or not os.path.isdir(run):
        raise FileNotFoundError(f"--run {run!r} is not a directory.")
    path = _paths(run)["config"]
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"--run {run!r} has no config.json: it is not a `tfp-glow train` run directory.")
    with open(path) as f:
        return json.load(f)


def _model_classes():
    from tfp_glow import NICE, Glow, RealNVP
    return {"Glow": Glow, "RealNVP": RealNVP, "NICE": NICE}


def load_run_model(run):
    """The trained model of a run: `model.keras`, else config + latest checkpoint."""
    import keras
    paths = _paths(run)
    cfg = _read_config(run)
    if os.path.exists(paths["model"]):
        return keras.saving.load_model(paths["model"], compile=False), cfg
    checkpoint = paths["last"]
    if not os.path.exists(checkpoint):
        raise FileNotFoundError(
            f"--run {run!r} has neither model.keras nor checkpoints/last.weights.h5: "
            f"train it first (`{PROG} train --output {run}`).")
    cls = _model_classes()[cfg["model_class"]]
    model = cls.from_config(cfg["model_config"])
    model.load_weights(checkpoint)
    return model, cfg


def _load_model_file(path):
    import keras
    import tfp_glow  # noqa: F401  (registers the classes for deserialisation)
    if not os.path.exists(path):
        raise FileNotFoundError(f"--model-file {path!r} does not exist.")
    if not path.endswith(".keras"):
        raise UsageError(f"--model-file must be a .keras file; got {path!r}.")
    return keras.saving.load_model(path, compile=False)


def _default_labels(model, num):
    import numpy as np
    if model.num_classes is None:
        return None
    return np.arange(num, dtype=np.int64) % model.num_classes


# ----------------------------------------------------------------- pictures


def _upscale_for(model, upscale=None):
    if upscale is not None:
        return upscale
    return max(1, 32 // max(model.event_shape[0], 1))


def _points_picture(point_sets, path, extent=3.0, bins=128):
    """One panel per point set: a 2-D histogram, dark where the points are dense."""
    import numpy as np
    from tfp_glow.images import image_grid, save_png
    panels = []
    for pts in point_sets:
        pts = np.asarray(pts, np.float64)
        pts = pts[np.all(np.isfinite(pts), axis=1)]
        hist, _, _ = np.histogram2d(pts[:, 1], pts[:, 0], bins=bins,
                                    range=[[-extent, extent], [-extent, extent]])
        hist = hist[::-1]  # y up
        level = np.log1p(hist) / max(np.log1p(hist).max(), 1e-12)
        panels.append((255 * (1.0 - level)).astype(np.uint8)[..., None])
    grid = image_grid(np.stack(panels), rows=1, border=2, border_value=0)
    save_png(grid, path)
    return grid


def _write_samples(model, path, num, temperature, seed, labels=None, upscale=None):
    """`num` samples at `temperature` as one PNG (image grid or 2-D histogram)."""
    import numpy as np
    from tfp_glow.images import save_image_grid
    x = np.asarray(model.sample(num, temperature=temperature, seed=seed, labels=labels))
    if len(model.event_shape) != 3:
        return _points_picture([x], path)
    rows = int(math.ceil(math.sqrt(num)))
    return save_image_grid(x, path, num_bins=model.num_bins, rows=rows,
                           upscale=_upscale_for(model, upscale))


def _write_temperature_sweep(model, path, seed, columns=10):
    """Rows = `TEMPERATURES`; every row decodes the same latents scaled by T."""
    import numpy as np
    from tfp_glow.images import save_image_grid
    image_model = len(model.event_shape) == 3
    num = columns if image_model else 5000
    labels = _default_labels(model, num)
    rows = [np.asarray(model.sample(num, temperature=t, seed=seed, labels=labels))
            for t in TEMPERATURES]
    if not image_model:
        return _points_picture(rows, path)
    return save_image_grid(np.concatenate(rows), path, num_bins=model.num_bins,
                           rows=len(TEMPERATURES), upscale=_upscale_for(model))


# ------------------------------------------------------------------ commands


def _history_from_csv(path):
    history = {}
    if not os.path.exists(path):
        return history
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                try:
                    number = float(value)
                except (TypeError, ValueError):
                    continue
                history.setdefault(key, []).append(int(number) if key == "epoch" else number)
    return history


def _evaluate(model, ds):
    """Mean NLL (nats) and bits/dim over a finite data set, via `Model.evaluate`."""
    if getattr(model, "optimizer", None) is None:
        model.compile(jit_compile=False)
    result = model.evaluate(ds, verbose=0, return_dict=True)
    return {"nll": float(result["loss"]), "bits_per_dim": float(result["bits_per_dim"])}


def cmd_train(args):
    """`tfp-glow train`: fit a model, then write checkpoints, history, PNGs,
    `model.keras`, metrics and a SavedModel to the run directory (module
    docstring)."""
    kind = _dataset_kind(args.dataset)
    if kind != "tfds":
        for flag, value in (("--n-bits", args.n_bits), ("--image-size", args.image_size)):
            if value is not None:
                raise UsageError(
                    f"{flag} applies to tensorflow-datasets data sets, not --dataset "
                    f"{args.dataset}" + (" (17 native levels)" if kind == "digits" else ""))
    if kind == "toy" and args.model == "glow":
        raise UsageError(
            f"--dataset {args.dataset} is a 2-D toy density: use --model realnvp or "
            f"--model nice (glow needs images).")
    arch = _resolve_architecture(args, kind)  # before the run directory exists
    output = args.output or os.path.join("runs", f"{args.dataset}-{args.model}")
    cfg = {key: value for key, value in vars(args).items() if key != "func"}
    cfg["output"] = output
    info = _dataset_info(cfg)
    if args.conditional and info["num_classes"] is None:
        raise UsageError(
            f"--conditional needs a labelled data set; --dataset {args.dataset} has no "
            f"class labels.")

    import keras
    from tfp_glow.callbacks import SampleGrid
    from tfp_glow.export import export_saved_model
    from tfp_glow.training import WarmupSchedule

    keras.utils.set_random_seed(args.seed)
    train_ds = _make_dataset(cfg, "train", args.batch_size, training=True)
    test_ds = _make_dataset(cfg, args.test_split, max(args.batch_size, 256), training=False)
    paths = _paths(output)
    os.makedirs(paths["checkpoints"], exist_ok=True)
    batches = _num_batches(train_ds)
    steps_per_epoch = args.steps_per_epoch
    if steps_per_epoch is not None:
        if batches is not None:
            steps_per_epoch = min(steps_per_epoch, batches)
        train_ds = train_ds.repeat()  # a capped epoch must not exhaust the iterator
    per_epoch = steps_per_epoch or batches
    decay_steps = None
    if args.lr_decay == "cosine" and per_epoch is not None:
        decay_steps = max(per_epoch * args.epochs - args.warmup_steps, 1)

    strategy = _strategy(args.strategy)
    with strategy.scope():
        model = _build_model(args, info, arch)
        schedule = WarmupSchedule(args.lr, warmup_steps=args.warmup_steps,
                                  decay_steps=decay_steps)
        model.compile(keras.optimizers.Adam(schedule, global_clipnorm=args.clipnorm),
                      jit_compile=args.jit)
    cfg["model_class"] = type(model).__name__
    cfg["model_config"] = model.get_config()
    cfg["num_parameters"] = int(model.count_params())
    cfg["dataset_info"] = info
    _write_json(paths["config"], cfg)

    resuming = os.path.isdir(paths["backup"]) and bool(os.listdir(paths["backup"]))
    if not resuming and os.path.exists(paths["history_csv"]):
        os.remove(paths["history_csv"])  # a fresh run: don't append to an old one
    callbacks = [
        keras.callbacks.BackupAndRestore(paths["backup"]),
        keras.callbacks.ModelCheckpoint(paths["last"], save_weights_only=True),
        keras.callbacks.ModelCheckpoint(paths["best"], save_weights_only=True,
                                        monitor="val_bits_per_dim", mode="min",
                                        save_best_only=True),
        keras.callbacks.CSVLogger(paths["history_csv"], append=True),
        keras.callbacks.TerminateOnNaN(),
    ]
    if args.sample_every and len(info["image_shape"]) == 3:
        callbacks.append(SampleGrid(paths["samples_dir"], num_samples=64,
                                    temperature=SAMPLE_TEMPERATURE, seed=args.seed,
                                    every_n_epochs=args.sample_every, rows=8,
                                    upscale=_upscale_for(model)))
    verbose = args.verbose
    if verbose is None:
        verbose = 1 if sys.stdout.isatty() else 2
    what = f"{cfg['model_class']} ({cfg['num_parameters']:,} parameters)"
    print(f"{PROG}: training {what} on {args.dataset} {tuple(info['image_shape'])} "
          f"for {args.epochs} epochs -> {output}" + (" (resuming)" if resuming else ""),
          flush=True)

    start = time.time()
    # shuffle=False: the pipelines shuffle themselves (Keras would only warn).
    model.fit(train_ds, epochs=args.epochs, steps_per_epoch=steps_per_epoch, shuffle=False,
              validation_data=test_ds, callbacks=callbacks, verbose=verbose)
    train_seconds = time.time() - start

    history = _history_from_csv(paths["history_csv"])
    _write_json(paths["history_json"], history)
    test = _evaluate(model, test_ds)
    metrics = {
        "test_bits_per_dim": test["bits_per_dim"],
        "test_nll": test["nll"],
        "train_bits_per_dim": history.get("bits_per_dim", [float("nan")])[-1],
        "best_test_bits_per_dim": min(history.get("val_bits_per_dim", [test["bits_per_dim"]])),
        "epochs": len(history.get("epoch", [])),
        "train_seconds": round(train_seconds, 1),
        "num_parameters": cfg["num_parameters"],
        "test_split": args.test_split,
    }
    _write_json(paths["metrics"], metrics)

    labels = _default_labels(model, 64)
    _write_samples(model, paths["samples"], 64, SAMPLE_TEMPERATURE, args.seed, labels)
    _write_temperature_sweep(model, paths["sweep"], args.seed)
    model.save(paths["model"])
    exported = None
    if args.export:
        exported = export_saved_model(model, paths["export"])
    print(f"{PROG}: test bits/dim {metrics['test_bits_per_dim']:.4f} "
          f"(train {metrics['train_bits_per_dim']:.4f}) after {metrics['epochs']} epochs, "
          f"{train_seconds:.0f} s of training")
    print(f"{PROG}: wrote {paths['samples']}, {paths['sweep']}, {paths['model']}"
          + (f", SavedModel {exported}" if exported else ""))
    return 0


def cmd_sample(args):
    """`tfp-glow sample`: a PNG grid of samples from a run or a `.keras` file."""
    if args.run is not None:
        model, _ = load_run_model(args.run)
        output = args.output or os.path.join(args.run, f"samples_T{args.temperature:g}.png")
    else:
        model = _load_model_file(args.model_file)
        if args.output is None:
            raise UsageError("--output is required with --model-file.")
        output = args.output
    labels = None
    if model.num_classes is not None:
        if args.label is not None and args.label >= model.num_classes:
            raise UsageError(
                f"--label must be < {model.num_classes} (the model's classes); "
                f"got {args.label}.")
        labels = (_default_labels(model, args.num) if args.label is None
                  else [args.label] * args.num)
    elif args.label is not None:
        raise UsageError("--label applies to class-conditional models only.")
    _write_samples(model, output, args.num, args.temperature, args.seed, labels,
                   upscale=args.upscale)
    print(output)
    return 0


def cmd_evaluate(args):
    """`tfp-glow evaluate`: bits/dim and NLL of a run's model on a data split."""
    model, cfg = load_run_model(args.run)
    split = args.split or cfg.get("test_split", "test")
    ds = _make_dataset(cfg, split, args.batch_size, training=False, data_dir=args.data_dir)
    result = _evaluate(model, ds)
    report = {"split": split, "bits_per_dim": result["bits_per_dim"], "nll": result["nll"],
              "dataset": cfg["dataset"], "model": cfg["model_class"]}
    if args.json:
        print(json.dumps(report, sort_keys=True))
    else:
        print(f"{split} bits/dim: {result['bits_per_dim']:.4f} "
              f"(NLL {result['nll']:.3f} nats per example)")
    return 0


def cmd_export(args):
    """`tfp-glow export`: a run's model as a versioned TF Serving SavedModel."""
    from tfp_glow.export import export_saved_model
    model, _ = load_run_model(args.run)
    export_dir = args.export_dir or _paths(args.run)["export"]
    path = export_saved_model(model, export_dir, version=args.version,
                              overwrite=args.overwrite)
    print(path)
    return 0


def cmd_interpolate(args):
    """`tfp-glow interpolate`: PNG rows decoding latent lines between test images."""
    import numpy as np
    import tensorflow as tf
    from tfp_glow.images import save_image_grid
    model, cfg = load_run_model(args.run)
    if len(model.event_shape) != 3:
        raise UsageError("interpolate needs an image model; this run models 2-D points.")
    output = args.output or os.path.join(args.run, "interpolation.png")
    has_labels = cfg["dataset_info"]["num_classes"] is not None
    ds = _make_dataset({**cfg, "conditional": has_labels}, cfg.get("test_split", "test"),
                       512, training=False, dequantize=False, data_dir=args.data_dir)
    x, y = next(iter(ds.map(lambda *e: e if has_labels else (e[0], tf.zeros(
        tf.shape(e[0])[:1], tf.int64)))))
    images, labels = x.numpy(), y.numpy()
    rng = np.random.default_rng(args.seed)
    starts, ends = [], []
    for _ in range(args.pairs):
        i = int(rng.integers(len(images)))
        # A conditional model decodes both ends with one label: pair within a class.
        pool = (np.flatnonzero(labels == labels[i]) if model.num_classes is not None
                else np.arange(len(images)))
        pool = pool[pool != i] if len(pool) > 1 else pool
        starts.append(i)
        ends.append(int(rng.choice(pool)))
    pair_labels = labels[starts] if model.num_classes is not None else None
    x = model.interpolate(tf.constant(images[starts]), tf.constant(images[ends]),
                          num_steps=args.steps, labels=pair_labels)
    x = np.transpose(np.asarray(x), (1, 0, 2, 3, 4)).reshape((-1,) + model.event_shape)
    save_image_grid(x, output, num_bins=model.num_bins, rows=args.pairs,
                    upscale=_upscale_for(model))
    print(output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
