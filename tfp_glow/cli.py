"""The `tfp-glow` command: train, sample, evaluate, export, interpolate.

    tfp-glow train                       # Glow on the built-in 8x8 digits, a few minutes
    tfp-glow train --dataset mnist --n-bits 5 --data-dir ~/tensorflow_datasets
    tfp-glow train --model realnvp --dataset two_moons
    tfp-glow sample --run runs/digits-glow --temperature 0.7 --output samples.png
    tfp-glow evaluate --run runs/digits-glow --json
    tfp-glow export --run runs/digits-glow --export-dir /models/glow
    tfp-glow interpolate --run runs/digits-glow --output interp.png --steps 8

This module parses flags, checks them (all in `check_train_args` and the
other `_check_*` functions, before anything is written), builds the data
and the model, and prints; the training itself is `tfp_glow.recipe.train`,
whose docstring describes the run directory (`--output` of `train`, `--run`
of the other commands).

`main(argv)` returns the exit code: 0 on success, 2 for bad arguments (argparse
errors and the library's `ValueError`s, printed as `tfp-glow: error: ...`).
"""

import collections
import contextlib
import json
import logging
import math
import os
import sys

from tfp_glow import cli_models, recipe
from tfp_glow.cli_args import COUPLINGS, MODELS, PERMUTATIONS, PROG, build_parser
from tfp_glow.cli_models import MODEL_DEFAULTS
from tfp_glow.cli_models import build_model as _build_model  # tests build through it

__all__ = ["COUPLINGS", "MODELS", "PERMUTATIONS", "PROG", "TrainPlan", "UsageError",
           "build_parser", "check_train_args", "load_run_model", "main"]

TOY_DATASETS = ("two_moons", "8gaussians", "checkerboard")
TEMPERATURES = recipe.TEMPERATURES
SAMPLE_TEMPERATURE = recipe.SAMPLE_TEMPERATURE
EVAL_BATCH = 256  # the test batch of `train`; any batch gives the same figure


class UsageError(ValueError):
    """A bad combination of command-line arguments."""


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
        return _COMMANDS[args.command](args) or 0
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted. Re-run the same command to resume from the "
              f"last completed epoch.", file=sys.stderr)
        return 130


# -------------------------------------------------------------- flag checks

TrainPlan = collections.namedtuple("TrainPlan", "kind arch info output")


def _dataset_kind(name):
    if name == "digits":
        return "digits"
    if name in TOY_DATASETS:
        return "toy"
    return "tfds"


def check_train_args(args):
    """Every check of `tfp-glow train`'s flags, before anything is written.

    Returns a `TrainPlan`: the data kind ("digits", "toy", "tfds"), the
    architecture (per-model defaults filled in), the data set's
    `dataset_info` and the run directory.
    """
    kind = _dataset_kind(args.dataset)
    if kind != "tfds":
        for flag, value in (("--n-bits", args.n_bits), ("--image-size", args.image_size)):
            if value is not None:
                raise UsageError(
                    f"{flag} applies to tensorflow-datasets data sets, not --dataset "
                    f"{args.dataset}" + (" (17 native levels)" if kind == "digits" else ""))
    if kind == "toy" and args.model == "glow":
        raise UsageError(
            f"--dataset {args.dataset} is a 2-D toy density: use any --model but glow "
            f"(glow needs images).")
    arch = _check_architecture(args, kind)
    info = _dataset_info(vars(args))
    if args.conditional and info["num_classes"] is None:
        raise UsageError(
            f"--conditional needs a labelled data set; --dataset {args.dataset} has no "
            f"class labels.")
    output = args.output or os.path.join("runs", f"{args.dataset}-{args.model}")
    return TrainPlan(kind, arch, info, output)


def _check_architecture(args, kind):
    """Per-model defaults; refuses flags that do not apply to `--model` on
    data of `kind`."""
    defaults = MODEL_DEFAULTS[args.model]
    arch = {}
    for key in cli_models.ARCHITECTURE_FLAGS:
        value = getattr(args, key)
        if value is not None and args.model not in cli_models.APPLIES_TO.get(key, MODELS):
            raise UsageError(
                f"--{key} does not apply to --model {args.model} (it applies to "
                f"{', '.join(cli_models.APPLIES_TO[key])}).")
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
    fixed = cli_models.VECTOR_PERMUTATIONS
    if args.model in cli_models.VECTOR_MODELS and arch.get("permutation") not in (
            None, *fixed):
        raise UsageError(
            f"--permutation for --model {args.model} must be one of {', '.join(fixed)} "
            f"(a fixed permutation between layers); got {arch['permutation']}.")
    return arch


def _check_sample_labels(args, model):
    """The labels `tfp-glow sample` draws: --label, every class in turn, or None."""
    if model.num_classes is None:
        if args.label is not None:
            raise UsageError("--label applies to class-conditional models only.")
        return None
    if args.label is None:
        return recipe.class_labels(model, args.num)
    if args.label >= model.num_classes:
        raise UsageError(f"--label must be < {model.num_classes} (the model's classes); "
                         f"got {args.label}.")
    return [args.label] * args.num


