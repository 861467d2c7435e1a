"""`tf.distribute.MirroredStrategy` over 2 logical CPU devices.

Splitting the CPU into logical devices must happen before TensorFlow
initialises its runtime, which the rest of the test session has long done,
so the distributed run happens in a subprocess: this file run as a script
(`python tests/test_distribute.py`) prints one JSON line of measurements and
the test asserts on them.

What is measured, on the same data and the same starting weights:

* `initialize(batch)` under the strategy: the ActNorm variables of both
  replicas, against each other and against a one-device init.
* two `fit` steps with SGD (whose update is proportional to the gradient, so
  a wrong replica scaling of the loss would show; Adam's first step would
  hide a constant factor): the reported losses and the weights afterwards,
  against the same two steps on one device.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

BATCH = 64
STEPS = 2
LEARNING_RATE = 1e-3


def _worker():
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

    import keras

    import tfp_glow
    from tfp_glow.data import DIGITS_NUM_BINS, load_digits, preprocess

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])

    def build():
        return tfp_glow.Glow(image_shape=(8, 8, 1), levels=2, steps_per_level=2,
                             hidden_channels=16, num_bins=DIGITS_NUM_BINS)

    keras.utils.set_random_seed(0)
    single = build()
    with strategy.scope():
        mirrored = build()
    mirrored.set_weights(single.get_weights())
    images, _ = load_digits("train")
    x = np.asarray(preprocess(images[:BATCH * STEPS], DIGITS_NUM_BINS, seed=0))

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

    def train(model):
        model.compile(keras.optimizers.SGD(LEARNING_RATE))
        data = tf.data.Dataset.from_tensor_slices(x).batch(BATCH)
        losses = []
        for _ in range(STEPS):  # one step per fit, to read each step's loss
            history = model.fit(data.take(1), epochs=1, verbose=0)
            losses.append(history.history["loss"][0])
            data = data.skip(1)
        return losses

    out["single_losses"] = train(single)
    out["mirrored_losses"] = train(mirrored)
    after_single, after_mirrored = single.get_weights(), mirrored.get_weights()
    out["weight_diff"] = max(float(np.max(np.abs(a - b)))
                             for a, b in zip(after_single, after_mirrored))
    out["update_size"] = max(float(np.max(np.abs(a - b)))
                             for a, b in zip(after_single, weights_before))
    out["replica_weight_diff"] = max(
        float(np.max(np.abs(c[0].numpy() - c[1].numpy())))
        for c in (v.value.values for v in mirrored.trainable_variables))
    # The model's own evaluation loss equals one device's on the same data.
    out["single_log_prob"] = single.log_prob(x).numpy().tolist()
    out["mirrored_log_prob"] = mirrored.log_prob(x).numpy().tolist()
    print("RESULT " + json.dumps(out), flush=True)


@pytest.fixture(scope="module")
def measured():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (
        f"worker failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
        f"{proc.stderr[-5000:]}")
    return json.loads(lines[-1][len("RESULT "):])


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
    print(f"losses: one device {single}, mirrored {mirrored}; weight diff "
          f"{measured['weight_diff']:.2e} after updates of {measured['update_size']:.2e}")
    assert len(single) == len(mirrored) == STEPS
    np.testing.assert_allclose(mirrored, single, atol=1e-4, rtol=0)
    # SGD moved the weights by a lot more than the tolerance, and both runs
    # moved them the same way (a missing 1/replicas would double the step).
    assert measured["update_size"] > 1e-3
    assert measured["weight_diff"] <= 1e-5
    assert measured["replica_weight_diff"] == 0.0
    np.testing.assert_allclose(measured["mirrored_log_prob"], measured["single_log_prob"],
                               atol=1e-4, rtol=0)


if __name__ == "__main__":
    _worker()
