"""`fit`'s time per step and per epoch against the bare compiled step; XLA compile times.

The model is `tfp-glow train`'s Glow as it was when these figures were
measured (2 levels x 8 steps, width 64, the built-in digits, batch 64, Adam;
no dropout, uniform dequantization: `common.PAPER_GLOW`). Every variant has its own copy of the
same initial weights and runs 23 steps (one epoch of the 1,437 training
digits: 22 full batches and one of 29) per round; rounds are interleaved, so
load on the machine hits every variant alike. Per step (median over rounds of
the round's wall time / 23):

* `bare`: one `tf.function` computing `-mean log p(x)`, its gradient and
  `optimizer.apply` (no guard, no metrics, no Keras), on the same batches;
* `train_function`: `FlowModel.make_train_function()` called directly on an
  iterator over those batches (the guard, the metrics, the guard's read-back);
Then, per epoch, each a single `fit` over `rounds + 1` epochs (the first,
tracing, dropped; an epoch = from one `on_epoch_end` to the next, after every
other callback), one configuration after the other:

* `fit, arrays`: `fit(x, batch_size=64)` on the NumPy array, no callbacks;
* `fit, digits_dataset`: on `digits_dataset` (fresh noise, shuffling);
* `+ validation`: with the 360 test digits as `validation_data`;
* `+ BackupAndRestore`, `+ ModelCheckpoint (last)`: Keras' weights files;
  `+ EpochCheckpoint`: tfp_glow's one background write of state and best;
* `CLI epoch, Keras ... (before)`: what `tfp-glow train` did per epoch until
  EpochCheckpoint (BackupAndRestore, best ModelCheckpoint, CSVLogger,
  TerminateOnNaN); `CLI epoch`: the recipe's callbacks now (EpochCheckpoint,
  CSVLogger, TerminateOnNaN; no sample grid, which the CLI writes every 5
  epochs);
* `..., steps_per_execution=4`: the same `fit` compiled with Keras'
  `steps_per_execution=4` (four steps per call of the train function).

`--jit` adds the XLA compile times: the first call of the bare step with
`jit_compile=True` against the first `fit(jit_compile=True)` epoch minus one
steady epoch, and a second epoch on NumPy data whose last batch is partial
(does it recompile?).

    python benchmarks/fit_overhead.py --rounds 6 --out benchmarks/results/fit_overhead.json
    python benchmarks/fit_overhead.py --rounds 3 --jit \
        --out benchmarks/results/fit_overhead_jit.json
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report  # noqa: E402
from common import PAPER_GLOW  # noqa: E402

STEPS_PER_EPOCH = 23
BATCH = 64


def _model(jit=False, steps_per_execution=1):
    import keras

    import tfp_glow
    from tfp_glow.data import DIGITS_NUM_BINS

    keras.utils.set_random_seed(0)
    model = tfp_glow.Glow(
        image_shape=(8, 8, 1),
        levels=2,
        steps_per_level=8,
        hidden_channels=64,
        num_bins=DIGITS_NUM_BINS,
        **PAPER_GLOW,
    )
    model.compile(
        keras.optimizers.Adam(1e-4), jit_compile=jit, steps_per_execution=steps_per_execution
    )
    return model


def _data():
    from tfp_glow.data import DIGITS_NUM_BINS, load_digits, preprocess

    images, _ = load_digits("train")
    return np.asarray(preprocess(images, DIGITS_NUM_BINS, seed=0), np.float32)


def _bare_step(model, jit=False):
    import tensorflow as tf

    density, variables, optimizer = model._density, model.trainable_variables, model.optimizer

    @tf.function(jit_compile=jit, reduce_retracing=True)
    def step(x):
        with tf.GradientTape() as tape:
            loss = -tf.reduce_mean(density.log_prob_of(x, None))
        optimizer.apply(tape.gradient(loss, variables), variables)
        return loss

    return step


def _batches(x):
    return [x[i : i + BATCH] for i in range(0, len(x), BATCH)][:STEPS_PER_EPOCH]


def _step_variants(x):
    import tensorflow as tf

    batches = [tf.constant(b) for b in _batches(x)]
    bare_model = _model()
    bare_model.initialize(x[:BATCH])
    bare = _bare_step(bare_model)
    tf_model = _model()
    tf_model.initialize(x[:BATCH])
    train_function = tf_model.make_train_function()
    dataset = tf.data.Dataset.from_tensor_slices(x).batch(BATCH).take(STEPS_PER_EPOCH)

    def call_train_function():
        iterator = iter(dataset)
        for _ in range(STEPS_PER_EPOCH):
            logs = train_function(iterator)
        return float(logs["loss"])

    return {
        "bare": lambda: [bare(b).numpy() for b in batches][-1],
        "train_function": call_train_function,
    }


def _epoch_configs(x, workdir):
    import keras

    from tfp_glow import recipe
    from tfp_glow.data import digits_dataset

    train = digits_dataset("train", batch_size=BATCH)
    test = digits_dataset("test", batch_size=360, shuffle=False)
    paths = recipe.run_paths(workdir)
    os.makedirs(paths["checkpoints"], exist_ok=True)

    def backup(m):
        return [keras.callbacks.BackupAndRestore(os.path.join(workdir, f"backup_{id(m)}"))]

    def last(m):
        return backup(m) + [keras.callbacks.ModelCheckpoint(paths["last"], save_weights_only=True)]

    def epoch_checkpoint(m):
        from tfp_glow.training import EpochCheckpoint

        return [
            EpochCheckpoint(
                os.path.join(workdir, f"state_{id(m)}"),
                best_path=paths["best"],
                monitor="val_bits_per_dim",
            )
        ]

    def cli(m):
        return recipe._callbacks(m, paths, 0, 0, getattr(m.optimizer, "use_ema", False))

    def cli_keras(m):
        # What `tfp-glow train` wrote per epoch before EpochCheckpoint: Keras'
        # BackupAndRestore and a best-weights ModelCheckpoint, each a weights file.
        return backup(m) + [
            keras.callbacks.CSVLogger(os.path.join(workdir, f"history_{id(m)}.csv")),
            keras.callbacks.TerminateOnNaN(),
            keras.callbacks.ModelCheckpoint(
                paths["best"],
                save_weights_only=True,
                monitor="val_bits_per_dim",
                mode="min",
                save_best_only=True,
            ),
        ]

    arrays = dict(batch_size=BATCH, shuffle=True)
    # name: (data, validation, callbacks, fit kwargs, steps_per_execution)
    return {
        "fit, arrays": (x, None, lambda m: [], arrays, 1),
        "fit, arrays, steps_per_execution=4": (x, None, lambda m: [], arrays, 4),
        "fit, digits_dataset": (train, None, lambda m: [], {}, 1),
        "+ validation": (train, test, lambda m: [], {}, 1),
        "+ BackupAndRestore": (train, test, backup, {}, 1),
        "+ ModelCheckpoint (last)": (train, test, last, {}, 1),
        "+ EpochCheckpoint (state and best)": (train, test, epoch_checkpoint, {}, 1),
        "CLI epoch, Keras BackupAndRestore + best ModelCheckpoint (before)": (
            train,
            test,
            cli_keras,
            {},
            1,
        ),
        "CLI epoch": (train, test, cli, {}, 1),
        "CLI epoch, steps_per_execution=4": (train, test, cli, {}, 4),
    }


def _epoch_clock():
    """A callback recording the time of every `on_epoch_end` (list it last)."""
    import keras

    class EpochClock(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times = []

        def on_epoch_end(self, epoch, logs=None):
            self.times.append(time.perf_counter())

    return EpochClock()


def run_timing(rounds):
    x = _data()
    variants = _step_variants(x)
    first = {}
    for name, fn in variants.items():  # tracing: timed alone
        t0 = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - t0
    times = {name: [] for name in variants}
    names = list(variants)
    for r in range(rounds):
        for i in range(len(names)):
            name = names[(i + r) % len(names)]
            t0 = time.perf_counter()
            variants[name]()
            times[name].append((time.perf_counter() - t0) / STEPS_PER_EPOCH * 1e3)
    bare = float(np.median(times["bare"]))
    result = {
        name: {
            "median_ms_per_step": float(np.median(t)),
            "min_ms_per_step": float(min(t)),
            "over_bare": float(np.median(t)) / bare,
            "first_call_s": first[name],
        }
        for name, t in times.items()
    }
    with tempfile.TemporaryDirectory() as workdir:
        for name, (data, val, callbacks, kwargs, spe) in _epoch_configs(x, workdir).items():
            model, clock = _model(steps_per_execution=spe), _epoch_clock()
            model.fit(
                data,
                validation_data=val,
                epochs=rounds + 1,
                verbose=0,
                callbacks=callbacks(model) + [clock],
                **kwargs,
            )
            epoch_ms = np.diff(clock.times) * 1e3
            result[name] = {
                "median_epoch_ms": float(np.median(epoch_ms)),
                "median_ms_per_step": float(np.median(epoch_ms)) / STEPS_PER_EPOCH,
                "epoch_over_bare_steps": float(np.median(epoch_ms)) / (STEPS_PER_EPOCH * bare),
            }
    return result


def run_jit():
    import tensorflow as tf

    x = _data()
    full = x[: (len(x) // BATCH) * BATCH]
    out = {}
    model = _model()
    model.initialize(x[:BATCH])
    step = _bare_step(model, jit=True)
    t0 = time.perf_counter()
    step(tf.constant(x[:BATCH])).numpy()
    out["bare_first_call_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    step(tf.constant(x[BATCH : 2 * BATCH])).numpy()
    out["bare_second_call_s"] = time.perf_counter() - t0

    model = _model(jit=True)
    model.initialize(x[:BATCH])
    epochs = []
    for data in (full, full, x):  # two epochs of full batches, then a partial last batch
        t0 = time.perf_counter()
        model.fit(data, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
        epochs.append(time.perf_counter() - t0)
    out["fit_epoch_s"] = {
        "first (compiles)": epochs[0],
        "second": epochs[1],
        "with a partial last batch": epochs[2],
    }
    out["fit_compile_s"] = epochs[0] - epochs[1]
    out["fit_compile_over_bare"] = out["fit_compile_s"] / out["bare_first_call_s"]
    out["partial_batch_extra_s"] = epochs[2] - epochs[1]
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--jit", action="store_true", help="measure XLA compile times instead")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    import common

    load_start = os.getloadavg()
    result = {"machine": common.machine_info(), "loadavg_start": list(load_start)}
    if args.jit:
        result["jit"] = run_jit()
    else:
        result["rounds"] = args.rounds
        result["steps_per_round"] = STEPS_PER_EPOCH
        result["timing"] = run_timing(args.rounds)
    result["loadavg_end"] = list(os.getloadavg())
    report.print_and_write(result, args.out)


if __name__ == "__main__":
    main()
