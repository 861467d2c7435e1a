"""`ResidualFlow` as a model: it fits 8 Gaussians and the digits, its log-det
is the autodiff Jacobian's, its config and `.keras` file round trip (also in a
fresh process) and its SavedModel serves log_prob where tfp_glow cannot be
imported."""

import json
import os
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import perturb

import tfp_glow
from tfp_glow.bijectors.base import walk_bijectors
from tfp_glow.models.residual import ResidualFlow

sys.path.insert(0, os.path.dirname(__file__))
from test_tfp_flows import EXPORT_CHILD, KERAS_CHILD, _run_child  # noqa: E402

# The child imports the module that registers ResidualFlow (as a user's import would).
RESIDUAL_KERAS_CHILD = KERAS_CHILD.replace(
    "import tfp_flows  # registers the builders, as a user's module would",
    "import tfp_glow.models.residual",
)


def vector_model(seed=0, **overrides):
    keras.utils.set_random_seed(seed)
    return ResidualFlow(
        input_shape=(2,), **{**dict(blocks=2, hidden_units=16, num_bins=None), **overrides}
    )


def image_model(seed=0):
    keras.utils.set_random_seed(seed)
    return ResidualFlow(input_shape=(8, 8, 1), blocks=1, hidden_channels=8, levels=2, num_bins=17)


def eight_gaussians(n, seed=0):
    return tfp_glow.data.toy_density("8gaussians", n, seed=seed).astype(np.float32) / 2.0


def test_fit_lowers_the_nll_of_8_gaussians():
    model = vector_model()
    data = eight_gaussians(512, seed=1)
    model.compile(keras.optimizers.Adam(1e-2))
    before = model.evaluate(data, batch_size=256, verbose=0, return_dict=True)["loss"]
    model.fit(data, epochs=3, batch_size=64, verbose=0)
    after = model.evaluate(data, batch_size=256, verbose=0, return_dict=True)["loss"]
    assert after < before - 0.1, (before, after)


def test_vector_log_det_is_the_autodiff_jacobian_of_the_whole_flow():
    model = perturb(vector_model(), 2, scale=0.3)
    x = tf.constant(eight_gaussians(8, seed=3))
    with tf.GradientTape() as tape:
        tape.watch(x)
        z, log_det = tfp_glow.bijectors.forward_and_log_det(model.flow, x, 1)
    _, expected = tf.linalg.slogdet(tape.batch_jacobian(z, x))
    np.testing.assert_allclose(log_det.numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)
    # Sampling inverts the blocks by fixed-point iteration: back to the same points.
    x_back, _ = tfp_glow.bijectors.inverse_and_log_det(model.flow, z, 1)
    np.testing.assert_allclose(x_back, x, atol=1e-4)


def digits(n):
    ds = tfp_glow.data.digits_dataset("train", batch_size=n, shuffle=False)
    return next(iter(ds)).numpy()


@pytest.mark.slow
def test_digits_fit_lowers_the_loss():
    """Images: multi-scale, roulette log-dets (64 and 32 dimensions per block)."""
    model = image_model()
    blocks = [
        b for b in walk_bijectors(model.flow) if isinstance(b, tfp_glow.bijectors.ResidualBlock)
    ]
    assert [b.log_det_mode for b in blocks] == ["roulette", "roulette"]
    images = digits(128)
    model.compile(keras.optimizers.Adam(3e-3))
    before = model.evaluate(images, batch_size=128, verbose=0, return_dict=True)
    model.fit(images, epochs=6, batch_size=32, verbose=0)
    after = model.evaluate(images, batch_size=128, verbose=0, return_dict=True)
    assert after["loss"] < before["loss"] - 1.0, (before, after)
    assert np.isfinite(after["bits_per_dim"])
    assert model.sample(2, seed=1).shape == (2, 8, 8, 1)


@pytest.mark.slow
def test_config_round_trip_and_keras_file_in_process(tmp_path):
    model = perturb(vector_model(hidden_units=8), 5, scale=0.2)
    config = json.loads(json.dumps(model.get_config()))
    rebuilt = ResidualFlow.from_config(config)
    assert rebuilt.get_config() == model.get_config()
    rebuilt.set_weights(model.get_weights())
    x = eight_gaussians(5, seed=6)
    np.testing.assert_array_equal(rebuilt.log_prob(x).numpy(), model.log_prob(x).numpy())
    model.save(tmp_path / "resflow.keras")
    loaded = keras.saving.load_model(tmp_path / "resflow.keras", compile=False)
    assert type(loaded) is ResidualFlow
    np.testing.assert_array_equal(loaded.log_prob(x).numpy(), model.log_prob(x).numpy())


def _saved_cases(tmp_path):
    """A vector model (exact log-dets) and an image model (roulette at fixed seeds)."""
    models, inputs = {}, {}
    for name, model, x in (
        ("vector", vector_model(), eight_gaussians(6, seed=8)),
        ("image", image_model(), digits(4)),
    ):
        model.initialize(x)  # ActNorm from the data (export refuses placeholders)
        perturb(model, 7, scale=0.05)
        inputs[name] = str(tmp_path / f"{name}_x.npy")
        np.save(inputs[name], x)
        models[name] = (model, x)
    return models, inputs


@pytest.mark.slow
def test_keras_file_reloads_in_a_fresh_process_with_equal_log_prob(tmp_path):
    models, inputs = _saved_cases(tmp_path)
    files = {}
    for name, (model, _) in models.items():
        model.compile(keras.optimizers.Adam(1e-3))
        files[name] = str(tmp_path / f"{name}.keras")
        model.save(files[name])
    (tmp_path / "job.json").write_text(json.dumps({"files": files, "inputs": inputs}))
    (tmp_path / "child.py").write_text(RESIDUAL_KERAS_CHILD)
    out = _run_child(tmp_path, os.path.dirname(__file__))
    for name, (model, x) in models.items():
        assert out[name]["class"] == "ResidualFlow" and out[name]["compiled"]
        np.testing.assert_array_equal(np.float32(out[name]["log_prob"]), model.log_prob(x).numpy())


@pytest.mark.slow
def test_export_serves_log_prob_without_tfp_glow(tmp_path):
    models, inputs = _saved_cases(tmp_path)
    exports = {
        name: str(tfp_glow.export_saved_model(model, tmp_path / name))
        for name, (model, _) in models.items()
    }
    (tmp_path / "job.json").write_text(json.dumps({"exports": exports, "inputs": inputs}))
    (tmp_path / "child.py").write_text(EXPORT_CHILD)
    out = _run_child(tmp_path)
    for name, (model, x) in models.items():
        np.testing.assert_allclose(
            out[name]["log_prob"], model.log_prob(x).numpy(), rtol=1e-5, atol=1e-4
        )


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(lipschitz=1.0), "lipschitz"),
        (dict(log_det="hutchinson"), "log_det"),
        (dict(blocks=0), "blocks"),
        (dict(input_shape=(8, 8)), "input_shape"),
        (dict(input_shape=(6, 6, 1), levels=3), "input_shape"),
        (dict(atol=0.0), "atol"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        ResidualFlow(**kwargs)
