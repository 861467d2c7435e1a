"""One checkpoint per epoch for resuming and for the best model, written off the step loop.

Keras' `BackupAndRestore` and `ModelCheckpoint(save_best_only=True)` each
write a Keras weights file (`.weights.h5`, one HDF5 dataset per variable) at
the end of an epoch, on the training thread: at the digits' size each file
costs 0.3-0.9 s, as much as the epoch's 23 steps (BENCHMARKS.md, "A full
`fit` epoch"). `EpochCheckpoint` does the work of both with one write:

* at the end of epoch `e` it copies every variable of the model and its
  optimizer to host memory (one compiled read, milliseconds) and hands the
  copy to a background thread, which writes `directory/state.npz` (NumPy,
  one file, no per-variable datasets) to a temporary name and renames it:
  a process killed at any moment leaves the previous complete state;
* when the monitored value improves it keeps the model's weights (their
  Polyak average when the optimizer has one, `use_ema=True`) in memory and
  in the same state file; `best_path` (a Keras `.weights.h5`, what
  `model.load_weights` reads) is written once, when `fit` ends;
* when `fit` starts and `state.npz` exists, every variable is restored, the
  best weights and value too, and `fit` resumes at epoch `e + 1` (as
  `BackupAndRestore` does: the interrupted epoch restarts from its first
  batch). A finished `fit` deletes the state (`delete_on_end=True`).

Under `tf.distribute` every worker restores, and only the chief writes.
"""

import json
import os
import threading

import keras
import numpy as np
import tensorflow as tf

from tfp_glow import checks
from tfp_glow.training.callbacks import _averaged_pairs

__all__ = ["EpochCheckpoint", "STATE_FILE", "read_state_weights"]

STATE_FILE = "state.npz"


def _read_all(variables):
    """A compiled read of many variables: one call instead of one op each."""

    @tf.function(autograph=False)
    def read():
        return [tf.identity(v) for v in variables]

    return read


def _values(read_fn):
    return [np.array(t) for t in read_fn()]


