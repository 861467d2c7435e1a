"""Cross-replica and cross-worker helpers: training under `tf.distribute`.

`FlowModel` trains with stock Keras `fit`, `evaluate` and callbacks under
`tf.distribute.MirroredStrategy` (devices of one machine) and
`tf.distribute.MultiWorkerMirroredStrategy` (several processes or machines).
What the stock pieces do not do on their own is here:

* `global_sum`, `global_moments`: statistics of the *global* batch (every
  replica's and every worker's part together), for ActNorm's data-dependent
  init. Each worker passes its own part; the mean and variance of channel `c`
  over the global batch `B = B_1 u ... u B_K` are

      n = sum_k |B_k|,   mean_c = (1/n) sum_k sum_{x in B_k} x_c,
      var_c = (1/n) sum_k sum_{x in B_k} (x_c - mean_c)^2,

  two all-reduces of per-worker sums (the second about the *global* mean, so
  the variance is as accurate as a one-process `tf.nn.moments`).
* `step_logs`: the logs of a train / test step in the shape Keras can reduce
  across workers (Keras 3 reduces them along axis 0, which a scalar lacks:
  tensorflow/tensorflow#72388).
* `BackupAndRestore`, `fit_callbacks`: `keras.callbacks.BackupAndRestore`
  with a shared backup directory, written by the chief only and atomically
  (Keras 3's callback has every worker write the same file); checkpoints,
  CSV and TensorBoard logs written by the chief only.
* `first_step_batch`: this worker's part of the first global batch (the
  batch `fit` initialises ActNorm on).
* `symbolic_build_iterator`: keeps Keras from spending a pass over the data
  before training under a strategy.
* `is_chief`, `in_multi_worker_mode`, `multi_worker_strategy` (from TF_CONFIG
  or a cluster manager's environment).
"""

import json
import os
import shutil
import tempfile
import warnings

import keras
import tensorflow as tf

__all__ = [
    "BackupAndRestore",
    "first_step_batch",
    "fit_callbacks",
    "global_moments",
    "global_sum",
    "in_multi_worker_mode",
    "is_chief",
    "multi_worker_strategy",
    "step_logs",
    "symbolic_build_iterator",
]


def _strategy(strategy):
    return tf.distribute.get_strategy() if strategy is None else strategy


def in_multi_worker_mode(strategy=None):
    """True when `strategy` (default: the current one) spans several workers."""
    strategy = _strategy(strategy)
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return False
    return strategy.num_replicas_in_sync > len(strategy.extended.worker_devices)


def is_chief(strategy=None):
    """True on the worker that writes shared files (task 0, or the `chief` task).

    Every process is the chief outside a multi-worker strategy.
    """
    strategy = _strategy(strategy)
    if not in_multi_worker_mode(strategy):
        return True
    resolver = strategy.cluster_resolver
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief


def global_sum(tensor):
    """`tensor` summed over the parts of the global batch.

    * In a replica context (`strategy.run`), each replica holds its own part:
      the sum over all replicas (of all workers).
    * In the cross-replica context (eager, inside `strategy.scope()`, e.g.
      `FlowModel.initialize`), this process holds its worker's part (its whole
      local batch, which the worker's own replicas would split): the sum over
      workers, each worker counted once. One worker: `tensor` unchanged.
    * Without a strategy: `tensor` unchanged.

    Every replica / worker must make the same calls in the same order (they
    are collective operations).
    """
    tensor = tf.convert_to_tensor(tensor)
    if not tf.distribute.in_cross_replica_context():
        ctx = tf.distribute.get_replica_context()
        if ctx.num_replicas_in_sync == 1:
            return tensor
        return ctx.all_reduce(tf.distribute.ReduceOp.SUM, tensor)
    strategy = tf.distribute.get_strategy()
    local = len(strategy.extended.worker_devices)
    if strategy.num_replicas_in_sync == local:
        return tensor  # one worker: its batch is the global batch
    zeros = tf.zeros_like(tensor)

    def first_local_replica_only(ctx):
        # Replica ids run worker by worker, `local` per worker: the first
        # local replica carries the worker's sum, the others add zeros.
        return tensor if ctx.replica_id_in_sync_group % local == 0 else zeros

    parts = strategy.experimental_distribute_values_from_function(first_local_replica_only)
    return strategy.reduce(tf.distribute.ReduceOp.SUM, parts, axis=None)


