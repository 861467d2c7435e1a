"""`tf.distribute.MirroredStrategy` over 2 logical CPU devices.

Splitting the CPU into logical devices must happen before TensorFlow
initialises its runtime, which the rest of the test session has long done,
so the distributed run happens in a subprocess: this file run as a script
(`python tests/test_distribute.py`) prints one JSON line of measurements and
the test asserts on them.

What is measured, on the same data and the same starting weights, with SGD
(whose update is proportional to the gradient, so a wrong replica scaling of
the loss would show; Adam's first step would hide a constant factor):

* `initialize(batch)` under the strategy: the ActNorm variables of both
  replicas, against each other and against a one-device init.
* `fit` from an uninitialised model on a reshuffling pipeline
  (`tfp_glow.data.digits_dataset`: new order and new dequantization noise at
  every pass): fit's own ActNorm init and the weights after several steps,
  on both replicas and against the same `fit` on one device. (Keras used to
  spend one pass of such a pipeline before training under a strategy, so the
  two trained on different batches: `tfp_glow.training.distributed.symbolic_build_iterator`.)
* a `fit` interrupted mid-epoch (an exception, as a preempted job) and
  resumed by `keras.callbacks.BackupAndRestore` in a fresh model under the
  strategy: the same weights as an uninterrupted run.
"""

import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest

# One subprocess running every mirrored fit (minutes on 2 cores): CI's slow step.
pytestmark = pytest.mark.slow

BATCH = 64
STEPS = 2  # the initialize + fit steps of the first check
FIT_STEPS = 3  # per epoch, reshuffling pipeline
FIT_EPOCHS = 2
LEARNING_RATE = 1e-3


