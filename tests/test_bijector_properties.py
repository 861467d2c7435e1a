"""Property-based checks (hypothesis) over shapes, masks, parities, dtypes, lu,
and over every registry entry with any sample shape.

For every drawn configuration: the inverse undoes the forward map (through
`tf.identity`, so TFP's cache cannot answer), and the log-det equals the
slogdet of the autodiff Jacobian, on perturbed (non-identity) parameters.
"""

import keras
import numpy as np
import tensorflow as tf
from bijector_registry import REGISTRY
from helpers import perturb
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tfp_glow import bijectors as B
from tfp_glow import nets

SETTINGS = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BATCH = 2
ROUND_TRIP_ATOL = {tf.float32: 1e-4, tf.float64: 1e-10}
LOG_DET_ATOL = {tf.float32: 5e-3, tf.float64: 1e-8}

sizes = st.sampled_from([2, 4, 6])
dtypes = st.sampled_from([tf.float32, tf.float64])
masks = st.sampled_from(["channel", "checkerboard"])
parities = st.sampled_from([0, 1])
seeds = st.integers(0, 2**16)
# Fed from the registry: a bijector added there is drawn here too.
registry_names = st.sampled_from(sorted(REGISTRY))
sample_shapes = st.sampled_from([(), (1,), (3,), (2, 2)])


def draw(shape, dtype, seed):
    return tf.constant(np.random.default_rng(seed + 1).standard_normal((BATCH,) + shape), dtype)


def check_round_trip_and_log_det(bijector, x, dtype):
    nd = x.shape.rank - 1
    y, ldj = bijector.forward_and_log_det(x)
    x_back, ildj = bijector.inverse_and_log_det(tf.identity(y))
    np.testing.assert_allclose(x_back, x, atol=ROUND_TRIP_ATOL[dtype], rtol=0)
    np.testing.assert_allclose(
        np.broadcast_to(ldj, [BATCH]),
        -np.broadcast_to(ildj, [BATCH]),
        atol=LOG_DET_ATOL[dtype],
        rtol=1e-6,
    )
    x_flat = tf.reshape(x, [BATCH, -1])
    with tf.GradientTape(persistent=x_flat.shape[1] <= 48) as tape:
        tape.watch(x_flat)
        y_flat = tf.reshape(bijector.forward(tf.reshape(x_flat, x.shape)), [BATCH, -1])
    # pfor traces a graph per call: only worth it for large events.
    jac = tape.batch_jacobian(y_flat, x_flat, experimental_use_pfor=x_flat.shape[1] > 48)
    sign, expected = tf.linalg.slogdet(jac)
    assert np.all(sign.numpy() != 0)
    np.testing.assert_allclose(
        np.broadcast_to(ldj, [BATCH]), expected, atol=LOG_DET_ATOL[dtype], rtol=1e-4
    )
    fldj = bijector.forward_log_det_jacobian(x, event_ndims=nd)
    np.testing.assert_allclose(
        np.broadcast_to(fldj, [BATCH]), expected, atol=LOG_DET_ATOL[dtype], rtol=1e-4
    )
    assert y.shape == x.shape and y.dtype == dtype


@SETTINGS
@given(h=sizes, w=sizes, c=sizes, dtype=dtypes, seed=seeds, image=st.booleans())
def test_actnorm_round_trip_and_log_det(h, w, c, dtype, seed, image):
    shape = (h, w, c) if image else (c,)
    act = B.ActNorm(c, event_ndims=len(shape), dtype=dtype)
    x = draw(shape, dtype, seed)
    act.initialize(x)
    perturb(act, seed)
    check_round_trip_and_log_det(act, x, dtype)


@SETTINGS
@given(h=sizes, w=sizes, c=sizes, dtype=dtypes, lu=st.booleans(), seed=seeds, image=st.booleans())
def test_invertible_conv1x1_round_trip_and_log_det(h, w, c, dtype, lu, seed, image):
    shape = (h, w, c) if image else (c,)
    conv = B.InvertibleConv1x1(c, lu=lu, event_ndims=len(shape), seed=seed, dtype=dtype)
    perturb(conv, seed, scale=0.2)
    check_round_trip_and_log_det(conv, draw(shape, dtype, seed), dtype)