def _needs_reduction():
    if not tf.distribute.in_cross_replica_context():
        return tf.distribute.get_replica_context().num_replicas_in_sync > 1
    strategy = tf.distribute.get_strategy()
    return strategy.num_replicas_in_sync > len(strategy.extended.worker_devices)


def global_moments(x, axes):
    """`(mean, variance)` of `x` over `axes`, over the global batch (see `global_sum`).

        n = sum over parts of their sizes along `axes`
        mean = (1/n) sum x,   variance = (1/n) sum (x - mean)^2

    Where nothing is to be reduced this is `tf.nn.moments(x, axes)` itself,
    so a one-process (or one-worker `MirroredStrategy`) init is unchanged.
    """
    x = tf.convert_to_tensor(x)
    if not _needs_reduction():
        return tf.nn.moments(x, axes=axes)
    axes = list(axes)
    count = tf.cast(tf.reduce_prod(tf.gather(tf.shape(x), axes)), x.dtype)
    sums = tf.reduce_sum(x, axis=axes, keepdims=True)
    totals = global_sum(tf.concat([tf.reshape(sums, [-1]), [count]], axis=0))
    n = totals[-1]
    mean = tf.reshape(totals[:-1] / n, tf.shape(sums))
    squares = tf.reduce_sum(tf.math.squared_difference(x, mean), axis=axes, keepdims=True)
    variance = tf.reshape(global_sum(tf.reshape(squares, [-1])) / n, tf.shape(squares))
    return tf.squeeze(mean, axes), tf.squeeze(variance, axes)


def step_logs(logs):
    """The logs of a train / test step, reducible by Keras across workers.

    Under a multi-worker strategy Keras 3 reduces each log with
    `strategy.reduce("MEAN", value, axis=0)` (the mean over replicas *and*
    axis 0), which fails for a scalar ("Invalid reduction dimension 0 for
    input with 0 dimensions", tensorflow/tensorflow#72388). A scalar reshaped
    to `[1]` reduces to the same scalar. Elsewhere the logs are unchanged.
    """
    if not in_multi_worker_mode():
        return logs
    return {
        k: (tf.reshape(v, [1]) if tf.convert_to_tensor(v).shape.rank == 0 else v)
        for k, v in logs.items()
    }


def _autoshard_off(dataset):
    policy = dataset.options().experimental_distribute.auto_shard_policy
    return policy == tf.data.experimental.AutoShardPolicy.OFF


def first_step_batch(data, strategy=None):
    """This process's part of the first global batch that `fit` will train on.

    `data` is a `tf.data.Dataset` or a `tf.distribute.DistributedDataset`
    (`strategy.experimental_distribute_dataset`,
    `strategy.distribute_datasets_from_function`). On one worker a dataset's
    first element *is* the global batch. Across workers, the element is
    taken from the dataset distributed as `fit` distributes it, and this
    worker's replicas' parts are concatenated: with `global_moments` that
    gives the statistics of exactly the first global batch, whatever the
    sharding (`tf.data` autosharding of one shared pipeline, or
    `distribute_datasets_from_function` with one pipeline per worker).

    Warns for a plain dataset with autosharding off across workers: TF then
    splits each of its batches into one part per worker (its batch size is
    the *global* batch size), so every worker walks all parts while Keras
    counts one step per batch, and an epoch sees 1/num_workers of the data
    (use `strategy.distribute_datasets_from_function` for per-worker data).
    """
    strategy = _strategy(strategy)
    if isinstance(data, tf.data.Dataset):
        if not in_multi_worker_mode(strategy):
            return next(iter(data))
        if _autoshard_off(data):
            warnings.warn(
                "A tf.data.Dataset with autosharding off under a multi-worker strategy: "
                "TensorFlow splits each of its batches (the global batch) into one part "
                "per worker, and every worker walks all the parts while Keras runs one "
                "step per batch, so an epoch covers 1/num_workers of each worker's data. "
                "For per-worker data pass strategy.distribute_datasets_from_function("
                "lambda ctx: dataset_batched_per_replica) to fit; for one shared pipeline "
                "leave autosharding on.",
                stacklevel=3,
            )
        data = strategy.experimental_distribute_dataset(data)
    element = next(iter(data))
    return tf.nest.map_structure(
        lambda v: tf.concat(strategy.experimental_local_results(v), axis=0), element
    )


