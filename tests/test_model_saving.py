"""Saving, restoring and the Keras callbacks users rely on.

Every restore path must give back the exact log-density (max abs diff 0) and
must never re-run ActNorm's data-dependent init: a restored model is checked
by a `fit` with a zero learning rate on *other* data, which would move the
ActNorm variables if the init ran again.
"""

import importlib.util
import json
import os
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import tfp_glow
from tfp_glow.data import DIGITS_NUM_BINS, digits_dataset, load_digits, preprocess

# TensorFlow 2.21 no longer pulls in TensorBoard; Keras' callback needs it.
HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


def _glow(**kwargs):
    config = dict(
        image_shape=(8, 8, 1),
        levels=2,
        steps_per_level=2,
        hidden_channels=16,
        num_bins=DIGITS_NUM_BINS,
    )
    config.update(kwargs)
    return tfp_glow.Glow(**config)


def _digits(split, n, seed=0):
    images, labels = load_digits(split)
    x = np.asarray(preprocess(images[:n], DIGITS_NUM_BINS, dequantize=True, seed=seed))
    return x, labels[:n]


def _prepared(model, x, labels=None, seed=0):
    """Initialised on `x`, then every variable moved off its initial value."""
    model.initialize(x, labels)
    rng = np.random.default_rng(seed)
    for v in model.trainable_variables:
        v.assign(v + 0.05 * rng.standard_normal(tuple(v.shape)).astype(v.dtype))
    return model


def _actnorm_values(model):
    return {v.path: v.numpy().copy() for v in model.weights if "act_norm" in v.path}


def _assert_no_reinit(model, x_other, labels_other=None, via_fit=False):
    """Initialising again on other data (what `fit` does first for a model
    that is not initialised) must leave every weight alone.

    With `via_fit`, a real `fit` with lr 0 on the other data: any ActNorm
    re-init would change the weights.
    """
    assert model.is_initialized
    before = [w.copy() for w in model.get_weights()]
    actnorm_before = _actnorm_values(model)
    assert len(actnorm_before) >= 12  # 4 ActNorms x (log_scale, bias, initialized)
    if via_fit:
        model.compile(keras.optimizers.SGD(0.0))
        model.fit(x_other, labels_other, batch_size=len(x_other), epochs=1, verbose=0)
    else:
        model.initialize(x_other, labels_other)
    for name, value in _actnorm_values(model).items():
        np.testing.assert_array_equal(value, actnorm_before[name], err_msg=name)
    for got, want in zip(model.get_weights(), before):
        np.testing.assert_array_equal(got, want)


@pytest.fixture(scope="module")
def data():
    x, y = _digits("train", 32)
    x_other, y_other = _digits("test", 48, seed=5)
    return x, y, x_other, y_other


