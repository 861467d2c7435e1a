"""`tfp_glow.nets.ODENet` and `ffjord_trace` with TFP's `tfb.FFJORD`: shapes,
round trip, log-det vs an autodiff Jacobian, Hutchinson vs the exact trace,
config round trip, argument checks.

FFJORD in eager runs the solver step by step in Python: D=2, batch 4, a small
net, and the augmented (state, trace) function compiled with `tf.function`
(the same math; FlowModel's compiled steps trace it all anyway) keep each
test to a few seconds.
"""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp
from helpers import randomize, stateless_draw

from tfp_glow import nets

tfb = tfp.bijectors

D = 2
# Tighter than TFP's default rtol=1e-3, so that the round trip is exact to
# ~1e-5; a first step of 0.1 (not 1e-3) saves the solver's warm-up steps.
SOLVER = tfp.math.ode.DormandPrince(rtol=1e-5, atol=1e-7, first_step_size=0.1)


@pytest.fixture(autouse=True)
def _seeded():
    keras.utils.set_random_seed(4)


def draw(shape, dtype=tf.float32, seed=0):
    return stateless_draw(shape, dtype, seed, stream=5)


def compiled(trace_fn):
    """`trace_fn` whose augmented ODE function runs as one `tf.function`."""
    return lambda ode_fn, state_shape, dtype: tf.function(trace_fn(ode_fn, state_shape, dtype))


def ode_net(**kwargs):
    net = nets.ODENet(D, [8], **kwargs)
    randomize(net)
    return net


def ffjord(net):
    return tfb.FFJORD(
        state_time_derivative_fn=net,
        ode_solve_fn=SOLVER.solve,
        trace_augmentation_fn=compiled(nets.ffjord_trace(exact=True)),
    )


@pytest.mark.parametrize("batch", [[], [5], [3, 4]], ids=str)
def test_shapes_dtype_and_time_dependence(batch):
    net = ode_net()
    for dtype in (tf.float32, tf.float64):
        dz = net(tf.constant(0.5, dtype), draw(batch + [D], dtype))
        assert dz.shape == tuple(batch) + (D,) and dz.dtype == dtype
    z = draw(batch + [D])
    flat = net(0.5, tf.reshape(z, [-1, D]))
    np.testing.assert_allclose(tf.reshape(net(0.5, z), [-1, D]), flat, rtol=1e-6, atol=1e-6)
    assert np.abs(net(0.0, z) - net(1.0, z)).min() > 0  # time enters every output


def test_time_enters_every_layer():
    net = nets.ODENet(D, [8, 8])
    assert [tuple(layer.kernel.shape) for layer in net.hidden + [net.dense_out]] == [
        (D + 1, 8),
        (8 + 1, 8),
        (8 + 1, D),
    ]
    conditional = nets.ODENet(D, [8], context_size=3)
    assert conditional.built
    assert tuple(conditional.hidden[0].kernel.shape) == (D + 3 + 1, 8)


def test_context_changes_the_field():
    net = ode_net(context_size=3)
    z, c = draw([4, D]), draw([4, 3], seed=1)
    dz = net(0.3, z, conditional_input=c)
    assert np.abs(dz - net(0.3, z, conditional_input=c + 1.0)).min() > 0
    assert net(0.3, draw([2, 4, D]), conditional_input=c).shape == (2, 4, D)


def test_ffjord_round_trip_and_inverse_log_det():
    """x -> y -> x through two ODE solves, conditional; -ildj(y) == fldj(x)."""
    flow = ffjord(ode_net(context_size=1))
    x, c = draw([4, D]), draw([4, 1], seed=1)
    y = flow.forward(x, conditional_input=c)
    assert np.abs(y - x).max() > 0.1
    y_ = tf.identity(y)  # a new tensor: the inverse really solves the ODE backwards
    np.testing.assert_allclose(flow.inverse(y_, conditional_input=c), x, rtol=0, atol=1e-4)
    fldj = flow.forward_log_det_jacobian(x, event_ndims=1, conditional_input=c)
    ildj = flow.inverse_log_det_jacobian(y_, event_ndims=1, conditional_input=c)
    assert np.abs(fldj).max() > 0.05
    np.testing.assert_allclose(ildj, -fldj, rtol=0, atol=1e-4)


def test_ffjord_log_det_matches_autodiff_jacobian():
    """FFJORD's integrated trace against log|det| of the Jacobian of the flow
    map `z(1)` of `dz/dt = net(t, z)`, by autodiff through TFP's solver (its
    adjoint method): equal up to the solver's error."""
    net = ode_net()
    flow, x = ffjord(net), draw([4, D])
    fldj = flow.forward_log_det_jacobian(x, event_ndims=1)
    field = tf.function(lambda t, z: net(t, z))
    with tf.GradientTape(persistent=True) as tape:
        x_ = tf.identity(x)
        tape.watch(x_)
        y = SOLVER.solve(field, 0.0, x_, solution_times=[1.0]).states[-1]
    jacobian = tape.batch_jacobian(y, x_, experimental_use_pfor=False)  # pfor can't the adjoint
    np.testing.assert_allclose(flow.forward(x), y, rtol=0, atol=1e-5)  # the same map
    assert np.abs(fldj).max() > 0.05
    np.testing.assert_allclose(fldj, tf.linalg.slogdet(jacobian)[1], rtol=0, atol=1e-3)


