"""The training recipe of `tfp-glow train`, as one library function.

`train` takes a built model and `tf.data` pipelines and does what the
command does with them: Adam with a warmup (then cosine or constant)
schedule, checkpoints, resumable training, per-epoch history, a final test
evaluation, sample PNGs, `model.keras` and a SavedModel, all in one run
directory. The command only parses flags, builds the data and the model,
and prints.

#### Examples

```python
import tfp_glow
from tfp_glow import data, recipe

model = tfp_glow.Glow(image_shape=(8, 8, 1), levels=2, steps_per_level=8,
                      hidden_channels=64, num_bins=data.DIGITS_NUM_BINS)
result = recipe.train(
    model, data.digits_dataset("train", 64), data.digits_dataset("test", 256, shuffle=False),
    run_dir="runs/my-digits", epochs=60, learning_rate=3e-3, warmup_steps=100)
result.metrics["test_bits_per_dim"]         # also in runs/my-digits/metrics.json
model, config = recipe.load_run("runs/my-digits")
```

A run directory (`run_paths`) holds:

    config.json          model class + config, and the training arguments
    checkpoints/         best.weights.h5 (the weights of the lowest test bits/dim,
                         written when training ends), last.weights.h5 (the final
                         weights, written when training ends)
    backup/              state.npz while training runs (`EpochCheckpoint`: every
                         variable and the best weights, each epoch, written off
                         the training thread): call `train` again with the same
                         run_dir and it resumes; `load_run` reads its weights
                         until the run ends
    history.csv, history.json   per-epoch metrics (train and test)
    samples/             SampleGrid PNGs every `sample_every` epochs
    samples.png          64 samples at temperature 0.7, captioned with the model
                         and its test bits/dim
    temperature_sweep.png  one row per temperature 0, 0.25, 0.5, 0.7, 0.85, 1.0,
                         each labelled "T = ..." beside it, under the same caption
    model.keras          the trained model (`keras.saving.load_model`)
    metrics.json         final test bits/dim and friends
    export/<version>/    SavedModel with TF Serving signatures
"""

import csv
import dataclasses
import json
import math
import os
import time

from tfp_glow import checks

# The run directory's layout and loading (re-exported: part of this module's API).
from tfp_glow.run_dir import RunDamagedError, RunNotFoundError, load_run, read_config, run_paths
from tfp_glow.training import RECOMMENDED_EMA_MOMENTUM

__all__ = [
    "LR_DECAYS",
    "RunDamagedError",
    "RunNotFoundError",
    "SAMPLE_TEMPERATURE",
    "TEMPERATURES",
    "TrainResult",
    "class_labels",
    "default_upscale",
    "evaluate",
    "figure_title",
    "has_backup",
    "load_run",
    "optimizer_settings",
    "read_config",
    "run_paths",
    "train",
    "write_samples",
    "write_temperature_sweep",
]

TEMPERATURES = (0.0, 0.25, 0.5, 0.7, 0.85, 1.0)
SAMPLE_TEMPERATURE = 0.7  # openai/glow's temperature for pictures
LR_DECAYS = ("cosine", "none")

@dataclasses.dataclass
class TrainResult:
    """What `train` returns.

    Attributes:
      metrics: the dict written to metrics.json (`test_bits_per_dim`,
        `test_nll`, `train_bits_per_dim`, `best_test_bits_per_dim`, `epochs`,
        `train_seconds`, `num_parameters`, ...).
      history: per-epoch lists, as in history.json (`epoch`, `loss`,
        `bits_per_dim`, `val_loss`, `val_bits_per_dim`, ...).
      paths: `run_paths(run_dir)`.
      export_path: the SavedModel version directory, or None.
      resumed: True if training resumed from a backup in `run_dir`.
    """

    metrics: dict
    history: dict
    paths: dict
    export_path: str | None = None
    resumed: bool = False


