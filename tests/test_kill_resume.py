"""A training run killed with SIGKILL in the middle of an epoch resumes from
`keras.callbacks.BackupAndRestore` (or from tfp_glow's `EpochCheckpoint`,
what `tfp-glow train` uses, whose state is written on a background thread)
and ends with the same weights as a run that was never interrupted.

Keras 3's `BackupAndRestore` restores the weights, the optimizer state and
the epoch number, but not the position inside an epoch: a resumed run
restarts the interrupted epoch from its first batch. So the backup is taken
at the end of every epoch (`save_freq="epoch"`), the run is killed during
epoch 2, and the resumed run repeats epoch 2 from its start. For the weights
to match, the data must be the same in every epoch of every process: no
shuffling and one fixed dequantisation draw (`preprocess(..., seed=...)`).
The model is `Glow`'s and `compile()`'s defaults (dropout, variational
dequantization, Polyak averaging): the resumed run must draw the dropout
masks the uninterrupted one drew and end with the same weights' average.
Each run is a separate Python process, as a preempted job would be.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

# Training processes killed and resumed: CI's slow step.
pytestmark = pytest.mark.slow

EPOCHS = 3
SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    import numpy as np
    import tensorflow as tf
    import keras
    import tfp_glow
    from tfp_glow import data

    backup_dir, out, log, sleep, kind = sys.argv[1:6]
    sleep = float(sleep)
    keras.utils.set_random_seed(0)
    images = data.load_digits("train")[0][:256]
    # One fixed dequantisation draw: every epoch, in every process, sees the same data.
    x = data.preprocess(images, data.DIGITS_NUM_BINS, dequantize=True, seed=1234).numpy()
    ds = tf.data.Dataset.from_tensor_slices(x).batch(32)  # 8 batches, no shuffle
    model = tfp_glow.Glow((8, 8, 1), levels=1, steps_per_level=2, hidden_channels=8,
                          num_bins=data.DIGITS_NUM_BINS)
    # The defaults: dropout (masks keyed by the step), variational
    # dequantization, and the recommended optimizer's Polyak averaging. After
    # `fit` the model holds the average, so the comparison below checks that
    # the backup carried the average and the step count across the kill.
    model.compile()
    assert model.optimizer.use_ema and model.dequantizer is not None

    class Log(keras.callbacks.Callback):
        def _write(self, text):
            with open(log, "a") as f:
                f.write(text + "\\n")
                f.flush()
                os.fsync(f.fileno())

        def on_epoch_begin(self, epoch, logs=None):
            self._write(f"begin {epoch}")

        def on_train_batch_end(self, batch, logs=None):
            self._write(f"batch {batch}")
            time.sleep(sleep)  # a window for the test to kill us mid-epoch

        def on_epoch_end(self, epoch, logs=None):
            self._write(f"end {epoch}")  # after BackupAndRestore (listed first) saved

    np.savez(out.replace(".npz", "_init.npz"), *model.get_weights())
    if kind == "keras":
        backup = keras.callbacks.BackupAndRestore(backup_dir, save_freq="epoch")
    else:
        backup = tfp_glow.training.EpochCheckpoint(backup_dir)
    model.fit(ds, epochs={epochs}, verbose=0, callbacks=[backup, Log()])
    np.savez(out, *model.get_weights())
    with open(log, "a") as f:
        f.write("done\\n")
""".replace("{epochs}", str(EPOCHS))
)


def _start(script, tmp_path, name, sleep, kind, log_name=None):
    log = tmp_path / f"{log_name or name}.log"
    log.write_text("")
    args = [
        sys.executable,
        str(script),
        str(tmp_path / f"{name}_backup"),
        str(tmp_path / f"{name}.npz"),
        str(log),
        str(sleep),
        kind,
    ]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True
    ), log


def _lines(log):
    return log.read_text().split()


BACKUP_FILES = {"keras": "latest.weights.h5", "tfp_glow": "state.npz"}


@pytest.mark.parametrize("kind", ["keras", "tfp_glow"])
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path, kind):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    # The reference run and the run to be killed go side by side (2 cores).
    reference, reference_log = _start(script, tmp_path, "reference", 0.0, kind)
    victim, victim_log = _start(script, tmp_path, "victim", 0.5, kind)
    backup_file = tmp_path / "victim_backup" / BACKUP_FILES[kind]
    deadline = time.time() + 240
    while time.time() < deadline:
        text = victim_log.read_text()
        # Epoch 1 (index 0) ended and its backup is on disk; 2 batches into
        # epoch 2. EpochCheckpoint writes on a background thread, so under load
        # the file can land a few batches after "end 0": wait for it (each
        # victim batch sleeps 0.5 s, so epoch 2 lasts at least 4 s).
        if (
            "end 0" in text
            and text.split("begin 1", 1)[-1].count("batch") >= 2
            and backup_file.exists()
        ):
            break
        assert victim.poll() is None, victim.communicate()[0][-3000:]
        time.sleep(0.02)
    else:
        pytest.fail("the victim run never reached the middle of epoch 2")
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    killed_log = _lines(victim_log)
    assert "end 1" not in " ".join(killed_log) and "done" not in killed_log
    assert backup_file.exists()
    assert not (tmp_path / "victim.npz").exists()

    # Same command again: it restores epoch 1's backup and restarts epoch 2.
    resumed, resumed_log = _start(script, tmp_path, "victim", 0.0, kind, log_name="resumed")
    out_resumed = resumed.communicate(timeout=240)[0]
    out_reference = reference.communicate(timeout=240)[0]
    assert resumed.returncode == 0, out_resumed[-3000:]
    assert reference.returncode == 0, out_reference[-3000:]
    # The killed process logged "begin 0 ... end 0 begin 1 batch 0 ...", the
    # resumed one starts at "begin 1", from batch 0, and never runs epoch 1 again.
    second = _lines(resumed_log)
    assert " ".join(second[:4]) == "begin 1 batch 0" and "begin 0" not in " ".join(second)
    assert second[-1] == "done" and " ".join(second).count("begin") == EPOCHS - 1
    assert " ".join(_lines(reference_log)).count("begin") == EPOCHS

    ref = np.load(tmp_path / "reference.npz")
    res = np.load(tmp_path / "victim.npz")
    assert len(ref.files) == len(res.files) > 10
    worst = max(float(np.max(np.abs(ref[k] - res[k]))) for k in ref.files)
    print(
        f"\n[kill-resume] max |w_resumed - w_uninterrupted| = {worst:.3e} "
        f"over {len(ref.files)} weight tensors"
    )
    for k in ref.files:
        np.testing.assert_allclose(res[k], ref[k], rtol=0, atol=1e-6)
    # Training moved the weights, so the comparison is not trivially true.
    init = np.load(tmp_path / "reference_init.npz")
    assert max(float(np.max(np.abs(ref[k] - init[k]))) for k in ref.files) > 1e-3