def symbolic_build_iterator(model, iterator):
    """The data iterator Keras' `_maybe_symbolic_build` may draw from, or None.

    Keras' TensorFlow trainer, for a model made under a strategy, builds it
    symbolically before `fit` / `evaluate` / `predict` from a batch it draws
    from a *fresh pass* over the data. A `FlowModel` creates every variable
    in its constructor, so nothing needs that batch; the extra pass, though,
    advances a reshuffling pipeline (`shuffle(reshuffle_each_iteration=True)`,
    fresh dequantization noise), and the same `fit` then trained on other
    batches under `MirroredStrategy` than on one device (measured: the first
    SGD step already 1e-3 apart). None (no draw) when the model and its
    compiled metrics and loss are built; else `iterator`.
    """
    needs_data = (
        not all(layer.built for layer in model._flatten_layers())
        or getattr(model, "_compile_metrics", None) is not None
        or getattr(model, "_compile_loss", None) is not None
    )
    return iterator if needs_data else None


class BackupAndRestore(keras.callbacks.BackupAndRestore):
    """`keras.callbacks.BackupAndRestore` for a backup directory shared by all workers.

    Under synchronous data-parallel training every worker holds the same
    weights, so the chief alone writes the backup; every worker reads it when
    the job restarts (the directory must be on storage every worker sees).
    The weights file and the epoch file are written under temporary names and
    then renamed, so a worker killed while saving leaves the previous backup
    intact. When training starts, the workers check that they all restored
    the same epoch (a `RuntimeError` on every worker if not: the directory is
    not shared). At the end of training only the chief deletes the directory.
    Outside a multi-worker strategy it behaves like Keras' callback, with the
    atomic writes.
    """

    @classmethod
    def from_keras(cls, callback):
        """The same backup (directory, frequency, options) as a Keras callback."""
        return cls(
            callback.backup_dir,
            save_freq=callback.save_freq,
            double_checkpoint=callback.double_checkpoint,
            delete_checkpoint=callback.delete_checkpoint,
        )

    def _save_model(self):
        if not is_chief(self.model.distribute_strategy):
            # Every worker saves, as tf.keras did: reading a distributed
            # variable may be a collective operation (a sync-on-read variable
            # summed over replicas) that every worker must join. Only the
            # chief's file is kept.
            scratch = tempfile.mkdtemp(prefix="backup_worker_")
            try:
                self.model.save_weights(os.path.join(scratch, "latest.weights.h5"))
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            return
        tf.io.gfile.makedirs(self.backup_dir)
        if self.double_checkpoint and tf.io.gfile.exists(self._weights_path):
            tf.io.gfile.copy(self._weights_path, self._prev_weights_path, overwrite=True)
        if self.double_checkpoint and tf.io.gfile.exists(self._training_metadata_path):
            tf.io.gfile.copy(
                self._training_metadata_path, self._prev_training_metadata_path, overwrite=True
            )
        # Weights first, then the epoch: a kill in between leaves the new
        # weights with the old epoch number, and the resumed run repeats an
        # epoch instead of skipping one.
        weights_tmp = os.path.join(self.backup_dir, "saving.weights.h5")
        self.model.save_weights(weights_tmp, overwrite=True)
        tf.io.gfile.rename(weights_tmp, self._weights_path, overwrite=True)
        metadata_tmp = self._training_metadata_path + ".saving"
        with tf.io.gfile.GFile(metadata_tmp, "w") as f:
            f.write(json.dumps({"epoch": self._current_epoch, "batch": self._last_batch_seen}))
        tf.io.gfile.rename(metadata_tmp, self._training_metadata_path, overwrite=True)

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        strategy = self.model.distribute_strategy
        if not in_multi_worker_mode(strategy):
            return
        epoch = 0.0
        if tf.io.gfile.exists(self._training_metadata_path):
            with tf.io.gfile.GFile(self._training_metadata_path) as f:
                epoch = float(json.loads(f.read())["epoch"])
        # All workers restored the same epoch iff (sum e)^2 = K sum e^2 over
        # the K workers. A worker that cannot see the chief's backup would
        # otherwise train on from other weights and another epoch.
        with strategy.scope():
            total, squares = global_sum(tf.constant([epoch, epoch * epoch], tf.float64)).numpy()
        workers = strategy.num_replicas_in_sync // len(strategy.extended.worker_devices)
        if total * total != workers * squares:
            raise RuntimeError(
                f"BackupAndRestore: the workers restored different epochs from "
                f"{self.backup_dir!r} (this worker: {int(epoch)}). Only the chief writes "
                "the backup, so the directory must be on storage every worker sees (a "
                "shared file system, gs://, s3://)."
            )

    def on_train_end(self, logs=None):
        if is_chief(self.model.distribute_strategy):
            super().on_train_end(logs)


