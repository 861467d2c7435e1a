"""Variational dequantization (Flow++): `q(u | k)` and the bound it trains.

The dequantizer is a conditional flow on the noise, so it is held to the same
standard as the bijectors: its `log q` equals `log N(eps)` minus the autodiff
Jacobian's log-determinant. The bound is checked where the discrete
likelihood is known exactly (a Gaussian over one pixel: `P(k)` is a
difference of normal CDFs): never above `log P(k)`, and much closer to it
than the uniform bound once `q` is trained.
"""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp
from helpers import perturb
from scipy import stats

import tfp_glow
from tfp_glow import VariationalDequantizer
from tfp_glow.data import DIGITS_NUM_BINS, load_digits, preprocess

tfb = tfp.bijectors


@pytest.fixture(scope="module")
def digits():
    images, _ = load_digits("train")
    return np.asarray(preprocess(images[:96], DIGITS_NUM_BINS, seed=0), np.float32)


def _glow(**kwargs):
    keras.utils.set_random_seed(0)
    return tfp_glow.Glow(
        image_shape=(8, 8, 1),
        levels=2,
        steps_per_level=2,
        hidden_channels=16,
        num_bins=DIGITS_NUM_BINS,
        dequantization="variational",
        dequantizer_kwargs={"hidden_channels": 8, "num_steps": 2},
        **kwargs,
    )


@pytest.mark.parametrize("dtype, tol", [("float64", 1e-9), ("float32", 2e-4)])
def test_log_q_is_log_normal_minus_the_autodiff_log_det(dtype, tol):
    q = VariationalDequantizer((4, 4, 2), 5, hidden_channels=8, num_steps=3, dtype=dtype)
    perturb(q, rng=0, scale=0.1)  # every last conv starts at zero
    rng = np.random.default_rng(1)
    k = tf.constant(rng.integers(0, 5, (3, 4, 4, 2)), dtype)
    eps = tf.constant(rng.standard_normal((3, 4, 4, 2)), dtype)
    with tf.GradientTape() as tape:
        tape.watch(eps)
        u, log_q = q.noise_and_log_q(k, eps)
    jac = tape.batch_jacobian(u, eps).numpy().reshape(3, 32, 32)
    sign, log_det = np.linalg.slogdet(jac.astype(np.float64))
    log_normal = stats.norm.logpdf(eps.numpy().astype(np.float64)).reshape(3, -1).sum(1)
    assert np.all(sign > 0)
    np.testing.assert_allclose(log_q.numpy(), log_normal - log_det, rtol=0, atol=tol * 32)
    assert log_q.dtype == dtype and u.dtype == dtype


def test_the_noise_comes_from_the_data_and_stays_in_its_bin():
    q = perturb(
        VariationalDequantizer((2, 2, 1), 17, hidden_channels=4, num_steps=2), rng=2, scale=0.3
    )
    k = np.array([0, 5, 16, 9], np.float32).reshape(1, 2, 2, 1)
    # A bin's lower edge (v = 0, as in a U[0, 1) draw), the pipelines' margin
    # below its upper edge (closer, float32 rounds into the next bin), its
    # centre, and an ordinary draw.
    v = np.array([0.0, 1.0 - 1e-4, 0.5, 0.3], np.float32).reshape(1, 2, 2, 1)
    x = (k + v) / 17.0 - 0.5
    levels, noise = q.levels_and_noise(tf.constant(x))
    np.testing.assert_array_equal(levels.numpy(), k)
    x_q, log_q = q(tf.constant(x))
    assert np.all(np.isfinite(log_q.numpy()))
    np.testing.assert_array_equal(np.floor((x_q.numpy() + 0.5) * 17.0), k)
    # Bin centres are eps = 0; the same x always gives the same x_q.
    centre = (k + 0.5) / 17.0 - 0.5
    u_centre, _ = q.noise_and_log_q(tf.constant(k), tf.zeros_like(tf.constant(k)))
    np.testing.assert_allclose(
        q(tf.constant(centre))[0].numpy(), (k + u_centre.numpy()) / 17.0 - 0.5, atol=1e-6
    )
    np.testing.assert_array_equal(q(tf.constant(x))[0].numpy(), x_q.numpy())


def _one_pixel_gaussian(num_bins, mean, scale, dequantizer):
    """A flow over one pixel whose density is N(mean, scale): P(k) is exact."""
    flow = tfb.Chain([tfb.Scale(1.0 / scale), tfb.Shift(-mean)])
    return tfp_glow.FlowModel(
        flow, event_shape=(1, 1, 1), num_bins=num_bins, dequantizer=dequantizer
    )


