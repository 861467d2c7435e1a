"""`tfp_glow.nets.RealNVPNet` as TFP's `tfb.RealNVP` conditioner: shapes,
identity at init, round trip and log-det vs autodiff, the bounded scale,
context, config round trip, argument checks."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp
from helpers import randomize, stateless_draw

from tfp_glow import nets

tfb = tfp.bijectors

D, MASKED = 4, 2


@pytest.fixture(autouse=True)
def _seeded():
    keras.utils.set_random_seed(9)


def draw(shape, dtype=tf.float32, seed=0):
    return stateless_draw(shape, dtype, seed, stream=7)


def realnvp(dtype="float32", **kwargs):
    net = nets.RealNVPNet(
        [16, 16], output_units=D - MASKED, input_units=MASKED, dtype=dtype, **kwargs
    )
    randomize(net)
    return net, tfb.RealNVP(num_masked=MASKED, shift_and_log_scale_fn=net)


@pytest.mark.parametrize("batch", [[], [5], [3, 4]], ids=str)
def test_shapes_and_dtype(batch):
    net = nets.RealNVPNet([8], output_units=3, input_units=2)
    randomize(net)
    for dtype in (tf.float32, tf.float64):
        shift, log_scale = net(draw(batch + [2], dtype), 3)
        assert shift.shape == log_scale.shape == tuple(batch) + (3,)
        assert shift.dtype == log_scale.dtype == dtype
    x = draw(batch + [2])
    flat = net(tf.reshape(x, [-1, 2]))
    np.testing.assert_allclose(tf.reshape(net(x)[0], [-1, 3]), flat[0], rtol=1e-6, atol=1e-6)


def test_zero_init_is_the_identity_realnvp():
    flow = tfb.RealNVP(
        num_masked=MASKED,
        shift_and_log_scale_fn=nets.RealNVPNet([16], output_units=D - MASKED, input_units=MASKED),
    )
    x = draw([5, D])
    np.testing.assert_array_equal(flow.forward(x), x)
    np.testing.assert_array_equal(flow.forward_log_det_jacobian(x, event_ndims=1), np.zeros(5))


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("float64", 1e-12)])
def test_round_trip_both_ways(dtype, tol):
    _, flow = realnvp(dtype)
    x = draw([6, D], dtype)
    y = flow.forward(x)
    assert y.dtype == dtype and np.abs(y - x).max() > 0.1
    np.testing.assert_array_equal(y[:, :MASKED], x[:, :MASKED])
    np.testing.assert_allclose(flow.inverse(tf.identity(y)), x, rtol=tol, atol=tol)
    np.testing.assert_allclose(
        flow.forward(tf.identity(flow.inverse(tf.identity(x)))), x, rtol=tol, atol=tol
    )


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("float64", 1e-12)])
def test_log_det_matches_autodiff_jacobian(dtype, tol):
    _, flow = realnvp(dtype)
    x = draw([6, D], dtype)
    with tf.GradientTape() as tape:
        x_ = tf.identity(x)
        tape.watch(x_)
        y = flow.forward(x_)
    _, log_det = tf.linalg.slogdet(tape.batch_jacobian(y, x_))
    fldj = flow.forward_log_det_jacobian(tf.identity(x), event_ndims=1)
    assert np.abs(fldj).max() > 0.1
    np.testing.assert_allclose(fldj, log_det, rtol=0, atol=tol)
    np.testing.assert_allclose(
        flow.inverse_log_det_jacobian(tf.identity(y), event_ndims=1), -fldj, rtol=0, atol=tol
    )


def test_log_scale_is_softly_clamped():
    net = nets.RealNVPNet([8], output_units=2, input_units=2, scale_bound=1.5)
    randomize(net, scale=30.0)
    _, log_scale = net(draw([64, 2]) * 10.0)
    # float32's tanh rounds to 1 far out: the bound is reached, never passed.
    assert np.all(np.abs(log_scale) <= 1.5) and np.abs(log_scale).max() > 1.4
    small = nets.RealNVPNet([8], output_units=2, input_units=2, scale_bound=1.5)
    randomize(small, scale=0.01)  # near 0 the clamp is the identity: tanh(u) ~ u
    raw = small.dense_out(small.hidden[0](draw([4, 2])))[:, 2:]
    np.testing.assert_allclose(small(draw([4, 2]))[1], raw, rtol=1e-4, atol=1e-7)


def test_context_changes_the_flow_and_round_trips():
    _, flow = realnvp(context_size=3)
    x, c = draw([5, D]), draw([5, 3], seed=1)
    y = flow.forward(x, conditional_input=c)
    assert np.abs(y - flow.forward(x, conditional_input=c + 1.0)).min(axis=0)[MASKED:].min() > 0
    np.testing.assert_allclose(
        flow.inverse(tf.identity(y), conditional_input=c), x, rtol=1e-5, atol=1e-5
    )
    net = nets.RealNVPNet([8], output_units=2, input_units=2, context_size=3)
    randomize(net)
    shift, _ = net(draw([4, 5, 2]), conditional_input=draw([5, 3], seed=1))
    assert shift.shape == (4, 5, 2)


def test_variables_exist_at_construction():
    net = nets.RealNVPNet([16, 8], output_units=3, input_units=2, context_size=4)
    assert net.built
    assert [tuple(v.shape) for v in net.trainable_variables] == [
        (6, 16),
        (16,),
        (16, 8),
        (8,),
        (8, 6),
        (6,),
    ]


def test_config_round_trip_through_json():
    net = nets.RealNVPNet(
        [8, 8],
        output_units=2,
        input_units=2,
        activation="tanh",
        context_size=3,
        scale_bound=2.0,
        zero_init_last=False,
    )
    randomize(net)
    clone = nets.RealNVPNet.from_config(json.loads(json.dumps(net.get_config())))
    clone.set_weights(net.get_weights())
    x, c = draw([4, 2]), draw([4, 3], seed=1)
    for a, b in zip(net(x, conditional_input=c), clone(x, conditional_input=c)):
        np.testing.assert_array_equal(a, b)
    revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(net))
    assert isinstance(revived, nets.RealNVPNet) and revived.get_config() == net.get_config()


@pytest.mark.parametrize(
    "kwargs,error,name",
    [
        ({"hidden_units": [0]}, ValueError, "hidden_units"),
        ({"output_units": 0}, ValueError, "output_units"),
        ({"input_units": 1.0}, TypeError, "input_units"),
        ({"activation": "nope"}, ValueError, "activation"),
        ({"context_size": -1}, ValueError, "context_size"),
        ({"scale_bound": 0.0}, ValueError, "scale_bound"),
        ({"zero_init_last": "yes"}, TypeError, "zero_init_last"),
    ],
    ids=str,
)
def test_bad_arguments_raise_naming_the_argument(kwargs, error, name):
    arguments = {"hidden_units": [8], "output_units": 2, "input_units": 2, **kwargs}
    with pytest.raises(error, match=f"`{name}`"):
        nets.RealNVPNet(**arguments)


def test_output_units_mismatch_names_the_argument():
    net = nets.RealNVPNet([8], output_units=2, input_units=2)
    with pytest.raises(ValueError, match="`output_units`"):
        net(tf.zeros([3, 2]), 3)
    # TFP's RealNVP on D=5 with num_masked=2 asks for 3 outputs of a 2-output net.
    with pytest.raises(ValueError, match="`output_units`"):
        tfb.RealNVP(num_masked=2, shift_and_log_scale_fn=net).forward(tf.zeros([3, 5]))
    with pytest.raises(ValueError, match="`x`"):
        net(tf.zeros([3, 3]), 2)


def test_mixed_precision_returns_the_input_dtype():
    net = nets.RealNVPNet([8], output_units=2, input_units=2, dtype="mixed_bfloat16")
    reference = nets.RealNVPNet([8], output_units=2, input_units=2)
    randomize(reference)
    net.set_weights(reference.get_weights())
    assert all(v.dtype == "float32" for v in net.weights)
    x = draw([5, 2])
    for got, want in zip(net(x), reference(x)):
        assert got.dtype == tf.float32
        assert 0 < np.abs(got - want).max() < 0.05  # computed in bfloat16


def test_tf_train_checkpoint_restores_every_weight(tmp_path):
    """The hidden layers live in a list, which tf.train.Checkpoint does not
    follow on a Keras layer by itself (LISTED_SUBLAYERS puts them in)."""
    net, fresh = (nets.RealNVPNet([8, 8], output_units=2, input_units=2) for _ in range(2))
    randomize(net)
    path = tf.train.Checkpoint(net=net).write(str(tmp_path / "ckpt"))
    tf.train.Checkpoint(net=fresh).read(path).assert_consumed()
    for saved, restored in zip(net.weights, fresh.weights):
        np.testing.assert_array_equal(saved, restored)