def _worker():
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

    import keras

    import tfp_glow
    from tfp_glow.data import DIGITS_NUM_BINS, digits_dataset, load_digits, preprocess

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])

    def build(mirrored, dropout=0.0):
        # Without dropout unless asked: with it each replica draws masks of
        # its own, so a mirrored step is not one device's step on the same
        # batch. (Glow's default variational dequantization stays on.)
        keras.utils.set_random_seed(0)
        with strategy.scope() if mirrored else tf.distribute.get_strategy().scope():
            model = tfp_glow.Glow(
                image_shape=(8, 8, 1),
                levels=2,
                steps_per_level=2,
                hidden_channels=16,
                num_bins=DIGITS_NUM_BINS,
                dropout=dropout,
            )
            model.compile(keras.optimizers.SGD(LEARNING_RATE))
        return model

    def replica_diff(model, variables=None):
        return max(
            float(np.max(np.abs(c[0].numpy() - c[1].numpy())))
            for c in (v.value.values for v in (variables or model.weights))
        )

    def max_diff(a, b):
        return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))

    # -- initialize(batch), then one-step fits --------------------------------
    single, mirrored = build(False), build(True)
    mirrored.set_weights(single.get_weights())
    images, _ = load_digits("train")
    x = np.asarray(preprocess(images[: BATCH * STEPS], DIGITS_NUM_BINS, seed=0))

    single.initialize(x[:BATCH])
    mirrored.initialize(x[:BATCH])
    out = {"num_replicas": strategy.num_replicas_in_sync, "actnorm": {}}
    single_values = {v.path: v.numpy() for v in single.weights}
    for v in mirrored.weights:
        if "act_norm" not in v.path:
            continue
        replicas = [np.asarray(c.numpy()) for c in v.value.values]
        out["actnorm"][v.path] = {
            "num_components": len(replicas),
            "devices": sorted(c.device for c in v.value.values),
            "replica_diff": float(np.max(np.abs(replicas[0] - replicas[1]))),
            "single_diff": float(np.max(np.abs(replicas[0] - single_values[v.path]))),
            "max_abs": float(np.max(np.abs(replicas[0]))),
        }
    weights_before = [w.copy() for w in single.get_weights()]

    def train_steps(model):
        data = tf.data.Dataset.from_tensor_slices(x).batch(BATCH)
        losses = []
        for _ in range(STEPS):  # one step per fit, to read each step's loss
            history = model.fit(data.take(1), epochs=1, verbose=0)
            losses.append(history.history["loss"][0])
            data = data.skip(1)
        return losses

    out["single_losses"] = train_steps(single)
    out["mirrored_losses"] = train_steps(mirrored)
    out["weight_diff"] = max_diff(single.get_weights(), mirrored.get_weights())
    out["update_size"] = max_diff(single.get_weights(), weights_before)
    out["replica_weight_diff"] = replica_diff(mirrored, mirrored.trainable_variables)
    # The model's own evaluation loss equals one device's on the same data.
    out["single_log_prob"] = single.log_prob(x).numpy().tolist()
    out["mirrored_log_prob"] = mirrored.log_prob(x).numpy().tolist()

    # -- fit from scratch on a reshuffling pipeline ---------------------------
    class RecordInit(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.actnorm = [v.numpy() for v in self.model.weights if "act_norm" in v.path]
            self.start = self.model.get_weights()
            if hasattr(self.model.weights[0].value, "values"):
                self.replica_diff = replica_diff(
                    self.model, [v for v in self.model.weights if "act_norm" in v.path]
                )

    def fit_from_scratch(mirrored):
        model, record = build(mirrored), RecordInit()
        history = model.fit(
            digits_dataset(batch_size=BATCH, seed=0),
            epochs=FIT_EPOCHS,
            steps_per_epoch=FIT_STEPS,
            verbose=0,
            callbacks=[record],
        )
        return model, record, history.history["loss"]

    fit_single, single_record, out["fit_single_losses"] = fit_from_scratch(False)
    fit_mirrored, mirrored_record, out["fit_mirrored_losses"] = fit_from_scratch(True)
    out["fit_start_diff"] = max_diff(single_record.start, mirrored_record.start)
    out["fit_init_diff"] = max_diff(single_record.actnorm, mirrored_record.actnorm)
    out["fit_init_replica_diff"] = mirrored_record.replica_diff
    out["fit_init_num_actnorm"] = len(mirrored_record.actnorm)
    out["fit_weight_diff"] = max_diff(fit_single.get_weights(), fit_mirrored.get_weights())
    out["fit_update_size"] = max_diff(fit_single.get_weights(), single_record.start)
    out["fit_replica_weight_diff"] = replica_diff(fit_mirrored)

    # -- interrupted mid-epoch, resumed from BackupAndRestore -----------------
    fixed = tf.data.Dataset.from_tensor_slices(
        np.asarray(preprocess(images[: BATCH * FIT_STEPS], DIGITS_NUM_BINS, seed=1))
    ).batch(BATCH)

    class Preempted(Exception):
        pass

    class Interrupt(keras.callbacks.Callback):
        def __init__(self, at):
            super().__init__()
            self.at, self.epoch = at, None

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_end(self, batch, logs=None):
            if (self.epoch, batch) == self.at:
                raise Preempted(f"epoch {self.epoch}, batch {batch}")

    def fit_fixed(backup_dir, interrupt_at=None):
        # Glow's default dropout: its masks are a function of (step, replica),
        # so the resumed run drops what the uninterrupted run dropped.
        model, record, epochs = build(True, dropout=0.2), RecordInit(), []
        logger = keras.callbacks.LambdaCallback(on_epoch_begin=lambda e, logs: epochs.append(e))
        try:
            model.fit(
                fixed,
                epochs=3,
                verbose=0,
                callbacks=[
                    record,
                    keras.callbacks.BackupAndRestore(backup_dir),
                    Interrupt(interrupt_at),
                    logger,
                ],
            )
        except Preempted:
            pass
        return model, record, epochs

    with tempfile.TemporaryDirectory() as tmp:
        uninterrupted, record, _ = fit_fixed(os.path.join(tmp, "a"))
        _, _, epochs_killed = fit_fixed(os.path.join(tmp, "b"), interrupt_at=(1, 1))
        resumed, _, epochs_resumed = fit_fixed(os.path.join(tmp, "b"))
    out["resume_epochs"] = [epochs_killed, epochs_resumed]
    out["resume_weight_diff"] = max_diff(uninterrupted.get_weights(), resumed.get_weights())
    out["resume_replica_weight_diff"] = replica_diff(resumed)
    out["resume_update_size"] = max_diff(uninterrupted.get_weights(), record.start)
    # -- Polyak averaging (model.compile()'s default) under the strategy -------
    keras.utils.set_random_seed(0)
    with strategy.scope():
        averaged = tfp_glow.Glow(
            image_shape=(8, 8, 1),
            levels=2,
            steps_per_level=2,
            hidden_channels=16,
            num_bins=DIGITS_NUM_BINS,
        )
        averaged.compile()
    history = averaged.fit(
        fixed,
        epochs=2,
        verbose=0,
        validation_data=fixed,
        callbacks=[tfp_glow.WithAveragedWeights()],
    )
    out["averaged_val"] = history.history["val_bits_per_dim"]
    out["averaged_eval"] = averaged.evaluate(fixed, verbose=0, return_dict=True)["bits_per_dim"]
    out["averaged_replica_diff"] = replica_diff(averaged)
    # Each replica's dropout seed: (step, replica id).
    from tfp_glow.training.flow_model import _dropout_seed

    seeds = strategy.run(tf.function(lambda: _dropout_seed(resumed.optimizer)))
    out["replica_dropout_seeds"] = [s.numpy().tolist() for s in seeds.values]
    print("RESULT " + json.dumps(out), flush=True)


@pytest.fixture(scope="module")
def measured():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (
        f"worker failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    )
    return json.loads(lines[-1][len("RESULT ") :])


def test_actnorm_init_is_identical_on_every_replica_and_equals_one_device(measured):
    assert measured["num_replicas"] == 2
    actnorm = measured["actnorm"]
    # 2 levels x 2 steps = 4 ActNorms, each with log_scale, bias, initialized.
    assert len(actnorm) == 12
    for path, stats in actnorm.items():
        assert stats["num_components"] == 2, path
        assert stats["devices"][0] != stats["devices"][1], path
        assert stats["replica_diff"] == 0.0, path
        assert stats["single_diff"] <= 1e-6, path
        assert stats["max_abs"] > 0.0, path  # the init really ran


def test_fit_under_mirrored_strategy_matches_one_device(measured):
    single, mirrored = measured["single_losses"], measured["mirrored_losses"]
    print(
        f"losses: one device {single}, mirrored {mirrored}; weight diff "
        f"{measured['weight_diff']:.2e} after updates of {measured['update_size']:.2e}"
    )
    assert len(single) == len(mirrored) == STEPS
    np.testing.assert_allclose(mirrored, single, atol=1e-4, rtol=0)
    # SGD moved the weights by a lot more than the tolerance, and both runs
    # moved them the same way (a missing 1/replicas would double the step).
    assert measured["update_size"] > 1e-3
    assert measured["weight_diff"] <= 1e-5
    assert measured["replica_weight_diff"] == 0.0
    np.testing.assert_allclose(
        measured["mirrored_log_prob"], measured["single_log_prob"], atol=1e-4, rtol=0
    )


def test_fit_initialises_and_trains_like_one_device_on_a_reshuffling_pipeline(measured):
    m = measured
    print(
        f"\n[mirrored fit] init: replicas {m['fit_init_replica_diff']:.1e}, vs one device "
        f"{m['fit_init_diff']:.1e}; weights after {FIT_STEPS * FIT_EPOCHS} SGD steps: "
        f"{m['fit_weight_diff']:.1e} (moved {m['fit_update_size']:.2e}); losses "
        f"{m['fit_single_losses']} vs {m['fit_mirrored_losses']}"
    )
    assert m["fit_init_num_actnorm"] == 12
    assert m["fit_init_replica_diff"] == 0.0
    assert m["fit_init_diff"] <= 1e-6
    assert m["fit_start_diff"] <= 1e-6  # same init weights, same first batch
    assert m["fit_update_size"] > 1e-2
    assert m["fit_weight_diff"] <= 1e-5
    assert m["fit_replica_weight_diff"] == 0.0
    np.testing.assert_allclose(m["fit_mirrored_losses"], m["fit_single_losses"], atol=1e-4, rtol=0)


def test_interrupted_fit_resumes_from_backup_like_an_uninterrupted_run(measured):
    killed, resumed = measured["resume_epochs"]
    assert killed == [0, 1] and resumed == [1, 2]  # restarts the interrupted epoch
    print(
        f"\n[mirrored resume] weights vs uninterrupted: {measured['resume_weight_diff']:.1e} "
        f"(training moved them {measured['resume_update_size']:.2e})"
    )
    assert measured["resume_weight_diff"] <= 1e-6
    assert measured["resume_replica_weight_diff"] == 0.0
    assert measured["resume_update_size"] > 1e-3


def test_validation_sees_the_average_and_replicas_stay_equal(measured):
    """`model.compile()` (Polyak averaging) with `WithAveragedWeights` under
    MirroredStrategy: the last validation is the model `fit` leaves."""
    assert measured["averaged_val"][-1] == pytest.approx(measured["averaged_eval"], abs=1e-6)
    assert measured["averaged_val"][0] > measured["averaged_val"][-1]
    assert measured["averaged_replica_diff"] == 0.0


def test_replicas_draw_dropout_masks_of_their_own(measured):
    # The resumed run ended after 3 epochs of FIT_STEPS batches.
    step = 3 * FIT_STEPS
    assert measured["replica_dropout_seeds"] == [[step, 0], [step, 1]]


if __name__ == "__main__":
    _worker()
