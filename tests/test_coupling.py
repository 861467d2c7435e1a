"""Additive and affine coupling: init, masks, parity, net validation, bounded scale."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfp_glow import bijectors as B
from tfp_glow import nets

DTYPES = [tf.float32, tf.float64]
DTYPE_IDS = ["f32", "f64"]
IMAGE = (4, 6, 4)
VECTOR = (6,)
SIGMOID_2 = 1.0 / (1.0 + np.exp(-2.0))


class ConstantNet(keras.layers.Layer):
    """Ignores its input and returns `value` with `channels` channels."""

    def __init__(self, value, channels, **kwargs):
        super().__init__(**kwargs)
        self.value = value
        self.channels = channels

    def call(self, x):
        shape = tf.concat([tf.shape(x)[:-1], [self.channels]], axis=0)
        return tf.fill(shape, tf.constant(self.value, x.dtype))


def transformed_channels(mask, shape):
    return shape[-1] // 2 if mask == "channel" else shape[-1]


def make_net(kind, mask, shape, dtype=tf.float32, hidden=8):
    out = transformed_channels(mask, shape) * (2 if kind == "affine" else 1)
    dt = tf.as_dtype(dtype).name
    if len(shape) == 3:
        return nets.GlowCouplingNet(hidden, out, dtype=dt)
    return nets.MLPCouplingNet(hidden, out, dtype=dt)


def make_coupling(kind, mask="channel", parity=0, shape=IMAGE, dtype=tf.float32, net=None):
    cls = B.AffineCoupling if kind == "affine" else B.AdditiveCoupling
    net = make_net(kind, mask, shape, dtype) if net is None else net
    return cls(net, mask=mask, parity=parity, event_shape=shape, dtype=dtype)


def perturb(bijector, seed=0, scale=0.3):
    rng = np.random.default_rng(seed)
    for v in bijector.trainable_variables:
        v.assign(v + tf.constant(scale * rng.standard_normal(v.shape), v.dtype))


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


MASK_CASES = [(m, p, s) for m in ("channel", "checkerboard") for p in (0, 1)
              for s in (IMAGE, VECTOR)]
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
        np.broadcast_to(b.inverse_log_det_jacobian(x, event_ndims=len(shape)), [3]), 0.0)


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
        n * np.log(SIGMOID_2), rtol=rtol)


# ------------------------------------------------------------------ masks


def test_checkerboard_mask_values_for_images():
    expected = np.array([[1, 0, 1, 0, 1],
                         [0, 1, 0, 1, 0],
                         [1, 0, 1, 0, 1]], np.float32)[..., None]
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
    for parity, (kept, moved) in {0: (slice(0, half), slice(half, None)),
                                  1: (slice(half, None), slice(0, half))}.items():
        b = make_coupling(kind, "channel", parity, shape)
        perturb(b)
        y = b.forward(x).numpy()
        np.testing.assert_array_equal(y[..., kept], x.numpy()[..., kept])
        assert np.abs(y[..., moved] - x.numpy()[..., moved]).min() > 0, parity


@pytest.mark.parametrize("kind", ["additive", "affine"])
@pytest.mark.parametrize("mask,parity,shape", MASK_CASES, ids=MASK_IDS)
def test_conditioning_part_is_unchanged_exactly(kind, mask, parity, shape):
    b = make_coupling(kind, mask, parity, shape)
    perturb(b, seed=parity, scale=0.1)
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
    assert np.all((y2 - y1)[~keep] > 1.0)  # 100 * s with s = sigmoid(r + 2), r small


# ------------------------------------------------------------------ network output


@pytest.mark.parametrize("kind,mask,shape,expected", [
    ("affine", "channel", IMAGE, 4),
    ("affine", "checkerboard", IMAGE, 8),
    ("additive", "channel", IMAGE, 2),
    ("additive", "checkerboard", IMAGE, 4),
    ("affine", "channel", VECTOR, 6),
    ("additive", "checkerboard", VECTOR, 6),
])
def test_wrong_net_output_channels_raises_naming_expected_count(kind, mask, shape, expected):
    wrong = ConstantNet(0.0, expected + 1)
    b = make_coupling(kind, mask, 0, shape, net=wrong)
    with pytest.raises(ValueError, match=f"must return {expected} channels"):
        b.forward(draw(shape))
    with pytest.raises(ValueError, match=f"must return {expected} channels"):
        b.inverse(draw(shape))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("value", [1e4, -1e4, 1e30], ids=["1e4", "-1e4", "1e30"])
@pytest.mark.parametrize("mask", ["channel", "checkerboard"])
def test_affine_scale_is_bounded_for_enormous_net_output(mask, value, dtype):
    shape = IMAGE
    c_out = 2 * transformed_channels(mask, shape)
    b = make_coupling("affine", mask, 0, shape, dtype, net=ConstantNet(value, c_out))
    x = draw(shape, dtype)
    y, ldj = b.forward_and_log_det(x)
    assert np.all(np.isfinite(y.numpy()))
    assert np.all(np.isfinite(ldj.numpy()))
    # sigmoid(h + 2) <= 1: a step can only contract, so log s <= 0.
    assert np.all(ldj.numpy() <= 0.0)
    if value > 0:  # s = sigmoid(huge) = 1 exactly: y_a = x_a + t, log-det 0
        np.testing.assert_array_equal(ldj, 0.0)
    else:  # log s = log_sigmoid(2 - 1e4) ~ -1e4 per element, not -inf
        n = int(np.prod(shape)) // 2
        np.testing.assert_allclose(ldj, n * (value + 2.0), rtol=1e-6)


@pytest.mark.parametrize("mask", ["channel", "checkerboard"])
def test_affine_log_det_matches_net_scale(mask):
    """A known raw scale r gives log-det = n * log_sigmoid(r + 2)."""
    c_out = 2 * transformed_channels(mask, IMAGE)
    b = make_coupling("affine", mask, 1, IMAGE, tf.float64,
                      net=ConstantNet(-1.5, c_out))
    x = draw(IMAGE, tf.float64)
    _, ldj = b.forward_and_log_det(x)
    n = int(np.prod(IMAGE)) // 2
    np.testing.assert_allclose(ldj, n * np.log(1.0 / (1.0 + np.exp(1.5 - 2.0))), rtol=1e-12)
    keep = np.broadcast_to(conditioning_mask(mask, 1, IMAGE), x.shape)
    y = b.forward(x).numpy()
    s = 1.0 / (1.0 + np.exp(-0.5))
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
