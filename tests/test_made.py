"""`tfp_glow.nets.MADE`: the autoregressive property by autodiff, shapes, the
context, zero init, config round trip, and TFP's MaskedAutoregressiveFlow on it."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp
from helpers import randomize, stateless_draw

from tfp_glow import nets

tfb = tfp.bijectors

D = 4
ORDERS = ["left-to-right", "right-to-left", "random", [3, 1, 4, 2]]


@pytest.fixture(autouse=True)
def _seeded():
    keras.utils.set_random_seed(7)


def draw(shape, dtype=tf.float32, seed=0):
    return stateless_draw(shape, dtype, seed, stream=99)


def jacobian(made, x, **kwargs):
    """d made(x)[b, i, p] / d x[b, j] as `[B, D, params, D]`."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = made(x, **kwargs)
    return tape.batch_jacobian(y, x).numpy()


def allowed(made):
    """[i, j]: output i may depend on input j (its degree is larger)."""
    degrees = made.input_order
    return degrees[None, :] < degrees[:, None]


@pytest.mark.parametrize("order", ORDERS, ids=str)
@pytest.mark.parametrize("hidden", [[], [3], [16, 16]], ids=str)
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_outputs_depend_exactly_on_earlier_inputs(order, hidden, activation):
    made = nets.MADE(2, D, hidden, input_order=order, activation=activation, seed=5)
    randomize(made)
    used = np.abs(jacobian(made, draw([8, D]))).max(axis=(0, 2)) > 0  # [i, j]
    mask = allowed(made)
    assert not np.any(used & ~mask), "an output depends on a later input"
    if activation == "tanh":  # no dead units: every allowed connection is used
        np.testing.assert_array_equal(used, mask)
    else:
        assert used.sum() > 0


@pytest.mark.parametrize("hidden_degrees", ["equal", "random"])
def test_random_hidden_degrees_keep_the_property(hidden_degrees):
    made = nets.MADE(
        3,
        6,
        [5, 7],
        input_order="random",
        hidden_degrees=hidden_degrees,
        activation="tanh",
        seed=11,
    )
    randomize(made)
    used = np.abs(jacobian(made, draw([4, 6]))).max(axis=(0, 2)) > 0
    assert not np.any(used & ~allowed(made))
    assert used.sum() > 0


def test_input_orders():
    np.testing.assert_array_equal(nets.MADE(1, D, [8]).input_order, [1, 2, 3, 4])
    np.testing.assert_array_equal(
        nets.MADE(1, D, [8], input_order="right-to-left").input_order, [4, 3, 2, 1]
    )
    np.testing.assert_array_equal(
        nets.MADE(1, D, [8], input_order=np.array([2, 4, 1, 3])).input_order, [2, 4, 1, 3]
    )
    random = nets.MADE(1, 10, [8], input_order="random", seed=3).input_order
    np.testing.assert_array_equal(np.sort(random), np.arange(1, 11))
    assert not np.array_equal(random, np.arange(1, 11))
    again = nets.MADE(1, 10, [8], input_order="random", seed=3).input_order
    np.testing.assert_array_equal(random, again)


def test_hidden_degrees_are_in_range():
    """Hidden degrees lie in [min over the layer below, D - 1]; output masks
    are strict (no output sees its own input)."""
    made = nets.MADE(2, 5, [7, 3], hidden_degrees="random", seed=2)
    masks = made.masks
    assert [m.shape for m in masks] == [(5, 7), (7, 3), (3, 10)]
    for i in range(5):  # output columns 2i, 2i+1 belong to input i
        for p in range(2):
            np.testing.assert_array_equal(masks[-1][:, 2 * i + p], masks[-1][:, 2 * i])
    own = (masks[0].astype(int) @ masks[1] @ masks[2] > 0).reshape(5, 5, 2)[..., 0]
    assert not np.any(np.diag(own))