def _write_npz(path, arrays, meta):
    """`arrays` and `meta` (JSON) to `path`, atomically (temporary name, fsync, rename)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        np.savez(f, meta=np.array(json.dumps(meta)), **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_state_weights(path, model):
    """Loads the model weights of an `EpochCheckpoint` state file into `model`.

    What a run that is still training (or was interrupted) has: its last
    completed epoch's raw weights. Raises `ValueError` when the file does not
    hold this model's variables.
    """
    with np.load(path, allow_pickle=False) as state:
        meta = json.loads(str(state["meta"]))
        names = meta["model_paths"]
        values = [state[f"model_{i}"] for i in range(len(names))]
    _assign(model.variables, values, names, f"the state file {path}")


def _path(v):
    return getattr(v, "path", None) or v.name


def _assign(variables, values, names, source):
    # By position: the same configuration creates its variables in the same
    # order (their names may differ: Keras numbers a second model "glow_1").
    if len(values) != len(variables) or len(names) != len(values):
        raise ValueError(
            f"{source} holds {len(values)} variables that do not match this model's "
            f"{len(variables)} (a different model configuration?)."
        )
    for v, a, name in zip(variables, values, names):
        if tuple(v.shape) != a.shape:
            raise ValueError(
                f"{source}: variable {name} has shape {a.shape}; this model's "
                f"{_path(v)} has {tuple(v.shape)} (a different model configuration?)."
            )
        v.assign(a)


class EpochCheckpoint(keras.callbacks.Callback):
    """Resume state and best weights in one background write per epoch.

    Args:
      directory: folder of `state.npz` (created if missing).
      best_path: where `fit`'s end writes the best weights (`.weights.h5`),
        or None to keep no best model.
      monitor: the logged value that decides "best" (e.g. `val_bits_per_dim`);
        an epoch without it keeps the earlier best. With Polyak averaging the
        best weights are the average: list `WithAveragedWeights` too, so that
        the validation figure monitored is the average's (`tfp-glow train` does).
      mode: `"min"` or `"max"`.
      delete_on_end: delete `state.npz` (and `directory` if it is then empty)
        when `fit` ends normally: the run is complete, a new `fit` starts at
        epoch 0.

    #### Examples

    ```python
    model.fit(train, validation_data=test, epochs=100, callbacks=[
        tfp_glow.training.EpochCheckpoint("run/backup", best_path="run/best.weights.h5")])
    # killed? run the same line again: it resumes after the last finished epoch
    ```
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        best_path: str | os.PathLike | None = None,
        monitor: str = "val_loss",
        mode: str = "min",
        delete_on_end: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(directory, (str, os.PathLike)) or not os.fspath(directory):
            raise ValueError(f"`directory` must be a non-empty path; got {directory!r}.")
        if best_path is not None and not os.fspath(best_path).endswith(".weights.h5"):
            raise ValueError(f"`best_path` must end in '.weights.h5'; got {best_path!r}.")
        checks.choice(mode, ("min", "max"), "mode")
        self.directory = os.fspath(directory)
        self.best_path = None if best_path is None else os.fspath(best_path)
        self.monitor = monitor
        self.mode = mode
        self.delete_on_end = delete_on_end
        self.state_path = os.path.join(self.directory, STATE_FILE)
        self._writer = None
        self._best = None  # (value, [arrays]) of the model's weights
        self._reads = None

    # -- the variables -----------------------------------------------------
    def _optimizer(self):
        optimizer = self.model.optimizer
        if optimizer is not None and not optimizer.built:
            optimizer.build(self.model.trainable_variables)
        return optimizer

    def _readers(self):
        if self._reads is None:
            model_vars = list(self.model.variables)
            optimizer = self._optimizer()
            opt_vars = list(optimizer.variables) if optimizer is not None else []
            # The weights "best" keeps: each trainable weight's Polyak average
            # where the optimizer keeps one, the raw value otherwise.
            averaged = {}
            inner = getattr(optimizer, "inner_optimizer", optimizer)
            if getattr(inner, "use_ema", False):
                averaged = {id(w): a for w, a in _averaged_pairs(optimizer)}
            best_sources = [averaged.get(id(v), v) for v in model_vars]
            self._reads = (
                model_vars,
                opt_vars,
                _read_all(model_vars),
                _read_all(opt_vars),
                _read_all(best_sources),
            )
        return self._reads

    def _is_chief(self):
        from tfp_glow.training.distributed import is_chief

        return is_chief(self.model.distribute_strategy)

    # -- restore -----------------------------------------------------------
    def on_train_begin(self, logs=None):
        self._best = None
        if not os.path.exists(self.state_path):
            return
        model_vars, opt_vars, *_ = self._readers()
        with np.load(self.state_path, allow_pickle=False) as state:
            meta = json.loads(str(state["meta"]))
            model_values = [state[f"model_{i}"] for i in range(len(meta["model_paths"]))]
            opt_values = [state[f"optimizer_{i}"] for i in range(len(meta["optimizer_paths"]))]
            best = (
                [state[f"best_{i}"] for i in range(meta["best_count"])]
                if meta["best_count"]
                else None
            )
        _assign(model_vars, model_values, meta["model_paths"], f"the state file {self.state_path}")
        _assign(opt_vars, opt_values, meta["optimizer_paths"], f"the state file {self.state_path}")
        if best is not None:
            self._best = (meta["best_value"], best)
        # What BackupAndRestore sets: fit's epoch loop starts there.
        self.model._initial_epoch = meta["epoch"]

    # -- save --------------------------------------------------------------
    def _improved(self, value):
        if value is None or not np.isfinite(value):
            return False
        if self._best is None:
            return True
        return value < self._best[0] if self.mode == "min" else value > self._best[0]

    def on_epoch_end(self, epoch, logs=None):
        model_vars, opt_vars, read_model, read_opt, read_best = self._readers()
        value = (logs or {}).get(self.monitor)
        value = None if value is None else float(value)
        if self.best_path is not None and self._improved(value):
            self._best = (value, _values(read_best))
        # Every worker reads (reading a sync-on-read variable may be a
        # collective that all must join); only the chief writes.
        arrays = {f"model_{i}": a for i, a in enumerate(_values(read_model))}
        arrays.update({f"optimizer_{i}": a for i, a in enumerate(_values(read_opt))})
        if not self._is_chief():
            return
        best = self._best[1] if self._best is not None else []
        arrays.update({f"best_{i}": a for i, a in enumerate(best)})
        meta = {
            "epoch": epoch + 1,
            "model_paths": [_path(v) for v in model_vars],
            "optimizer_paths": [_path(v) for v in opt_vars],
            "best_count": len(best),
            "best_value": None if self._best is None else self._best[0],
            "monitor": self.monitor,
        }
        self.wait()  # at most one write in flight; the last one is long done
        os.makedirs(self.directory, exist_ok=True)
        self._writer = threading.Thread(
            # Not a daemon: Python's exit waits for the write to finish.
            target=_write_npz,
            args=(self.state_path, arrays, meta),
            daemon=False,
            name="tfp_glow-epoch-checkpoint",
        )
        self._writer.start()

    def wait(self) -> None:
        """Returns when the last epoch's state is on disk (`fit` ends with it)."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None

    def on_train_end(self, logs=None):
        self.wait()
        if not self._is_chief():
            return
        if self.best_path is not None and self._best is not None:
            model_vars, _, read_model, _, _ = self._readers()
            current = _values(read_model)
            try:
                for v, a in zip(model_vars, self._best[1]):
                    v.assign(a)
                self.model.save_weights(self.best_path)
            finally:
                for v, a in zip(model_vars, current):
                    v.assign(a)
        if self.delete_on_end and os.path.exists(self.state_path):
            os.remove(self.state_path)
            if not os.listdir(self.directory):  # ours alone: leave no empty folder
                os.rmdir(self.directory)
