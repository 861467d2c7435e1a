"""`tfp_glow.nets.AutoregressiveSplineFn`: TFP's MAF as a neural spline flow
(round trip, log-det vs autodiff, identity outside the bound and at init,
gradients, context, config round trip, argument checks)."""

import json

import helpers
import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_glow import nets

tfb = tfp.bijectors

D, BINS, BOUND = 3, 5, 2.0


@pytest.fixture(autouse=True)
def _seeded():
    keras.utils.set_random_seed(5)


def randomize(layer, scale=0.2):
    helpers.randomize(layer, scale)


def spline_fn(dtype="float32", **kwargs):
    fn = nets.AutoregressiveSplineFn.build(
        D, [16], num_bins=BINS, bound=BOUND, dtype=dtype, **kwargs
    )
    randomize(fn.made)
    return fn


def inside(shape, dtype=tf.float32, seed=0):
    """Points within (-BOUND, BOUND), where the spline acts."""
    return tf.random.stateless_uniform(
        shape, seed=[seed, 3], minval=-0.95 * BOUND, maxval=0.95 * BOUND, dtype=dtype
    )


def test_build_sizes_the_made():
    fn = nets.AutoregressiveSplineFn.build(D, [8], num_bins=BINS)
    assert fn.made.params == 3 * BINS - 1 and fn.made.event_size == D
    assert fn.trainable_variables == fn.made.trainable_variables


def test_zero_init_is_the_identity():
    flow = tfb.MaskedAutoregressiveFlow(
        bijector_fn=nets.AutoregressiveSplineFn.build(D, [16], num_bins=BINS, bound=BOUND)
    )
    x = inside([4, D]) * 1.5  # some coordinates outside the bound too
    np.testing.assert_allclose(flow.forward(x), x, atol=2e-6)
    np.testing.assert_allclose(
        flow.forward_log_det_jacobian(x, event_ndims=1), np.zeros(4), atol=2e-6
    )


@pytest.mark.parametrize("dtype,tol", [("float32", 2e-5), ("float64", 1e-10)])
def test_round_trip_both_ways(dtype, tol):
    flow = tfb.MaskedAutoregressiveFlow(bijector_fn=spline_fn(dtype))
    x = inside([6, D], dtype)
    y = flow.forward(x)
    assert y.dtype == dtype and np.abs(y - x).max() > 0.05
    np.testing.assert_allclose(flow.inverse(tf.identity(y)), x, rtol=tol, atol=tol)
    np.testing.assert_allclose(
        flow.forward(tf.identity(flow.inverse(tf.identity(x)))), x, rtol=tol, atol=tol
    )


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("float64", 1e-10)])
@pytest.mark.parametrize("where", ["inside", "partly_outside"])
def test_log_det_matches_autodiff_jacobian(dtype, tol, where):
    flow = tfb.MaskedAutoregressiveFlow(bijector_fn=spline_fn(dtype))
    x = inside([6, D], dtype)
    if where == "partly_outside":  # the first coordinate beyond the bound
        x = tf.concat([x[:, :1] + tf.sign(x[:, :1]) * BOUND, x[:, 1:]], axis=-1)
    with tf.GradientTape(persistent=True) as tape:
        x_ = tf.identity(x)
        tape.watch(x_)
        y = flow.forward(x_)
    # One gradient per output (pfor would trace the spline in the while loop: slow).
    jacobian = tape.batch_jacobian(y, x_, experimental_use_pfor=False)
    _, log_det = tf.linalg.slogdet(jacobian)
    fldj = flow.forward_log_det_jacobian(tf.identity(x), event_ndims=1)
    assert np.abs(fldj).max() > 0.05
    np.testing.assert_allclose(fldj, log_det, rtol=0, atol=tol)
    if where == "partly_outside":  # identity outside the bound
        np.testing.assert_array_equal(y[:, 0], x[:, 0])