# --------------------------------------------------------------- data sets


@contextlib.contextmanager
def _quiet_tfds():
    """tensorflow-datasets logs through absl about folders it probes (e.g.
    "Variant folder ... has no dataset_info.json" for a data set that is not
    prepared): noise on a terminal, where the error message says what to do."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _dataset_info(cfg):
    from tfp_glow import data
    if _dataset_kind(cfg["dataset"]) != "tfds":
        return data.dataset_info(cfg["dataset"])
    try:
        with _quiet_tfds():
            return data.dataset_info(cfg["dataset"], n_bits=cfg["n_bits"] or 8,
                                     image_size=cfg["image_size"])
    except ValueError as e:
        raise UsageError(f"--dataset {cfg['dataset']!r}: {e}") from e


def _make_dataset(cfg, split, batch_size, training, dequantize=True, data_dir=None,
                  drop_remainder=False):
    """`tf.data` pipeline for a run's data set (`cfg`: the training arguments).

    Evaluation pipelines (`training=False`) keep every example's
    dequantization noise fixed, so `train` and `evaluate` report one figure.
    `drop_remainder` (image data sets) drops a partial last batch, which
    XLA would compile the training step for again.
    """
    from tfp_glow import data
    name = cfg["dataset"]
    kind = _dataset_kind(name)
    common = dict(split=split, batch_size=batch_size, seed=cfg["seed"], shuffle=training)
    labels = bool(cfg.get("conditional"))
    if kind == "toy":
        return data.make_dataset(name, **common)
    if kind == "digits":
        return data.digits_dataset(dequantize=dequantize, with_labels=labels,
                                   drop_remainder=drop_remainder, **common)
    try:
        with _quiet_tfds():
            return data.tfds_dataset(
                name, n_bits=cfg["n_bits"] or 8, image_size=cfg["image_size"],
                data_dir=data_dir or cfg["data_dir"], dequantize=dequantize,
                with_labels=labels, drop_remainder=drop_remainder, **common)
    except data.DatasetNotAvailableError as e:
        where = (f"--data-dir {e.data_dir}" if data_dir or cfg["data_dir"] else
                 f"{e.data_dir}, the tensorflow-datasets default (no --data-dir given)")
        raise FileNotFoundError(
            f"--dataset {name} is not prepared in {where}: there is no {e.path}. {PROG} "
            f"never downloads data: run `tfds build {e.base_name} --data_dir DIR` on a "
            f"machine with internet, copy DIR here and pass --data-dir DIR.") from None


# ------------------------------------------------------------------- models


def _strategy(name):
    import tensorflow as tf
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multiworker":  # the cluster from TF_CONFIG, or Slurm's environment
        from tfp_glow.training.distributed import multi_worker_strategy
        return multi_worker_strategy()
    return tf.distribute.get_strategy()


def load_run_model(run):
    """`(model, config)` of the run directory `run` (`recipe.load_run`), with
    errors that name `--run` and the file at fault, on one line."""
    try:
        return recipe.load_run(run)
    except recipe.RunNotFoundError as e:
        raise FileNotFoundError(f"--run {e.run_dir!r} {e.problem}") from None
    except recipe.RunDamagedError as e:
        raise UsageError(f"--run {run!r}: {e}") from None


def _load_model_file(path):
    import keras

    import tfp_glow  # noqa: F401  (registers the classes for deserialisation)
    if not os.path.exists(path):
        raise FileNotFoundError(f"--model-file {path!r} does not exist.")
    if not path.endswith(".keras"):
        raise UsageError(f"--model-file must be a .keras file; got {path!r}.")
    return keras.saving.load_model(path, compile=False)


def _what_the_logs_mean(model):
    """One line on the numbers Keras prints while a flow trains."""
    d = model.num_dims
    if model.num_bins is None:
        bpd = f"loss / ({d} ln 2)"
    else:
        bpd = (f"(loss + {d} ln {model.num_bins}) / ({d} ln 2), the figure to compare; "
               f"uniform = {math.log2(model.num_bins):.2f}")
    if getattr(model, "dequantizer", None) is not None:
        bpd += ("; with variational dequantization loss and bits_per_dim are the bound "
                "-(log p(x_q) - log q(u|k)), val_uniform_bits_per_dim the uniform figure")
    return (f"{PROG}: loss = -log p(x) in nats per example (below 0 is fine: a density "
            f"can exceed 1); bits_per_dim = {bpd}; nonfinite_steps = steps skipped for "
            f"a NaN/inf (expect 0)")


# ------------------------------------------------------------------ commands


def cmd_train(args):
    """`tfp-glow train`: check the flags, build data and model, run
    `recipe.train` (checkpoints, history, PNGs, metrics, model.keras and a
    SavedModel in the run directory), print the outcome."""
    plan = check_train_args(args)  # before the run directory exists
    # Before any other TensorFlow work: MultiWorkerMirroredStrategy must
    # configure the collective ops at program startup.
    strategy = _strategy(args.strategy)
    import keras
    keras.utils.set_random_seed(args.seed)
    cfg = {**vars(args), "output": plan.output}
    train_ds = _make_dataset(cfg, "train", args.batch_size, training=True,
                             drop_remainder=args.jit)  # no second XLA compile
    test_ds = _make_dataset(cfg, args.test_split, max(args.batch_size, EVAL_BATCH),
                            training=False)
    with strategy.scope():
        model = _build_model(args, plan.info, plan.arch)
    # Unset --lr / --weight-decay: the model's own (what its compile() uses).
    args.lr, args.weight_decay = recipe.optimizer_settings(model, args.lr, args.weight_decay)
    cfg.update(lr=args.lr, weight_decay=args.weight_decay)
    verbose = args.verbose if args.verbose is not None else (1 if sys.stdout.isatty() else 2)
    resuming = " (resuming)" if recipe.has_backup(plan.output) else ""
    print(f"{PROG}: training {type(model).__name__} ({model.count_params():,} parameters) "
          f"on {args.dataset} {tuple(plan.info['image_shape'])} for {args.epochs} epochs "
          f"-> {plan.output}{resuming}\n{_what_the_logs_mean(model)}", flush=True)
    result = recipe.train(
        model, train_ds, test_ds, run_dir=plan.output, epochs=args.epochs,
        learning_rate=args.lr, warmup_steps=args.warmup_steps, lr_decay=args.lr_decay,
        clipnorm=args.clipnorm, weight_decay=args.weight_decay, ema_momentum=args.ema or None,
        steps_per_epoch=args.steps_per_epoch, jit_compile=args.jit,
        seed=args.seed, sample_every=args.sample_every, export=args.export, verbose=verbose,
        config={**cfg, "dataset_info": plan.info},
        extra_metrics={"test_split": args.test_split})
    m, paths = result.metrics, result.paths
    uniform = m.get("test_uniform_bits_per_dim")
    print(f"{PROG}: test bits/dim {m['test_bits_per_dim']:.4f} (train "
          f"{m['train_bits_per_dim']:.4f}) after {m['epochs']} epochs, "
          f"{m['train_seconds']:.0f} s of training"
          + ("" if uniform is None else
             f"; variational bound, uniform dequantization {uniform:.4f}"))
    print(f"{PROG}: wrote {paths['samples']}, {paths['sweep']}, {paths['model']}"
          + (f", SavedModel {result.export_path}" if result.export_path else ""))
    return 0


def cmd_sample(args):
    """`tfp-glow sample`: a PNG grid of samples from a run or a `.keras` file."""
    if args.run is not None:
        model, _ = load_run_model(args.run)
        output = args.output or os.path.join(args.run, f"samples_T{args.temperature:g}.png")
    else:
        if args.output is None:
            raise UsageError("--output is required with --model-file.")
        model = _load_model_file(args.model_file)
        output = args.output
    labels = _check_sample_labels(args, model)
    recipe.write_samples(model, output, args.num, args.temperature, args.seed, labels,
                         upscale=args.upscale)
    print(output)
    return 0


def cmd_evaluate(args):
    """`tfp-glow evaluate`: bits/dim and NLL of a run's model on a data split
    (the same figure as the run's metrics.json on its test split, at any
    --batch-size)."""
    model, cfg = load_run_model(args.run)
    split = args.split or cfg.get("test_split", "test")
    ds = _make_dataset(cfg, split, args.batch_size, training=False, data_dir=args.data_dir)
    result = recipe.evaluate(model, ds)
    report = {"split": split, "bits_per_dim": result["bits_per_dim"], "nll": result["nll"],
              "dataset": cfg["dataset"], "model": cfg["model_class"]}
    uniform = result.get("uniform_bits_per_dim")
    if uniform is not None:
        report["uniform_bits_per_dim"] = uniform
    if args.json:
        print(json.dumps(report, sort_keys=True))
    else:
        print(f"{split} bits/dim: {result['bits_per_dim']:.4f} "
              f"(NLL {result['nll']:.3f} nats per example)"
              + ("" if uniform is None else
                 f"; variational bound, uniform dequantization {uniform:.4f}"))
    return 0


def cmd_export(args):
    """`tfp-glow export`: a run's model as a versioned TF Serving SavedModel."""
    from tfp_glow.export import export_saved_model
    model, _ = load_run_model(args.run)
    export_dir = args.export_dir or recipe.run_paths(args.run)["export"]
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
                    upscale=recipe.default_upscale(model))
    print(output)
    return 0


_COMMANDS = {"train": cmd_train, "sample": cmd_sample, "evaluate": cmd_evaluate,
             "export": cmd_export, "interpolate": cmd_interpolate}


if __name__ == "__main__":
    sys.exit(main())
