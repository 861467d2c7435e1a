"""Glow, RealNVP and NICE under Keras mixed precision.

Every coupling and prior network follows the Keras dtype policy (computes in
bfloat16 / float16, keeps float32 variables) while the flow math, log-dets and
`log_prob` stay float32; mixed_float16 trains with loss scaling under the
NaN/inf guard.
"""

import contextlib

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfp_glow
from tfp_glow.bijectors import keras_layers_of

SMALL = {
    "glow": lambda **kw: tfp_glow.Glow(
        image_shape=(8, 8, 1), levels=2, steps_per_level=2, hidden_channels=8, num_bins=17, **kw
    ),
    "realnvp": lambda **kw: tfp_glow.RealNVP(
        input_shape=(8, 8, 1), levels=2, hidden_channels=8, num_blocks=1, num_bins=17, **kw
    ),
    "nice": lambda **kw: tfp_glow.NICE(
        input_shape=(8, 8, 1),
        coupling_layers=2,
        hidden_units=16,
        num_hidden_layers=1,
        num_bins=17,
        **kw,
    ),
}


@contextlib.contextmanager
def global_policy(name):
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def _digits(n=64):
    images, _ = tfp_glow.data.load_digits("train")
    return tfp_glow.data.preprocess(images[:n], num_bins=17, seed=0)


def _networks(model):
    """The Keras layers that compute (not the variable holders of ActNorm / LU conv)."""
    return [
        layer
        for layer in keras_layers_of(model.flow)
        if layer.weights and type(layer).__name__ != "ParameterLayer"
    ]


def _check_policy(model, compute):
    nets = _networks(model)
    assert nets
    for layer in nets:
        assert layer.compute_dtype == compute, (layer.name, layer.compute_dtype)
        assert all(v.dtype == "float32" for v in layer.weights), layer.name
    x = _digits(16)
    log_prob = model.log_prob(x)
    assert log_prob.dtype == tf.float32 and np.isfinite(log_prob.numpy()).all()
    return log_prob


@pytest.mark.parametrize("kind", sorted(SMALL))
@pytest.mark.parametrize(
    "policy, compute", [("mixed_bfloat16", "bfloat16"), ("mixed_float16", "float16")]
)
def test_networks_follow_the_global_policy_flow_stays_float32(kind, policy, compute):
    reference = SMALL[kind]()
    reference.initialize(_digits())
    # Off the zero-initialised last layers, or every network outputs exact zeros.
    rng = np.random.default_rng(0)
    for v in reference.trainable_variables:
        v.assign(v + 0.05 * rng.standard_normal(v.shape).astype(np.float32))
    with global_policy(policy):
        model = SMALL[kind]()
    model.set_weights(reference.get_weights())
    mixed = _check_policy(model, compute)
    exact = reference.log_prob(_digits(16))
    # Low precision networks: close to, but not bit-identical with, float32.
    assert not np.array_equal(mixed.numpy(), exact.numpy())
    np.testing.assert_allclose(mixed, exact, rtol=0.05, atol=0.5)


def test_model_dtype_argument_is_a_policy_too():
    model = SMALL["glow"](dtype="mixed_bfloat16")
    model.initialize(_digits())
    _check_policy(model, "bfloat16")
    assert model.get_config()["dtype"]["config"]["name"] == "mixed_bfloat16"


def test_mixed_float16_trains_with_loss_scaling_under_the_guard():
    with global_policy("mixed_float16"):
        model = SMALL["glow"]()
        model.compile(keras.optimizers.Adam(1e-3))
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    x = _digits(128)
    history = model.fit(x, batch_size=32, epochs=2, verbose=0)
    assert model.nonfinite_steps == 0
    bpd = history.history["bits_per_dim"]
    assert np.isfinite(bpd).all() and bpd[-1] < bpd[0]
    # A poisoned second batch is still refused by the guard (the loss is checked):
    # fit stops with a FloatingPointError and every weight stays finite.
    bad = x.numpy()[:32].copy()
    bad[0, 0, 0, 0] = np.nan
    batches = tf.data.Dataset.from_tensor_slices(np.stack([x.numpy()[:32], bad]))
    with pytest.raises(FloatingPointError, match="epoch 1, batch 1"):
        model.fit(batches, epochs=1, verbose=0)
    assert all(np.isfinite(w).all() for w in model.get_weights())
