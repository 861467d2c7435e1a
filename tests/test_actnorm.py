"""ActNorm: data-dependent init, the init context, save/restore, log-det."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfp_glow import bijectors as B

DTYPES = [tf.float32, tf.float64]
DTYPE_IDS = ["f32", "f64"]
# kind -> (make(dtype), batch shape including the batch axis)
KINDS = {
    "image": (lambda d: B.ActNorm(3, dtype=d), (32, 4, 6, 3)),
    "vector": (lambda d: B.ActNorm(5, event_ndims=1, dtype=d), (256, 5)),
}


def skewed_batch(shape, dtype, seed=0, loc=3.0, scale=2.0):
    """Data whose channels have very different means and stds."""
    rng = np.random.default_rng(seed)
    c = shape[-1]
    locs = loc * (1.0 + np.arange(c))
    scales = scale * (1.0 + 0.5 * np.arange(c))
    return tf.constant(rng.standard_normal(shape) * scales + locs, dtype)


def channel_stats(y):
    y = np.asarray(y, np.float64).reshape(-1, y.shape[-1])
    return y.mean(axis=0), y.std(axis=0)


def variables_of(act):
    return {
        name: getattr(act, name).numpy().copy() for name in ("log_scale", "bias", "initialized")
    }


def assert_variables_equal(act, expected):
    for name, value in expected.items():
        np.testing.assert_array_equal(getattr(act, name).numpy(), value, err_msg=name)


class TrackingModel(keras.Model):
    """A minimal Keras model that only holds a flow's layers."""

    def __init__(self, flow_layers, **kwargs):
        super().__init__(**kwargs)
        self.flow_layers = list(flow_layers)
        self.built = True

    def call(self, x):
        return x


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_initialize_standardises_each_channel(kind, dtype):
    make, shape = KINDS[kind]
    act = make(dtype)
    x = skewed_batch(shape, dtype)
    act.initialize(x)
    y = act.forward(x)
    assert y.dtype == dtype
    mean, std = channel_stats(y)
    np.testing.assert_allclose(mean, 0.0, atol=1e-5)
    np.testing.assert_allclose(std, 1.0, atol=1e-4)
    # And the data really was far from standard before.
    raw_mean, raw_std = channel_stats(x)
    assert np.abs(raw_mean).min() > 2.0 and raw_std.min() > 1.5


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_initialize_flips_initialized_flag(kind):
    make, shape = KINDS[kind]
    act = make(tf.float32)
    assert float(act.initialized.numpy()) == 0.0
    assert not act.is_initialized
    act.initialize(skewed_batch(shape, tf.float32))
    assert float(act.initialized.numpy()) == 1.0
    assert act.is_initialized
    # The flag is saved state, not a trainable parameter.
    trainable = {v.ref() for v in act.trainable_variables}
    assert act.initialized.value.ref() not in trainable
    assert act.initialized.value.ref() in {v.ref() for v in act.variables}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_data_dependent_init_initialises_on_first_eager_forward(kind, dtype):
    make, shape = KINDS[kind]
    act = make(dtype)
    x = skewed_batch(shape, dtype)
    with B.data_dependent_init():
        y = act.forward(x)
    assert act.is_initialized
    mean, std = channel_stats(y)
    np.testing.assert_allclose(mean, 0.0, atol=1e-5)
    np.testing.assert_allclose(std, 1.0, atol=1e-4)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_data_dependent_init_never_reinitialises(kind):
    make, shape = KINDS[kind]
    act = make(tf.float32)
    first = skewed_batch(shape, tf.float32, seed=0)
    second = skewed_batch(shape, tf.float32, seed=1, loc=-7.0, scale=0.1)
    with B.data_dependent_init():
        act.forward(first)
        after_first = variables_of(act)
        y_second = act.forward(second)
        act.inverse(second)
    assert_variables_equal(act, after_first)
    with B.data_dependent_init():
        act.forward(second)
    assert_variables_equal(act, after_first)
    # Sanity: the second batch is *not* standardised by the first batch's stats.
    mean, _ = channel_stats(y_second)
    assert np.abs(mean).min() > 1.0


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_forward_outside_context_never_changes_variables(kind):
    make, shape = KINDS[kind]
    act = make(tf.float32)
    x = skewed_batch(shape, tf.float32)
    before = variables_of(act)
    y = act.forward(x)
    act.inverse(x)
    act.forward_log_det_jacobian(x, event_ndims=act.event_ndims)
    assert_variables_equal(act, before)
    assert not act.is_initialized
    np.testing.assert_array_equal(y, x)  # uninitialised ActNorm is the identity