@pytest.mark.parametrize("conditional", [False, True])
def test_keras_file_round_trip_is_exact_and_never_reinitialises(tmp_path, data, conditional):
    x, y, x_other, y_other = data
    kwargs = (
        dict(num_classes=10, coupling="additive", permutation="shuffle", split_fraction=0.25)
        if conditional
        else {}
    )
    labels, labels_other = (y, y_other) if conditional else (None, None)
    model = _prepared(_glow(**kwargs), x, labels)
    path = str(tmp_path / "glow.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded) is tfp_glow.Glow
    assert loaded.get_config() == model.get_config()
    assert loaded.is_initialized
    assert (
        np.max(np.abs(loaded.log_prob(x, labels).numpy() - model.log_prob(x, labels).numpy()))
        == 0.0
    )
    sample_labels = 3 if conditional else None
    np.testing.assert_array_equal(
        loaded.sample(4, seed=1, labels=sample_labels).numpy(),
        model.sample(4, seed=1, labels=sample_labels).numpy(),
    )
    for name, value in _actnorm_values(model).items():
        np.testing.assert_array_equal(_actnorm_values(loaded)[name], value)
    _assert_no_reinit(loaded, x_other, labels_other, via_fit=not conditional)


def test_keras_file_keeps_the_optimizer_state(tmp_path, data):
    x, _, _, _ = data
    model = _glow()
    model.compile(keras.optimizers.Adam(1e-3))
    model.fit(x, batch_size=16, epochs=1, verbose=0)
    path = str(tmp_path / "trained.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.optimizer, keras.optimizers.Adam)
    assert int(loaded.optimizer.iterations.numpy()) == 2
    saved, restored = model.optimizer.variables, loaded.optimizer.variables
    assert len(saved) == len(restored) > 10
    for want, got in zip(saved, restored):
        assert tuple(got.shape) == tuple(want.shape)
        np.testing.assert_array_equal(got.numpy(), want.numpy(), err_msg=want.path)
    # The Adam moments are really there (not zeros re-created by a new build).
    assert max(float(np.max(np.abs(v.numpy()))) for v in restored[2:]) > 0.0


def test_save_weights_into_a_fresh_model_is_exact(tmp_path, data):
    x, _, x_other, _ = data
    model = _prepared(_glow(), x)
    path = str(tmp_path / "glow.weights.h5")
    model.save_weights(path)
    fresh = tfp_glow.Glow.from_config(model.get_config())
    assert not fresh.is_initialized
    assert np.max(np.abs(fresh.log_prob(x).numpy() - model.log_prob(x).numpy())) > 1.0
    fresh.load_weights(path)
    assert fresh.is_initialized
    assert np.max(np.abs(fresh.log_prob(x).numpy() - model.log_prob(x).numpy())) == 0.0
    _assert_no_reinit(fresh, x_other)


def test_tf_train_checkpoint_restore_is_exact(tmp_path, data):
    x, _, x_other, _ = data
    model = _prepared(_glow(), x)
    prefix = tf.train.Checkpoint(model=model).save(str(tmp_path / "ckpt"))
    fresh = tfp_glow.Glow.from_config(model.get_config())
    assert not fresh.is_initialized
    status = tf.train.Checkpoint(model=fresh).restore(prefix)
    status.assert_existing_objects_matched()
    assert fresh.is_initialized
    assert np.max(np.abs(fresh.log_prob(x).numpy() - model.log_prob(x).numpy())) == 0.0
    for got, want in zip(fresh.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(got, want)
    _assert_no_reinit(fresh, x_other)


_EVERY_MODEL = {
    "glow (variational dequantization)": lambda: _glow(),
    "realnvp": lambda: tfp_glow.RealNVP(
        (8, 8, 1), levels=2, hidden_channels=8, num_blocks=2, num_bins=DIGITS_NUM_BINS
    ),
    "nice": lambda: tfp_glow.NICE((8, 8, 1), hidden_units=16, num_bins=DIGITS_NUM_BINS),
}


@pytest.mark.parametrize("name", sorted(_EVERY_MODEL))
def test_tf_train_checkpoint_restores_every_weight(tmp_path, data, name):
    """Every weight is in `tf.train.Checkpoint`'s graph, the dequantizer's
    networks (which Keras keeps in lists) included: a restored model equals
    the saved one weight by weight, none left at its fresh initial value."""
    x = data[0]
    keras.utils.set_random_seed(0)
    model = _prepared(_EVERY_MODEL[name](), x)
    prefix = tf.train.Checkpoint(model=model).save(str(tmp_path / "ckpt"))
    fresh = type(model).from_config(model.get_config())
    tf.train.Checkpoint(model=fresh).restore(prefix).assert_existing_objects_matched()
    assert len(fresh.weights) == len(model.weights) > 10
    for got, want in zip(fresh.weights, model.weights):
        np.testing.assert_array_equal(got.numpy(), want.numpy(), err_msg=want.path)


# ----------------------------------------------------------------- callbacks


def test_stock_callbacks_and_sample_grid_write_their_files(tmp_path):
    keras.utils.set_random_seed(0)
    model = _glow(steps_per_level=1, hidden_channels=8)
    model.compile(keras.optimizers.Adam(1e-3))
    train = digits_dataset("train", batch_size=256, seed=1)
    test = digits_dataset("test", batch_size=360, shuffle=False, seed=2)
    grid = tfp_glow.SampleGrid(
        tmp_path / "samples",
        num_samples=6,
        temperature=0.7,
        seed=3,
        every_n_epochs=2,
        rows=2,
        upscale=3,
    )
    callbacks = [
        keras.callbacks.ModelCheckpoint(str(tmp_path / "ckpt" / "epoch_{epoch:02d}.keras")),
        keras.callbacks.ModelCheckpoint(
            str(tmp_path / "best.weights.h5"),
            monitor="val_bits_per_dim",
            mode="min",
            save_best_only=True,
            save_weights_only=True,
        ),
        grid,
    ]
    if HAS_TENSORBOARD:
        callbacks.append(keras.callbacks.TensorBoard(str(tmp_path / "logs")))
    history = model.fit(train, validation_data=test, epochs=2, callbacks=callbacks, verbose=0)
    logged = {"loss", "bits_per_dim", "val_loss", "val_bits_per_dim"}
    assert logged <= set(history.history)
    # ModelCheckpoint: one .keras per epoch; the last one is the final model.
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["epoch_01.keras", "epoch_02.keras"]
    x, _ = _digits("test", 16)
    final = keras.models.load_model(str(tmp_path / "ckpt" / "epoch_02.keras"))
    assert np.max(np.abs(final.log_prob(x).numpy() - model.log_prob(x).numpy())) == 0.0
    assert os.path.getsize(tmp_path / "best.weights.h5") > 10_000
    # TensorBoard: event files for training and validation.
    for split in ("train", "validation") if HAS_TENSORBOARD else ():
        events = os.listdir(tmp_path / "logs" / split)
        assert any(name.startswith("events.out.tfevents") for name in events)
    # SampleGrid: only epoch 2 (every_n_epochs=2); 2 rows x 3 columns of
    # 24x24 images (8x8 upscaled 3x) with a 1-px border.
    assert sorted(os.listdir(tmp_path / "samples")) == ["samples_epoch_002.png"]
    assert grid.written == [str(tmp_path / "samples" / "samples_epoch_002.png")]
    with Image.open(grid.written[0]) as png:
        assert png.format == "PNG" and png.mode == "L"
        assert png.size == (3 * 25 + 1, 2 * 25 + 1)
        pixels = np.asarray(png)
    # It shows exactly the seeded samples of the final model.
    samples = model.sample(6, temperature=0.7, seed=3).numpy()
    expected = tfp_glow.image_grid(
        np.repeat(np.repeat(tfp_glow.to_uint8(samples, DIGITS_NUM_BINS), 3, axis=1), 3, axis=2),
        rows=2,
    )
    np.testing.assert_array_equal(pixels, expected[..., 0])
    assert len(np.unique(pixels)) > 5  # real pictures, not a blank grid

    # EarlyStopping: no epoch can improve the loss by 1e9, so training stops
    # after the first epoch that fails to (patience 0): 2 of the 5 epochs.
    stop = keras.callbacks.EarlyStopping(monitor="loss", min_delta=1e9, patience=0)
    history = model.fit(train, epochs=5, callbacks=[stop], verbose=0)
    assert len(history.history["loss"]) == 2 and stop.stopped_epoch == 1
    if not HAS_TENSORBOARD:
        pytest.skip(
            "everything but TensorBoard checked: tensorboard is not installed "
            "(`pip install tensorboard`), so its callback was left out"
        )


class _Interrupt(keras.callbacks.Callback):
    """Simulates a crash at the end of epoch `at` (1-based)."""

    def __init__(self, at):
        super().__init__()
        self.at = at

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.at:
            raise RuntimeError("simulated crash")


@pytest.mark.slow  # over ~15 s on 2 cores: CI's second step
def test_backup_and_restore_resumes_where_an_uninterrupted_fit_ends(tmp_path):
    # Same data order every epoch: no shuffling, no random dequantization.
    train = digits_dataset("train", batch_size=256, shuffle=False, dequantize=False)
    model = _glow(steps_per_level=1, hidden_channels=8)
    initial = model.get_weights()
    model.compile(keras.optimizers.Adam(1e-3))
    model.optimizer.build(model.trainable_variables)
    optimizer_initial = [v.numpy() for v in model.optimizer.variables]

    def run(callbacks, fresh):
        if fresh:  # what a new process after the crash would do
            run.model = _glow(steps_per_level=1, hidden_channels=8)
            run.model.compile(keras.optimizers.Adam(1e-3))
        else:  # reuse the traced train step: reset weights and optimizer state
            run.model = model
            for v, value in zip(model.optimizer.variables, optimizer_initial):
                v.assign(value)
        run.model.set_weights(initial)
        run.model.fit(train, epochs=4, callbacks=callbacks, verbose=0)
        return run.model

    uninterrupted = run([], fresh=False)
    final = [w.copy() for w in uninterrupted.get_weights()]
    backup = str(tmp_path / "backup")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run([keras.callbacks.BackupAndRestore(backup), _Interrupt(at=2)], fresh=False)
    assert int(model.optimizer.iterations.numpy()) == 6 * 2
    with open(os.path.join(backup, "training_metadata.json")) as f:
        assert json.load(f)["epoch"] == 2
    # A new process would build a fresh model: do the same.
    resumed = run([keras.callbacks.BackupAndRestore(backup)], fresh=True)
    assert resumed is not model
    steps = 6 * 4  # 1437 images in batches of 256, 4 epochs
    assert int(resumed.optimizer.iterations.numpy()) == steps
    for got, want in zip(resumed.get_weights(), final):
        np.testing.assert_allclose(got, want, atol=1e-6)
    # Not trivially equal: training moved the weights a lot from the start.
    assert max(np.max(np.abs(a - b)) for a, b in zip(final, initial)) > 1e-3
    assert not os.path.exists(backup)  # deleted once training completes
    shutil.rmtree(backup, ignore_errors=True)


# ------------------------------------------------------------ image helpers


def test_to_uint8_maps_levels_to_evenly_spaced_pixels():
    levels = np.arange(17)
    x = (levels + 0.5) / 17 - 0.5  # bin centres
    pixels = tfp_glow.to_uint8(x, 17)
    np.testing.assert_array_equal(pixels, np.round(levels * 255 / 16).astype(np.uint8))
    assert pixels.dtype == np.uint8 and pixels[0] == 0 and pixels[-1] == 255
    # Bin edges: floor((x + 0.5) * num_bins); out-of-range values clip.
    np.testing.assert_array_equal(
        tfp_glow.to_uint8([-0.5, 1 / 17 - 0.5 - 1e-6, 1 / 17 - 0.5 + 1e-6, -3.0, 3.0, np.nan], 17),
        [0, 0, 16, 0, 255, 0],
    )
    # 256 levels: identity on 8-bit pixels after preprocess.
    k = np.arange(256)
    np.testing.assert_array_equal(tfp_glow.to_uint8((k + 0.3) / 256 - 0.5, 256), k)
    with pytest.raises(ValueError, match="num_bins"):
        tfp_glow.to_uint8(x, 1)


def test_image_grid_layout_and_png_round_trip(tmp_path):
    images = np.stack([np.full((2, 3, 1), 10 * (i + 1), np.uint8) for i in range(5)])
    grid = tfp_glow.image_grid(images, rows=2)
    assert grid.shape == (2 * 3 + 1, 3 * 4 + 1, 1)  # 2 rows x 3 columns, 1-px border
    assert grid[1:3, 1:4].min() == grid[1:3, 1:4].max() == 10
    assert grid[1:3, 5:8].max() == 20 and grid[4:6, 1:4].max() == 40
    assert grid[4:6, 9:12].min() == 255  # the empty sixth cell
    assert grid[0].min() == 255 and grid[:, 4].min() == 255  # borders
    assert tfp_glow.image_grid(images).shape == (3 * 3 + 1, 2 * 4 + 1, 1)  # 3 = ceil(sqrt 5) rows
    rgb = np.zeros((4, 2, 2, 3), np.uint8)
    assert tfp_glow.image_grid(rgb).shape == (7, 7, 3)
    path = tfp_glow.save_png(grid, tmp_path / "sub" / "grid.png")
    with Image.open(path) as png:
        np.testing.assert_array_equal(np.asarray(png), grid[..., 0])
    with pytest.raises(ValueError, match="images"):
        tfp_glow.image_grid(np.zeros((2, 3, 3, 2), np.uint8))
    with pytest.raises(TypeError, match="images"):
        tfp_glow.image_grid(np.zeros((2, 3, 3, 1), np.float32))
    with pytest.raises(ValueError, match="rows"):
        tfp_glow.image_grid(images, rows=0)
    out = tfp_glow.save_image_grid(
        np.zeros((3, 8, 8, 1)), tmp_path / "up.png", num_bins=17, upscale=2
    )
    assert out.shape == (2 * 17 + 1, 2 * 17 + 1, 1)
    with pytest.raises(ValueError, match="upscale"):
        tfp_glow.save_image_grid(np.zeros((3, 8, 8, 1)), tmp_path / "x.png", 17, upscale=0)


def test_sample_grid_validates_its_arguments(tmp_path):
    for kwargs, arg in [
        (dict(num_samples=0), "num_samples"),
        (dict(temperature=-1.0), "temperature"),
        (dict(every_n_epochs=0), "every_n_epochs"),
        (dict(rows=0), "rows"),
        (dict(upscale=0), "upscale"),
    ]:
        with pytest.raises(ValueError, match=arg):
            tfp_glow.SampleGrid(tmp_path, **kwargs)
    # A seed of the wrong type is a TypeError (successive grids must be comparable).
    for seed in (None, 1.5, "0"):
        with pytest.raises(TypeError, match="seed"):
            tfp_glow.SampleGrid(tmp_path, seed=seed)
    with pytest.raises(ValueError, match="directory"):
        tfp_glow.SampleGrid("")
    # A vector model has no pictures to draw.
    callback = tfp_glow.SampleGrid(tmp_path)
    callback.set_model(tfp_glow.NICE(input_shape=(2,), hidden_units=8, num_bins=None))
    with pytest.raises(ValueError, match="num_bins"):
        callback.on_epoch_end(0)


def test_every_model_class_is_registered_for_keras_saving():
    import tfp_glow

    for cls in (tfp_glow.FlowModel, tfp_glow.Glow, tfp_glow.RealNVP, tfp_glow.NICE):
        assert keras.saving.get_registered_object(f"tfp_glow>{cls.__name__}") is cls
