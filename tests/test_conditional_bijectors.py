"""Conditional bijectors, networks and model families, `p(x | context)`.

The shared contract (round trips, log-dets against autodiff, gradients to the
context path) runs the conditional registry entries; here: what the features
of a context are (broadcast, resize, flatten), the walker handing the context
to TFP's conditional flows and to nothing else, the errors, and each model
family learning to use its context.
"""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp
from helpers import perturb

import tfp_glow
from tfp_glow import bijectors as B
from tfp_glow import nets
from tfp_glow.bijectors import _context

tfb = tfp.bijectors


def glow_net(hidden=8):
    return functools.partial(nets.GlowCouplingNet, hidden)


# ----------------------------------------------------------- context features


def test_vector_context_is_broadcast_over_every_position():
    c = tf.constant([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    x_b = tf.zeros([2, 4, 4, 2])
    out = _context.concat_features(x_b, c, (3,), 3)
    assert out.shape == (2, 4, 4, 5)
    np.testing.assert_array_equal(
        out[:, :, :, 2:], np.broadcast_to(c[:, None, None, :], [2, 4, 4, 3])
    )


def test_image_context_is_area_averaged_down_and_resized_up():
    rng = np.random.default_rng(0)
    c = tf.constant(rng.standard_normal((2, 8, 8, 1)), tf.float64)
    down = _context.resize(c, (4, 4))
    expected = c.numpy().reshape(2, 4, 2, 4, 2, 1).mean(axis=(2, 4))
    np.testing.assert_allclose(down, expected, rtol=0, atol=1e-15)  # exact, float64 kept
    assert down.dtype == tf.float64
    up = _context.resize(c[:, :3, :3], (4, 4))  # 3x3 -> 4x4: bilinear
    assert up.shape == (2, 4, 4, 1) and up.dtype == tf.float64
    np.testing.assert_allclose(
        up, tf.image.resize(tf.cast(c[:, :3, :3], tf.float32), (4, 4)), atol=1e-6
    )


def test_context_of_a_vector_event_is_flattened():
    c = tf.reshape(tf.range(12.0), [2, 2, 3, 1])
    out = _context.concat_features(tf.zeros([2, 4]), c, (2, 3, 1), 1)
    np.testing.assert_array_equal(out[:, 4:], tf.reshape(c, [2, 6]))


def test_coupling_with_a_sample_axis_maps_like_each_slice():
    b = perturb(B.AffineCoupling(glow_net(), event_shape=(4, 4, 4), context_shape=(3,)), 0)
    rng = np.random.default_rng(1)
    x = tf.constant(rng.standard_normal((2, 3, 4, 4, 4)), tf.float32)
    c = tf.constant(rng.standard_normal((3, 3)), tf.float32)
    y, ldj = b.forward_and_log_det(x, conditional_input=c)
    for s in range(2):
        y_s, ldj_s = b.forward_and_log_det(x[s], conditional_input=c)
        np.testing.assert_allclose(y[s], y_s, atol=1e-5)
        np.testing.assert_allclose(ldj[s], ldj_s, atol=1e-4)


def test_class_table_is_the_vector_context_map_on_one_hot():
    prior = perturb(B.LearnedPrior((2, 2, 4), num_classes=3), 0)
    x = tf.constant(np.random.default_rng(2).standard_normal((4, 2, 2, 4)), tf.float32)
    labels = tf.constant([0, 2, 1, 2])
    by_id = prior.forward_and_log_det(x, conditional_input=labels)
    by_one_hot = prior.forward_and_log_det(x, conditional_input=tf.one_hot(labels, 3))
    for a, b in zip(by_id, by_one_hot):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert prior.context_shape == (3,)


# -------------------------------------------------------------------- errors


def test_bad_contexts_are_refused_naming_conditional_input():
    b = B.AffineCoupling(glow_net(), event_shape=(4, 4, 4), context_shape=(3,))
    x = tf.zeros([2, 4, 4, 4])
    with pytest.raises(ValueError, match=r"conditional_input.*\[batch, 3\]"):
        b.forward(x)
    with pytest.raises(ValueError, match=r"conditional_input.*\[batch, 3\]"):
        b.forward(x, conditional_input=tf.zeros([2, 4]))
    with pytest.raises(TypeError, match="conditional_input.*float"):
        b.forward(x, conditional_input=tf.zeros([2, 3], tf.int32))
    with pytest.raises(ValueError, match="event_shape"):
        B.AffineCoupling(glow_net(), context_shape=(3,))
    with pytest.raises(ValueError, match="context_shape"):
        B.LearnedPrior((2, 2, 4), context_shape=(0,))
    with pytest.raises(ValueError, match="not both"):
        B.FactorOut(4, num_classes=3, context_shape=(3,))
    with pytest.raises(ValueError, match="context_size"):
        nets.MADE(2, 4, [8], context_size=5, context_shape=(2, 3))
    # An unconditional coupling ignores a context meant for other bijectors.
    plain = B.AffineCoupling(glow_net(), event_shape=(4, 4, 4))
    np.testing.assert_array_equal(
        plain.forward(x, conditional_input=tf.ones([2, 3])), plain.forward(x)
    )


@pytest.mark.parametrize("family", [tfp_glow.ResidualFlow])
def test_families_without_a_context_path_refuse_context_shape(family):
    with pytest.raises(ValueError, match=r"context_shape.*not supported"):
        family(input_shape=(2,), context_shape=(3,))


def test_num_classes_and_context_shape_together_are_refused():
    with pytest.raises(ValueError, match="not both"):
        tfp_glow.MAF(input_shape=(4,), num_classes=3, context_shape=(3,))


# ------------------------------------------------------ the walker and TFP


def test_walker_gives_the_context_to_tfp_maf_and_realnvp_only():
    made = perturb(nets.MADE(2, 4, [16], context_shape=(2, 2, 1)), 0)
    rnvp = perturb(nets.RealNVPNet([16], 2, 2, context_shape=(2, 2, 1)), 1)
    maf = tfb.MaskedAutoregressiveFlow(shift_and_log_scale_fn=made)
    realnvp = tfb.RealNVP(num_masked=2, shift_and_log_scale_fn=rnvp)
    # Permute would refuse `conditional_input` with a TypeError: it gets none.
    flow = tfb.Chain([tfb.Invert(maf), tfb.Permute([3, 2, 1, 0]), realnvp])
    rng = np.random.default_rng(3)
    x = tf.constant(rng.standard_normal((5, 4)), tf.float32)
    c = tf.constant(rng.standard_normal((5, 2, 2, 1)), tf.float32)
    y, ldj = B.forward_and_log_det(flow, x, conditional_input=c)
    # TFP's own methods, part by part (Chain runs its last part first).
    h = realnvp.forward(x, conditional_input=c)
    expected_y = maf.inverse(tf.reverse(h, [-1]), conditional_input=c)
    expected_ldj = realnvp.forward_log_det_jacobian(
        x, event_ndims=1, conditional_input=c
    ) + maf.inverse_log_det_jacobian(tf.reverse(h, [-1]), event_ndims=1, conditional_input=c)
    np.testing.assert_allclose(y, expected_y, atol=1e-5)
    np.testing.assert_allclose(ldj, expected_ldj, atol=1e-5)
    x_back, ildj = B.inverse_and_log_det(flow, tf.identity(y), conditional_input=c)
    np.testing.assert_allclose(x_back, x, atol=1e-4)
    np.testing.assert_allclose(ildj, -ldj, atol=1e-4)
    other = B.forward_and_log_det(flow, x, conditional_input=c + 1.0)[0]
    assert float(tf.reduce_max(tf.abs(other - y))) > 1e-3


def test_spline_fn_takes_a_context_of_any_shape():
    fn = nets.AutoregressiveSplineFn.build(4, [16], num_bins=4, context_shape=(3, 2))
    perturb(fn.made, 0)
    maf = tfb.Invert(tfb.MaskedAutoregressiveFlow(bijector_fn=fn))
    rng = np.random.default_rng(4)
    x = tf.constant(rng.uniform(-2, 2, (3, 4)), tf.float32)
    c = tf.constant(rng.standard_normal((3, 3, 2)), tf.float32)
    z, ldj = B.forward_and_log_det(maf, x, conditional_input=c)
    x_back, ildj = B.inverse_and_log_det(maf, tf.identity(z), conditional_input=c)
    np.testing.assert_allclose(x_back, x, atol=1e-4)
    np.testing.assert_allclose(ildj, -ldj, atol=1e-4)
    assert fn.made.get_config()["context_shape"] == [3, 2]


# ------------------------------------------------------------ model families


def _pairs(event_shape, context_shape, n=64, seed=0):
    """`x = A flatten(c) + 0.1 noise` (in the data's shape): a context that
    tells a model most of what it needs to know about x."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((n,) + context_shape).astype("float32")
    d, k = int(np.prod(event_shape)), int(np.prod(context_shape))
    a = rng.standard_normal((k, d)).astype("float32") * 0.3
    x = c.reshape(n, k) @ a + 0.1 * rng.standard_normal((n, d)).astype("float32")
    return x.reshape((n,) + event_shape), c


def _learns_its_context(model, event_shape, context_shape, epochs=4):
    x, c = _pairs(event_shape, context_shape)
    model.compile(keras.optimizers.Adam(1e-2))
    before = -float(tf.reduce_mean(model.log_prob(x, c)))
    model.fit((x, c), batch_size=32, epochs=epochs, verbose=0)
    after = -float(tf.reduce_mean(model.log_prob(x, c)))
    shuffled = -float(tf.reduce_mean(model.log_prob(x, c[::-1])))
    assert after < before - 0.1, (before, after)
    assert after < shuffled - 0.05, (after, shuffled)  # it uses the context
    assert model.context_shape == tuple(context_shape)
    assert tuple(model.get_config()["context_shape"]) == tuple(context_shape)


def test_glow_with_an_image_context_learns_to_use_it():
    model = tfp_glow.Glow(
        image_shape=(4, 4, 1),
        levels=2,
        steps_per_level=1,
        hidden_channels=8,
        num_bins=None,
        dropout=0.0,
        context_shape=(4, 4, 1),
    )
    _learns_its_context(model, (4, 4, 1), (4, 4, 1))
    twin = tfp_glow.Glow.from_config(model.get_config())
    twin.set_weights(model.get_weights())
    x, c = _pairs((4, 4, 1), (4, 4, 1), n=4, seed=1)
    np.testing.assert_allclose(twin.log_prob(x, c), model.log_prob(x, c), atol=1e-4)


def test_maf_with_a_vector_context_learns_to_use_it():
    model = tfp_glow.MAF(
        input_shape=(4,), num_layers=2, hidden_units=[16], num_bins=None, context_shape=(3,)
    )
    _learns_its_context(model, (4,), (3,))


@pytest.mark.slow
@pytest.mark.parametrize(
    "make, event_shape",
    [
        (
            lambda: tfp_glow.RealNVP(
                input_shape=(4, 4, 1),
                levels=2,
                hidden_channels=8,
                num_blocks=1,
                num_bins=None,
                logit_alpha=None,
                context_shape=(3,),
            ),
            (4, 4, 1),
        ),
        (
            lambda: tfp_glow.RealNVP(
                input_shape=(4,),
                coupling_layers=2,
                hidden_channels=16,
                num_bins=None,
                context_shape=(3,),
            ),
            (4,),
        ),
        (
            lambda: tfp_glow.NICE(
                input_shape=(4,),
                coupling_layers=2,
                hidden_units=16,
                num_hidden_layers=1,
                num_bins=None,
                context_shape=(3,),
            ),
            (4,),
        ),
        (
            lambda: tfp_glow.IAF(
                input_shape=(4,), num_layers=2, hidden_units=[16], num_bins=None, context_shape=(3,)
            ),
            (4,),
        ),
        (
            lambda: tfp_glow.NeuralSplineFlow(
                input_shape=(4,), num_layers=2, hidden_units=[16], num_bins=None, context_shape=(3,)
            ),
            (4,),
        ),
        (
            lambda: tfp_glow.NeuralSplineFlow(
                input_shape=(4,),
                variant="coupling",
                num_layers=2,
                hidden_units=[16],
                num_bins=None,
                context_shape=(3,),
            ),
            (4,),
        ),
        (
            lambda: tfp_glow.Glow(
                image_shape=(4, 4, 1),
                levels=2,
                steps_per_level=1,
                hidden_channels=8,
                num_bins=None,
                dropout=0.0,
                coupling="spline",
                last_kernel=1,
                context_shape=(3,),
            ),
            (4, 4, 1),
        ),
    ],
    ids=[
        "realnvp_image",
        "realnvp_vector",
        "nice",
        "iaf",
        "nsf_autoregressive",
        "nsf_coupling",
        "glow_spline_vector_context",
    ],
)
def test_family_learns_to_use_its_context(make, event_shape):
    _learns_its_context(make(), event_shape, (3,))


def test_checkpoint_and_reversible_backprop_give_the_same_gradients_with_a_context():
    from tfp_glow.models.glow import build_glow_flow
    from tfp_glow.training import reversible

    flow = perturb(build_glow_flow((4, 4, 1), 2, 2, 8, context_shape=(3,)), 0, 0.05)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.uniform(-0.5, 0.5, (4, 4, 4, 1)), tf.float32)
    c = tf.constant(rng.standard_normal((4, 3)), tf.float32)
    variables = flow.trainable_variables
    results = {}
    for mode in ("standard", "checkpoint", "reversible"):
        with tf.GradientTape() as tape:
            z, ldj = reversible.forward_and_log_det(
                flow, x, mode, event_ndims=3, conditional_input=c
            )
            loss = tf.reduce_sum(z**2) / 2 - tf.reduce_sum(ldj)
        results[mode] = (loss, tape.gradient(loss, variables))
    loss, grads = results["standard"]
    for mode in ("checkpoint", "reversible"):
        np.testing.assert_allclose(results[mode][0], loss, rtol=1e-6)
        for g, expected in zip(results[mode][1], grads):
            np.testing.assert_allclose(g, expected, atol=1e-5)


@pytest.mark.slow
def test_realnvp_on_an_odd_dimension_is_exact_given_the_context():
    # A 5-D posterior q(theta | x): odd D takes the alternating-feature mask.
    keras.utils.set_random_seed(0)
    model = tfp_glow.RealNVP(
        input_shape=(5,), coupling_layers=4, hidden_channels=16, context_shape=(3,), dtype="float64"
    )
    rng = np.random.RandomState(0)
    x, c = rng.randn(6, 5), rng.randn(6, 3)
    # Move the zero-initialised last layers so the map is not the identity.
    for v in model.trainable_variables:
        v.assign(v + 0.1 * rng.randn(*v.shape))
    z = model.encode(x, c).numpy()
    np.testing.assert_allclose(model.decode(z, c).numpy(), x, atol=1e-10)
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        zt = model.encode(xt, c)
    jac = tape.batch_jacobian(zt, xt).numpy()
    expected = -0.5 * np.sum(z**2, -1) - 2.5 * np.log(2 * np.pi) + np.linalg.slogdet(jac)[1]
    np.testing.assert_allclose(model.log_prob(x, c).numpy(), expected, rtol=1e-9, atol=1e-9)
    assert np.abs(model.log_prob(x, c) - model.log_prob(x, c[::-1])).max() > 1e-3