@SETTINGS
@given(
    h=sizes,
    w=sizes,
    c=sizes,
    dtype=dtypes,
    mask=masks,
    parity=parities,
    affine=st.booleans(),
    seed=seeds,
)
def test_coupling_round_trip_and_log_det(h, w, c, dtype, mask, parity, affine, seed):
    keras.utils.set_random_seed(seed)
    shape = (h, w, c)
    c_out = (c // 2 if mask == "channel" else c) * (2 if affine else 1)
    net = nets.GlowCouplingNet(4, c_out, dtype=tf.as_dtype(dtype).name)
    cls = B.AffineCoupling if affine else B.AdditiveCoupling
    coupling = cls(net, mask=mask, parity=parity, event_shape=shape, dtype=dtype)
    perturb(coupling, seed)
    x = draw(shape, dtype, seed)
    check_round_trip_and_log_det(coupling, x, dtype)
    # The conditioning part is copied bit for bit.
    y = coupling.forward(x).numpy()
    if mask == "channel":
        keep = (np.arange(c) < c // 2) if parity == 0 else (np.arange(c) >= c // 2)
        np.testing.assert_array_equal(y[..., keep], x.numpy()[..., keep])
    else:
        keep = np.broadcast_to(
            B.checkerboard_mask(shape, parity, tf.float64).numpy() > 0.5, x.shape
        )
        np.testing.assert_array_equal(y[keep], x.numpy()[keep])


@SETTINGS
@given(
    d=st.sampled_from([2, 4, 6]),
    dtype=dtypes,
    mask=masks,
    parity=parities,
    affine=st.booleans(),
    seed=seeds,
)
def test_vector_coupling_round_trip_and_log_det(d, dtype, mask, parity, affine, seed):
    keras.utils.set_random_seed(seed)
    c_out = (d // 2 if mask == "channel" else d) * (2 if affine else 1)
    net = nets.MLPCouplingNet(8, c_out, dtype=tf.as_dtype(dtype).name)
    cls = B.AffineCoupling if affine else B.AdditiveCoupling
    coupling = cls(net, mask=mask, parity=parity, event_shape=(d,), dtype=dtype)
    perturb(coupling, seed)
    check_round_trip_and_log_det(coupling, draw((d,), dtype, seed), dtype)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=registry_names, dtype=dtypes, sample_shape=sample_shapes, seed=seeds)
def test_registry_bijector_maps_any_sample_shape_like_one_flat_batch(
    name, dtype, sample_shape, seed
):
    """No sample axis, one or two: the same points as a flat batch, and back."""
    case = REGISTRY[name]
    assume(case.conditional is None or len(sample_shape) == 1)  # labels are [batch]
    bijector = perturb(case.make(dtype), seed)
    rng = np.random.default_rng(seed)
    n, nd = int(np.prod(sample_shape)), len(case.event_shape)
    x_flat = case.draw(rng, n, dtype)
    kw = case.kwargs(rng, n)
    x = tf.reshape(x_flat, sample_shape + case.event_shape)
    y, ldj = B.forward_and_log_det(bijector, x, nd, **kw)
    y_flat, ldj_flat = B.forward_and_log_det(bijector, x_flat, nd, **kw)
    assert y.shape == bijector.forward_event_shape(x.shape)
    assert y.shape == sample_shape + tuple(bijector.forward_event_shape(case.event_shape))
    np.testing.assert_allclose(
        tf.reshape(y, y_flat.shape), y_flat, atol=ROUND_TRIP_ATOL[dtype], rtol=0
    )
    np.testing.assert_allclose(
        np.broadcast_to(ldj, sample_shape).reshape(-1),
        np.broadcast_to(ldj_flat, [n]),
        atol=LOG_DET_ATOL[dtype],
    )
    x_back, ildj = B.inverse_and_log_det(
        bijector, tf.identity(y), bijector.forward_event_ndims(nd), **kw
    )
    np.testing.assert_allclose(x_back, x, atol=ROUND_TRIP_ATOL[dtype], rtol=0)
    np.testing.assert_allclose(
        np.broadcast_to(ildj, sample_shape),
        -np.broadcast_to(ldj, sample_shape),
        atol=LOG_DET_ATOL[dtype],
    )