def _elbo_and_exact(model, k, num_bins, mean, scale, draws, seed):
    """Per-draw bound `log p(x_q) - log q - log B` of bin `k`, and the exact log P(k)."""
    v = np.random.default_rng(seed).uniform(1e-4, 1 - 1e-4, (draws, 1, 1, 1))
    x = ((k + v) / num_bins - 0.5).astype(np.float32)
    bound = model.variational_log_prob(x).numpy() - math.log(num_bins)
    uniform = model.log_prob(x).numpy() - math.log(num_bins)
    lo, hi = k / num_bins - 0.5, (k + 1) / num_bins - 0.5
    exact = math.log(stats.norm.cdf(hi, mean, scale) - stats.norm.cdf(lo, mean, scale))
    return bound, uniform, exact


def test_the_bound_never_exceeds_the_exact_likelihood_and_training_q_closes_the_gap():
    # Bin 2 is [0, 0.25) and the density N(0.05, 0.06) is far from flat in it.
    num_bins, mean, scale, k = 4, 0.05, 0.06, 2
    keras.utils.set_random_seed(3)
    q = VariationalDequantizer((1, 1, 1), num_bins, hidden_channels=8, num_steps=1)
    model = _one_pixel_gaussian(num_bins, mean, scale, q)
    perturb(q, rng=4, scale=0.2)
    before, uniform, exact = _elbo_and_exact(model, k, num_bins, mean, scale, 4096, seed=5)
    se = before.std() / math.sqrt(before.size)
    assert before.mean() <= exact + 3 * se  # Jensen: a bound for any q
    uniform_gap = exact - uniform.mean()
    assert uniform_gap > 0.5

    model.compile(keras.optimizers.Adam(1e-2))
    v = np.random.default_rng(6).uniform(1e-4, 1 - 1e-4, (64 * 150, 1, 1, 1))
    model.fit(((k + v) / num_bins - 0.5).astype(np.float32), batch_size=64, epochs=1, verbose=0)
    after, _, _ = _elbo_and_exact(model, k, num_bins, mean, scale, 4096, seed=7)
    se = after.std() / math.sqrt(after.size)
    gap = exact - after.mean()
    assert gap >= -3 * se
    assert gap < 0.2 * uniform_gap, (gap, uniform_gap)


@pytest.mark.slow  # over ~15 s on 2 cores: CI's second step
def test_glow_with_variational_dequantization_reports_bound_and_uniform_figure(digits):
    model = _glow()
    model.compile(keras.optimizers.Adam(2e-3))
    history = model.fit(digits, batch_size=32, epochs=2, verbose=0)
    assert history.history["bits_per_dim"][1] < history.history["bits_per_dim"][0]
    result = model.evaluate(digits, batch_size=48, verbose=0, return_dict=True)
    np.testing.assert_allclose(
        result["bits_per_dim"], model.variational_bits_per_dim(digits).numpy().mean(), rtol=1e-5
    )
    np.testing.assert_allclose(
        result["uniform_bits_per_dim"], model.bits_per_dim(digits).numpy().mean(), rtol=1e-5
    )
    # The evaluation noise is the data's: another batch size gives the same figure.
    again = model.evaluate(digits, batch_size=96, verbose=0, return_dict=True)
    np.testing.assert_allclose(again["bits_per_dim"], result["bits_per_dim"], rtol=1e-5)


@pytest.mark.slow  # over ~15 s on 2 cores: CI's second step
def test_every_dequantizer_variable_is_trained(digits):
    model = _glow()
    model.initialize(digits[:64])
    model.compile(keras.optimizers.Adam(1e-2))
    before = [v.numpy().copy() for v in model.dequantizer.trainable_variables]
    # Two steps: the zero-initialised last convs block the first step's
    # gradient to the layers before them.
    for _ in range(2):
        model.train_on_batch(digits[:32])
    moved = [
        not np.array_equal(b, v.numpy())
        for b, v in zip(before, model.dequantizer.trainable_variables)
    ]
    assert len(moved) == 17 and all(moved)  # 2 context convs, 3 zero convs, 2 hidden
    assert all(
        any(v is w for w in model.trainable_variables)
        for v in model.dequantizer.trainable_variables
    )


@pytest.mark.parametrize("backprop", ["checkpoint", "reversible"])
def test_recomputing_backprop_gives_the_dequantizers_gradients(digits, backprop):
    model = _glow()
    model.initialize(digits[:64])
    perturb(model, rng=8, scale=0.02)
    x = tf.constant(digits[:16])

    def grads(mode):
        with tf.GradientTape() as tape:
            loss = -tf.reduce_mean(model._bound_of(x, None, mode))
        return tape.gradient(loss, model.trainable_variables)

    for a, b in zip(grads("standard"), grads(backprop)):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-3, atol=1e-5)


