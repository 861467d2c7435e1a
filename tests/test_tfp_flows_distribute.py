"""TFP's own flows under `tf.distribute.MirroredStrategy` (2 logical CPU devices).

For every case of `tests/tfp_flows.py`: the same flow with the same starting
weights, trained by `fit` with SGD on the same batches, once on one device and
once mirrored over two replicas, ends with the same weights, and the two
replicas agree. SGD's update is proportional to the gradient, so a wrong
replica scaling of the loss, a variable left out of the mirrored update, or
TFP's ActNorm initialised from each replica's half batch would all show.

The devices must be split before TensorFlow starts, so the runs happen in a
subprocess (this file run as a script prints one JSON line).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

BATCH = 32
STEPS = 2
LEARNING_RATE = 1e-2


def _worker():
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from tfp_flows import FLOWS, build_model, perturb_all

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    out = {}
    for name, case in FLOWS.items():
        x = case.data(BATCH * STEPS, seed=11)

        def trained(mirrored):
            with strategy.scope() if mirrored else tf.distribute.get_strategy().scope():
                model = perturb_all(build_model(name, seed=0), seed=12, scale=0.1)
                model.compile(keras.optimizers.SGD(LEARNING_RATE))
            start = [w.numpy() for w in model.trainable_weights]
            history = model.fit(x, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
            return model, start, history.history["loss"][0]

        single, single_start, single_loss = trained(False)
        mirrored, mirrored_start, mirrored_loss = trained(True)

        def diff(a, b):
            return max(
                float(np.max(np.abs(np.asarray(u, np.float64) - np.asarray(v, np.float64))))
                for u, v in zip(a, b)
            )

        replicas = [v.value.values for v in mirrored.weights if hasattr(v.value, "values")]
        out[name] = {
            "num_weights": len(single.trainable_weights),
            "num_mirrored": len(replicas),
            "start_diff": diff(single_start, mirrored_start),
            "update_size": diff(single.trainable_weights, single_start),
            "weight_diff": diff(single.weights, mirrored.weights),
            "replica_diff": max(diff([c[0]], [c[1]]) for c in replicas),
            "losses": [single_loss, mirrored_loss],
        }
    print("RESULT " + json.dumps(out))


@pytest.mark.slow
def test_mirrored_fit_matches_one_device_for_every_tfp_flow():
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__)], capture_output=True, text=True, timeout=900
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT ") :])
    for name, r in out.items():
        assert r["num_mirrored"] >= r["num_weights"] > 0, (name, r)
        assert r["start_diff"] == 0.0, (name, r)
        assert r["update_size"] > 1e-4, (name, r)  # the runs did train
        assert r["weight_diff"] <= 1e-5 + 1e-3 * r["update_size"], (name, r)
        assert r["replica_diff"] == 0.0, (name, r)
        np.testing.assert_allclose(r["losses"][0], r["losses"][1], rtol=1e-5, err_msg=name)


if __name__ == "__main__":
    _worker()
