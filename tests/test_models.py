"""Glow, RealNVP and NICE as Keras models: training, exactness, sampling, config.

Every test asserts numbers. Models are small (8x8x1 or 4x4x1 images, two
levels, a few steps) so the whole file runs in about a minute on 2 cores.
"""

import math

import keras
import numpy as np
import pytest
import scipy.stats
import tensorflow as tf
from helpers import perturb
from PIL import Image

import tfp_glow
from tfp_glow.bijectors import ActNorm, keras_layers_of
from tfp_glow.bijectors.base import walk_bijectors
from tfp_glow.data import DIGITS_NUM_BINS, digits_dataset, load_digits, preprocess

UNIFORM_BPD = math.log2(DIGITS_NUM_BINS)  # 4.09: every level equally likely


def _random_images(n, shape, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(-0.5, 0.5, (n,) + tuple(shape)).astype(np.float32)


def _small_glow(**kwargs):
    config = dict(
        image_shape=(8, 8, 1),
        levels=2,
        steps_per_level=2,
        hidden_channels=16,
        num_bins=DIGITS_NUM_BINS,
    )
    config.update(kwargs)
    return tfp_glow.Glow(**config)


def _ready(model, x, scale=0.1, seed=0, labels=None):
    """ActNorm initialised on `x`, then every parameter perturbed."""
    model.initialize(x, labels)
    return perturb(model, seed, scale)


def _test_images(n=None):
    images, _ = load_digits("test")
    x = preprocess(images, DIGITS_NUM_BINS, dequantize=False)
    return np.asarray(x if n is None else x[:n])


# ---------------------------------------------------------------- training


@pytest.fixture(scope="module")
def trained_glow():
    """The issue's reference model, trained 5 epochs with stock `fit`.

    Test bits/dim is measured eagerly on the whole dequantized test split
    (360 images), before and after training.
    """
    keras.utils.set_random_seed(0)
    model = tfp_glow.Glow(
        image_shape=(8, 8, 1),
        levels=2,
        steps_per_level=4,
        hidden_channels=32,
        num_bins=DIGITS_NUM_BINS,
    )
    model.compile(keras.optimizers.Adam(1e-3))
    images, _ = load_digits("test")
    x_test = preprocess(images, DIGITS_NUM_BINS, dequantize=True, seed=1)
    model.initialize(next(iter(digits_dataset("train", batch_size=256, seed=2))))
    before = float(tf.reduce_mean(model.bits_per_dim(x_test)))
    history = model.fit(digits_dataset("train", batch_size=64, seed=3), epochs=5, verbose=0)
    after = float(tf.reduce_mean(model.bits_per_dim(x_test)))
    return model, before, after, history


def test_glow_fit_lowers_test_bits_per_dim_well_below_uniform(trained_glow):
    model, before, after, history = trained_glow
    print(
        f"Glow 8x8x1 L=2 K=4 w=32, digits test bits/dim: {before:.3f} at init -> "
        f"{after:.3f} after 5 epochs (uniform {UNIFORM_BPD:.3f})"
    )
    assert before > UNIFORM_BPD  # at init the model is worse than uniform
    assert after < 3.6  # measured ~3.1
    train_bpd = history.history["bits_per_dim"]
    assert len(train_bpd) == 5 and train_bpd[-1] < train_bpd[0] - 0.5
    # The reported metric is exactly the bits/dim of the reported loss.
    d = 64
    loss = history.history["loss"][-1]
    np.testing.assert_allclose(
        train_bpd[-1], (loss + d * math.log(DIGITS_NUM_BINS)) / (d * math.log(2)), rtol=1e-5
    )


def test_log_prob_and_bits_per_dim_match_a_closed_form_density():
    """One ActNorm y = s x + b over N(0, I): log p(x) = sum log N(s x + b) + D log s.

    Checked against scipy's normal log-density, so neither number comes from
    the code under test; bits/dim is -log2 of the mass of x's bin (width
    1/17 per dimension) per dimension.
    """
    act = ActNorm(1)
    model = tfp_glow.FlowModel(act, event_shape=(8, 8, 1), num_bins=17)
    act.log_scale.assign([math.log(2.5)])
    act.bias.assign([0.3])
    act.initialized.assign(1.0)
    x = _random_images(3, (8, 8, 1))
    d = 64
    expected = scipy.stats.norm.logpdf(2.5 * x.astype(np.float64) + 0.3).sum(
        axis=(1, 2, 3)
    ) + d * math.log(2.5)
    np.testing.assert_allclose(model.log_prob(x).numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(
        model.bits_per_dim(x).numpy(), (-expected / d + math.log(17.0)) / math.log(2.0), rtol=1e-6
    )


def test_bits_per_dim_is_nll_plus_discretisation_in_bits(trained_glow):
    model = trained_glow[0]
    x = _test_images(16)
    log_prob = model.log_prob(x).numpy().astype(np.float64)
    d = 64
    by_hand = (-log_prob + d * math.log(17.0)) / (d * math.log(2.0))
    np.testing.assert_allclose(model.bits_per_dim(x).numpy(), by_hand, rtol=1e-6)
    # `call` is log_prob, so Keras' predict gives the same numbers.
    np.testing.assert_allclose(model(x).numpy(), log_prob, rtol=1e-6)


def test_sampling_shapes_temperature_and_seeds(trained_glow):
    model = trained_glow[0]
    samples = model.sample(5, temperature=0.7, seed=1)
    assert tuple(samples.shape) == (5, 8, 8, 1)
    assert np.all(np.isfinite(samples.numpy()))
    # Same seed, same samples; another seed, other samples.
    np.testing.assert_array_equal(model.sample(5, temperature=0.7, seed=1).numpy(), samples.numpy())
    other = model.sample(5, temperature=0.7, seed=2).numpy()
    assert np.max(np.abs(other - samples.numpy())) > 0.05
    # Unseeded draws differ from each other.
    assert np.max(np.abs(model.sample(3).numpy() - model.sample(3).numpy())) > 0.05
    # T = 0: every sample is the decode of z = 0 (the mode of every prior).
    mode = model.decode(tf.zeros([1, 64])).numpy()
    np.testing.assert_allclose(
        model.sample(4, temperature=0.0, seed=7).numpy(), np.repeat(mode, 4, axis=0), atol=1e-6
    )
    # Temperature scales the latent: sample(T) == decode(T * eps(seed)).
    eps = tf.random.stateless_normal([5, 64], seed=tf.constant([1, 0], tf.int64))
    np.testing.assert_allclose(samples.numpy(), model.decode(0.7 * eps).numpy(), atol=1e-5)
    # Lower temperature, samples closer to the mode.
    spread = [
        np.mean((model.sample(64, temperature=t, seed=3).numpy() - mode) ** 2) for t in (0.3, 1.0)
    ]
    assert spread[0] < spread[1]


def test_encode_decode_and_interpolation_endpoints(trained_glow):
    model = trained_glow[0]
    x = _test_images(6)
    z = model.encode(x)
    assert tuple(z.shape) == (6, 64) and model.latent_shape == (64,)
    np.testing.assert_allclose(model.decode(z).numpy(), x, atol=1e-5)
    path = model.interpolate(x[:3], x[3:], num_steps=5).numpy()
    assert path.shape == (5, 3, 8, 8, 1)
    np.testing.assert_allclose(path[0], x[:3], atol=1e-5)
    np.testing.assert_allclose(path[-1], x[3:], atol=1e-5)
    # The midpoint decodes the average latent.
    mid = model.decode(0.5 * (z[:3] + z[3:])).numpy()
    np.testing.assert_allclose(path[2], mid, atol=1e-5)


# ---------------------------------------------------------------- exactness


def _autodiff_log_prob(model, x):
    """log N(f(x); 0, I) + log|det df/dx| with the Jacobian by autodiff.

    Row `i` of each example's Jacobian is the gradient of `z_i`: the batch is
    repeated `D` times and one backward pass of `sum_i z[copy i, i]` gives all
    rows at once (much cheaper in eager mode than `batch_jacobian`'s pfor).
    """
    x = tf.convert_to_tensor(x)
    n, d = x.shape[0], int(np.prod(x.shape[1:]))
    x_rep = tf.repeat(x, d, axis=0)
    with tf.GradientTape() as tape:
        tape.watch(x_rep)
        z_rep = model.encode(x_rep)
        selected = tf.reduce_sum(z_rep * tf.tile(tf.eye(d, dtype=z_rep.dtype), [n, 1]))
    jac = tf.reshape(tape.gradient(selected, x_rep), [n, d, d]).numpy()
    sign, log_det = np.linalg.slogdet(jac.astype(np.float64))
    assert np.all(sign != 0)
    z = model.encode(x).numpy().astype(np.float64)
    base = -0.5 * np.sum(z**2, axis=-1) - 0.5 * d * math.log(2 * math.pi)
    return base + log_det


_EXACTNESS_MODELS = {
    "glow": lambda **kw: tfp_glow.Glow(
        image_shape=(4, 4, 1), levels=2, steps_per_level=2, hidden_channels=16, num_bins=17, **kw
    ),
    "glow_additive_shuffle": lambda **kw: tfp_glow.Glow(
        image_shape=(4, 4, 1),
        levels=2,
        steps_per_level=2,
        hidden_channels=16,
        coupling="additive",
        permutation="shuffle",
        split_fraction=0.25,
        **kw,
    ),
    "realnvp": lambda **kw: tfp_glow.RealNVP(
        input_shape=(4, 4, 1), levels=2, hidden_channels=8, num_blocks=1, **kw
    ),
    "nice": lambda **kw: tfp_glow.NICE(
        input_shape=(4, 4, 1), coupling_layers=4, hidden_units=16, num_hidden_layers=2, **kw
    ),
}


@pytest.mark.parametrize(
    "name, dtype",
    [
        ("glow", "float32"),
        ("glow", "float64"),
        ("glow_additive_shuffle", "float64"),
        ("realnvp", "float64"),
        ("nice", "float64"),
    ],
)
def test_log_prob_is_base_density_plus_autodiff_log_det(name, dtype):
    """End to end: the whole flow's log-det against an autodiff Jacobian.

    float64 makes the comparison tight (rtol 1e-9); float32 is the default
    users train in.
    """
    model = _EXACTNESS_MODELS[name](dtype=dtype)
    # RealNVP's logit needs x + 0.5 inside (0, 1): stay in the data range.
    x = (_random_images(3, (4, 4, 1), seed=1) * 0.9).astype(dtype)
    _ready(model, x, scale=0.1)
    assert all(v.dtype == dtype for v in model.weights)
    log_prob = model.log_prob(x).numpy()
    assert log_prob.dtype == dtype
    rtol, atol = (1e-9, 1e-9) if dtype == "float64" else (1e-4, 1e-3)
    np.testing.assert_allclose(log_prob, _autodiff_log_prob(model, x), rtol=rtol, atol=atol)
    np.testing.assert_allclose(
        model.distribution.log_prob(x).numpy(), log_prob, rtol=rtol, atol=atol
    )
    x_back = model.decode(tf.identity(model.encode(x))).numpy()
    np.testing.assert_allclose(x_back, x, atol=1e-10 if dtype == "float64" else 1e-4)
    # The perturbation really made the flow non-trivial.
    assert np.max(np.abs(model.encode(x).numpy().reshape(3, -1) - x.reshape(3, -1))) > 0.1


# ------------------------------------------------------------- architecture


@pytest.mark.parametrize(
    "variant",
    [
        dict(permutation="conv_lu"),
        dict(permutation="conv"),
        dict(permutation="reverse"),
        dict(permutation="shuffle"),
        dict(coupling="additive"),
        dict(split_fraction=0.25),
        dict(split_fraction=0.75),
        dict(learn_top_prior=False),
    ],
)
def test_glow_variants_build_and_round_trip(variant):
    model = _small_glow(**variant)
    x = _random_images(4, (8, 8, 1), seed=2)
    _ready(model, x)
    z = model.encode(x)
    assert tuple(z.shape) == (4, 64)
    np.testing.assert_allclose(model.decode(tf.identity(z)).numpy(), x, atol=1e-5)
    log_prob = model.log_prob(x).numpy()
    assert log_prob.shape == (4,) and np.all(np.isfinite(log_prob))
    # Split fraction f of the 4 channels after the first squeeze factors out
    # round(4 f) channels of a 4x4 map; the rest goes on to level 2.
    fraction = variant.get("split_fraction", 0.5)
    shapes = model.flow.latent_shapes
    assert shapes[0] == (4, 4, int(round(4 * fraction)))
    assert sum(int(np.prod(s)) for s in shapes) == 64
    has_top = variant.get("learn_top_prior", True)
    assert (model.flow.top_prior is not None) == has_top


def test_trainable_variables_are_exactly_the_flows_keras_layers_and_the_dequantizer():
    model = _small_glow()
    layers = keras_layers_of(model.flow)
    in_flow = [v for layer in layers for v in layer.trainable_weights]
    # Glow's default variational dequantization trains q(u | k) beside the flow.
    expected = in_flow + model.dequantizer.trainable_weights
    assert len(in_flow) > 20 and len(model.dequantizer.trainable_weights) > 0
    assert len(model.trainable_variables) == len(expected)
    assert {id(v) for v in model.trainable_variables} == {id(v) for v in expected}
    count = sum(int(np.prod(v.shape)) for v in expected)
    assert model.count_params() == count + sum(
        int(np.prod(v.shape)) for layer in layers for v in layer.non_trainable_weights
    )
    # A plain tf.Module walk of the bijector finds the flow's trainable tensors.
    assert len(model.flow.trainable_variables) == len(in_flow)
    uniform = _small_glow(dequantization="uniform")
    assert len(uniform.trainable_variables) == len(in_flow)
    # 2 levels x 2 steps: one ActNorm per step, each with a saved init flag.
    actnorms = [layer for layer in layers if layer.name.startswith("act_norm")]
    assert len(actnorms) == 4
    assert all(len(layer.non_trainable_weights) == 1 for layer in actnorms)


def test_every_trainable_variable_gets_a_gradient_from_fit_loss():
    model = _small_glow(num_classes=3)
    x = _random_images(6, (8, 8, 1), seed=3)
    labels = np.array([0, 1, 2, 0, 1, 2])
    _ready(model, x, scale=0.05, labels=labels)
    with tf.GradientTape() as tape:
        # fit's loss: the variational bound (Glow's default dequantization).
        loss = -tf.reduce_mean(model.variational_log_prob(x, labels))
    grads = tape.gradient(loss, model.trainable_variables)
    missing = [
        v.path
        for v, g in zip(model.trainable_variables, grads)
        if g is None or not np.any(np.asarray(g) != 0)
    ]
    assert not missing
    assert any(v.path.startswith("dequantizer/") for v in model.trainable_variables)


# ------------------------------------------------------- class conditioning


def test_class_conditional_glow_trains_and_samples_a_chosen_class(tmp_path):
    keras.utils.set_random_seed(1)
    model = _small_glow(num_classes=10, steps_per_level=1)
    model.compile(keras.optimizers.Adam(3e-3))
    test = digits_dataset("test", batch_size=360, shuffle=False, with_labels=True)
    x_test, y_test = next(iter(test))
    train = digits_dataset("train", batch_size=128, with_labels=True)
    model.initialize(*next(iter(train)))
    before = model.evaluate(test, return_dict=True, verbose=0)["bits_per_dim"]
    history = model.fit(train, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    after = model.evaluate(test, return_dict=True, verbose=0)["bits_per_dim"]
    print(f"class-conditional test bits/dim {before:.3f} -> {after:.3f}")
    assert after < before - 0.15, (before, after)  # measured 4.626 -> 4.284
    # The labels change the density: the true labels score differently from
    # a wrong label, and on average better after training.
    right = model.log_prob(x_test, y_test).numpy()
    wrong = model.log_prob(x_test, (y_test + 5) % 10).numpy()
    assert np.max(np.abs(right - wrong)) > 1e-3
    assert np.mean(right) > np.mean(wrong)
    # One-hot labels mean the same as int labels.
    np.testing.assert_allclose(
        model.log_prob(x_test[:8], tf.one_hot(y_test[:8], 10)).numpy(), right[:8], rtol=1e-5
    )
    # sample(labels=3) decodes the seeded latent under label 3 for every sample.
    samples = model.sample(4, temperature=0.7, seed=5, labels=3).numpy()
    assert samples.shape == (4, 8, 8, 1) and np.all(np.isfinite(samples))
    eps = tf.random.stateless_normal([4, 64], seed=tf.constant([5, 0], tf.int64))
    np.testing.assert_allclose(
        samples, model.decode(0.7 * eps, labels=np.full(4, 3)).numpy(), atol=1e-5
    )
    other = model.sample(4, temperature=0.7, seed=5, labels=8).numpy()
    assert np.max(np.abs(other - samples)) > 1e-3
    # Interpolation under int and one-hot labels reconstructs its endpoints.
    for labels in (y_test[:3], tf.one_hot(y_test[:3], 10)):
        path = model.interpolate(x_test[:3], x_test[3:6], num_steps=3, labels=labels)
        np.testing.assert_allclose(path[0].numpy(), x_test[:3].numpy(), atol=1e-5)
        np.testing.assert_allclose(path[-1].numpy(), x_test[3:6].numpy(), atol=1e-5)
    # SampleGrid draws every class in turn by default (labels = i % 10).
    grid = tfp_glow.SampleGrid(tmp_path, num_samples=12, seed=4, rows=3, upscale=1)
    grid.set_model(model)
    grid.on_epoch_end(0)
    labels = np.arange(12) % 10
    expected = tfp_glow.image_grid(
        tfp_glow.to_uint8(model.sample(12, temperature=0.7, seed=4, labels=labels), 17), rows=3
    )
    with Image.open(tmp_path / "samples_epoch_001.png") as png:
        np.testing.assert_array_equal(np.asarray(png), expected[..., 0])
    # A class-conditional model refuses to score without labels.
    with pytest.raises(ValueError, match="labels"):
        model.log_prob(x_test[:2])
    with pytest.raises(ValueError, match="labels"):
        model.sample(2)


@pytest.mark.parametrize("conditional", [False, True])
def test_fit_on_numpy_arrays_initialises_actnorm_on_the_first_batch(conditional):
    """`fit(x, y, batch_size)` on arrays == `initialize(x[:batch_size])` first."""
    rng = np.random.default_rng(4)
    x = tfp_glow.data.toy_density("two_moons", 96, seed=4)
    labels = rng.integers(0, 3, 96) if conditional else None
    num_classes = 3 if conditional else None

    def build():
        return tfp_glow.NICE(
            input_shape=(2,),
            coupling_layers=2,
            hidden_units=8,
            num_hidden_layers=1,
            num_classes=num_classes,
            num_bins=None,
        )

    model, reference = build(), build()
    reference.set_weights(model.get_weights())
    assert not model.is_initialized
    reference.initialize(x[:32], None if labels is None else labels[:32])
    # A zero learning rate: fit changes nothing but the data-dependent init.
    model.compile(keras.optimizers.SGD(0.0))
    model.fit(x, labels, batch_size=32, epochs=1, shuffle=False, verbose=0)
    assert model.is_initialized
    for got, want in zip(model.get_weights(), reference.get_weights()):
        np.testing.assert_array_equal(got, want)
    scaling = next(b for b in walk_bijectors(model.flow) if isinstance(b, ActNorm))
    assert np.max(np.abs(scaling.log_scale.numpy())) > 0.01  # the init ran


# ------------------------------------------------------------ bad arguments


@pytest.mark.parametrize(
    "build, arg",
    [
        (lambda: tfp_glow.Glow(image_shape=(8, 8, 1), levels=4), "levels"),
        (lambda: tfp_glow.Glow(image_shape=(8, 8, 1), levels=0), "levels"),
        (lambda: tfp_glow.Glow(image_shape=(8, 8), levels=1), "image_shape"),
        (lambda: tfp_glow.Glow(image_shape=(8, 8, 1), levels=2, coupling="rqs"), "coupling"),
        (
            lambda: tfp_glow.Glow(image_shape=(8, 8, 1), levels=2, permutation="random"),
            "permutation",
        ),
        (
            lambda: tfp_glow.Glow(image_shape=(8, 8, 1), levels=2, steps_per_level=0),
            "steps_per_level",
        ),
        (
            lambda: tfp_glow.Glow(image_shape=(8, 8, 1), levels=2, hidden_channels=-1),
            "hidden_channels",
        ),
        (lambda: _small_glow(split_fraction=1.0), "split_fraction"),
        (lambda: _small_glow(num_classes=0), "num_classes"),
        (lambda: _small_glow(num_bins=1), "num_bins"),
        (lambda: tfp_glow.RealNVP(input_shape=(8, 8, 1), levels=5), "input_shape"),
        (lambda: tfp_glow.RealNVP(input_shape=(8, 8), levels=2), "input_shape"),
        (lambda: tfp_glow.RealNVP(input_shape=(2,), coupling_layers=1), "coupling_layers"),
        (lambda: tfp_glow.RealNVP(input_shape=(2,), num_blocks=0), "num_blocks"),
        (lambda: tfp_glow.NICE(input_shape=(2, 2, 2, 2)), "input_shape"),
        (lambda: tfp_glow.NICE(input_shape=(2,), coupling_layers=1), "coupling_layers"),
        (lambda: tfp_glow.NICE(input_shape=(2,), hidden_units=0), "hidden_units"),
    ],
)
def test_bad_constructor_arguments_raise_value_error_naming_them(build, arg):
    with pytest.raises(ValueError, match=arg):
        build()


def test_bad_call_arguments_raise_naming_them():
    model = _small_glow()
    x = _random_images(2, (8, 8, 1))
    model.initialize(x)
    with pytest.raises(
        ValueError, match=r"`x` must have shape \[batch, 8, 8, 1\]; got \(2, 4, 4, 1\)"
    ):
        model.log_prob(np.zeros((2, 4, 4, 1), np.float32))
    with pytest.raises(TypeError, match=r"`x` must be a floating tensor .* got dtype int32"):
        model.log_prob(np.zeros((2, 8, 8, 1), np.int32))
    with pytest.raises(ValueError, match=r"`z` must have shape \[batch, 64\]; got \(2, 63\)"):
        model.decode(np.zeros((2, 63), np.float32))
    with pytest.raises(ValueError, match="temperature"):
        model.sample(2, temperature=-1.0)
    with pytest.raises(ValueError, match="loss"):
        model.compile("adam", loss="mse")


def test_xla_fit_on_arrays_warns_about_a_partial_last_batch():
    """XLA compiles the step again for a smaller last batch: `fit` says so."""
    x = tfp_glow.data.toy_density("two_moons", 40, seed=0)
    model = tfp_glow.NICE(
        input_shape=(2,), coupling_layers=2, hidden_units=8, num_hidden_layers=1, num_bins=None
    )
    model.compile(keras.optimizers.Adam(1e-3), jit_compile=True)
    with pytest.warns(UserWarning, match=r"last batch of each epoch has 8 examples.*x\[:32\]"):
        model.fit(x, batch_size=16, epochs=1, verbose=0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        history = model.fit(x[:32], batch_size=16, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_cli_jit_training_pipeline_has_only_full_batches():
    from tfp_glow import cli

    cfg = {"dataset": "digits", "seed": 0, "conditional": False}
    batches = [
        b.shape[0] for b in cli._make_dataset(cfg, "train", 64, training=True, drop_remainder=True)
    ]
    assert batches == [64] * (1437 // 64)
    assert [b.shape[0] for b in cli._make_dataset(cfg, "train", 64, training=True)][-1] == 29


def test_keras_ema_averages_the_weights_fit_ends_with_and_saves(tmp_path):
    """Polyak averaging through Keras' own `use_ema`: under the NaN guard every
    applied step updates the average, `fit` ends with the averaged weights,
    and the `.keras` file keeps the average with the optimizer state."""
    keras.utils.set_random_seed(0)
    images, _ = load_digits("train")
    x = np.asarray(preprocess(images[:96], DIGITS_NUM_BINS, seed=0), np.float32)
    model = _small_glow(steps_per_level=1)
    momentum = 0.8
    model.compile(keras.optimizers.Adam(1e-2, use_ema=True, ema_momentum=momentum))

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append([v.numpy().copy() for v in model.trainable_variables])

    seen = []
    model.fit(x, batch_size=32, epochs=2, shuffle=False, verbose=0, callbacks=[Record()])
    assert len(seen) == 6
    # Keras' rule: the first step copies the weights, then a <- m a + (1 - m) w.
    average = seen[0]
    for weights in seen[1:]:
        average = [momentum * a + (1 - momentum) * w for a, w in zip(average, weights)]
    final = [v.numpy() for v in model.trainable_variables]
    assert max(np.max(np.abs(f - a)) for f, a in zip(final, average)) < 1e-5
    assert max(np.max(np.abs(f - w)) for f, w in zip(final, seen[-1])) > 1e-3  # not raw
    path = str(tmp_path / "ema.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.optimizer.use_ema
    for a, b in zip(
        loaded.optimizer._model_variables_moving_average,
        model.optimizer._model_variables_moving_average,
    ):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.slow
def test_keras_ema_resumes_from_backup_and_restore(tmp_path):
    """An interrupted `fit` with `use_ema` resumes with its average: the
    backup holds the optimizer's moving averages with the weights, so the
    resumed run ends where the uninterrupted one does."""
    images, _ = load_digits("train")
    x = np.asarray(preprocess(images[:64], DIGITS_NUM_BINS, seed=0), np.float32)

    def run(callbacks):
        keras.utils.set_random_seed(0)
        model = _small_glow(steps_per_level=1)
        model.compile(keras.optimizers.Adam(1e-2, use_ema=True, ema_momentum=0.8))
        model.fit(x, batch_size=32, epochs=3, shuffle=False, verbose=0, callbacks=callbacks)
        return model

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise KeyboardInterrupt  # after the backup of epoch 1 is written

    backup = str(tmp_path / "backup")
    with pytest.raises(KeyboardInterrupt):
        run([keras.callbacks.BackupAndRestore(backup), Interrupt()])
    resumed = run([keras.callbacks.BackupAndRestore(backup)])
    straight = run([])
    assert resumed.history.epoch == [2]  # it resumed: only the last epoch ran
    assert int(resumed.optimizer.iterations.numpy()) == 6
    for a, b in zip(resumed.trainable_variables, straight.trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)
    for a, b in zip(
        resumed.optimizer._model_variables_moving_average,
        straight.optimizer._model_variables_moving_average,
    ):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)
