"""One worker of the two-process `MultiWorkerMirroredStrategy` runs of
tests/test_multiworker.py (and the recipe those tests replay in one process).

Run as a script, with TF_CONFIG naming this worker:

    python tests/_multiworker_worker.py OUT_DIR BACKUP_DIR SLEEP_PER_BATCH

it trains the small Glow below with stock `fit` (SGD, `nonfinite="skip"`,
`keras.callbacks.BackupAndRestore(BACKUP_DIR)`) on its own data (its own
pipeline through `strategy.distribute_datasets_from_function`: no
autosharding, no rebatching) and writes `OUT_DIR/worker_<task>.npz`: the
ActNorm variables right after `fit`'s first-batch init, the weights after
training, the epoch losses, the skipped-step count, `evaluate`'s loss and
`log_prob` of fixed images. It logs `begin E` / `batch B` / `end E` lines to
`OUT_DIR/worker_<task>.log` and sleeps SLEEP_PER_BATCH seconds after each batch
(a window to kill it).

The data: the global batch of step `s` is `global_batches()[s]` (32 images);
worker `k` feeds rows `16k .. 16k + 15` of it. Worker 1's batch 1 carries a
NaN pixel in every epoch, so that step must be skipped on *both* workers.
"""

import json
import os
import sys
import time
import warnings

import numpy as np

WORKERS = 2
PER_WORKER = 16
STEPS = 4  # per epoch
EPOCHS = 3
LEARNING_RATE = 1e-3
POISONED = (1, 1)  # (worker, batch): a NaN pixel here in every epoch


def global_batches():
    """`[STEPS, WORKERS * PER_WORKER, 8, 8, 1]`: the global batch of each step."""
    from tfp_glow import data

    images = data.load_digits("train")[0][: STEPS * WORKERS * PER_WORKER]
    x = data.preprocess(images, data.DIGITS_NUM_BINS, dequantize=True, seed=1234).numpy()
    x = x.reshape(STEPS, WORKERS * PER_WORKER, 8, 8, 1)
    worker, batch = POISONED
    x[batch, worker * PER_WORKER, 3, 3, 0] = np.nan
    return x


def worker_batches(task):
    """Worker `task`'s part of every global batch: `[STEPS, PER_WORKER, 8, 8, 1]`."""
    return global_batches()[:, task * PER_WORKER : (task + 1) * PER_WORKER]


def probe_images():
    """Clean images every process scores after training (the same on every worker)."""
    return global_batches()[0, :4]


def dataset(batches, strategy=None):
    """`batches` in order, as a `tf.data` pipeline or, given a strategy, as
    this worker's own pipeline (`distribute_datasets_from_function`: no
    autosharding, no rebatching; its batches go to the worker's replica)."""
    import tensorflow as tf

    def pipeline(input_context=None):
        ds = tf.data.Dataset.from_tensor_slices(batches.reshape(-1, 8, 8, 1))
        return ds.batch(batches.shape[1])

    if strategy is None:
        return pipeline()
    return strategy.distribute_datasets_from_function(pipeline)


def build_model():
    """The small Glow (2 levels x 2 steps: 4 ActNorms), compiled with SGD.

    Without dropout: with it every replica draws masks of its own, so the
    workers' steps would not be one process's step on the global batch."""
    import keras

    import tfp_glow
    from tfp_glow import data

    keras.utils.set_random_seed(0)
    model = tfp_glow.Glow(
        (8, 8, 1),
        levels=2,
        steps_per_level=2,
        hidden_channels=8,
        num_bins=data.DIGITS_NUM_BINS,
        nonfinite="skip",
        dropout=0.0,
    )
    model.compile(keras.optimizers.SGD(LEARNING_RATE))
    return model


# Keyed by position: Keras numbers layer names per process, positions are stable.
def actnorm_values(model):
    return {
        f"{i:03d}": np.array(v.numpy()) for i, v in enumerate(model.weights) if "act_norm" in v.path
    }


def weight_values(model):
    return {f"{i:03d}": np.array(v.numpy()) for i, v in enumerate(model.weights)}


def _callbacks(record, log_path=None, sleep=0.0, backup_dir=None):
    import keras

    class RecordInit(keras.callbacks.Callback):
        # Listed before BackupAndRestore: sees fit's own init, not a restored one.
        def on_train_begin(self, logs=None):
            record.update({f"init/{k}": v for k, v in actnorm_values(self.model).items()})
            record.update({f"start/{k}": v for k, v in weight_values(self.model).items()})

    class Log(keras.callbacks.Callback):
        def _write(self, text):
            with open(log_path, "a") as f:
                f.write(text + "\n")
                f.flush()
                os.fsync(f.fileno())

        def on_epoch_begin(self, epoch, logs=None):
            self._write(f"begin {epoch}")

        def on_train_batch_end(self, batch, logs=None):
            self._write(f"batch {batch}")
            time.sleep(sleep)

        def on_epoch_end(self, epoch, logs=None):
            self._write(f"end {epoch}")  # after BackupAndRestore (listed first) saved

    callbacks = [RecordInit()]
    if backup_dir is not None:
        callbacks.append(keras.callbacks.BackupAndRestore(backup_dir))
    if log_path is not None:
        callbacks.append(Log())
    return callbacks


def train(model, batches, strategy=None, **callback_args):
    """`fit` for EPOCHS epochs, then `evaluate` on the clean batches.

    Returns everything a test compares, as flat NumPy arrays: `init/*` (the
    ActNorm variables right after fit's own init), `start/*` (all weights
    then), `weight/*` (after training), `losses`, `nonfinite_steps`,
    `eval_loss`, `log_prob` (of `probe_images()`).
    """
    out = {}
    history = model.fit(
        dataset(batches, strategy),
        epochs=EPOCHS,
        verbose=0,
        callbacks=_callbacks(out, **callback_args),
    )
    out.update({f"weight/{k}": v for k, v in weight_values(model).items()})
    out["losses"] = np.asarray(history.history.get("loss", []), np.float64)
    out["nonfinite_steps"] = np.asarray(model.nonfinite_steps)
    out["eval_loss"] = np.asarray(
        model.evaluate(
            dataset(np.nan_to_num(batches, nan=0.0), strategy), verbose=0, return_dict=True
        )["loss"]
    )
    out["log_prob"] = model.log_prob(probe_images()).numpy()
    return out


def main(out_dir, backup_dir, sleep):
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    from tfp_glow.training.distributed import first_step_batch, multi_worker_strategy

    strategy = multi_worker_strategy()  # from TF_CONFIG, before any other TF work
    task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    with strategy.scope():
        model = build_model()
    out = train(
        model,
        worker_batches(task),
        strategy,
        log_path=os.path.join(out_dir, f"worker_{task}.log"),
        sleep=sleep,
        backup_dir=backup_dir,
    )
    out["num_replicas"] = np.asarray(strategy.num_replicas_in_sync)
    # A plain pipeline with autosharding off: fit's first-batch peek warns
    # (each epoch would see 1/num_workers of the data).
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first_step_batch(dataset(worker_batches(task)).with_options(options), strategy)
    out["off_warnings"] = np.asarray(sum("autosharding off" in str(w.message) for w in caught))
    np.savez(os.path.join(out_dir, f"worker_{task}.npz"), **out)
    with open(os.path.join(out_dir, f"worker_{task}.log"), "a") as f:
        f.write("done\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]))