def test_every_output_depends_on_the_context():
    made = nets.MADE(2, D, [16], activation="tanh", context_size=3)
    randomize(made)
    x, c = draw([6, D]), draw([6, 3], seed=1)
    with tf.GradientTape() as tape:
        tape.watch(c)
        y = made(x, conditional_input=c)
    dy_dc = np.abs(tape.batch_jacobian(y, c).numpy()).max(axis=(0, 2, 3))  # per output i
    assert np.all(dy_dc > 0)  # the first output too, which sees no x
    other = made(x, conditional_input=c + 1.0)
    assert np.abs(other - y).min(axis=(0, 2)).max() > 1e-3
    used = np.abs(jacobian(made, x, conditional_input=c)).max(axis=(0, 2)) > 0
    assert not np.any(used & ~allowed(made))


@pytest.mark.parametrize("batch", [[], [5], [3, 4]], ids=str)
def test_output_shape_and_values_for_any_batch_shape(batch):
    made = nets.MADE(3, D, [8], context_size=2)
    randomize(made)
    x, c = draw(batch + [D]), draw(batch + [2], seed=1)
    y = made(x, conditional_input=c)
    assert y.shape == tuple(batch) + (D, 3)
    flat = made(tf.reshape(x, [-1, D]), conditional_input=tf.reshape(c, [-1, 2]))
    np.testing.assert_allclose(tf.reshape(y, [-1, D, 3]), flat, rtol=1e-6, atol=1e-6)


def test_context_batch_broadcasts_against_x():
    made = nets.MADE(2, D, [8], context_size=2)
    randomize(made)
    x, c = draw([3, 5, D]), draw([5, 2], seed=1)
    y = made(x, conditional_input=c)
    assert y.shape == (3, 5, D, 2)
    np.testing.assert_allclose(y[1], made(x[1], conditional_input=c), rtol=1e-6, atol=1e-6)


def test_zero_init_last_gives_zero_output():
    x = draw([5, D]) * 3.0
    np.testing.assert_array_equal(nets.MADE(2, D, [16, 16])(x), np.zeros((5, D, 2)))
    assert np.abs(nets.MADE(2, D, [16], zero_init_last=False)(x)).max() > 1e-3


def test_variables_exist_at_construction():
    made = nets.MADE(2, D, [16, 8], context_size=3)
    assert made.built
    assert [tuple(v.shape) for v in made.trainable_variables] == [
        (D + 3, 16),
        (16,),
        (16 + 3, 8),
        (8,),
        (8 + 3, 2 * D),
        (2 * D,),
    ]


@pytest.mark.parametrize("order", ["random", [3, 1, 4, 2]], ids=str)
def test_config_round_trip_through_json(order):
    made = nets.MADE(
        2,
        D,
        [8, 8],
        input_order=order,
        hidden_degrees="random",
        activation="tanh",
        context_size=2,
        zero_init_last=False,
    )
    randomize(made)
    config = json.loads(json.dumps(made.get_config()))
    clone = nets.MADE.from_config(config)
    for mask, cloned in zip(made.masks, clone.masks):
        np.testing.assert_array_equal(mask, cloned)
    np.testing.assert_array_equal(made.input_order, clone.input_order)
    clone.set_weights(made.get_weights())
    x, c = draw([4, D]), draw([4, 2], seed=1)
    np.testing.assert_array_equal(made(x, conditional_input=c), clone(x, conditional_input=c))
    revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(made))
    assert isinstance(revived, nets.MADE) and revived.get_config() == made.get_config()


def maf(dtype):
    made = nets.MADE(params=2, event_size=D, hidden_units=[16], dtype=dtype)
    randomize(made)
    return tfb.MaskedAutoregressiveFlow(shift_and_log_scale_fn=made)


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("float64", 1e-10)])
def test_maf_round_trip_both_ways(dtype, tol):
    flow, x = maf(dtype), draw([6, D], dtype)
    y = flow.forward(x)
    assert y.dtype == dtype and np.abs(y - x).max() > 0.1  # not the identity
    np.testing.assert_allclose(flow.inverse(tf.identity(y)), x, rtol=tol, atol=tol)
    np.testing.assert_allclose(
        flow.forward(tf.identity(flow.inverse(tf.identity(x)))), x, rtol=tol, atol=tol
    )


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("float64", 1e-10)])
def test_maf_log_det_matches_autodiff_jacobian(dtype, tol):
    flow, x = maf(dtype), draw([6, D], dtype)
    with tf.GradientTape() as tape:
        x_ = tf.identity(x)
        tape.watch(x_)
        y = flow.forward(x_)
    _, log_det = tf.linalg.slogdet(tape.batch_jacobian(y, x_))
    fldj = flow.forward_log_det_jacobian(tf.identity(x), event_ndims=1)
    assert np.abs(fldj).max() > 0.1
    np.testing.assert_allclose(fldj, log_det, rtol=0, atol=tol)
    ildj = flow.inverse_log_det_jacobian(tf.identity(y), event_ndims=1)
    np.testing.assert_allclose(ildj, -fldj, rtol=0, atol=tol)