def has_backup(run_dir):
    """True if `run_dir` holds `EpochCheckpoint` state: `train` will resume."""
    return os.path.exists(run_paths(run_dir)["backup_weights"])


def _write_json(path, obj):
    tmp = path + ".tmp"  # written whole, then renamed: never a half-written file
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


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


def _num_batches(ds):
    import tensorflow as tf
    n = int(ds.cardinality())
    return None if n in (int(tf.data.INFINITE_CARDINALITY),
                         int(tf.data.UNKNOWN_CARDINALITY)) else n


def class_labels(model, num):
    """`arange(num) % num_classes` (every class in turn) for a class-conditional
    model, else None."""
    import numpy as np
    if model.num_classes is None:
        return None
    return np.arange(num, dtype=np.int64) % model.num_classes


def default_upscale(model):
    """Nearest-neighbour enlargement that makes an image about 32 pixels wide."""
    return max(1, 32 // max(model.event_shape[0], 1))


# ------------------------------------------------------------------ pictures


def figure_title(model, metrics=None):
    """The caption of a run's pictures: the model and, after training, its
    test bits/dim (`metrics`: the dict of metrics.json)."""
    name = type(model).__name__
    if metrics is None or metrics.get("test_bits_per_dim") is None:
        return name
    return f"{name}, test {metrics['test_bits_per_dim']:.3f} bits/dim"


def write_samples(model, path, num=64, temperature=SAMPLE_TEMPERATURE, seed=0, labels=None,
                  upscale=None, title=None):
    """`num` samples at `temperature` as one PNG: an image grid with about
    `sqrt(num)` rows, or for 2-D models a histogram of the points; `title`
    (e.g. `figure_title(model, metrics)`) captions it, followed by the
    temperature."""
    import numpy as np

    from tfp_glow.images import save_image_grid, save_points_picture
    x = np.asarray(model.sample(num, temperature=temperature, seed=seed, labels=labels))
    caption = None if title is None else f"{title}, T = {temperature:g}"
    if len(model.event_shape) != 3:
        return save_points_picture([x], path, title=caption)
    return save_image_grid(x, path, num_bins=model.num_bins, rows=int(math.ceil(math.sqrt(num))),
                           upscale=default_upscale(model) if upscale is None else upscale,
                           title=caption)


def write_temperature_sweep(model, path, seed=0, columns=10, title=None):
    """One row per temperature in `TEMPERATURES`, every row decoding the same
    latents scaled by T (`columns` images, or 5,000 points for 2-D models:
    then one panel per T), labelled "T = ..." beside each row (above each
    panel), under `title` (e.g. `figure_title(model, metrics)`)."""
    import numpy as np

    from tfp_glow.images import save_image_grid, save_points_picture
    image_model = len(model.event_shape) == 3
    num = columns if image_model else 5000
    labels = class_labels(model, num)
    rows = [np.asarray(model.sample(num, temperature=t, seed=seed, labels=labels))
            for t in TEMPERATURES]
    names = [f"T = {t:g}" for t in TEMPERATURES]
    if not image_model:
        return save_points_picture(rows, path, title=title, labels=names)
    return save_image_grid(np.concatenate(rows), path, num_bins=model.num_bins,
                           rows=len(TEMPERATURES), upscale=default_upscale(model),
                           title=title, row_labels=names)


# ------------------------------------------------------------------- training


def evaluate(model, ds):
    """Mean NLL (nats per example) and bits/dim over a finite data set.

    With variational dequantization both are the variational bound, and
    `uniform_bits_per_dim` is the flow's figure on the data's own uniform noise.

    With `tfp_glow.data` pipelines built with ``shuffle=False`` the
    dequantization noise of each example is fixed, so the figure does not
    depend on the batch size (up to float32 rounding of the mean).
    """
    if getattr(model, "optimizer", None) is None:
        model.compile(jit_compile=False)
    result = model.evaluate(ds, verbose=0, return_dict=True)
    out = {"nll": float(result["loss"]), "bits_per_dim": float(result["bits_per_dim"])}
    if "uniform_bits_per_dim" in result:  # variational dequantization: the bound above
        out["uniform_bits_per_dim"] = float(result["uniform_bits_per_dim"])
    return out


def _check_train_args(epochs, learning_rate, warmup_steps, lr_decay, clipnorm,
                      steps_per_epoch, sample_every, verbose, weight_decay, ema_momentum):
    checks.positive_int(epochs, "epochs")
    checks.number(weight_decay, "weight_decay", minimum=0)
    checks.number(ema_momentum, "ema_momentum", minimum=0, maximum=1,
                  exclusive_minimum=True, exclusive_maximum=True, allow_none=True)
    checks.number(learning_rate, "learning_rate", minimum=0, exclusive_minimum=True)
    checks.positive_int(warmup_steps, "warmup_steps", minimum=0)
    checks.choice(lr_decay, LR_DECAYS, "lr_decay")
    checks.number(clipnorm, "clipnorm", minimum=0, exclusive_minimum=True, allow_none=True)
    checks.positive_int(steps_per_epoch, "steps_per_epoch", allow_none=True)
    checks.positive_int(sample_every, "sample_every", minimum=0)
    checks.choice(verbose, (0, 1, 2), "verbose")


def _callbacks(model, paths, sample_every, seed, averaged):
    """The run's callbacks; with Polyak averaging (`averaged`) validation, the
    checkpoints and the sample grids see the averaged weights, the backup the
    raw ones with their average."""
    import keras

    from tfp_glow.training.callbacks import SampleGrid, WithAveragedWeights
    from tfp_glow.training.epoch_checkpoint import EpochCheckpoint
    # One state file per epoch, written on a background thread, serves the
    # resume and the best weights (kept in memory and in that file, written as
    # best.weights.h5 when fit ends): two Keras weights files per epoch cost
    # 0.3-0.9 s each on the training thread, as much as a digits epoch's steps.
    # It reads the best weights' Polyak average itself (not wrapped below).
    backup = EpochCheckpoint(paths["backup"], best_path=paths["best"],
                             monitor="val_bits_per_dim", mode="min")
    grids = []
    if sample_every and len(model.event_shape) == 3:
        grids.append(SampleGrid(paths["samples_dir"], num_samples=64,
                                temperature=SAMPLE_TEMPERATURE, seed=seed,
                                every_n_epochs=sample_every, rows=8,
                                upscale=default_upscale(model)))
    # With averaging, WithAveragedWeights also makes validation (so the
    # monitored val_bits_per_dim) see the average, with or without grids.
    # The epoch's state first, then its history row: as before, a kill in
    # between leaves a resumable state whose history lacks at most that row.
    return [
        backup,
        keras.callbacks.CSVLogger(paths["history_csv"], append=True),
        keras.callbacks.TerminateOnNaN(),
        *([WithAveragedWeights(*grids)] if averaged else grids),
    ]


def optimizer_settings(model, learning_rate=None, weight_decay=None):
    """`(learning_rate, weight_decay)` of a run: the given values, and for None
    what the model's `compile()` would use (`recommended_optimizer_settings()`:
    a family may override 3e-3 and no decay where that overfits its networks)."""
    from tfp_glow.training import RECOMMENDED_LEARNING_RATE

    settings = getattr(model, "recommended_optimizer_settings", dict)()
    if learning_rate is None:
        learning_rate = settings.get("learning_rate", RECOMMENDED_LEARNING_RATE)
    if weight_decay is None:
        weight_decay = settings.get("weight_decay", 0.0)
    return learning_rate, weight_decay


def train(model, train_ds, test_ds, *, run_dir, epochs=60, learning_rate=None,
          warmup_steps=100, lr_decay="none", clipnorm=None, steps_per_epoch=None,
          jit_compile=False, seed=0, sample_every=5, export=True, verbose=2, config=None,
          extra_metrics=None, weight_decay=None, ema_momentum=RECOMMENDED_EMA_MOMENTUM):
    """Trains `model` on `train_ds` and writes the run directory `run_dir`.

    The recipe (`tfp_glow.training.recommended_optimizer`, what
    `model.compile()` gives): Adam with `WarmupSchedule(learning_rate,
    warmup_steps, decay_steps)`, i.e. a linear warmup to `learning_rate`,
    then a constant rate (``lr_decay="none"``, the default: with Polyak
    averaging it ended lower than the cosine decay on the digits, see
    BENCHMARKS.md) or a cosine decay to 0 at the last step
    (``"cosine"``, ``decay_steps = epochs * batches_per_epoch -
    warmup_steps``); optional global-norm clipping; with
    `weight_decay` > 0 AdamW decaying the networks' weights only
    (`tfp_glow.training.adamw`); Polyak averaging with `ema_momentum` (Keras'
    `use_ema`: the optimizer keeps `avg <- m avg + (1 - m) w`, saved with its
    state in the backup; the per-epoch validation, the checkpoints and the
    sample grids use the average through `WithAveragedWeights`, and `fit`
    ends by copying it into the weights, so the test figure, `model.keras`
    and the export use it too); Keras `fit`
    on ``-log p(x)`` with `test_ds` as validation data, checkpoints
    (last and best `val_bits_per_dim`), `EpochCheckpoint` (call again with the
    same `run_dir` after an interruption and it resumes from the last
    completed epoch) and a CSV history. Then `evaluate(model, test_ds)`
    gives metrics.json, and `write_samples`, `write_temperature_sweep`,
    `model.save` and (if `export`) `export_saved_model` write the rest.

    The optimizer is created under `model.distribute_strategy`: build the
    model inside a strategy's scope to train with it.

    Args:
      model: a `FlowModel` (Glow, RealNVP, NICE), not necessarily initialised
        (`fit` initialises ActNorm on the first batch).
      train_ds: `tf.data` pipeline of training batches (it shuffles itself).
      test_ds: finite `tf.data` pipeline of test batches (best built with
        ``shuffle=False``: fixed dequantization noise, one test figure).
      run_dir: the run directory (created if missing).
      epochs: passes over `train_ds` (or of `steps_per_epoch` batches).
      learning_rate, warmup_steps, lr_decay, clipnorm: the schedule above;
        `learning_rate` None: the model's (`recommended_optimizer_settings()`,
        what its `compile()` uses; 3e-3 unless the family says otherwise).
      weight_decay: AdamW's decoupled weight decay of the network weights
        (0: plain Adam; None: the model's, 0 unless the family says otherwise).
      ema_momentum: momentum in (0, 1) of the weights' moving average
        (default 0.99, `recommended_optimizer`'s; None: off).
      steps_per_epoch: cap on the batches per epoch (`train_ds` is then
        repeated so that a capped epoch never exhausts it).
      jit_compile: compile the train step with XLA.
      seed: seed of the sample pictures.
      sample_every: write samples/samples_epoch_NNN.png every so many epochs
        (0: never; image models only).
      export: write a SavedModel under run_dir/export/.
      verbose: Keras `fit` verbosity (0, 1 or 2).
      config: JSON-able dict stored in config.json beside the model's class
        and config (the command stores every flag); default: this call's
        arguments.
      extra_metrics: JSON-able dict merged into metrics.json.

    Returns:
      A `TrainResult` (metrics, history, paths, export_path, resumed).
    """
    from tfp_glow.training import recommended_optimizer
    learning_rate, weight_decay = optimizer_settings(model, learning_rate, weight_decay)
    _check_train_args(epochs, learning_rate, warmup_steps, lr_decay, clipnorm,
                      steps_per_epoch, sample_every, verbose, weight_decay, ema_momentum)
    paths = run_paths(run_dir)
    os.makedirs(paths["checkpoints"], exist_ok=True)
    batches = _num_batches(train_ds)
    if steps_per_epoch is not None:
        if batches is not None:
            steps_per_epoch = min(steps_per_epoch, batches)
        train_ds = train_ds.repeat()  # a capped epoch must not exhaust the iterator
    per_epoch = steps_per_epoch or batches
    decay_steps = None
    if lr_decay == "cosine" and per_epoch is not None:
        decay_steps = max(per_epoch * epochs - warmup_steps, 1)
    with model.distribute_strategy.scope():
        optimizer = recommended_optimizer(
            decay_steps, learning_rate=learning_rate, warmup_steps=warmup_steps,
            ema_momentum=ema_momentum, weight_decay=weight_decay, model=model,
            global_clipnorm=clipnorm)
        model.compile(optimizer, jit_compile=jit_compile)
    if config is None:
        config = dict(epochs=epochs, learning_rate=learning_rate, warmup_steps=warmup_steps,
                      lr_decay=lr_decay, clipnorm=clipnorm, weight_decay=weight_decay,
                      ema_momentum=ema_momentum,
                      steps_per_epoch=steps_per_epoch,
                      jit_compile=jit_compile, seed=seed, sample_every=sample_every)
    num_parameters = int(model.count_params())
    _write_json(paths["config"], {**config, "model_class": type(model).__name__,
                                  "model_config": model.get_config(),
                                  "num_parameters": num_parameters})

    resumed = has_backup(run_dir)
    if not resumed and os.path.exists(paths["history_csv"]):
        os.remove(paths["history_csv"])  # a fresh run: don't append to an old one
    start = time.time()
    callbacks = _callbacks(model, paths, sample_every, seed, ema_momentum is not None)
    try:
        # shuffle=False: the pipelines shuffle themselves (Keras would only warn).
        model.fit(train_ds, epochs=epochs, steps_per_epoch=steps_per_epoch, shuffle=False,
                  validation_data=test_ds, callbacks=callbacks, verbose=verbose)
    finally:
        # An interrupted fit (Ctrl-C) returns only once its last state is on disk.
        callbacks[0].wait()
    train_seconds = time.time() - start

    history = _history_from_csv(paths["history_csv"])
    _write_json(paths["history_json"], history)
    test = evaluate(model, test_ds)
    metrics = {
        "test_bits_per_dim": test["bits_per_dim"],
        "test_nll": test["nll"],
        **({"test_uniform_bits_per_dim": test["uniform_bits_per_dim"]}
           if "uniform_bits_per_dim" in test else {}),
        "train_bits_per_dim": history.get("bits_per_dim", [float("nan")])[-1],
        "best_test_bits_per_dim": min(history.get("val_bits_per_dim", [test["bits_per_dim"]])),
        "epochs": len(history.get("epoch", [])),
        "train_seconds": round(train_seconds, 1),
        "num_parameters": num_parameters,
        **(extra_metrics or {}),
    }
    export_path = None
    # Under a multi-worker strategy every worker trains and evaluates, but only
    # the chief writes the run directory they share (no racing writers).
    from tfp_glow.training.distributed import is_chief
    if is_chief(model.distribute_strategy):
        model.save_weights(paths["last"])
        _write_json(paths["metrics"], metrics)
        title = figure_title(model, metrics)
        write_samples(model, paths["samples"], 64, SAMPLE_TEMPERATURE, seed,
                      class_labels(model, 64), title=title)
        write_temperature_sweep(model, paths["sweep"], seed, title=title)
        model.save(paths["model"])
        if export:
            from tfp_glow.export import export_saved_model
            export_path = export_saved_model(model, paths["export"])
    return TrainResult(metrics=metrics, history=history, paths=paths,
                       export_path=export_path, resumed=resumed)


# ------------------------------------------------------------------ reloading