# Keras callbacks that write files named by the user: across workers they
# would all write the same files (an h5 written twice at once fails with
# "unable to lock file"); the chief's copy is the one to keep.
_CHIEF_ONLY = (
    keras.callbacks.ModelCheckpoint,
    keras.callbacks.CSVLogger,
    keras.callbacks.TensorBoard,
)


def fit_callbacks(callbacks, strategy=None):
    """The callbacks given to `fit` (None, one callback or a list) as a list,
    ready for `strategy`. `FlowModel.fit` applies it.

    Under a multi-worker strategy each stock `keras.callbacks.BackupAndRestore`
    becomes this module's `BackupAndRestore` (same settings), and workers
    other than the chief leave out `ModelCheckpoint`, `CSVLogger` and
    `TensorBoard` (their logs are the chief's: the strategy reduces them).
    Elsewhere the list is unchanged.
    """
    if callbacks is None:
        callbacks = []
    elif isinstance(callbacks, keras.callbacks.Callback):
        callbacks = [callbacks]
    if not in_multi_worker_mode(strategy):
        return list(callbacks)
    chief = is_chief(strategy)
    ready = []
    for callback in callbacks:
        if type(callback) is keras.callbacks.BackupAndRestore:
            callback = BackupAndRestore.from_keras(callback)
        elif not chief and isinstance(callback, _CHIEF_ONLY):
            continue
        ready.append(callback)
    return ready


def multi_worker_strategy(
    cluster_resolver: tf.distribute.cluster_resolver.ClusterResolver | None = None,
    communication: str = "auto",
) -> tf.distribute.MultiWorkerMirroredStrategy:
    """A `tf.distribute.MultiWorkerMirroredStrategy` for this process.

    The cluster comes from `cluster_resolver` if given; else from the
    `TF_CONFIG` environment variable (`TFConfigClusterResolver`, what
    TensorFlow's own tooling and Kubernetes operators set); else, inside a
    Slurm job (`SLURM_JOB_ID` set), from Slurm's environment
    (`SlurmClusterResolver`: one worker per task). Create it at the start of
    the program, before other TensorFlow work.

    Args:
      cluster_resolver: a `tf.distribute.cluster_resolver.ClusterResolver`, or None.
      communication: `"auto"`, `"ring"` (gRPC) or `"nccl"` (GPUs).
    """
    implementations = {
        "auto": tf.distribute.experimental.CommunicationImplementation.AUTO,
        "ring": tf.distribute.experimental.CommunicationImplementation.RING,
        "nccl": tf.distribute.experimental.CommunicationImplementation.NCCL,
    }
    if communication not in implementations:
        raise ValueError(
            f"`communication` must be one of {sorted(implementations)}; received {communication!r}."
        )
    resolvers = tf.distribute.cluster_resolver
    if cluster_resolver is None:
        if os.environ.get("TF_CONFIG"):
            cluster_resolver = resolvers.TFConfigClusterResolver()
        elif os.environ.get("SLURM_JOB_ID"):
            cluster_resolver = resolvers.SlurmClusterResolver()
        else:
            raise ValueError(
                "Multi-worker training needs the cluster: set TF_CONFIG (see the README, "
                "'Training on several machines'), run inside a Slurm job, or pass "
                "`cluster_resolver`."
            )
    options = tf.distribute.experimental.CommunicationOptions(
        implementation=implementations[communication]
    )
    return tf.distribute.MultiWorkerMirroredStrategy(
        cluster_resolver=cluster_resolver, communication_options=options
    )
