"""The library's defaults: what `Glow(...)` and `model.compile()` give.

Issue 14's winning combination on the digits protocol is the default: dropout
0.2 in the coupling networks and variational dequantization (BENCHMARKS.md,
"Held-out likelihood by default"), trained by Adam with a 100-step warmup to
3e-3 and Polyak averaging of the weights (momentum 0.99). These tests pin
that resolution, the cases where a default cannot apply (continuous data),
and that files saved before the defaults changed load as the models they were.
"""

import json
import zipfile

import keras
import numpy as np
import pytest

import tfp_glow
from tfp_glow import nets, training
from tfp_glow.bijectors import keras_layers_of
from tfp_glow.data import DIGITS_NUM_BINS, load_digits, preprocess
from tfp_glow.variational_dequantization import VariationalDequantizer


def _glow(**kwargs):
    keras.utils.set_random_seed(0)
    return tfp_glow.Glow(
        image_shape=(8, 8, 1),
        levels=2,
        steps_per_level=2,
        hidden_channels=8,
        **{"num_bins": DIGITS_NUM_BINS, **kwargs},
    )


def _rates(model):
    return {
        layer.dropout
        for layer in keras_layers_of(model.flow)
        if isinstance(layer, nets.GlowCouplingNet)
    }


@pytest.fixture(scope="module")
def digits():
    images, _ = load_digits("train")
    return np.asarray(preprocess(images[:64], DIGITS_NUM_BINS, seed=0), np.float32)


def test_glow_defaults_to_dropout_and_variational_dequantization():
    model = _glow()
    config = model.get_config()
    assert config["dropout"] == tfp_glow.DEFAULT_DROPOUT == 0.2
    assert config["dequantization"] == "variational"
    assert _rates(model) == {0.2}
    assert isinstance(model.dequantizer, VariationalDequantizer)


@pytest.mark.parametrize("backprop", ["checkpoint", "reversible"])
def test_recomputing_backprop_keeps_the_default_dropout_and_trains(digits, backprop):
    """Dropout masks are a function of the step, so the recomputing modes
    (which run the networks again for the gradient) keep the default rate."""
    model = _glow(backprop=backprop)
    assert model.get_config()["dropout"] == 0.2 and _rates(model) == {0.2}
    assert model.get_config()["dequantization"] == "variational"
    model.compile()
    history = model.fit(digits, batch_size=32, epochs=2, verbose=0).history
    assert np.all(np.isfinite(history["loss"])) and history["loss"][1] < history["loss"][0]


def test_continuous_glow_defaults_to_uniform():
    model = _glow(num_bins=None)
    assert model.get_config()["dequantization"] == "uniform" and model.dequantizer is None
    with pytest.raises(ValueError, match="`dequantization='variational'` needs discrete data"):
        _glow(num_bins=None, dequantization="variational")


def test_paper_glow_is_two_arguments_away():
    model = _glow(dropout=0.0, dequantization="uniform")
    assert _rates(model) == {0.0} and model.dequantizer is None
    assert model.count_params() < _glow().count_params()  # the dequantizer's weights


def test_a_file_saved_before_the_defaults_loads_as_the_model_it_was(digits, tmp_path):
    """A `.keras` file whose config has no `dropout` or `dequantization` key
    (saved by an older tfp_glow) is a Glow without dropout and with uniform
    dequantization, and its weights load."""
    old = _glow(dropout=0.0, dequantization="uniform")
    old.initialize(digits)
    path = tmp_path / "new.keras"
    old.save(path)
    legacy = tmp_path / "legacy.keras"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(legacy, "w") as dst:
        for item in src.infolist():
            payload = src.read(item.filename)
            if item.filename == "config.json":
                config = json.loads(payload)
                for key in ("dropout", "dequantization", "dequantizer_kwargs"):
                    del config["config"][key]
                payload = json.dumps(config).encode()
            dst.writestr(item, payload)
    loaded = keras.models.load_model(legacy)
    assert loaded.get_config()["dropout"] == 0.0
    assert loaded.get_config()["dequantization"] == "uniform"
    np.testing.assert_allclose(
        loaded.log_prob(digits[:8]).numpy(), old.log_prob(digits[:8]).numpy(), rtol=1e-6
    )


def test_compile_without_arguments_gives_the_recommended_optimizer():
    model = _glow()
    model.compile()
    optimizer = model.optimizer
    assert isinstance(optimizer, keras.optimizers.Adam)
    assert optimizer.use_ema and optimizer.ema_momentum == 0.99  # Polyak averaging
    # The peak rate is a variable (callbacks can set it); the schedule scales it.
    assert isinstance(optimizer, training.WarmupAdam)
    assert float(optimizer.learning_rate) == pytest.approx(3e-3)
    schedule = optimizer.schedule
    assert isinstance(schedule, training.WarmupSchedule)
    rates = [float(schedule(step)) for step in (0, 49, 99, 100, 5000)]
    np.testing.assert_allclose(rates, [3e-5, 1.5e-3, 3e-3, 3e-3, 3e-3], rtol=1e-6)


def test_recommended_optimizer_with_decay_and_weight_decay(digits):
    decayed = training.recommended_optimizer(decay_steps=200)
    # Warmup ends at step 99; the cosine runs over the next 200 steps.
    rates = [float(decayed.schedule(step)) for step in (100, 200, 300)]
    np.testing.assert_allclose(rates, [3e-3, 1.5e-3, 0.0], atol=1e-9)
    model = _glow()
    adamw = training.recommended_optimizer(weight_decay=0.05, model=model, global_clipnorm=5.0)
    assert isinstance(adamw, keras.optimizers.AdamW)
    assert adamw.weight_decay == 0.05 and adamw.global_clipnorm == 5.0 and adamw.use_ema
    with pytest.raises(ValueError, match="needs `model`"):
        training.recommended_optimizer(weight_decay=0.05)
    assert not training.recommended_optimizer(ema_momentum=None).use_ema
    with pytest.raises(ValueError, match="`ema_momentum`"):
        training.recommended_optimizer(ema_momentum=1.0)


def test_recipe_without_lr_or_weight_decay_takes_the_models_own_settings(tmp_path):
    # `tfp-glow train --model maf` and `recipe.train(maf)` train what
    # `maf.compile()` would: MAF's 1e-3 with decay 0.3, not the library's 3e-3.
    import tensorflow as tf

    from tfp_glow import recipe

    x = np.random.RandomState(0).randn(64, 2).astype("float32")
    ds = tf.data.Dataset.from_tensor_slices(x).batch(32)
    resolved = {}
    for name, kwargs in (("default", {}), ("given", dict(learning_rate=2e-3, weight_decay=0.0))):
        keras.utils.set_random_seed(0)
        model = tfp_glow.MAF(input_shape=(2,), num_layers=1, hidden_units=[8], num_bins=None)
        result = recipe.train(
            model,
            ds,
            ds,
            run_dir=str(tmp_path / name),
            epochs=1,
            export=False,
            verbose=0,
            sample_every=0,
            **kwargs,
        )
        with open(result.paths["config"]) as f:
            config = json.load(f)
        resolved[name] = (
            config["learning_rate"],
            config["weight_decay"],
            float(getattr(model.optimizer, "weight_decay", None) or 0.0),
        )
    assert resolved["default"] == (1e-3, 0.3, pytest.approx(0.3))
    assert resolved["given"] == (2e-3, 0.0, 0.0)
