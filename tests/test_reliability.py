"""Stable-by-default training: five seeds without a NaN, the NaN/inf guard
(raise and skip, on one device and under MirroredStrategy), no poisoned
checkpoint, warmup and gradient clipping, and a 1x1 conv that cannot become
singular."""

import math
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfp_glow
from tfp_glow import data
from tfp_glow.bijectors import InvertibleConv1x1
from tfp_glow.training import WarmupSchedule

TINY = dict(
    image_shape=(8, 8, 1),
    levels=1,
    steps_per_level=2,
    hidden_channels=8,
    num_bins=data.DIGITS_NUM_BINS,
)
BATCH = 32
POISONED_BATCH = 5


def _reset_optimizer(optimizer):
    # Fresh moments and step count; the learning rate variable stays.
    for v in optimizer.variables:
        if v.name != "learning_rate":
            v.assign(tf.zeros_like(v))


# ------------------------------------------------------------ five seeds


@pytest.mark.slow
def test_five_seeds_of_affine_glow_train_on_digits_without_nan():
    """Five independent runs: per seed a fresh initialisation (weights and 1x1
    conv rotations drawn from the seed), fresh Adam state, ActNorm
    re-initialised on the seed's first batch, and the seed's data order and
    dequantisation noise. They share one compiled train step (the variables
    are re-assigned, not re-created) so the suite pays for one trace."""
    config = dict(
        image_shape=(8, 8, 1),
        levels=2,
        steps_per_level=2,
        hidden_channels=16,
        coupling="affine",
        num_bins=data.DIGITS_NUM_BINS,
    )
    model = tfp_glow.Glow(**config)
    model.compile(keras.optimizers.Adam(1e-3))
    test_x = data.preprocess(data.load_digits("test")[0], data.DIGITS_NUM_BINS, False)
    results = []
    for seed in range(5):
        keras.utils.set_random_seed(seed)
        fresh = tfp_glow.Glow(**config, seed=seed)
        model.set_weights(fresh.get_weights())
        _reset_optimizer(model.optimizer)
        assert not model.is_initialized
        train = data.digits_dataset("train", batch_size=64, seed=seed)
        model.initialize(next(iter(train)))  # what fit does with the first batch
        initial_bpd = float(tf.reduce_mean(model.bits_per_dim(test_x)))
        history = model.fit(train, epochs=2, verbose=0)
        losses = history.history["loss"] + history.history["bits_per_dim"]
        assert all(math.isfinite(v) for v in losses), (seed, history.history)
        assert history.history["nonfinite_steps"] == [0.0, 0.0]
        assert int(model.optimizer.iterations) == 2 * 23  # 1437 images, batch 64
        test_bpd = float(tf.reduce_mean(model.bits_per_dim(test_x)))
        assert math.isfinite(test_bpd)
        assert all(np.isfinite(w).all() for w in model.get_weights())
        results.append((initial_bpd, history.history["bits_per_dim"], test_bpd))
    print(
        "\n[reliability] five seeds, Glow L=2 K=2 width 16 affine, Adam 1e-3, 2 epochs: "
        "test bits/dim at ActNorm init, train bits/dim per epoch, test bits/dim:"
    )
    for seed, (initial, train, test) in enumerate(results):
        print(
            f"  seed {seed}: test {initial:.3f} -> train {[round(v, 3) for v in train]}"
            f" -> test {test:.3f}"
        )
    # Every run learned: clearly below its start and below uniform (log2 17 = 4.09).
    for initial, train, test in results:
        assert train[1] < train[0] and test < initial - 0.3 and test < 4.09


# ------------------------------------------------------------- the guard


def _poisoned_dataset():
    images = data.load_digits("train")[0][: 8 * BATCH]
    x = data.preprocess(images, data.DIGITS_NUM_BINS, dequantize=False).numpy()
    x[POISONED_BATCH * BATCH + 3, 4, 4, 0] = np.nan
    return tf.data.Dataset.from_tensor_slices(x).batch(BATCH), x