def test_gradient_reaches_every_made_variable():
    fn = spline_fn()
    flow = tfb.MaskedAutoregressiveFlow(bijector_fn=fn)
    dist = tfp.distributions.TransformedDistribution(
        tfp.distributions.MultivariateNormalDiag(tf.zeros(D)), tfb.Invert(flow)
    )
    x = inside([8, D])
    with tf.GradientTape() as tape:
        loss = -tf.reduce_mean(dist.log_prob(x))
    grads = tape.gradient(loss, fn.made.trainable_variables)
    assert len(grads) == 4
    for variable, grad in zip(fn.made.trainable_variables, grads):
        assert grad is not None and np.abs(grad).max() > 0, variable.path


def test_context_changes_the_flow_and_round_trips():
    fn = spline_fn(context_size=2)
    flow = tfb.MaskedAutoregressiveFlow(bijector_fn=fn)
    x, c = inside([5, D]), inside([5, 2], seed=1)
    y = flow.forward(x, conditional_input=c)
    assert np.abs(y - flow.forward(x, conditional_input=c + 0.5)).max() > 1e-3
    np.testing.assert_allclose(
        flow.inverse(tf.identity(y), conditional_input=c), x, rtol=2e-5, atol=2e-5
    )


def test_config_round_trip_through_json():
    fn = spline_fn(context_size=2, input_order="random", min_derivative=1e-2)
    config = json.loads(json.dumps(fn.get_config()))
    clone = nets.AutoregressiveSplineFn.from_config(config)
    assert (clone.num_bins, clone.bound, clone.min_derivative) == (BINS, BOUND, 1e-2)
    clone.made.set_weights(fn.made.get_weights())
    x, c = inside([4, D]), inside([4, 2], seed=1)
    a, b = fn(x, conditional_input=c), clone(x, conditional_input=c)
    np.testing.assert_array_equal(a.forward(x), b.forward(x))


def test_bad_arguments_raise_naming_the_argument():
    made = nets.MADE(3 * BINS - 1, D, [8])
    with pytest.raises(ValueError, match="`num_bins"):
        nets.AutoregressiveSplineFn(made, num_bins=BINS + 1)
    with pytest.raises(TypeError, match="`made`"):
        nets.AutoregressiveSplineFn(keras.layers.Dense(3), num_bins=BINS)
    with pytest.raises(ValueError, match="`bound`"):
        nets.AutoregressiveSplineFn(made, num_bins=BINS, bound=0.0)
    with pytest.raises(ValueError, match="`min_bin_size`"):
        nets.AutoregressiveSplineFn(made, num_bins=BINS, bound=1.0, min_bin_size=0.5)
    with pytest.raises(ValueError, match="`min_derivative`"):
        nets.AutoregressiveSplineFn(made, num_bins=BINS, min_derivative=1.0)
    with pytest.raises(ValueError, match="`num_bins`"):
        nets.AutoregressiveSplineFn.build(D, [8], num_bins=0)
    with pytest.raises(TypeError, match="shift"):
        nets.AutoregressiveSplineFn(made, num_bins=BINS)(tf.zeros([2, D]), shift=1.0)


def test_tf_train_checkpoint_of_the_flow_restores_the_made(tmp_path):
    """A checkpoint of the MAF reaches the MADE through `_bijector_fn`."""
    fn, fresh = spline_fn(), nets.AutoregressiveSplineFn.build(D, [16], num_bins=BINS, bound=BOUND)
    flow = tfb.MaskedAutoregressiveFlow(bijector_fn=fn)
    path = tf.train.Checkpoint(flow=flow).write(str(tmp_path / "ckpt"))
    restored = tfb.MaskedAutoregressiveFlow(bijector_fn=fresh)
    tf.train.Checkpoint(flow=restored).read(path).assert_consumed()
    for saved, loaded in zip(fn.made.weights, fresh.made.weights):
        np.testing.assert_array_equal(saved, loaded)
    x = inside([4, D])
    np.testing.assert_array_equal(flow.forward(x), restored.forward(x))