def test_initialize_sees_the_variational_noise(digits):
    """ActNorm is initialised on what training feeds the flow, `x_q`."""
    model = _glow()
    perturb(model.dequantizer, rng=9, scale=0.3)  # so that x_q is far from x
    x = tf.constant(digits[:64])
    model.initialize(x)
    x_q, _ = model.dequantizer(x)
    (act_norm,) = [a for a in model._actnorms if a.name == "act_norm_0_0"]
    squeeze = tfp_glow.bijectors.Squeeze(event_shape=(8, 8, 1))
    z = act_norm.forward(squeeze.forward(x_q))
    np.testing.assert_allclose(tf.reduce_mean(z, [0, 1, 2]).numpy(), 0.0, atol=1e-4)
    np.testing.assert_allclose(tf.math.reduce_std(z, [0, 1, 2]).numpy(), 1.0, atol=1e-3)
    z_x = act_norm.forward(squeeze.forward(x))
    assert np.max(np.abs(tf.reduce_mean(z_x, [0, 1, 2]).numpy())) > 0.05


def test_keras_file_keeps_the_dequantizer(digits, tmp_path):
    model = _glow()
    model.compile(keras.optimizers.Adam(2e-3))
    model.fit(digits, batch_size=32, epochs=1, verbose=0)
    path = str(tmp_path / "vd.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.get_config()["dequantization"] == "variational"
    assert loaded.get_config()["dequantizer_kwargs"] == {"hidden_channels": 8, "num_steps": 2}
    np.testing.assert_allclose(
        loaded.variational_log_prob(digits[:8]).numpy(),
        model.variational_log_prob(digits[:8]).numpy(),
        rtol=1e-6,
    )


def test_without_a_dequantizer_the_bound_is_log_prob(digits):
    keras.utils.set_random_seed(0)
    model = tfp_glow.Glow(
        image_shape=(8, 8, 1),
        levels=2,
        steps_per_level=2,
        hidden_channels=16,
        num_bins=DIGITS_NUM_BINS,
        dequantization="uniform",
    )
    model.initialize(digits[:64])
    model.compile()
    assert model.dequantizer is None
    np.testing.assert_array_equal(
        model.variational_log_prob(digits[:8]).numpy(), model.log_prob(digits[:8]).numpy()
    )
    assert "uniform_bits_per_dim" not in model.evaluate(digits, verbose=0, return_dict=True)


@pytest.mark.parametrize(
    "build, error, match",
    [
        (lambda: _glow_with(dequantization="learned"), ValueError, "dequantization"),
        (
            lambda: _glow_with(dequantization="uniform", dequantizer_kwargs={"num_steps": 2}),
            ValueError,
            "needs dequantization='variational'",
        ),
        (
            lambda: _glow_with(dequantization="variational", dequantizer_kwargs={"width": 2}),
            ValueError,
            "'width' is not an option",
        ),
        (
            lambda: _glow_with(dequantization="variational", dequantizer_kwargs={"num_steps": -1}),
            ValueError,
            "num_steps",
        ),
        (lambda: VariationalDequantizer((64,), 17), ValueError, "image data"),
        (lambda: VariationalDequantizer((8, 8, 1), None), ValueError, "discrete data"),
        (lambda: VariationalDequantizer((8, 8, 1), 1), ValueError, "num_bins"),
        (
            lambda: tfp_glow.FlowModel(
                tfb.Identity(), event_shape=(2, 2, 1), num_bins=4, dequantizer="variational"
            ),
            TypeError,
            "dequantizer",
        ),
        (
            lambda: tfp_glow.FlowModel(
                tfb.Identity(),
                event_shape=(2, 2, 1),
                num_bins=4,
                dequantizer=VariationalDequantizer((2, 2, 1), 5),
            ),
            ValueError,
            "num_bins=5",
        ),
    ],
)
def test_bad_dequantization_arguments_are_refused_clearly(build, error, match):
    with pytest.raises(error, match=match):
        build()


def _glow_with(**kwargs):
    return tfp_glow.Glow(
        image_shape=(8, 8, 1),
        levels=2,
        steps_per_level=1,
        hidden_channels=8,
        num_bins=DIGITS_NUM_BINS,
        **kwargs,
    )


def test_variational_log_prob_refuses_raw_pixels():
    model = _glow()
    with pytest.raises(ValueError, match="-0.5, 0.5"):
        model.variational_log_prob(np.full((2, 8, 8, 1), 12.0, np.float32))
