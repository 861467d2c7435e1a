"""InvertibleConv1x1: LU parameterisation, init, inverses, extreme values, saving."""

import os

import numpy as np
import pytest
import tensorflow as tf
from helpers import perturb

from tfp_glow import bijectors as B

DTYPES = [tf.float32, tf.float64]
DTYPE_IDS = ["f32", "f64"]
ATOL = {tf.float32: 1e-5, tf.float64: 1e-12}


SCALE = 0.3  # far enough from a rotation that W W^T != I shows


def lu_product_by_hand(conv):
    """P L U' in float64 numpy, applying the masks the docstring promises."""
    c = conv.channels
    p = conv.permutation.numpy().astype(np.float64)
    lower = np.tril(conv.lower.numpy().astype(np.float64), -1) + np.eye(c)
    diag = conv.sign.numpy().astype(np.float64) * np.exp(conv.log_s.numpy().astype(np.float64))
    upper = np.triu(conv.upper.numpy().astype(np.float64), 1) + np.diag(diag)
    return p @ lower @ upper


def images(shape=(3, 4, 5, 6), dtype=tf.float32, seed=1):
    return tf.constant(np.random.default_rng(seed).standard_normal(shape), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("perturbed", [False, True], ids=["init", "perturbed"])
def test_lu_weight_equals_p_l_u_product(dtype, perturbed):
    conv = B.InvertibleConv1x1(6, seed=3, dtype=dtype)
    if perturbed:
        # Also moves the masked-out halves of `lower` / `upper`, which must be ignored.
        perturb(conv, 0, SCALE)
    np.testing.assert_allclose(
        conv.weight(), lu_product_by_hand(conv), atol=10 * ATOL[dtype], rtol=0
    )
    assert conv.weight().dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("lu", [True, False], ids=["lu", "full"])
def test_weight_is_orthogonal_at_init(lu, dtype):
    conv = B.InvertibleConv1x1(8, lu=lu, seed=11, dtype=dtype)
    w = conv.weight().numpy()
    np.testing.assert_allclose(w @ w.T, np.eye(8), atol=1e-5)
    np.testing.assert_allclose(w.T @ w, np.eye(8), atol=1e-5)
    # A rotation, not the identity.
    assert np.abs(w - np.eye(8)).max() > 0.1


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("lu", [True, False], ids=["lu", "full"])
def test_log_det_is_zero_at_init(lu, dtype):
    conv = B.InvertibleConv1x1(6, lu=lu, seed=5, dtype=dtype)
    x = images(dtype=dtype)
    fldj = conv.forward_log_det_jacobian(x, event_ndims=3)
    # |det W| = 1 for a rotation; H * W = 20 pixels accumulate the rounding.
    np.testing.assert_allclose(fldj, 0.0, atol=1e-4 if dtype == tf.float32 else 1e-11)
    if lu:
        np.testing.assert_allclose(conv.log_s.numpy().sum(), 0.0, atol=1e-5)


@pytest.mark.parametrize("lu", [True, False], ids=["lu", "full"])
def test_same_seed_gives_same_weight(lu):
    w1 = B.InvertibleConv1x1(5, lu=lu, seed=42).weight()
    w2 = B.InvertibleConv1x1(5, lu=lu, seed=42).weight()
    np.testing.assert_array_equal(w1, w2)


@pytest.mark.parametrize("lu", [True, False], ids=["lu", "full"])
def test_different_seeds_give_different_weights(lu):
    w1 = B.InvertibleConv1x1(5, lu=lu, seed=1).weight().numpy()
    w2 = B.InvertibleConv1x1(5, lu=lu, seed=2).weight().numpy()
    assert np.abs(w1 - w2).max() > 0.1


def test_lu_and_full_agree_for_the_same_seed():
    w_lu = B.InvertibleConv1x1(5, lu=True, seed=9, dtype=tf.float64).weight()
    w_full = B.InvertibleConv1x1(5, lu=False, seed=9, dtype=tf.float64).weight()
    np.testing.assert_allclose(w_lu, w_full, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("lu", [True, False], ids=["lu", "full"])
def test_inverse_weight_times_weight_is_identity_after_perturbation(lu, dtype):
    conv = B.InvertibleConv1x1(6, lu=lu, seed=0, dtype=dtype)
    perturb(conv, 4, SCALE)
    w, w_inv = conv.weight().numpy(), conv.inverse_weight().numpy()
    assert np.abs(w @ w.T - np.eye(6)).max() > 1e-2  # no longer a rotation
    tol = 1e-5 if dtype == tf.float32 else 1e-12
    np.testing.assert_allclose(w_inv @ w, np.eye(6), atol=tol)
    np.testing.assert_allclose(w @ w_inv, np.eye(6), atol=tol)
    # The log-det follows the perturbed matrix.
    x = images(dtype=dtype)
    expected = 20 * np.linalg.slogdet(w.astype(np.float64))[1]
    np.testing.assert_allclose(
        np.broadcast_to(conv.forward_log_det_jacobian(x, event_ndims=3), [3]),
        expected,
        rtol=1e-5,
        atol=10 * tol,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_lu_map_stays_invertible_with_extreme_log_s(dtype):
    conv = B.InvertibleConv1x1(4, seed=0, dtype=dtype)
    log_s = tf.constant([-50.0, 50.0, -20.0, 25.0], dtype)
    conv.log_s.assign(log_s)
    w = conv.weight()
    det = tf.linalg.det(tf.cast(w, tf.float64))
    assert np.isfinite(det.numpy()) and det.numpy() != 0.0
    assert np.all(np.isfinite(conv.inverse_weight().numpy()))
    # log|det| is never computed from W: it is exactly sum(log_s) * H * W.
    x = images((2, 3, 5, 4), dtype=dtype)
    y, ldj = conv.forward_and_log_det(x)
    expected = 15 * tf.reduce_sum(log_s)
    np.testing.assert_array_equal(np.broadcast_to(ldj, [2]), expected.numpy())
    np.testing.assert_allclose(float(expected), 15 * 5.0, rtol=1e-6)
    np.testing.assert_array_equal(
        np.broadcast_to(conv.inverse_log_det_jacobian(tf.identity(y), event_ndims=3), [2]),
        -expected.numpy(),
    )
    assert np.all(np.isfinite(y.numpy()))
    # W^-1 has entries ~ e^50 too, so only float64 can hold W^-1 (W x).
    if dtype == tf.float64:
        assert np.all(np.isfinite(conv.inverse(tf.identity(y)).numpy()))
    # det W = det P * 1 * prod(sign * exp(log_s)) = +-e^5 exactly, never 0
    # (a general LU of W itself is too ill-conditioned to reproduce it in float32).
    structural = np.linalg.det(conv.permutation.numpy().astype(np.float64)) * np.prod(
        conv.sign.numpy() * np.exp(log_s.numpy().astype(np.float64))
    )
    np.testing.assert_allclose(abs(structural), np.exp(5.0), rtol=1e-6)
    if dtype == tf.float64:
        np.testing.assert_allclose(det.numpy(), structural, rtol=1e-3)


@pytest.mark.parametrize("lu", [True, False], ids=["lu", "full"])
def test_frozen_factors_are_non_trainable_but_saved(lu):
    conv = B.InvertibleConv1x1(4, lu=lu, seed=0)
    trainable = {v.ref() for v in conv.trainable_variables}
    every = {v.ref() for v in conv.variables}
    if lu:
        for frozen in (conv.permutation, conv.sign):
            assert frozen.value.ref() not in trainable
            assert frozen.value.ref() in every
            assert not frozen.trainable
        assert {
            v.ref() for v in (conv.lower.value, conv.upper.value, conv.log_s.value)
        } == trainable
    else:
        assert trainable == {conv.kernel.value.ref()}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("lu", [True, False], ids=["lu", "full"])
def test_checkpoint_restores_weight_into_a_differently_seeded_conv(tmp_path, lu, dtype):
    saved = B.InvertibleConv1x1(6, lu=lu, seed=1, dtype=dtype)
    perturb(saved, 2, scale=0.1)
    path = tf.train.Checkpoint(layers=list(saved.keras_layers)).save(os.path.join(tmp_path, "conv"))
    names = " ".join(name for name, _ in tf.train.list_variables(path))
    for var in ("permutation", "sign", "lower", "upper", "log_s") if lu else ("kernel",):
        assert var in names, names

    fresh = B.InvertibleConv1x1(6, lu=lu, seed=999, dtype=dtype)
    assert np.abs(fresh.weight().numpy() - saved.weight().numpy()).max() > 0.1
    tf.train.Checkpoint(layers=list(fresh.keras_layers)).restore(
        path
    ).assert_existing_objects_matched()
    np.testing.assert_array_equal(fresh.weight(), saved.weight())
    if lu:
        np.testing.assert_array_equal(fresh.permutation.numpy(), saved.permutation.numpy())
        np.testing.assert_array_equal(fresh.sign.numpy(), saved.sign.numpy())
    x = images(dtype=dtype)
    np.testing.assert_array_equal(fresh.forward(x), saved.forward(x))


def test_keras_save_weights_restores_weight_into_a_differently_seeded_conv(tmp_path):
    import keras

    class Holder(keras.Model):
        def __init__(self, flow_layers):
            super().__init__()
            self.flow_layers = list(flow_layers)
            self.built = True

        def call(self, x):
            return x

    saved = B.InvertibleConv1x1(6, seed=1)
    perturb(saved, 2, scale=0.1)
    path = os.path.join(tmp_path, "conv.weights.h5")
    Holder(saved.keras_layers).save_weights(path)
    fresh = B.InvertibleConv1x1(6, seed=123)
    Holder(fresh.keras_layers).load_weights(path)
    np.testing.assert_array_equal(fresh.weight(), saved.weight())


@pytest.mark.parametrize("lu", [True, False], ids=["lu", "full"])
def test_forward_is_the_same_matrix_at_every_pixel(lu):
    conv = B.InvertibleConv1x1(4, lu=lu, seed=0, dtype=tf.float64)
    perturb(conv, 0, SCALE)
    x = images((2, 3, 3, 4), dtype=tf.float64)
    y = conv.forward(x).numpy()
    np.testing.assert_allclose(y, x.numpy() @ conv.weight().numpy().T, atol=1e-12)
    vec = B.InvertibleConv1x1(4, lu=lu, event_ndims=1, seed=0, dtype=tf.float64)
    perturb(vec, 0, SCALE)
    v = x.numpy()[:, 0, 0, :]
    np.testing.assert_allclose(vec.forward(tf.constant(v)), v @ vec.weight().numpy().T, atol=1e-12)
    np.testing.assert_allclose(
        np.broadcast_to(vec.forward_log_det_jacobian(tf.constant(v), event_ndims=1), [2]),
        np.linalg.slogdet(vec.weight().numpy())[1],
        atol=1e-10,
    )
