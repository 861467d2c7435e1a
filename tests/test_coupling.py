"""Additive and affine coupling: init, masks, parity, net sizing and validation,
bounded scale."""

import functools
import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import perturb

from tfp_glow import bijectors as B
from tfp_glow import nets

DTYPES = [tf.float32, tf.float64]
DTYPE_IDS = ["f32", "f64"]
IMAGE = (4, 6, 4)
VECTOR = (6,)
SIGMOID_2 = 1.0 / (1.0 + np.exp(-2.0))
MIN_SCALE = 0.1  # AffineCoupling's default lower bound of s


class ConstantNet(keras.layers.Layer):
    """Ignores its input and returns `value` with `channels` channels."""

    def __init__(self, value, channels, **kwargs):
        super().__init__(**kwargs)
        self.value = value
        self.channels = channels

    def call(self, x):
        shape = tf.concat([tf.shape(x)[:-1], [self.channels]], axis=0)
        return tf.fill(shape, tf.constant(self.value, x.dtype))


def constant_net(value):
    """A factory: the coupling says how many channels of `value` it needs."""
    return lambda units: ConstantNet(value, units)


def make_net(shape, dtype=tf.float32, hidden=8):
    """A network factory `fn(output_units)`: the coupling sizes the network."""
    dt = tf.as_dtype(dtype).name
    cls = nets.GlowCouplingNet if len(shape) == 3 else nets.MLPCouplingNet
    return functools.partial(cls, hidden, dtype=dt)


def make_coupling(
    kind, mask="channel", parity=0, shape=IMAGE, dtype=tf.float32, net=None, **kwargs
):
    cls = B.AffineCoupling if kind == "affine" else B.AdditiveCoupling
    net = make_net(shape, dtype) if net is None else net
    return cls(net, mask=mask, parity=parity, event_shape=shape, dtype=dtype, **kwargs)


def expected_scale(raw, min_scale=MIN_SCALE):
    """The documented s(r) = s_min + (1 - s_min) sigmoid(r + b), in NumPy float64."""
    ratio = (SIGMOID_2 - min_scale) / (1.0 - min_scale)
    offset = math.log(ratio / (1.0 - ratio))
    return min_scale + (1.0 - min_scale) / (1.0 + np.exp(-(np.asarray(raw) + offset)))


def draw(shape, dtype=tf.float32, batch=3, seed=1):
    return tf.constant(np.random.default_rng(seed).standard_normal((batch,) + shape), dtype)


def conditioning_mask(mask, parity, shape):
    """Boolean array over the event: True where x is copied unchanged."""
    if mask == "checkerboard":
        b = B.checkerboard_mask(shape, parity, tf.float64).numpy() > 0.5
        return np.broadcast_to(b, shape)
    c = shape[-1]
    first_half = np.arange(c) < c // 2
    keep = first_half if parity == 0 else ~first_half
    return np.broadcast_to(keep, shape)


@pytest.fixture(autouse=True)
def _seeded():
    keras.utils.set_random_seed(1234)  # the nets' Glorot init


MASK_CASES = [
    (m, p, s) for m in ("channel", "checkerboard") for p in (0, 1) for s in (IMAGE, VECTOR)
]
MASK_IDS = [f"{m}-p{p}-{'image' if len(s) == 3 else 'vector'}" for m, p, s in MASK_CASES]