def test_data_dependent_init_does_not_initialise_inside_tf_function():
    act = B.ActNorm(3)
    x = skewed_batch((8, 4, 4, 3), tf.float32)
    before = variables_of(act)

    @tf.function
    def forward(x):
        return act.forward(x)

    with B.data_dependent_init():
        forward(x)
    assert_variables_equal(act, before)


def test_data_dependent_init_context_is_restored_on_exit():
    act = B.ActNorm(3)
    x = skewed_batch((8, 4, 4, 3), tf.float32)
    with pytest.raises(RuntimeError):
        with B.data_dependent_init():
            raise RuntimeError("boom")
    act.forward(x)
    assert not act.is_initialized


def _initialised_pair(dtype=tf.float32):
    shape = KINDS["image"][1]
    act = B.ActNorm(3, dtype=dtype)
    act.initialize(skewed_batch(shape, dtype, seed=0))
    return act, skewed_batch(shape, dtype, seed=5, loc=-4.0, scale=0.3)


def _assert_restored_and_never_reinitialised(restored, saved, new_batch):
    assert restored.is_initialized
    saved_values = variables_of(saved)
    assert_variables_equal(restored, saved_values)
    with B.data_dependent_init():
        y = restored.forward(new_batch)
    assert_variables_equal(restored, saved_values)
    np.testing.assert_allclose(y, saved.forward(new_batch), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_checkpoint_round_trip_restores_initialised_actnorm(tmp_path, dtype):
    act, new_batch = _initialised_pair(dtype)
    path = tf.train.Checkpoint(layers=list(act.keras_layers)).save(os.path.join(tmp_path, "ckpt"))
    saved_names = {name for name, _ in tf.train.list_variables(path)}
    for var in ("log_scale", "bias", "initialized"):
        assert any(var in name for name in saved_names), (var, saved_names)

    fresh = B.ActNorm(3, dtype=dtype)
    assert not fresh.is_initialized
    status = tf.train.Checkpoint(layers=list(fresh.keras_layers)).restore(path)
    status.assert_existing_objects_matched()
    _assert_restored_and_never_reinitialised(fresh, act, new_batch)


def test_keras_save_weights_round_trip_restores_initialised_actnorm(tmp_path):
    act, new_batch = _initialised_pair()
    model = TrackingModel(B.keras_layers_of(act))
    assert len(model.weights) == 3
    path = os.path.join(tmp_path, "flow.weights.h5")
    model.save_weights(path)

    fresh = B.ActNorm(3)
    TrackingModel(B.keras_layers_of(fresh)).load_weights(path)
    _assert_restored_and_never_reinitialised(fresh, act, new_batch)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_log_det_is_hw_times_sum_of_log_scale(dtype):
    act = B.ActNorm(3, dtype=dtype)
    log_scale = np.array([0.3, -1.2, 0.05])
    act.log_scale.assign(tf.constant(log_scale, dtype))
    act.bias.assign(tf.constant([1.0, -2.0, 0.5], dtype))
    x = skewed_batch((5, 4, 6, 3), dtype)
    expected = 4 * 6 * log_scale.sum()
    fldj = act.forward_log_det_jacobian(x, event_ndims=3)
    ildj = act.inverse_log_det_jacobian(x, event_ndims=3)
    np.testing.assert_allclose(np.broadcast_to(fldj, [5]), expected, rtol=1e-6)
    np.testing.assert_allclose(np.broadcast_to(ildj, [5]), -expected, rtol=1e-6)
    _, ldj = act.forward_and_log_det(x)
    np.testing.assert_allclose(np.broadcast_to(ldj, [5]), expected, rtol=1e-6)
    # Other spatial sizes scale the log-det by H * W.
    bigger = skewed_batch((2, 8, 2, 3), dtype)
    np.testing.assert_allclose(
        np.broadcast_to(act.forward_log_det_jacobian(bigger, event_ndims=3), [2]),
        16 * log_scale.sum(),
        rtol=1e-6,
    )
    # The forward map is exactly y = exp(log_scale) * x + b.
    np.testing.assert_allclose(
        act.forward(x),
        np.exp(log_scale) * x.numpy() + np.array([1.0, -2.0, 0.5]),
        rtol=1e-6,
        atol=1e-5 if dtype == tf.float32 else 1e-12,
    )


def test_log_det_for_vectors_is_sum_of_log_scale():
    act = B.ActNorm(4, event_ndims=1)
    log_scale = np.array([0.5, -0.25, 1.0, -2.0])
    act.log_scale.assign(log_scale.astype(np.float32))
    x = skewed_batch((7, 4), tf.float32)
    np.testing.assert_allclose(
        np.broadcast_to(act.forward_log_det_jacobian(x, event_ndims=1), [7]),
        log_scale.sum(),
        rtol=1e-6,
    )