def test_hutchinson_estimate_averages_to_the_exact_trace():
    net = ode_net()
    z, t = draw([4, D]), tf.constant(0.4)
    state = (z, tf.zeros_like(z))
    exact_fn = nets.ffjord_trace(exact=True)(net, z.shape, z.dtype)
    dz_exact, diag = exact_fn(t, state)
    num_samples = 4000
    estimate_fn = nets.ffjord_trace(exact=False, num_samples=num_samples, seed=3)(
        net, z.shape, z.dtype
    )
    dz, estimate = estimate_fn(t, state)
    np.testing.assert_allclose(dz, dz_exact, rtol=1e-6)
    with tf.GradientTape() as tape:
        tape.watch(z)
        field = net(t, z)
    jacobian = tape.batch_jacobian(field, z).numpy()
    np.testing.assert_allclose(diag, np.diagonal(jacobian, axis1=1, axis2=2), rtol=1e-5)
    trace, trace_estimate = np.sum(diag, -1), np.sum(estimate, -1)
    # Var(r^T A r) = 2 |sym(A)|_F^2 for standard normal r: five standard errors.
    symmetric = 0.5 * (jacobian + np.transpose(jacobian, (0, 2, 1)))
    stderr = np.sqrt(2 * np.sum(symmetric**2, axis=(1, 2)) / num_samples)
    assert np.all(np.abs(trace_estimate - trace) < 5 * stderr)
    assert np.all(np.abs(trace_estimate - trace) > 0)  # an estimate, not the exact trace


def test_ffjord_trace_returns_tfps_functions():
    assert nets.ffjord_trace() is tfb.ffjord.trace_jacobian_exact
    hutchinson = nets.ffjord_trace(exact=False, num_samples=3, seed=7)
    assert hutchinson.func is tfb.ffjord.trace_jacobian_hutchinson
    assert hutchinson.keywords == {"num_samples": 3, "seed": 7}


def test_config_round_trip_through_json():
    net = ode_net(activation="softplus", context_size=2)
    clone = nets.ODENet.from_config(json.loads(json.dumps(net.get_config())))
    clone.set_weights(net.get_weights())
    z, c = draw([3, D]), draw([3, 2], seed=1)
    np.testing.assert_array_equal(
        net(0.2, z, conditional_input=c), clone(0.2, z, conditional_input=c)
    )
    revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(net))
    assert isinstance(revived, nets.ODENet) and revived.get_config() == net.get_config()


@pytest.mark.parametrize(
    "kwargs,error,name",
    [
        ({"event_size": 0}, ValueError, "event_size"),
        ({"hidden_units": [8, -1]}, ValueError, "hidden_units"),
        ({"hidden_units": None}, TypeError, "hidden_units"),
        ({"activation": "nope"}, ValueError, "activation"),
        ({"context_size": 1.5}, TypeError, "context_size"),
    ],
    ids=str,
)
def test_bad_arguments_raise_naming_the_argument(kwargs, error, name):
    with pytest.raises(error, match=f"`{name}`"):
        nets.ODENet(**{"event_size": D, "hidden_units": [8], **kwargs})


def test_bad_trace_and_call_arguments():
    with pytest.raises(TypeError, match="`exact`"):
        nets.ffjord_trace(exact=1)
    with pytest.raises(ValueError, match="`num_samples`"):
        nets.ffjord_trace(exact=False, num_samples=0)
    with pytest.raises(ValueError, match="`seed`"):
        nets.ffjord_trace(exact=False, seed=-2)
    with pytest.raises(ValueError, match="`state`"):
        nets.ODENet(D, [8])(0.0, tf.zeros([3, D + 1]))
    with pytest.raises(ValueError, match="conditional_input"):
        nets.ODENet(D, [8], context_size=2)(0.0, tf.zeros([3, D]))


def test_mixed_precision_returns_the_state_dtype():
    net = nets.ODENet(D, [8], dtype="mixed_bfloat16")
    reference = ode_net()
    net.set_weights(reference.get_weights())
    assert all(v.dtype == "float32" for v in net.weights)
    z = draw([5, D])
    got = net(0.5, z)
    assert got.dtype == tf.float32
    assert 0 < np.abs(got - reference(0.5, z)).max() < 0.05  # computed in bfloat16


def test_tf_train_checkpoint_restores_every_weight(tmp_path):
    """The hidden layers live in a list, which tf.train.Checkpoint does not
    follow on a Keras layer by itself (LISTED_SUBLAYERS puts them in)."""
    net, fresh = ode_net(), nets.ODENet(D, [8])
    path = tf.train.Checkpoint(net=net).write(str(tmp_path / "ckpt"))
    tf.train.Checkpoint(net=fresh).read(path).assert_consumed()
    for saved, restored in zip(net.weights, fresh.weights):
        np.testing.assert_array_equal(saved, restored)
