"""A conditional FFJORD, `p(x | c)` with the field `dz/dt = f(z, t, c)`.

The walker binds the context into the field per call
(`_tfp_parts.bind_ffjord_context`): TFP's own condition kwargs would reach
the field too, but TFP 0.25's FFJORD caches its log-det keyed by the input
alone, so a second context on the same tensor returned the first one's
log-det (`test_the_same_input_under_two_contexts_gets_two_log_dets`).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfp_glow


def _model(dtype="float64", **kwargs):
    keras.utils.set_random_seed(0)
    options = dict(hidden_units=[8], trace="exact", num_bins=None, context_shape=(3,))
    model = tfp_glow.FFJORD(input_shape=(2,), dtype=dtype, **{**options, **kwargs})
    rng = np.random.RandomState(0)
    # Move every variable (the prior's zero-initialised context offset too)
    # so the flow and the prior both depend on the context.
    for v in model.trainable_variables:
        v.assign(v + 0.3 * rng.randn(*v.shape))
    return model


def _pairs(n=4, seed=1):
    rng = np.random.RandomState(seed)
    return rng.randn(n, 2), rng.randn(n, 3)


def _field_variables(model):
    """The ODENet's variables (its Dense layers'; the prior's are the rest)."""
    return [v for v in model.trainable_variables if not v.path.startswith("learned_prior")]


def test_the_config_carries_the_context_shape():
    model = tfp_glow.FFJORD(input_shape=(2,), hidden_units=[4], num_bins=None, context_shape=(3,))
    assert model.context_shape == (3,)
    assert tuple(model.get_config()["context_shape"]) == (3,)
    twin = tfp_glow.FFJORD.from_config(model.get_config())
    assert twin.context_shape == (3,)
    with pytest.raises(ValueError, match="num_classes.*context_shape"):
        tfp_glow.FFJORD(input_shape=(2,), num_classes=3, context_shape=(3,))


def test_the_same_input_under_two_contexts_gets_two_log_dets():
    model = _model()
    x, c = _pairs()
    xt = tf.constant(x)  # one tensor: TFP's cache would key on it
    walk = tfp_glow.bijectors.forward_and_log_det
    _, ldj1 = walk(model.flow, xt, 1, conditional_input=tf.constant(c))
    _, ldj2 = walk(model.flow, xt, 1, conditional_input=tf.constant(c + 1.0))
    _, ldj1_again = walk(model.flow, xt, 1, conditional_input=tf.constant(c))
    assert np.abs(ldj1 - ldj2).max() > 1e-3
    np.testing.assert_allclose(ldj1_again, ldj1, rtol=1e-12)


@pytest.mark.slow
def test_log_prob_is_the_exact_change_of_variables_given_the_context():
    """log p(x | c) = log N(encode(x, c)) + log|det d encode / dx|: the
    integrated trace against the autodiff Jacobian of the solved map (float64,
    the solver at rtol 1e-6: they agree to ~2e-6), and the map inverts."""
    model = _model(rtol=1e-6, atol=1e-8)
    x, c = _pairs()
    xt = tf.constant(x)
    with tf.GradientTape(persistent=True) as tape:  # no pfor: FFJORD's solver
        tape.watch(xt)
        zt, _ = tfp_glow.bijectors.forward_and_log_det(
            model.flow, xt, 1, conditional_input=tf.constant(c)
        )
    jacobian = tape.batch_jacobian(zt, xt, experimental_use_pfor=False).numpy()
    z = model.encode(x, c).numpy()
    np.testing.assert_allclose(z, zt.numpy(), atol=1e-12)  # the prior is in the flow
    expected = -0.5 * np.sum(z**2, -1) - np.log(2 * np.pi) + np.linalg.slogdet(jacobian)[1]
    np.testing.assert_allclose(model.log_prob(x, c).numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.decode(z, c).numpy(), x, atol=1e-5)
    assert np.abs(model.log_prob(x, c) - model.log_prob(x, c[::-1])).max() > 1e-3


def test_gradients_reach_every_field_variable_and_the_context_rows():
    model = _model(dtype="float32")
    x, c = _pairs()
    x, c = tf.constant(x, tf.float32), tf.constant(c, tf.float32)
    variables = _field_variables(model)
    assert [tuple(v.shape) for v in variables] == [(6, 8), (8,), (9, 2), (2,)]
    with tf.GradientTape() as tape:
        z, ldj = tfp_glow.bijectors.forward_and_log_det(model.flow, x, 1, conditional_input=c)
        loss = tf.reduce_sum(z**2) / 2 - tf.reduce_sum(ldj)
    grads = tape.gradient(loss, variables)
    for v, g in zip(variables, grads):
        assert g is not None, v.path
        assert float(tf.reduce_max(tf.abs(g))) > 0.0, v.path
    # The first layer reads [z (2), c (3), t (1)]: rows 2..4 are the context's.
    context_rows = np.abs(grads[0].numpy()[2:5])
    assert np.all(context_rows.max(axis=1) > 1e-6), context_rows


@pytest.mark.slow
def test_a_few_fit_steps_on_pairs_lower_the_nll_and_use_the_context():
    rng = np.random.default_rng(0)
    c = rng.standard_normal((64, 3)).astype("float32")
    x = c @ (0.6 * rng.standard_normal((3, 2))).astype("float32")
    x += 0.1 * rng.standard_normal((64, 2)).astype("float32")
    keras.utils.set_random_seed(0)
    model = tfp_glow.FFJORD(
        input_shape=(2,), hidden_units=[16], trace="exact", num_bins=None, context_shape=(3,)
    )
    model.compile(keras.optimizers.Adam(1e-2))
    before = -float(tf.reduce_mean(model.log_prob(x, c)))
    model.fit((x, c), batch_size=32, epochs=3, verbose=0)
    after = -float(tf.reduce_mean(model.log_prob(x, c)))
    shuffled = -float(tf.reduce_mean(model.log_prob(x, c[::-1])))
    assert after < before - 0.1, (before, after)
    assert after < shuffled - 0.05, (after, shuffled)