def test_zero_init_maf_is_the_identity():
    flow = tfb.MaskedAutoregressiveFlow(shift_and_log_scale_fn=nets.MADE(2, D, [16]))
    x = draw([3, D])
    np.testing.assert_array_equal(flow.forward(x), x)
    np.testing.assert_array_equal(flow.forward_log_det_jacobian(x, event_ndims=1), [0, 0, 0])


def test_conditional_maf_round_trip():
    made = nets.MADE(2, D, [16], context_size=2)
    randomize(made)
    flow = tfb.MaskedAutoregressiveFlow(shift_and_log_scale_fn=made)
    x, c = draw([5, D]), draw([5, 2], seed=1)
    y = flow.forward(x, conditional_input=c)
    assert np.abs(y - flow.forward(x, conditional_input=c + 1.0)).max() > 1e-3
    np.testing.assert_allclose(
        flow.inverse(tf.identity(y), conditional_input=c), x, rtol=1e-5, atol=1e-5
    )


def test_mixed_precision_computes_in_bfloat16_and_returns_the_input_dtype():
    made32 = nets.MADE(2, D, [16])
    mixed = nets.MADE(2, D, [16], dtype="mixed_bfloat16")
    randomize(made32)
    mixed.set_weights(made32.get_weights())
    assert all(v.dtype == "float32" for v in mixed.weights)
    x = draw([5, D])
    y32, y16 = made32(x), mixed(x)
    assert y16.dtype == tf.float32
    error = np.abs(y16 - y32).max()
    assert 0 < error < 0.1
    assert mixed(tf.cast(x, tf.float64)).dtype == tf.float64


def test_tf_function_with_unknown_batch():
    made = nets.MADE(2, D, [8])
    randomize(made)
    fn = tf.function(made, input_signature=[tf.TensorSpec([None, D])])
    x = draw([3, D])
    np.testing.assert_allclose(fn(x), made(x), rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs,error,name",
    [
        ({"params": 0}, ValueError, "params"),
        ({"event_size": 2.0}, TypeError, "event_size"),
        ({"hidden_units": [8, 0]}, ValueError, "hidden_units"),
        ({"hidden_units": 8}, TypeError, "hidden_units"),
        ({"input_order": "up"}, ValueError, "input_order"),
        ({"input_order": [1, 2, 2, 4]}, ValueError, "input_order"),
        ({"input_order": [0, 1, 2, 3]}, ValueError, "input_order"),
        ({"input_order": [1.0, 2.0, 3.0, 4.0]}, ValueError, "input_order"),
        ({"hidden_degrees": "even"}, ValueError, "hidden_degrees"),
        ({"activation": "nope"}, ValueError, "activation"),
        ({"seed": -1}, ValueError, "seed"),
        ({"context_size": 0}, ValueError, "context_size"),
        ({"zero_init_last": 1}, TypeError, "zero_init_last"),
    ],
    ids=lambda v: str(v) if not isinstance(v, type) else v.__name__,
)
def test_bad_arguments_raise_naming_the_argument(kwargs, error, name):
    arguments = {"params": 2, "event_size": D, "hidden_units": [8], **kwargs}
    with pytest.raises(error, match=f"`{name}`"):
        nets.MADE(**arguments)