class _WeightsAtBatchBegin(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.snapshots = {}

    def on_train_batch_begin(self, batch, logs=None):
        self.snapshots[batch] = [w.copy() for w in self.model.get_weights()]


def test_poisoned_batch_raises_and_leaves_weights_and_checkpoint_clean(tmp_path):
    ds, x = _poisoned_dataset()
    keras.utils.set_random_seed(0)
    model = tfp_glow.Glow(**TINY)
    assert model.nonfinite == "raise"  # the default
    model.compile(keras.optimizers.Adam(1e-3))
    snapshots = _WeightsAtBatchBegin()
    ckpt = str(tmp_path / "every_batch.weights.h5")
    saver = keras.callbacks.ModelCheckpoint(ckpt, save_weights_only=True, save_freq=1)
    with pytest.raises(FloatingPointError) as info:
        model.fit(ds, epochs=2, verbose=0, callbacks=[snapshots, saver])
    message = str(info.value)
    assert f"epoch 1, batch {POISONED_BATCH}" in message
    assert "non-finite loss" in message
    assert "learning rate" in message and "clipnorm" in message
    assert "nonfinite='skip'" in message
    # The poisoned step was not applied: weights equal those before the batch,
    # Adam took exactly the 5 good steps.
    before = snapshots.snapshots[POISONED_BATCH]
    for w, b in zip(model.get_weights(), before):
        np.testing.assert_array_equal(w, b)
    assert int(model.optimizer.iterations) == POISONED_BATCH
    # The checkpoint written after the last good batch is intact and loads.
    restored = tfp_glow.Glow(**TINY)
    restored.load_weights(ckpt)
    assert restored.is_initialized
    for w, b in zip(restored.get_weights(), before):
        assert np.isfinite(w).all()
        np.testing.assert_array_equal(w, b)
    good = np.delete(x, POISONED_BATCH * BATCH + 3, axis=0)
    assert np.isfinite(restored.log_prob(good).numpy()).all()
    # The guard re-arms: a clean dataset trains on after the error.
    model.fit(tf.data.Dataset.from_tensor_slices(good).batch(BATCH), epochs=1, verbose=0)
    assert int(model.optimizer.iterations) == POISONED_BATCH + 8

    # Several steps per call of the train function: the check after the call
    # comes too late to stop the steps after the bad one, so the traced step
    # stays frozen after a bad step; the result equals one step per call.
    keras.utils.set_random_seed(0)
    chunked = tfp_glow.Glow(**TINY)
    chunked.compile(keras.optimizers.Adam(1e-3), steps_per_execution=4)
    with pytest.raises(FloatingPointError, match="epoch 1, one of batches 4-7"):
        chunked.fit(ds, epochs=1, verbose=0)
    assert int(chunked.optimizer.iterations) == POISONED_BATCH
    for w, b in zip(chunked.get_weights(), before):
        np.testing.assert_array_equal(w, b)


def test_skip_mode_skips_the_poisoned_step_and_keeps_training():
    ds, _ = _poisoned_dataset()
    keras.utils.set_random_seed(0)
    model = tfp_glow.Glow(**TINY, nonfinite="skip")
    model.compile(keras.optimizers.Adam(1e-3))
    snapshots = _WeightsAtBatchBegin()
    history = model.fit(ds, epochs=2, verbose=0, callbacks=[snapshots])
    # One skipped step per pass over the poisoned batch (cumulative in a fit).
    assert history.history["nonfinite_steps"] == [1.0, 2.0]
    assert model.nonfinite_steps == 2
    assert int(model.optimizer.iterations) == 2 * 8 - 2
    # Epoch means leave the skipped batch out instead of turning NaN.
    assert all(math.isfinite(v) for v in history.history["loss"])
    assert all(np.isfinite(w).all() for w in model.get_weights())
    # The batch after the poisoned one starts from the weights before it.
    for a, b in zip(snapshots.snapshots[POISONED_BATCH], snapshots.snapshots[POISONED_BATCH + 1]):
        np.testing.assert_array_equal(a, b)
    config = model.get_config()
    assert config["nonfinite"] == "skip"
    assert tfp_glow.Glow.from_config(config).nonfinite == "skip"


_MIRRORED_SCRIPT = textwrap.dedent("""
    import numpy as np, tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras, tfp_glow

    x = np.random.default_rng(0).standard_normal((64, 2)).astype(np.float32)
    x[5 * 8 + 6, 1] = np.nan  # batch 5, second replica's half
    ds = tf.data.Dataset.from_tensor_slices(x).batch(8)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    for mode in ("raise", "skip"):
        keras.utils.set_random_seed(0)
        with strategy.scope():
            model = tfp_glow.NICE((2,), coupling_layers=2, hidden_units=8,
                                  num_hidden_layers=1, num_bins=None, nonfinite=mode)
            model.compile(keras.optimizers.Adam(1e-2))
        model.initialize(x[:8])
        seen = {}
        class Snap(keras.callbacks.Callback):
            def on_train_batch_begin(self, batch, logs=None):
                seen[batch] = [w.copy() for w in self.model.get_weights()]
        try:
            model.fit(ds, epochs=1, verbose=0, callbacks=[Snap()])
            outcome = "finished"
        except FloatingPointError as e:
            outcome = "raised at " + str(e).split(" produced")[0]
        same = all(np.array_equal(a, b) for a, b in zip(model.get_weights(), seen[5]))
        replicas_agree = all(
            np.array_equal(*[t.numpy() for t in v.value.values])
            for v in model.trainable_variables)
        finite = all(np.isfinite(w).all() for w in model.get_weights())
        print(f"RESULT {mode} {outcome} | iterations={int(model.optimizer.iterations.numpy())} "
              f"nonfinite_steps={model.nonfinite_steps} weights_equal_batch5={same} "
              f"replicas_agree={replicas_agree} finite={finite}")
""")


@pytest.mark.slow  # over ~15 s on 2 cores: CI's second step
def test_guard_under_mirrored_strategy_two_replicas():
    """The conditional update takes the cross-replica `merge_call` path: one
    replica's NaN stops the update on both, which stay identical."""
    out = subprocess.run(
        [sys.executable, "-c", _MIRRORED_SCRIPT],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    results = [line for line in out.stdout.splitlines() if line.startswith("RESULT")]
    assert len(results) == 2, out.stdout + out.stderr[-3000:]
    raised, skipped = results
    assert "raise raised at Training stopped: epoch 1, batch 5 |" in raised
    assert "iterations=5 " in raised and "weights_equal_batch5=True" in raised
    assert "skip finished |" in skipped and "iterations=7 " in skipped
    assert "nonfinite_steps=1 " in skipped
    for line in results:
        assert "replicas_agree=True" in line and "finite=True" in line


# ------------------------------------------------- warmup and clipping


def test_warmup_schedule_values():
    constant = WarmupSchedule(1e-3, warmup_steps=4)
    np.testing.assert_allclose(
        [float(constant(s)) for s in range(6)], [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3], rtol=1e-6
    )
    assert float(constant(10**6)) == pytest.approx(1e-3)
    cosine = WarmupSchedule(2e-3, warmup_steps=10, decay_steps=100, alpha=0.1)
    assert float(cosine(0)) == pytest.approx(2e-4)
    assert float(cosine(9)) == pytest.approx(2e-3)
    assert float(cosine(10)) == pytest.approx(2e-3)
    # Half way through the decay: alpha + (1 - alpha) / 2 of the peak.
    assert float(cosine(60)) == pytest.approx(2e-3 * 0.55, rel=1e-5)
    assert float(cosine(110)) == pytest.approx(2e-4, rel=1e-5)
    assert float(cosine(5000)) == pytest.approx(2e-4, rel=1e-5)
    assert float(WarmupSchedule(1e-3, warmup_steps=0)(0)) == pytest.approx(1e-3)
    # Serialisable like any Keras schedule.
    again = keras.optimizers.schedules.deserialize(keras.optimizers.schedules.serialize(cosine))
    assert isinstance(again, WarmupSchedule) and again.get_config() == cosine.get_config()


def test_warmup_and_global_clipnorm_drive_flowmodel_updates():
    """SGD with a warmup schedule and `global_clipnorm=c`: every update of a
    FlowModel has global norm exactly lr(step) * c (the raw gradients are far
    larger than c, so clipping is active)."""
    keras.utils.set_random_seed(1)
    model = tfp_glow.Glow(**TINY)
    clip = 1e-3
    schedule = WarmupSchedule(0.5, warmup_steps=4)
    model.compile(keras.optimizers.SGD(schedule, global_clipnorm=clip))
    x = data.preprocess(
        data.load_digits("train")[0][: 4 * BATCH], data.DIGITS_NUM_BINS, dequantize=False
    )
    model.initialize(x[:BATCH])
    snapshots = _WeightsAtBatchBegin()
    model.fit(
        tf.data.Dataset.from_tensor_slices(x).batch(BATCH),
        epochs=1,
        verbose=0,
        callbacks=[snapshots],
    )
    trainable = [i for i, w in enumerate(model.weights) if w.trainable]
    states = [snapshots.snapshots[b] for b in range(4)] + [model.get_weights()]
    with tf.GradientTape() as tape:
        loss = -tf.reduce_mean(model.log_prob(x[-BATCH:]))
    raw = tf.linalg.global_norm(tape.gradient(loss, model.trainable_variables))
    assert float(raw) > 100 * clip
    for step in range(4):
        delta = [states[step + 1][i] - states[step][i] for i in trainable]
        norm = math.sqrt(sum(float(np.sum(d.astype(np.float64) ** 2)) for d in delta))
        assert norm == pytest.approx(float(schedule(step)) * clip, rel=1e-3), step


# ------------------------------------------------ 1x1 conv never singular


def test_lu_conv_stays_invertible_at_extreme_log_scales():
    """W = P L (U + diag(sign * exp(log_s))) has det = +-exp(sum(log_s)) != 0
    for any finite log_s, and the log-det is read off log_s, never computed
    from W. Scales from e^-30 to e^30 (training moves log_s by about the
    learning rate per step) leave W, W^-1 and the log-det finite in float32
    and the log-det exact. (Far beyond that, around e^+-40, float32 W^-1
    overflows, and the NaN/inf guard of `fit` would stop such a step.)"""
    conv = InvertibleConv1x1(4, seed=3)
    log_s = np.array([-30.0, 30.0, -15.0, 10.0], np.float32)
    conv.log_s.assign(log_s)
    w = conv.weight().numpy()
    w_inv = conv.inverse_weight().numpy()
    assert np.isfinite(w).all() and np.isfinite(w_inv).all()
    x = tf.random.stateless_normal([2, 3, 5, 4], seed=[1, 2])
    y, ldj = conv.forward_and_log_det(x)
    x_back, ildj = conv.inverse_and_log_det(tf.identity(y))
    for t in (y, ldj, x_back, ildj):
        assert np.isfinite(t.numpy()).all()
    assert float(ldj) == pytest.approx(15 * float(np.sum(log_s)), rel=1e-6)
    assert float(ildj) == -float(ldj)

    # The documented factorisation, rebuilt in float64 from the saved
    # variables: slogdet agrees with sum(log_s), det W != 0. (slogdet of the
    # float32 W itself, condition number ~e^60, is off by ~0.02: the reason
    # the log-det is read off log_s.)
    def f64(v):
        return v.numpy().astype(np.float64)

    lower = np.tril(f64(conv.lower), -1) + np.eye(4)
    upper = np.triu(f64(conv.upper), 1) + np.diag(f64(conv.sign) * np.exp(f64(conv.log_s)))
    w64 = f64(conv.permutation) @ lower @ upper
    np.testing.assert_allclose(w64, w, rtol=1e-5, atol=1e-30)
    sign, logdet = np.linalg.slogdet(w64)
    assert sign != 0 and logdet == pytest.approx(float(np.sum(log_s)), rel=1e-9)
    # Scales e^-10..e^10 (condition number ~3e10): the triangular-solve
    # inverse is still exact to float64 precision.
    conv64 = InvertibleConv1x1(4, seed=3, dtype=tf.float64)
    conv64.log_s.assign([-10.0, 10.0, -5.0, 3.0])
    w64 = conv64.weight().numpy()
    assert np.linalg.cond(w64) > 1e9
    np.testing.assert_allclose(w64 @ conv64.inverse_weight().numpy(), np.eye(4), atol=1e-12)
