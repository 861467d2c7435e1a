"""Mixed precision at the bijector / network level.

Under a Keras `"mixed_bfloat16"` or `"mixed_float16"` policy the coupling and
prior networks compute in bfloat16/float16 (float32 variables) while the flow
math, outputs and log-dets stay float32. Every test restores the global
policy, so the rest of the suite is unaffected.
"""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import perturb

from tfp_glow import bijectors as B
from tfp_glow import nets
from tfp_glow.bijectors import _precision

IMAGE = (4, 4, 4)
VECTOR = (6,)
POLICIES = {"mixed_bfloat16": tf.bfloat16, "mixed_float16": tf.float16}


@pytest.fixture(params=sorted(POLICIES))
def global_policy(request):
    """Sets the global Keras policy for one test and always restores it."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(request.param)
    try:
        yield request.param
    finally:
        keras.mixed_precision.set_global_policy(previous)


@pytest.fixture(autouse=True)
def _seeded():
    keras.utils.set_random_seed(7)


def draw(shape, batch=3, seed=1, dtype=tf.float32):
    return tf.constant(np.random.default_rng(seed).standard_normal((batch,) + shape), dtype)


def sublayers(net):
    """The Keras layers a network computes with, itself included."""
    found = [net]
    for name in ("conv_in", "conv_mid", "conv_out", "conv", "dense_out"):
        if hasattr(net, name):
            found += sublayers(getattr(net, name))
    for block in getattr(net, "blocks", []):
        found += list(block)
    found += list(getattr(net, "hidden", []))
    return found


NETS = {
    "glow": (lambda **kw: nets.GlowCouplingNet(8, 4, **kw), IMAGE),
    "resnet": (lambda **kw: nets.ResNetCouplingNet(8, 4, num_blocks=1, **kw), IMAGE),
    "mlp": (lambda **kw: nets.MLPCouplingNet(8, 4, **kw), VECTOR),
    "zero_conv": (lambda **kw: nets.ZeroConv2D(4, **kw), IMAGE),
}


def check_net_computes_in(net, shape, compute_dtype):
    net.build((None,) + shape)
    layers = sublayers(net)
    assert len(layers) >= 2 or isinstance(net, nets.ZeroConv2D)
    for layer in layers:
        assert layer.compute_dtype == compute_dtype.name, layer.name
        assert layer.variable_dtype == "float32", layer.name
    assert net.weights and all(w.dtype == "float32" for w in net.weights)
    y = net(draw(shape))
    assert y.dtype == compute_dtype


@pytest.mark.parametrize("name", sorted(NETS))
def test_every_net_follows_the_global_policy(global_policy, name):
    make, shape = NETS[name]
    check_net_computes_in(make(), shape, POLICIES[global_policy])


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("name", sorted(NETS))
def test_every_net_takes_a_policy_name_as_dtype(name, policy):
    make, shape = NETS[name]
    assert keras.mixed_precision.global_policy().name == "float32"
    check_net_computes_in(make(dtype=policy), shape, POLICIES[policy])


COUPLINGS = [
    (kind, mask, shape)
    for kind in ("affine", "additive")
    for mask in ("channel", "checkerboard")
    for shape in (IMAGE, VECTOR)
]
COUPLING_IDS = [f"{k}-{m}-{'image' if len(s) == 3 else 'vector'}" for k, m, s in COUPLINGS]


def coupling(kind, mask, shape, **net_kwargs):
    cls = B.AffineCoupling if kind == "affine" else B.AdditiveCoupling
    net_cls = nets.GlowCouplingNet if len(shape) == 3 else nets.MLPCouplingNet
    return cls(functools.partial(net_cls, 8, **net_kwargs), mask=mask, parity=1, event_shape=shape)


@pytest.mark.parametrize("kind,mask,shape", COUPLINGS, ids=COUPLING_IDS)
def test_coupling_net_is_mixed_while_the_flow_stays_float32(global_policy, kind, mask, shape):
    b = coupling(kind, mask, shape)  # the factory's net follows the global policy
    assert b.net.compute_dtype == POLICIES[global_policy].name
    assert b.dtype == tf.float32
    perturb(b, scale=0.3)
    x = draw(shape)
    y, fldj = b.forward_and_log_det(x)
    x_back, ildj = b.inverse_and_log_det(tf.identity(y))
    for t in (y, fldj, x_back, ildj):
        assert t.dtype == tf.float32
        assert np.all(np.isfinite(t.numpy()))
    # The network sees the same (unchanged) conditioning part both ways, so
    # its low precision costs no invertibility: float32 round-off only.
    np.testing.assert_allclose(x_back, x, atol=2e-5)
    np.testing.assert_allclose(ildj, -fldj, atol=1e-5)
    # ... and it is the net that is low precision: a float32 copy with the
    # same weights differs by bfloat16/float16 round-off, not more.
    ref = coupling(kind, mask, shape, dtype="float32")
    for v, w in zip(ref.net.weights, b.net.weights):
        v.assign(w)
    y32, fldj32 = ref.forward_and_log_det(x)
    # bfloat16 keeps 8 bits of mantissa (relative spacing 0.4%), a few layers deep.
    np.testing.assert_allclose(y, y32, rtol=0.05, atol=0.05)
    assert np.abs(y32.numpy() - y.numpy()).max() > 0  # low-precision arithmetic happened
    np.testing.assert_allclose(fldj, fldj32, rtol=0.05, atol=0.05)


def test_gradients_reach_float32_variables_through_a_mixed_net(global_policy):
    b = coupling("affine", "channel", IMAGE)
    perturb(b, scale=0.3)
    x = draw(IMAGE)
    with tf.GradientTape() as tape:
        y, ldj = b.forward_and_log_det(x)
        loss = tf.reduce_mean(tf.reduce_sum(y**2, [1, 2, 3]) - ldj)
    grads = tape.gradient(loss, b.trainable_variables)
    assert len(grads) == len(b.net.trainable_variables) > 0
    for v, g in zip(b.trainable_variables, grads):
        assert v.dtype == tf.float32 and g is not None and g.dtype == tf.float32
        assert np.all(np.isfinite(g.numpy()))
    assert max(float(tf.reduce_max(tf.abs(g))) for g in grads) > 0


def test_mixed_coupling_in_tf_function_with_unknown_batch(global_policy):
    b = coupling("affine", "checkerboard", IMAGE)
    perturb(b, scale=0.3)
    fn = tf.function(
        lambda x: b.forward_and_log_det(x),
        input_signature=[tf.TensorSpec((None,) + IMAGE, tf.float32)],
    )
    x = draw(IMAGE, batch=5)
    y, ldj = fn(x)
    assert y.dtype == ldj.dtype == tf.float32
    eager_y, eager_ldj = b.forward_and_log_det(x)
    # Graph and eager kernels round bfloat16/float16 differently: agree to
    # their precision, not float32's.
    np.testing.assert_allclose(y, eager_y, rtol=0.02, atol=0.02)
    np.testing.assert_allclose(ldj, eager_ldj, rtol=0.02, atol=0.1)
    # The compiled function is itself exactly invertible.
    inv = tf.function(
        lambda y: b.inverse(y), input_signature=[tf.TensorSpec((None,) + IMAGE, tf.float32)]
    )
    np.testing.assert_allclose(inv(tf.identity(y)), x, atol=2e-5)


# ------------------------------------------------------------------ float16 overflow


class Float16Overflow(keras.layers.Layer):
    """Returns `value` computed in float16: 1e5 or -1e5 overflows to +-inf."""

    def __init__(self, value, units, **kwargs):
        super().__init__(dtype="mixed_float16", **kwargs)
        self.value = value
        self.units = units

    def call(self, x):
        ones = tf.ones(tf.concat([tf.shape(x)[:-1], [self.units]], 0), x.dtype)
        return ones * tf.constant(self.value / 10.0, x.dtype) * tf.constant(10.0, x.dtype)


@pytest.mark.parametrize("value", [1e5, -1e5], ids=["+inf", "-inf"])
@pytest.mark.parametrize("kind", ["affine", "additive"])
def test_float16_overflow_is_clipped_so_the_coupling_stays_a_bijection(kind, value):
    cls = B.AffineCoupling if kind == "affine" else B.AdditiveCoupling
    b = cls(lambda units: Float16Overflow(value, units), event_shape=IMAGE)
    h = b.net(tf.zeros((1,) + IMAGE[:-1] + (2,), tf.float16))
    assert h.dtype == tf.float16 and np.all(np.isinf(h.numpy()))  # the net overflows
    x = draw(IMAGE)
    y, fldj = b.forward_and_log_det(x)
    x_back, ildj = b.inverse_and_log_det(tf.identity(y))
    for t in (y, fldj, x_back, ildj):
        assert np.all(np.isfinite(t.numpy()))
    limit = 65504.0  # float16's largest finite value: shift (and raw scale) clipped to it
    keep = np.arange(4) < 2  # channel mask, parity 0: the first half is copied
    s = 1.0 if (kind == "additive" or value > 0) else 0.1  # the default min_scale
    shift = np.sign(value) * limit
    np.testing.assert_allclose(y.numpy()[..., ~keep], s * x.numpy()[..., ~keep] + shift, rtol=1e-6)
    np.testing.assert_array_equal(y.numpy()[..., keep], x.numpy()[..., keep])
    # Exactly invertible up to the float32 spacing of numbers near 65504.
    np.testing.assert_allclose(x_back, x, atol=0.01 / s)
    n = 4 * 4 * 2  # transformed elements
    np.testing.assert_allclose(fldj, n * np.log(s) * np.ones(3), rtol=1e-6, atol=1e-4)


def test_to_flow_dtype_clips_infinities_and_keeps_nans():
    h = tf.constant([np.inf, -np.inf, np.nan, 3.0], tf.float16)
    out = _precision.to_flow_dtype(h, tf.float32).numpy()
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out[[0, 1, 3]], [65504.0, -65504.0, 3.0])
    assert np.isnan(out[2])
    # A float64 value too large for a float32 flow is clipped, not turned to inf.
    wide = _precision.to_flow_dtype(tf.constant([1e300, -1e300], tf.float64), tf.float32)
    np.testing.assert_array_equal(wide, [np.finfo(np.float32).max, -np.finfo(np.float32).max])
    same = tf.constant([np.inf], tf.float32)
    assert _precision.to_flow_dtype(same, tf.float32) is same


# ------------------------------------------------------------------ prior nets


@pytest.mark.parametrize("event_ndims,shape", [(3, IMAGE), (1, VECTOR)], ids=["image", "vector"])
def test_factor_out_prior_net_takes_net_dtype(global_policy, event_ndims, shape):
    fo = B.FactorOut(shape[-1], event_ndims=event_ndims, net_dtype=global_policy)
    assert fo.prior_net.compute_dtype == POLICIES[global_policy].name
    assert all(w.dtype == "float32" for w in fo.prior_net.weights)
    perturb(fo, scale=0.3)
    x = draw(shape)
    z, fldj = fo.forward_and_log_det(x)
    x_back, ildj = fo.inverse_and_log_det(tf.identity(z))
    for t in (z, fldj, x_back, ildj):
        assert t.dtype == tf.float32 and np.all(np.isfinite(t.numpy()))
    np.testing.assert_allclose(x_back, x, atol=2e-5)
    np.testing.assert_allclose(ildj, -fldj, rtol=1e-6, atol=1e-5)


def test_factor_out_net_dtype_none_is_the_bijector_dtype(global_policy):
    """None means the bijector's dtype, whatever the global policy says."""
    assert B.FactorOut(4).prior_net.compute_dtype == "float32"
    assert B.FactorOut(4, dtype=tf.float64).prior_net.compute_dtype == "float64"


def test_factor_out_rejects_bad_net_dtype():
    with pytest.raises(
        ValueError,
        match=r"`net_dtype` must be None .*'mixed_bfloat16'.*"
        r"received 'int8'",
    ):
        B.FactorOut(4, net_dtype="int8")
    with pytest.raises(
        ValueError,
        match=r"`net_dtype` sets the dtype policy of the default "
        r"prior net only",
    ):
        B.FactorOut(
            4, prior_net=keras.layers.Conv2D(4, 3, padding="same"), net_dtype="mixed_bfloat16"
        )