def test_bad_calls_raise_naming_the_argument():
    made = nets.MADE(2, D, [8])
    with pytest.raises(ValueError, match="`x`"):
        made(tf.zeros([3, D + 1]))
    with pytest.raises(ValueError, match="context_size"):
        made(tf.zeros([3, D]), conditional_input=tf.zeros([3, 2]))
    conditional = nets.MADE(2, D, [8], context_size=2)
    with pytest.raises(ValueError, match="conditional_input"):
        conditional(tf.zeros([3, D]))
    with pytest.raises(ValueError, match="conditional_input"):
        conditional(tf.zeros([3, D]), conditional_input=tf.zeros([3, 3]))


def test_tf_train_checkpoint_restores_every_weight(tmp_path):
    """The kernels live in lists, which tf.train.Checkpoint does not follow
    on a Keras layer by itself (LISTED_SUBLAYERS puts them in its graph)."""
    made, fresh = (nets.MADE(2, D, [8, 8], context_size=2) for _ in range(2))
    randomize(made)
    path = tf.train.Checkpoint(net=made).write(str(tmp_path / "ckpt"))
    tf.train.Checkpoint(net=fresh).read(path).assert_consumed()
    for saved, restored in zip(made.weights, fresh.weights):
        np.testing.assert_array_equal(saved, restored)


def test_hidden_biases_start_at_the_masked_fan_in_rule():
    """b_j ~ U(-1/sqrt(n_j), 1/sqrt(n_j)), n_j the inputs unit j sees; the last layer's are 0."""
    made = nets.MADE(2, 3, [64, 64])
    for bias, mask in zip(made._biases[:-1], made.masks[:-1]):
        limit = 1 / np.sqrt(np.maximum(mask.sum(axis=0), 1))
        b = bias.numpy()
        assert np.all(np.abs(b) <= limit) and np.std(b / limit) > 0.4  # uniform: 0.577
    np.testing.assert_array_equal(made._biases[-1].numpy(), 0.0)


def test_dropout_acts_only_inside_a_training_step_and_keeps_the_masks():
    made = nets.MADE(2, D, [32, 32], zero_init_last=False, dropout=0.5)
    x = draw([8, D])
    plain = made(x).numpy()
    np.testing.assert_array_equal(made(x).numpy(), plain)  # no dropout outside a step
    with nets.dropout_active(tf.constant([3, 0], tf.int64)):
        dropped = made(x).numpy()
        np.testing.assert_array_equal(made(x).numpy(), dropped)  # one step: one mask
        # Still autoregressive: output i never sees x_i or a later input.
        jac = jacobian(made, x)
    assert np.max(np.abs(dropped - plain)) > 1e-3
    with nets.dropout_active(tf.constant([4, 0], tf.int64)):
        assert np.max(np.abs(made(x).numpy() - dropped)) > 1e-3  # next step: new mask
    degrees = made.input_order
    for i in range(D):
        for j in range(D):
            if degrees[j] >= degrees[i]:
                assert np.all(jac[:, i, :, j] == 0)
    with pytest.raises(ValueError, match="dropout"):
        nets.MADE(2, D, [8], dropout=1.0)


@pytest.mark.parametrize("order", ORDERS, ids=str)
@pytest.mark.parametrize("hidden", [[], [16]], ids=str)
def test_direct_connections_keep_the_property_and_reach_every_allowed_pair(order, hidden):
    made = nets.MADE(2, D, hidden, input_order=order, seed=5, direct_connections=True,
                     context_size=2)  # fmt: skip
    np.testing.assert_array_equal(made(draw([3, D]), conditional_input=draw([3, 2])), 0.0)
    randomize(made)
    x, c = draw([8, D]), draw([8, 2], seed=1)
    used = np.abs(jacobian(made, x, conditional_input=c)).max(axis=(0, 2)) > 0
    # The linear path alone uses every allowed connection, and nothing more.
    np.testing.assert_array_equal(used, allowed(made))
    with tf.GradientTape() as tape:
        tape.watch(c)
        out = made(x, conditional_input=c)
    assert np.all(np.abs(tape.batch_jacobian(out, c).numpy()).max(axis=(0, 2, 3)) > 0)
    restored = nets.MADE.from_config(json.loads(json.dumps(made.get_config())))
    assert restored.direct_connections and len(restored.weights) == len(made.weights)
