"""The coupling / prior networks: zero output at init, config round trip
(`get_config` -> JSON -> `from_config`), argument checks."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfp_glow import nets

IMAGE = (4, 4, 3)
VECTOR = (5,)

# name: (constructor, input event shape, output channels)
NETS = {
    "glow": (lambda: nets.GlowCouplingNet(8, 6), IMAGE, 6),
    "glow_mixed": (lambda: nets.GlowCouplingNet(8, 6, dtype="mixed_bfloat16"), IMAGE, 6),
    "resnet": (lambda: nets.ResNetCouplingNet(8, 4, num_blocks=3), IMAGE, 4),
    "resnet_no_blocks": (lambda: nets.ResNetCouplingNet(8, 4, num_blocks=0), IMAGE, 4),
    "mlp": (lambda: nets.MLPCouplingNet(16, 10, num_hidden_layers=3), VECTOR, 10),
    "mlp_linear": (lambda: nets.MLPCouplingNet(16, 10, num_hidden_layers=0), VECTOR, 10),
    "zero_conv": (lambda: nets.ZeroConv2D(5, kernel_size=1, logscale_factor=2.0), IMAGE, 5),
}


@pytest.fixture(autouse=True)
def _seeded():
    keras.utils.set_random_seed(3)


def draw(shape, batch=2, seed=0):
    return tf.constant(np.random.default_rng(seed).standard_normal((batch,) + shape), tf.float32)


def randomize(net, seed=1):
    """Every weight off its init value (the last layer starts at zero)."""
    rng = np.random.default_rng(seed)
    for w in net.weights:
        w.assign(0.3 * rng.standard_normal(w.shape).astype(np.float32))


@pytest.mark.parametrize("name", sorted(NETS))
def test_output_is_zero_at_init(name):
    make, shape, channels = NETS[name]
    net = make()
    y = net(draw(shape))
    assert tuple(y.shape) == (2,) + shape[:-1] + (channels,)
    assert net.compute_output_shape((None,) + shape) == (None,) + shape[:-1] + (channels,)
    np.testing.assert_array_equal(tf.cast(y, tf.float32), 0.0)


@pytest.mark.parametrize("name", sorted(NETS))
def test_config_round_trip_through_json_gives_the_same_net(name):
    make, shape, channels = NETS[name]
    net = make()
    net.build((None,) + shape)
    randomize(net)
    config = json.loads(json.dumps(keras.saving.serialize_keras_object(net)))
    copy = keras.saving.deserialize_keras_object(config)
    assert type(copy) is type(net)
    assert copy.get_config() == net.get_config()
    assert copy.dtype_policy.name == net.dtype_policy.name
    assert copy.built  # the serialised build config rebuilt it, weights and all
    assert [w.shape for w in copy.weights] == [w.shape for w in net.weights]
    for w_copy, w in zip(copy.weights, net.weights):
        w_copy.assign(w)
    x = draw(shape, batch=3, seed=2)
    y = net(x)
    assert float(tf.reduce_max(tf.abs(tf.cast(y, tf.float32)))) > 0.01  # not the zero init
    np.testing.assert_array_equal(copy(x), y)
    # from_config directly, as `run_layer_test` does.
    again = type(net).from_config(json.loads(json.dumps(net.get_config())))
    assert again.get_config() == net.get_config()


@pytest.mark.parametrize(
    "make,error,match",
    [
        (lambda: nets.GlowCouplingNet(0, 4), ValueError, r"`hidden_channels` must be an int >= 1"),
        (
            lambda: nets.GlowCouplingNet(8, 2.0),
            TypeError,
            r"`out_channels` must be an int >= 1; "
            r"received 2.0",
        ),
        (lambda: nets.GlowCouplingNet(True, 4), TypeError, r"`hidden_channels` must be an int"),
        (
            lambda: nets.ResNetCouplingNet(8, 4, num_blocks=-1),
            ValueError,
            r"`num_blocks` must be an int >= 0; received -1",
        ),
        (lambda: nets.ResNetCouplingNet(8, None), TypeError, r"`out_channels` must be an int"),
        (lambda: nets.MLPCouplingNet(8, 0), ValueError, r"`out_units` must be an int >= 1"),
        (lambda: nets.MLPCouplingNet("8", 2), TypeError, r"`hidden_units` must be an int"),
        (
            lambda: nets.MLPCouplingNet(8, 2, num_hidden_layers=1.5),
            TypeError,
            r"`num_hidden_layers` must be an int >= 0",
        ),
        (lambda: nets.ZeroConv2D(0), ValueError, r"`filters` must be an int >= 1"),
        (
            lambda: nets.ZeroConv2D(4, kernel_size=(3, 3)),
            TypeError,
            r"`kernel_size` must be an int",
        ),
        (
            lambda: nets.ZeroConv2D(4, logscale_factor="3"),
            TypeError,
            r"`logscale_factor` must be a number",
        ),
        (
            lambda: nets.ZeroConv2D(4, logscale_factor=float("inf")),
            ValueError,
            r"`logscale_factor` must be a finite number",
        ),
    ],
)
def test_bad_arguments_raise_naming_the_argument(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_numpy_ints_are_accepted_and_stored_as_python_ints():
    net = nets.GlowCouplingNet(np.int64(8), np.int32(4))
    config = net.get_config()
    assert type(config["hidden_channels"]) is int and type(config["out_channels"]) is int
    json.dumps(config)  # serialisable as is
