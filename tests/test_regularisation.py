"""Regularisers for small data sets: dropout and network-only weight decay.

`Glow(dropout=rate)` puts inverted dropout after each hidden ReLU of Glow's
coupling networks. It must act inside `FlowModel.train_step` (so `fit` and
`train_on_batch` regularise) and nowhere else: `log_prob`, `encode`,
`decode`, `sample` and evaluation stay deterministic and exactly invertible.

`tfp_glow.training.adamw` (and `tfp-glow train --weight-decay`) decays the
networks' weights and never the bijector parameters.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import perturb

import tfp_glow
from tfp_glow import nets, recipe
from tfp_glow.bijectors import keras_layers_of
from tfp_glow.bijectors._state import ParameterLayer
from tfp_glow.data import DIGITS_NUM_BINS, load_digits, preprocess
from tfp_glow.training import adamw, network_variables


def _glow(dropout, **kwargs):
    # Uniform dequantization unless asked: these tests compare `evaluate` with
    # `log_prob`, which variational dequantization's bound is not.
    kwargs.setdefault("dequantization", "uniform")
    keras.utils.set_random_seed(0)
    return tfp_glow.Glow(
        image_shape=(8, 8, 1),
        levels=2,
        steps_per_level=2,
        hidden_channels=16,
        num_bins=DIGITS_NUM_BINS,
        dropout=dropout,
        **kwargs,
    )


@pytest.fixture(scope="module")
def digits():
    images, _ = load_digits("train")
    return np.asarray(preprocess(images[:128], DIGITS_NUM_BINS, seed=0), np.float32)


def _moved(model, x):
    """Initialised on `x`, then every weight moved: the zero-initialised last
    conv of each network would otherwise hide what dropout does."""
    model.initialize(x[:64])
    return perturb(model, rng=1, scale=0.05)


def test_inverted_dropout_keeps_the_mean_and_drops_the_rate():
    h = tf.ones([200, 500])
    assert nets._dropout(h, 0.25) is h  # outside dropout_active(): the identity
    with nets.dropout_active():
        dropped = nets._dropout(h, 0.25).numpy()
        assert nets.is_dropout_active()
    assert not nets.is_dropout_active()
    assert set(np.unique(dropped)) == {0.0, np.float32(1 / 0.75)}
    assert abs(np.mean(dropped == 0) - 0.25) < 0.01
    assert abs(dropped.mean() - 1.0) < 0.02


def test_outside_training_the_flow_with_dropout_is_the_flow_without(digits):
    x = digits[:32]
    with_dropout = _moved(_glow(0.5), digits)
    without = _moved(_glow(0.0), digits)
    for a, b in zip(with_dropout.trainable_variables, without.trainable_variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    lp = with_dropout.log_prob(x).numpy()
    np.testing.assert_array_equal(lp, with_dropout.log_prob(x).numpy())
    np.testing.assert_array_equal(lp, without.log_prob(x).numpy())
    z = with_dropout.encode(x)
    np.testing.assert_allclose(with_dropout.decode(z).numpy(), x, atol=1e-5)
    np.testing.assert_array_equal(
        with_dropout.sample(4, seed=3).numpy(), without.sample(4, seed=3).numpy()
    )
    # Inside the training context the same call is random, and differs by more
    # than rounding from the deterministic value.
    with nets.dropout_active():
        noisy = with_dropout._density.log_prob_of(tf.constant(x)).numpy()
    assert np.max(np.abs(noisy - lp)) > 1e-2


@pytest.mark.parametrize("dropout, differs", [(0.5, True), (0.0, False)])
def test_the_training_step_drops_units(digits, dropout, differs):
    # A learning rate of 0: the weights stay put, so two steps on one batch
    # differ only by their dropout masks.
    model = _moved(_glow(dropout), digits)
    model.compile(keras.optimizers.SGD(0.0))
    first = model.train_on_batch(digits[:64], return_dict=True)["loss"]
    second = model.train_on_batch(digits[:64], return_dict=True)["loss"]
    assert (abs(first - second) > 1e-3) == differs
    # Evaluation runs without dropout: equal to -mean log p of the batch.
    evaluated = model.evaluate(digits[:64], batch_size=64, verbose=0, return_dict=True)
    expected = -np.mean(model.log_prob(digits[:64]).numpy())
    assert evaluated["loss"] == pytest.approx(expected, rel=1e-5)


def test_fit_with_dropout_trains_and_the_rate_is_saved(digits, tmp_path):
    model = _glow(0.2)
    model.compile(keras.optimizers.Adam(1e-3))
    before = -np.mean(_glow(0.2).initialize(digits[:64]).log_prob(digits).numpy())
    model.fit(digits, batch_size=64, epochs=3, verbose=0)
    after = -np.mean(model.log_prob(digits).numpy())
    assert after < before - 1.0
    path = str(tmp_path / "glow.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.get_config()["dropout"] == 0.2
    assert {
        layer.dropout
        for layer in keras_layers_of(loaded.flow)
        if isinstance(layer, nets.GlowCouplingNet)
    } == {0.2}
    np.testing.assert_allclose(
        loaded.log_prob(digits[:8]).numpy(), model.log_prob(digits[:8]).numpy(), rtol=1e-6
    )


def test_the_masks_are_a_function_of_the_step(digits):
    """Same optimizer step, same masks (a resumed run drops what the
    uninterrupted run dropped); another step, other masks."""
    model = _moved(_glow(0.5), digits)
    model.compile(keras.optimizers.SGD(0.0))
    losses = [model.train_on_batch(digits[:64], return_dict=True)["loss"] for _ in range(2)]
    assert abs(losses[0] - losses[1]) > 1e-3
    model.optimizer.iterations.assign(0)
    again = model.train_on_batch(digits[:64], return_dict=True)["loss"]
    assert again == losses[0]


@pytest.mark.slow  # over ~15 s on 2 cores: CI's second step
@pytest.mark.parametrize("backprop", ["checkpoint", "reversible"])
def test_recomputing_backprop_drops_the_units_standard_drops(digits, backprop):
    """`"checkpoint"` and `"reversible"` run the networks again for the
    gradient; with the step's masks they train to standard backprop's weights."""
    weights = {}
    for mode, rate in (("standard", 0.3), (backprop, 0.3), ("standard", 0.0)):
        model = _moved(_glow(rate, backprop=mode), digits)
        model.compile(keras.optimizers.SGD(1e-2))
        model.fit(digits[:96], batch_size=32, epochs=1, shuffle=False, verbose=0)
        weights[mode, rate] = [v.numpy() for v in model.trainable_variables]

    def worst(a, b):
        return max(float(np.max(np.abs(u - v))) for u, v in zip(weights[a], weights[b]))

    assert worst(("standard", 0.3), (backprop, 0.3)) < 1e-5
    assert worst(("standard", 0.3), ("standard", 0.0)) > 1e-3  # dropout did act


@pytest.mark.parametrize(
    "rate, error",
    [
        (1.0, ValueError),
        (-0.1, ValueError),
        (float("nan"), ValueError),
        ("0.2", TypeError),
        (True, TypeError),
    ],
)
def test_bad_dropout_rates_name_the_argument(rate, error):
    with pytest.raises(error, match="`dropout`"):
        _glow(rate)
    with pytest.raises(error, match="`dropout`"):
        nets.GlowCouplingNet(8, 4, dropout=rate)


@pytest.mark.parametrize("options", [{}, {"dequantization": "variational"}])
def test_adamw_decays_the_network_weights_and_nothing_else(digits, options):
    model = _moved(_glow(0.0, **options), digits)
    networks = {id(v) for v in network_variables(model)}
    if options:  # the dequantizer's convs are networks too
        assert {id(v) for v in model.dequantizer.trainable_variables} <= networks
    parameters = [
        v
        for layer in keras_layers_of(model.flow)
        if isinstance(layer, ParameterLayer)
        for v in layer.trainable_variables
    ]
    assert networks and parameters
    assert len(networks) + len(parameters) == len(model.trainable_variables)
    optimizer = adamw(model, 1e-2, 0.5)
    variables = model.trainable_variables
    before = [v.numpy() for v in variables]
    # Zero gradients: Adam's step is 0, so only the decay moves a weight,
    # w <- w - lr * weight_decay * w.
    optimizer.apply([tf.zeros_like(v) for v in variables], variables)
    for v, w in zip(variables, before):
        expected = w * (1 - 1e-2 * 0.5) if id(v) in networks else w
        np.testing.assert_allclose(v.numpy(), expected, rtol=1e-6, atol=1e-9)


def test_recipe_trains_with_adamw_when_asked(digits, tmp_path):
    import json

    model = _glow(0.0)
    ds = tf.data.Dataset.from_tensor_slices(digits).batch(64)
    recipe.train(
        model,
        ds,
        ds,
        run_dir=str(tmp_path / "run"),
        epochs=1,
        steps_per_epoch=1,
        warmup_steps=0,
        weight_decay=0.05,
        sample_every=0,
        export=False,
        verbose=0,
    )
    assert isinstance(model.optimizer, keras.optimizers.AdamW)
    assert model.optimizer.weight_decay == pytest.approx(0.05)
    with open(recipe.run_paths(str(tmp_path / "run"))["config"]) as f:
        assert json.load(f)["weight_decay"] == 0.05


@pytest.mark.slow
def test_recipe_polyak_averaging_leaves_the_model_with_the_average(digits, tmp_path):
    """`recipe.train(ema_momentum=m)` (`tfp-glow train --ema m`): the
    test figure, `model.keras` and the export come from the averaged weights."""
    import json

    model = _glow(0.2)
    ds = tf.data.Dataset.from_tensor_slices(digits).batch(32)
    raw = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda b, logs: raw.append(
            [v.numpy().copy() for v in model.trainable_variables]
        )
    )
    run = str(tmp_path / "run")
    with pytest.MonkeyPatch.context() as patch:  # the recipe's own callbacks plus ours
        original = recipe._callbacks
        patch.setattr(recipe, "_callbacks", lambda *a: original(*a) + [record])
        result = recipe.train(
            model,
            ds,
            ds,
            run_dir=run,
            epochs=2,
            warmup_steps=0,
            ema_momentum=0.9,
            sample_every=0,
            verbose=0,
        )
    assert model.optimizer.use_ema and model.optimizer.ema_momentum == 0.9
    assert len(raw) == 8
    average = raw[0]  # Keras' rule: the first step copies the weights
    for weights in raw[1:]:
        average = [0.9 * a + 0.1 * w for a, w in zip(average, weights)]
    final = [v.numpy() for v in model.trainable_variables]
    assert max(float(np.max(np.abs(f - a))) for f, a in zip(final, average)) < 1e-5
    assert max(float(np.max(np.abs(f - w))) for f, w in zip(final, raw[-1])) > 1e-3
    assert result.metrics["test_bits_per_dim"] == pytest.approx(
        float(model.evaluate(ds, verbose=0, return_dict=True)["bits_per_dim"]), abs=1e-6
    )
    loaded = keras.models.load_model(result.paths["model"])
    np.testing.assert_allclose(
        loaded.log_prob(digits[:8]).numpy(), model.log_prob(digits[:8]).numpy(), rtol=1e-6
    )
    served = tf.saved_model.load(result.export_path)
    np.testing.assert_allclose(
        served.signatures["log_prob"](x=tf.constant(digits[:8]))["log_prob"].numpy(),
        model.log_prob(digits[:8]).numpy(),
        rtol=1e-5,
        atol=1e-4,
    )
    with open(recipe.run_paths(run)["config"]) as f:
        assert json.load(f)["ema_momentum"] == 0.9


@pytest.mark.slow  # over ~15 s on 2 cores: CI's second step
def test_with_averaged_weights_validation_and_checkpoints_see_the_average(digits, tmp_path):
    """`model.compile()` averages the weights (Keras `use_ema`, momentum
    0.99). Inside `WithAveragedWeights` validation and the wrapped
    checkpoint see the average; training is bit for bit the same as without it."""
    train, val = digits[:96], digits[96:]
    path = str(tmp_path / "last.weights.h5")

    def run(wrapped):
        model = _glow(0.2)
        model.compile()
        assert model.optimizer.use_ema and model.optimizer.ema_momentum == 0.99
        callbacks = (
            [
                tfp_glow.WithAveragedWeights(
                    keras.callbacks.ModelCheckpoint(path, save_weights_only=True)
                )
            ]
            if wrapped
            else []
        )
        history = model.fit(
            train,
            batch_size=32,
            epochs=3,
            shuffle=False,
            verbose=0,
            validation_data=(val,),
            callbacks=callbacks,
        )
        return model, history.history["val_bits_per_dim"]

    plain, plain_val = run(False)
    averaged, averaged_val = run(True)
    for a, b in zip(plain.weights, averaged.weights):  # fit ends with the average
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    after_fit = averaged.evaluate(val, verbose=0, return_dict=True)["bits_per_dim"]
    assert averaged_val[-1] == pytest.approx(after_fit, abs=1e-6)
    assert abs(plain_val[-1] - after_fit) > 1e-3  # Keras validates the raw weights
    checkpoint = _glow(0.2)
    checkpoint.load_weights(path)
    np.testing.assert_array_equal(
        checkpoint.log_prob(val[:8]).numpy(), averaged.log_prob(val[:8]).numpy()
    )


def test_with_averaged_weights_needs_an_averaging_optimizer(digits):
    model = _glow(0.0)
    model.compile(keras.optimizers.Adam(1e-3))
    with pytest.raises(ValueError, match="use_ema=True"):
        model.fit(
            digits[:64],
            batch_size=32,
            epochs=1,
            verbose=0,
            callbacks=[tfp_glow.WithAveragedWeights()],
        )
    with pytest.raises(TypeError, match="Keras callbacks"):
        tfp_glow.WithAveragedWeights("best.weights.h5")


@pytest.mark.parametrize("value, error", [(-0.1, ValueError), ("0.1", TypeError)])
def test_bad_weight_decay_names_the_argument(digits, value, error):
    with pytest.raises(error, match="`weight_decay`"):
        adamw(_glow(0.0), 1e-3, value)