# ------------------------------------------------------------------ init


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("mask,parity,shape", MASK_CASES, ids=MASK_IDS)
def test_additive_is_exactly_the_identity_at_init(mask, parity, shape, dtype):
    b = make_coupling("additive", mask, parity, shape, dtype)
    x = draw(shape, dtype)
    y, ldj = b.forward_and_log_det(x)
    np.testing.assert_array_equal(y, x)
    np.testing.assert_array_equal(b.inverse(tf.identity(x)), x)
    np.testing.assert_array_equal(np.broadcast_to(ldj, [3]), 0.0)
    np.testing.assert_array_equal(
        np.broadcast_to(b.inverse_log_det_jacobian(x, event_ndims=len(shape)), [3]), 0.0
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("mask,parity,shape", MASK_CASES, ids=MASK_IDS)
def test_affine_at_init_scales_transformed_part_by_sigmoid_2(mask, parity, shape, dtype):
    b = make_coupling("affine", mask, parity, shape, dtype)
    x = draw(shape, dtype)
    y, ldj = b.forward_and_log_det(x)
    keep = np.broadcast_to(conditioning_mask(mask, parity, shape), x.shape)
    x_np, y_np = x.numpy(), y.numpy()
    np.testing.assert_array_equal(y_np[keep], x_np[keep])
    rtol = 1e-6 if dtype == tf.float32 else 1e-14
    np.testing.assert_allclose(y_np[~keep], SIGMOID_2 * x_np[~keep], rtol=rtol)
    n = int((~conditioning_mask(mask, parity, shape)).sum())
    assert n == int(np.prod(shape)) // 2
    np.testing.assert_allclose(np.broadcast_to(ldj, [3]), n * np.log(SIGMOID_2), rtol=rtol)
    np.testing.assert_allclose(
        np.broadcast_to(b.forward_log_det_jacobian(x, event_ndims=len(shape)), [3]),
        n * np.log(SIGMOID_2),
        rtol=rtol,
    )


# ------------------------------------------------------------------ masks


def test_checkerboard_mask_values_for_images():
    expected = np.array([[1, 0, 1, 0, 1], [0, 1, 0, 1, 0], [1, 0, 1, 0, 1]], np.float32)[..., None]
    mask0 = B.checkerboard_mask((3, 5, 4), parity=0).numpy()
    mask1 = B.checkerboard_mask((3, 5, 4), parity=1).numpy()
    assert mask0.shape == (3, 5, 1)
    np.testing.assert_array_equal(mask0, expected)
    np.testing.assert_array_equal(mask1, 1.0 - expected)


def test_checkerboard_mask_values_for_vectors():
    np.testing.assert_array_equal(B.checkerboard_mask((5,), 0), [1, 0, 1, 0, 1])
    np.testing.assert_array_equal(B.checkerboard_mask((5,), 1), [0, 1, 0, 1, 0])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_checkerboard_mask_has_requested_dtype(dtype):
    assert B.checkerboard_mask((2, 2, 1), dtype=dtype).dtype == dtype


@pytest.mark.parametrize("kind", ["additive", "affine"])
@pytest.mark.parametrize("shape", [IMAGE, VECTOR], ids=["image", "vector"])
def test_channel_mask_parity_selects_unchanged_half(kind, shape):
    x = draw(shape)
    half = shape[-1] // 2
    for parity, (kept, moved) in {
        0: (slice(0, half), slice(half, None)),
        1: (slice(half, None), slice(0, half)),
    }.items():
        b = make_coupling(kind, "channel", parity, shape)
        perturb(b, scale=0.3)
        y = b.forward(x).numpy()
        np.testing.assert_array_equal(y[..., kept], x.numpy()[..., kept])
        assert np.abs(y[..., moved] - x.numpy()[..., moved]).min() > 0, parity


@pytest.mark.parametrize("kind", ["additive", "affine"])
@pytest.mark.parametrize("mask,parity,shape", MASK_CASES, ids=MASK_IDS)
def test_conditioning_part_is_unchanged_exactly(kind, mask, parity, shape):
    b = make_coupling(kind, mask, parity, shape)
    perturb(b, parity, scale=0.1)
    x = draw(shape)
    keep = np.broadcast_to(conditioning_mask(mask, parity, shape), x.shape)
    y = b.forward(x).numpy()
    x_back = b.inverse(tf.identity(y)).numpy()
    np.testing.assert_array_equal(y[keep], x.numpy()[keep])
    np.testing.assert_array_equal(x_back[keep], y[keep])
    # ... and every other position really is transformed, and comes back.
    assert np.abs(y[~keep] - x.numpy()[~keep]).min() > 0
    np.testing.assert_allclose(x_back, x, atol=1e-5)


@pytest.mark.parametrize("mask", ["channel", "checkerboard"])
def test_net_sees_only_the_conditioning_part(mask):
    """Changing the transformed positions never changes the net's input."""
    b = make_coupling("affine", mask, 0, IMAGE, tf.float64)
    perturb(b, scale=0.1)
    x = draw(IMAGE, tf.float64)
    keep = np.broadcast_to(conditioning_mask(mask, 0, IMAGE), x.shape)
    x2 = np.where(keep, x.numpy(), 100.0 + x.numpy())
    y1, y2 = b.forward(x).numpy(), b.forward(tf.constant(x2)).numpy()
    # y_a = s(x_b) x_a + t(x_b): with x_b fixed, y2 - y1 = s * 100 on ~keep.
    _, ldj1 = b.forward_and_log_det(x)
    _, ldj2 = b.forward_and_log_det(tf.constant(x2))
    np.testing.assert_allclose(ldj1, ldj2, rtol=1e-12)
    np.testing.assert_array_equal(y2[keep], y1[keep])
    assert np.all((y2 - y1)[~keep] > 1.0)  # 100 * s with s ~ sigmoid(2), r small


# ------------------------------------------------------------------ network sizing


class RecordingFactory:
    """A factory that remembers the `output_units` it was asked for."""

    def __init__(self, shape):
        self.calls = []
        self.inner = make_net(shape)

    def __call__(self, output_units):
        self.calls.append(output_units)
        return self.inner(output_units)


@pytest.mark.parametrize(
    "kind,mask,shape,expected",
    [
        ("affine", "channel", IMAGE, 4),
        ("affine", "checkerboard", IMAGE, 8),
        ("additive", "channel", IMAGE, 2),
        ("additive", "checkerboard", IMAGE, 4),
        ("affine", "channel", VECTOR, 6),
        ("affine", "checkerboard", VECTOR, 12),
        ("additive", "channel", VECTOR, 3),
        ("additive", "checkerboard", VECTOR, 6),
    ],
)
def test_coupling_sizes_its_network_from_a_factory(kind, mask, shape, expected):
    cls = B.AffineCoupling if kind == "affine" else B.AdditiveCoupling
    assert cls.output_units_for(shape, mask) == expected
    factory = RecordingFactory(shape)
    b = cls(factory, mask=mask, parity=1, event_shape=shape)
    assert factory.calls == [expected]  # called once, at construction
    assert b.output_units == expected
    assert b.net.built
    # The network's variables are the bijector's, created eagerly.
    # (the bijector lists the tf.Variables under the Keras variables)
    assert {id(v.value) for v in b.net.trainable_variables} <= {
        id(v) for v in b.trainable_variables
    }
    assert len(b.net.trainable_variables) > 0
    y = b.forward(draw(shape))
    assert y.shape == (3,) + shape


def test_a_keras_layer_class_is_a_factory():
    """`keras.layers.Dense` takes the units first, so the class itself is a factory."""
    b = B.AffineCoupling(keras.layers.Dense, event_shape=(4,))
    assert isinstance(b.net, keras.layers.Dense)
    assert b.net.units == 4
    x = draw((4,), tf.float64)
    x = tf.cast(x, tf.float32)
    np.testing.assert_allclose(b.inverse(tf.identity(b.forward(x))), x, atol=1e-5)


def test_output_units_is_none_without_event_shape():
    b = B.AffineCoupling(nets.GlowCouplingNet(8, 4))
    assert b.output_units is None
    assert b.forward(draw(IMAGE)).shape == (3,) + IMAGE  # sized right: runs


@pytest.mark.parametrize(
    "kind,mask,shape,expected",
    [
        ("affine", "channel", IMAGE, 4),
        ("affine", "checkerboard", IMAGE, 8),
        ("additive", "channel", IMAGE, 2),
        ("additive", "checkerboard", IMAGE, 4),
        ("affine", "channel", VECTOR, 6),
        ("additive", "checkerboard", VECTOR, 6),
    ],
)
def test_wrong_net_output_channels_raises_naming_expected_count(kind, mask, shape, expected):
    """A ready layer that cannot tell its output shape is checked on the first call."""
    wrong = ConstantNet(0.0, expected + 1)
    b = make_coupling(kind, mask, 0, shape, net=wrong)
    with pytest.raises(ValueError, match=f"must return {expected} channels"):
        b.forward(draw(shape))
    with pytest.raises(ValueError, match=f"must return {expected} channels"):
        b.inverse(draw(shape))


@pytest.mark.parametrize(
    "kind,shape,wrong,expected",
    [
        ("affine", IMAGE, nets.GlowCouplingNet, 4),
        ("additive", IMAGE, nets.ResNetCouplingNet, 2),
        ("affine", VECTOR, nets.MLPCouplingNet, 6),
    ],
)
def test_wrong_ready_net_raises_at_construction(kind, shape, wrong, expected):
    """A ready layer with `compute_output_shape` is checked before any call."""
    net = wrong(8, expected + 2)
    with pytest.raises(
        ValueError,
        match=rf"must return {expected} channels .*output "
        rf"shape is \(None, .*{expected + 2}\)",
    ):
        make_coupling(kind, "channel", 0, shape, net=net)


@pytest.mark.parametrize(
    "cls,arg", [(B.AffineCoupling, "shift_and_log_scale_fn"), (B.AdditiveCoupling, "shift_fn")]
)
def test_factory_needs_event_shape(cls, arg):
    with pytest.raises(ValueError, match=rf"`{arg}` is a network factory .*pass `event_shape`"):
        cls(functools.partial(nets.GlowCouplingNet, 8))


@pytest.mark.parametrize(
    "cls,arg", [(B.AffineCoupling, "shift_and_log_scale_fn"), (B.AdditiveCoupling, "shift_fn")]
)
def test_factory_must_return_a_keras_layer(cls, arg):
    with pytest.raises(
        TypeError,
        match=rf"factory `{arg}` must return a keras.layers.Layer;"
        rf" .*\(\d\) returned 'conv'",
    ):
        cls(lambda units: "conv", event_shape=IMAGE)


@pytest.mark.parametrize(
    "bad,error,match",
    [
        ((4, 4, 3), ValueError, r"even number of channels .*\(4, 4, 3\)"),
        ((4, 4), ValueError, r"`event_shape` must have \(1, 3\) dims"),
        ("abc", TypeError, r"`event_shape` must be a sequence of positive ints"),
    ],
)
def test_output_units_for_rejects_bad_shapes(bad, error, match):
    with pytest.raises(error, match=match):
        B.AffineCoupling.output_units_for(bad, "channel")


def test_output_units_for_rejects_bad_mask():
    with pytest.raises(ValueError, match=r"`mask` must be one of \('channel', 'checkerboard'\)"):
        B.AdditiveCoupling.output_units_for(IMAGE, "stripes")


# ------------------------------------------------------------------ bounded scale


class LargeNet(keras.layers.Layer):
    """`h = value * (1 + 0.5 tanh(x W))`: outputs of size ~|value| that depend on x."""

    def __init__(self, value, units, **kwargs):
        super().__init__(**kwargs)
        self.value = value
        self.units = units

    def build(self, input_shape):
        self.w = self.add_weight(shape=(input_shape[-1], self.units), initializer="ones")

    def call(self, x):
        h = tf.tensordot(x, tf.cast(self.w, x.dtype), axes=1)
        return tf.constant(self.value, x.dtype) * (1.0 + 0.5 * tf.tanh(h))


def autodiff_log_det(fn, x):
    """log|det J| of `fn` at each row of `x` [N, D], by a full Jacobian.

    One gradient per output coordinate (rows are independent, so the gradient
    of `y[:, i]` holds row i of every example's Jacobian): ~10x faster than
    `batch_jacobian`'s pfor for these tiny D.
    """
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y = fn(x)
        outputs = [y[:, i] for i in range(y.shape[-1])]
    jacobian = tf.stack([tape.gradient(y_i, x) for y_i in outputs], axis=1)
    return np.linalg.slogdet(jacobian.numpy())[1]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("value", [200.0, -200.0, 1e4, -1e4], ids=["200", "-200", "1e4", "-1e4"])
@pytest.mark.parametrize("mask", ["channel", "checkerboard"])
def test_affine_huge_net_output_stays_finite_and_exact(mask, value, dtype):
    """Forward, inverse and both log-dets are finite, and equal autodiff's."""
    shape = (6,)
    b = make_coupling("affine", mask, 0, shape, dtype, net=lambda u: LargeNet(value, u))
    x = draw(shape, dtype, batch=4)
    y, fldj = b.forward_and_log_det(x)
    x_back, ildj = b.inverse_and_log_det(tf.identity(y))
    z = draw(shape, dtype, batch=4, seed=5) * 3.0  # sampling direction from any point
    x_of_z, ildj_z = b.inverse_and_log_det(z)
    for t in (y, fldj, x_back, ildj, x_of_z, ildj_z):
        assert np.all(np.isfinite(t.numpy())), t
    # Every transformed element has log s in [log s_min, 0]; 3 of them here.
    assert np.all(fldj.numpy() >= 3 * np.log(MIN_SCALE) - 1e-4)
    assert np.all(fldj.numpy() <= 1e-5)
    rtol = 1e-5 if dtype == tf.float32 else 1e-12
    np.testing.assert_allclose(fldj, autodiff_log_det(b.forward, x), rtol=rtol, atol=rtol)
    np.testing.assert_allclose(ildj_z, autodiff_log_det(b.inverse, z), rtol=rtol, atol=rtol)
    np.testing.assert_allclose(ildj, -fldj, rtol=rtol, atol=rtol)
    if dtype == tf.float64:  # y ~ |value| leaves float32 too few digits for x
        np.testing.assert_allclose(x_back, x, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "value",
    [200.0, -200.0, 1e4, -1e4, 1e30, -1e30],
    ids=["200", "-200", "1e4", "-1e4", "1e30", "-1e30"],
)
@pytest.mark.parametrize("mask", ["channel", "checkerboard"])
def test_affine_scale_is_bounded_on_both_sides(mask, value, dtype):
    """A raw scale r = +-huge gives s = 1 or s = s_min exactly, both ways."""
    shape = IMAGE
    b = make_coupling("affine", mask, 0, shape, dtype, net=constant_net(value))
    x = draw(shape, dtype)
    y, ldj = b.forward_and_log_det(x)
    x_back, ildj = b.inverse_and_log_det(x)  # sampling direction: divides by s
    for t in (y, ldj, x_back, ildj):
        assert np.all(np.isfinite(t.numpy()))
    n = int(np.prod(shape)) // 2
    keep = np.broadcast_to(conditioning_mask(mask, 0, shape), x.shape)
    x_np = x.numpy()
    s = 1.0 if value > 0 else MIN_SCALE
    np.testing.assert_allclose(ldj, n * np.log(s), rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(ildj, -n * np.log(s), rtol=1e-6, atol=1e-5)
    rtol = 1e-6 if dtype == tf.float32 else 1e-12
    t = float(np.float32(value))  # ConstantNet computes in float32
    np.testing.assert_allclose(y.numpy()[~keep], s * x_np[~keep] + t, rtol=rtol)
    # Inverse: x_a = (y_a - t) / s, at most 1 / s_min = 10 times |y_a - t|.
    np.testing.assert_allclose(x_back.numpy()[~keep], (x_np[~keep] - t) / s, rtol=rtol)


@pytest.mark.parametrize("min_scale", [1e-6, 0.01, 0.3, 0.8])
def test_affine_init_scale_is_sigmoid_2_for_any_min_scale(min_scale):
    assert B.AffineCoupling(keras.layers.Dense, event_shape=(2,)).min_scale == MIN_SCALE
    b = make_coupling("affine", "channel", 0, IMAGE, tf.float64, min_scale=min_scale)
    assert b.min_scale == min_scale
    x = draw(IMAGE, tf.float64)
    _, ldj = b.forward_and_log_det(x)
    n = int(np.prod(IMAGE)) // 2
    np.testing.assert_allclose(ldj, n * np.log(SIGMOID_2), rtol=1e-13)
    # ... and the floor is the one asked for.
    floor = make_coupling(
        "affine", "channel", 0, IMAGE, tf.float64, min_scale=min_scale, net=constant_net(-1e4)
    )
    np.testing.assert_allclose(floor.forward_and_log_det(x)[1], n * np.log(min_scale), rtol=1e-12)


@pytest.mark.parametrize(
    "bad,error",
    [
        (0.0, ValueError),
        (-0.1, ValueError),
        (SIGMOID_2, ValueError),
        (1.0, ValueError),
        (True, TypeError),
        ("0.1", TypeError),
    ],
)
def test_affine_min_scale_must_be_between_0_and_sigmoid_2(bad, error):
    with pytest.raises(error, match=r"`min_scale` must be a number"):
        make_coupling("affine", min_scale=bad)


@pytest.mark.parametrize("mask", ["channel", "checkerboard"])
def test_affine_log_det_matches_net_scale(mask):
    """A known raw scale r gives log-det = n * log s(r) and y_a = s(r) x_a + t."""
    b = make_coupling("affine", mask, 1, IMAGE, tf.float64, net=constant_net(-1.5))
    x = draw(IMAGE, tf.float64)
    _, ldj = b.forward_and_log_det(x)
    n = int(np.prod(IMAGE)) // 2
    s = expected_scale(-1.5)
    assert 0.6 < s < 0.7  # 0.1 + 0.9 sigmoid(-1.5 + 1.88), well inside (s_min, 1)
    np.testing.assert_allclose(ldj, n * np.log(s), rtol=1e-12)
    keep = np.broadcast_to(conditioning_mask(mask, 1, IMAGE), x.shape)
    y = b.forward(x).numpy()
    np.testing.assert_allclose(y[~keep], s * x.numpy()[~keep] - 1.5, rtol=1e-12)


# ------------------------------------------------------------------ batch shapes


@pytest.mark.parametrize("kind", ["additive", "affine"])
@pytest.mark.parametrize("mask,parity,shape", MASK_CASES[::3], ids=MASK_IDS[::3])
def test_any_batch_shape_matches_a_flat_batch(kind, mask, parity, shape):
    b = make_coupling(kind, mask, parity, shape)
    perturb(b, scale=0.1)
    x = draw(shape, batch=6)
    y, ldj = b.forward_and_log_det(x)
    y23, ldj23 = b.forward_and_log_det(tf.reshape(x, (2, 3) + shape))
    np.testing.assert_allclose(tf.reshape(y23, y.shape), y, atol=1e-6)
    np.testing.assert_allclose(tf.reshape(ldj23, [6]), ldj, rtol=1e-6, atol=1e-5)
    y0, ldj0 = b.forward_and_log_det(x[0])  # no batch axis at all
    assert y0.shape == shape
    np.testing.assert_allclose(y0, y[0], atol=1e-6)
    np.testing.assert_allclose(ldj0, ldj[0], rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(b.inverse(tf.identity(y0)), x[0], atol=1e-5)
