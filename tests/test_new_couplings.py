"""Rational-quadratic spline and mixture-of-logistics CDF couplings.

Round trips both ways (through `tf.identity`, so TFP's cache cannot answer),
log-det against an autodiff Jacobian, float32 / float64, `tf.function` with
an unknown batch, gradients to every variable, independent references for
the elementwise maps (TFP's `RationalQuadraticSpline`, a NumPy mixture CDF),
finite results far in the tails, use inside a trained flow, bad arguments.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_glow import FlowModel, nets
from tfp_glow.bijectors import ActNorm, InvertibleConv1x1, MultiScaleFlow
from tfp_glow.bijectors.base import walk_bijectors
from tfp_glow.bijectors.coupling import checkerboard_mask_np
from tfp_glow.bijectors.logistic_mixture_coupling import LogisticMixtureCoupling
from tfp_glow.bijectors.spline_coupling import (
    RationalQuadraticSplineCoupling,
    rational_quadratic_spline,
)

tfb = tfp.bijectors
IMAGE = (2, 2, 4)
VECTOR = (6,)
BATCH = 3
DTYPES = [tf.float32, tf.float64]
ROUND_TRIP_ATOL = {tf.float32: 2e-5, tf.float64: 1e-10}
LOG_DET_ATOL = {tf.float32: 2e-3, tf.float64: 1e-8}


def _units(cls, shape, mask, arg):
    c = shape[-1]
    return cls.outputs_per_channel(arg) * (c // 2 if mask == "channel" else c)


def make(kind, mask="channel", parity=0, shape=IMAGE, dtype=tf.float32, perturb=0.1, seed=0):
    cls, arg, kwargs = (
        (RationalQuadraticSplineCoupling, 5, {"num_bins": 5})
        if kind == "spline"
        else (LogisticMixtureCoupling, 3, {"num_components": 3})
    )
    units = _units(cls, shape, mask, arg)
    dt = tf.as_dtype(dtype).name
    net = (
        nets.GlowCouplingNet(8, units, dtype=dt)
        if len(shape) == 3
        else nets.MLPCouplingNet(8, units, dtype=dt)
    )
    b = cls(net, mask=mask, parity=parity, event_shape=shape, dtype=dtype, **kwargs)
    rng = np.random.default_rng(seed)
    for v in b.trainable_variables:  # off the identity init
        v.assign(v + tf.constant(perturb * rng.standard_normal(v.shape), v.dtype))
    x = tf.constant(1.5 * rng.standard_normal((BATCH,) + shape), dtype)
    return b, x


CASES = [
    ("spline", "channel", 0, IMAGE),
    ("spline", "checkerboard", 1, VECTOR),
    ("mol", "checkerboard", 0, IMAGE),
    ("mol", "channel", 1, VECTOR),
]
IDS = [f"{k}-{m}-p{p}-{len(s)}d" for k, m, p, s in CASES]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("kind,mask,parity,shape", CASES, ids=IDS)
class TestCouplingContract:
    def test_round_trip_both_ways(self, kind, mask, parity, shape, dtype):
        b, x = make(kind, mask, parity, shape, dtype)
        y = b.forward(x)
        assert y.dtype == dtype
        assert float(tf.reduce_max(tf.abs(y - x))) > 1e-2  # not the identity
        np.testing.assert_allclose(
            b.inverse(tf.identity(y)), x, atol=ROUND_TRIP_ATOL[dtype], rtol=0
        )
        z = tf.constant(np.random.default_rng(5).standard_normal(x.shape), dtype)
        np.testing.assert_allclose(
            b.forward(tf.identity(b.inverse(z))), z, atol=ROUND_TRIP_ATOL[dtype], rtol=0
        )

    def test_log_det_matches_autodiff_jacobian(self, kind, mask, parity, shape, dtype):
        b, x = make(kind, mask, parity, shape, dtype)
        flat = tf.reshape(x, [BATCH, -1])
        with tf.GradientTape() as tape:
            tape.watch(flat)
            y = tf.reshape(b.forward(tf.reshape(flat, x.shape)), [BATCH, -1])
        _, expected = tf.linalg.slogdet(tape.batch_jacobian(y, flat))
        fldj = b.forward_log_det_jacobian(x, event_ndims=len(shape))
        np.testing.assert_allclose(fldj, expected, atol=LOG_DET_ATOL[dtype], rtol=1e-5)
        assert float(tf.reduce_max(tf.abs(fldj))) > 1e-2
        ildj = b.inverse_log_det_jacobian(tf.identity(b.forward(x)), event_ndims=len(shape))
        np.testing.assert_allclose(ildj, -fldj, atol=LOG_DET_ATOL[dtype], rtol=1e-5)


@pytest.mark.parametrize("kind,mask,parity,shape", CASES, ids=IDS)
def test_tf_function_unknown_batch(kind, mask, parity, shape, dtype=tf.float64):
    b, x = make(kind, mask, parity, shape, dtype)

    @tf.function(input_signature=[tf.TensorSpec((None,) + shape, dtype)])
    def round_trip(t):
        y, ldj = b.forward_and_log_det(t)
        return y, ldj, b.inverse(tf.identity(y))

    y, ldj, x_back = round_trip(x)
    np.testing.assert_allclose(y, b.forward(x), atol=ROUND_TRIP_ATOL[dtype])
    np.testing.assert_allclose(
        ldj, b.forward_log_det_jacobian(x, event_ndims=len(shape)), atol=LOG_DET_ATOL[dtype]
    )
    np.testing.assert_allclose(x_back, x, atol=ROUND_TRIP_ATOL[dtype])
    assert round_trip(tf.concat([x, x], 0))[0].shape[0] == 2 * BATCH
    assert round_trip.experimental_get_tracing_count() == 1


@pytest.mark.parametrize("kind,mask,parity,shape", CASES, ids=IDS)
def test_gradients_reach_every_variable(kind, mask, parity, shape, dtype=tf.float32):
    b, x = make(kind, mask, parity, shape, dtype)
    w = tf.constant(np.random.default_rng(1).standard_normal(x.shape), dtype)
    with tf.GradientTape() as tape:
        y, ldj = b.forward_and_log_det(x)
        loss = tf.reduce_sum(y * w) + tf.reduce_sum(ldj)
    grads = tape.gradient(loss, b.trainable_variables)
    assert len(grads) >= 4  # every layer of the network: kernels and biases
    for v, g in zip(b.trainable_variables, grads):
        assert g is not None, v.name
        assert float(tf.reduce_max(tf.abs(g))) > 0, v.name


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_spline_matches_tfp_rational_quadratic_spline(dtype):
    """The same knots through TFP's implementation (an independent reference)."""
    rng = np.random.default_rng(0)
    k, bound = 4, 2.0
    x = tf.constant(rng.uniform(-3.0, 3.0, (50,)), dtype)
    raw = [tf.constant(rng.standard_normal((50, n)), dtype) for n in (k, k, k - 1)]
    y, ldj = rational_quadratic_spline(
        x, *raw, tail_bound=bound, min_width=1e-3, min_height=1e-3, min_derivative=1e-3
    )

    def fractions(r):
        return 2 * bound * (1e-3 + (1 - 1e-3 * k) * tf.nn.softmax(r, axis=-1))

    slopes = 1e-3 + tf.nn.softplus(raw[2] + np.log(np.expm1(1 - 1e-3)))
    ref = tfb.RationalQuadraticSpline(
        fractions(raw[0]), fractions(raw[1]), slopes, range_min=-bound
    )
    np.testing.assert_allclose(y, ref.forward(x), atol=ROUND_TRIP_ATOL[dtype] * 10)
    np.testing.assert_allclose(ldj, ref.forward_log_det_jacobian(x, 0), atol=LOG_DET_ATOL[dtype])
    outside = np.abs(x.numpy()) > bound
    assert outside.sum() > 5
    np.testing.assert_array_equal(y.numpy()[outside], x.numpy()[outside])  # linear tails
    x_back, ildj = rational_quadratic_spline(tf.identity(y), *raw, tail_bound=bound, inverse=True)
    np.testing.assert_allclose(x_back, x, atol=ROUND_TRIP_ATOL[dtype] * 10)
    np.testing.assert_allclose(ildj, -ldj, atol=LOG_DET_ATOL[dtype])


def test_mol_matches_numpy_mixture_cdf():
    """`y = logit(sum pi_k sigmoid((x - mu_k) / s_k)) exp(a) + t + m x`, in NumPy."""
    b, x = make("mol", "channel", 0, IMAGE, tf.float64)
    y, ldj = b.forward_and_log_det(x)
    x_b = x.numpy()[..., :2]
    h = b.net(tf.constant(x_b)).numpy().reshape(BATCH, 2, 2, 2, 11)
    logits, mu, r, t, q = h[..., :3], h[..., 3:6], h[..., 6:9], h[..., 9], h[..., 10]
    pi = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    mu = mu + np.linspace(-1.0, 1.0, 3)
    s = np.exp(7.0 * np.tanh(r / 7.0))
    a = 3.0 * np.tanh(q / 3.0)
    x_a = x.numpy()[..., 2:]
    sig = 1.0 / (1.0 + np.exp(-(x_a[..., None] - mu) / s))
    cdf = (pi * sig).sum(-1)
    pdf = (pi * sig * (1 - sig) / s).sum(-1)
    m = b.min_derivative
    assert m == 1e-3
    expected_y = np.log(cdf / (1 - cdf)) * np.exp(a) + t + m * x_a
    expected_ldj = np.log(pdf / (cdf * (1 - cdf)) * np.exp(a) + m).sum(axis=(1, 2, 3))
    np.testing.assert_allclose(y.numpy()[..., 2:], expected_y, atol=1e-10)
    np.testing.assert_array_equal(y.numpy()[..., :2], x_b)
    np.testing.assert_allclose(ldj, expected_ldj, atol=1e-9)


def test_spline_is_the_identity_at_init():
    b, x = make("spline", perturb=0.0)
    y, ldj = b.forward_and_log_det(x)
    np.testing.assert_allclose(y, x, atol=1e-6)
    np.testing.assert_allclose(ldj, np.zeros(BATCH), atol=1e-5)


@pytest.mark.parametrize("kind", ["spline", "mol"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_far_in_the_tails(kind, dtype):
    """Extreme transformed values round-trip (linear tails); extreme conditioning
    values still give finite results both ways."""
    b, x = make(kind, dtype=dtype)  # mask="channel", parity=0: channels 2: transformed
    values = np.array([-1e4, -50.0, -4.0, 0.0, 4.0, 50.0, 1e4])
    x_np = x.numpy()
    x_np[..., 2:] = np.resize(values, x_np[..., 2:].shape)
    y, ldj = b.forward_and_log_det(tf.constant(x_np))
    x_back, ildj = b.inverse_and_log_det(tf.identity(y))
    np.testing.assert_allclose(x_back, x_np, rtol=1e-5, atol=ROUND_TRIP_ATOL[dtype] * 10)
    np.testing.assert_allclose(ildj, -ldj, rtol=1e-5, atol=LOG_DET_ATOL[dtype])
    extreme = tf.constant(np.resize(values, x_np.shape), dtype)
    y, ldj = b.forward_and_log_det(extreme)
    x_back, ildj = b.inverse_and_log_det(tf.identity(y))
    for t in (y, ldj, x_back, ildj):
        assert np.all(np.isfinite(t.numpy()))


@pytest.mark.parametrize("kind", ["spline", "mol"])
def test_inverse_gradient_is_the_implicit_gradient(kind):
    """d inverse / d params == -(d forward / d params) / (d forward / dx)."""
    b, x = make(kind, dtype=tf.float64)
    y = tf.identity(b.forward(x))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(b.inverse(y))
    grads = tape.gradient(loss, b.trainable_variables)
    x_back = tf.identity(b.inverse(y))
    with tf.GradientTape(persistent=True) as tape2:
        tape2.watch(x_back)
        y2 = b.forward(x_back)
        # On a transformed element, d(sum y)/dx is the element's own slope (no
        # y depends on it otherwise); copied elements do not depend on theta.
        dx = tape2.gradient(y2, x_back)
        weighted = tf.reduce_sum(y2 * tf.stop_gradient(-1.0 / dx))
    weighted = tape2.gradient(weighted, b.trainable_variables)
    for g, w in zip(grads, weighted):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("kind", ["spline", "mol"])
def test_trains_inside_a_flow_model(kind):
    """ActNorm, LU 1x1 conv and the coupling as one Glow step, fitted with `fit`."""
    keras.utils.set_random_seed(0)
    shape = (2, 2, 4)
    cls, arg, kw = (
        (RationalQuadraticSplineCoupling, 4, {"num_bins": 4})
        if kind == "spline"
        else (LogisticMixtureCoupling, 2, {"num_components": 2})
    )
    coupling = cls(
        nets.GlowCouplingNet(8, _units(cls, shape, "channel", arg)), event_shape=shape, **kw
    )
    step = tfb.Chain([coupling, InvertibleConv1x1(4, seed=0), ActNorm(4)])
    model = FlowModel(MultiScaleFlow(shape, [(step, None)]), event_shape=shape, num_bins=None)
    rng = np.random.default_rng(0)
    data = (rng.standard_normal((128,) + shape) ** 3 * 0.5).astype(np.float32)
    model.initialize(data[:64])
    before = float(-tf.reduce_mean(model.log_prob(data)))
    model.compile(keras.optimizers.Adam(1e-2))
    model.fit(data, batch_size=32, epochs=8, verbose=0)
    after = float(-tf.reduce_mean(model.log_prob(data)))
    assert np.isfinite(after) and after < before - 0.1, (before, after)


def _net(units, shape=IMAGE):
    return nets.GlowCouplingNet(8, units) if len(shape) == 3 else nets.MLPCouplingNet(8, units)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"num_bins": 1}, ValueError, "num_bins"),
        ({"num_bins": 2.5}, TypeError, "num_bins"),
        ({"num_bins": True}, TypeError, "num_bins"),
        ({"tail_bound": 0.0}, ValueError, "tail_bound"),
        ({"tail_bound": "3"}, TypeError, "tail_bound"),
        ({"min_bin_width": 0.25}, ValueError, "min_bin_width"),
        ({"min_bin_height": 0.0}, ValueError, "min_bin_height"),
        ({"min_derivative": 1.0}, ValueError, "min_derivative"),
        ({"max_derivative_ratio": 0.5}, ValueError, "max_derivative_ratio"),
        ({"max_derivative_ratio": "3"}, TypeError, "max_derivative_ratio"),
        ({"mask": "stripes"}, ValueError, "mask"),
    ],
)
def test_spline_bad_arguments(kwargs, error, match):
    full = {"num_bins": 4, **kwargs}
    with pytest.raises(error, match=match):
        RationalQuadraticSplineCoupling(_net(22), event_shape=IMAGE, **full)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"num_components": 0}, ValueError, "num_components"),
        ({"num_components": 2.0}, TypeError, "num_components"),
        ({"bisection_steps": 0}, ValueError, "bisection_steps"),
        ({"bisection_steps": True}, TypeError, "bisection_steps"),
        ({"min_derivative": 1.0}, ValueError, "min_derivative"),
        ({"min_derivative": -1e-3}, ValueError, "min_derivative"),
        ({"parity": 2}, ValueError, "parity"),
    ],
)
def test_mol_bad_arguments(kwargs, error, match):
    full = {"num_components": 3, **kwargs}
    with pytest.raises(error, match=match):
        LogisticMixtureCoupling(_net(22), event_shape=IMAGE, **full)


@pytest.mark.parametrize("kind", ["spline", "mol"])
def test_network_of_the_wrong_size_is_refused(kind):
    cls, kw = (
        (RationalQuadraticSplineCoupling, {"num_bins": 4})
        if kind == "spline"
        else (LogisticMixtureCoupling, {"num_components": 4})
    )
    with pytest.raises(ValueError, match="channels"):
        b = cls(_net(4), event_shape=IMAGE, **kw)  # needs 22 or 28 channels
        b.forward(tf.zeros((1,) + IMAGE))


@pytest.mark.slow  # over ~15 s on 2 cores: CI's second step
@pytest.mark.parametrize("kind", ["spline", "mol"])
def test_glow_and_realnvp_take_the_coupling_by_name(kind, tmp_path):
    """`Glow(coupling=...)` and `RealNVP(coupling=...)` build the coupling, fit
    lowers the NLL on digits, and the `.keras` file keeps the choice."""
    import tfp_glow
    from tfp_glow.data import DIGITS_NUM_BINS, load_digits, preprocess

    images, _ = load_digits("train")
    x = np.asarray(preprocess(images[:128], DIGITS_NUM_BINS, seed=0), np.float32)
    keras.utils.set_random_seed(0)
    glow = tfp_glow.Glow(
        image_shape=(8, 8, 1),
        levels=2,
        steps_per_level=1,
        hidden_channels=8,
        num_bins=DIGITS_NUM_BINS,
        coupling=kind,
    )
    expected = {"spline": RationalQuadraticSplineCoupling, "mol": LogisticMixtureCoupling}[kind]
    found = [b for b in walk_bijectors(glow.bijector) if isinstance(b, expected)]
    assert len(found) == 2  # one per level
    glow.initialize(x[:64])
    glow.compile(keras.optimizers.Adam(3e-3))
    before = float(glow.evaluate(x, batch_size=128, verbose=0, return_dict=True)["loss"])
    glow.fit(x, batch_size=32, epochs=3, verbose=0)
    after = float(glow.evaluate(x, batch_size=128, verbose=0, return_dict=True)["loss"])
    assert np.isfinite(after) and after < before - 1.0, (before, after)
    path = str(tmp_path / f"{kind}.keras")
    glow.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.get_config()["coupling"] == kind
    np.testing.assert_allclose(loaded.log_prob(x[:8]), glow.log_prob(x[:8]), rtol=1e-5)
    realnvp = tfp_glow.RealNVP(
        input_shape=(2,), coupling_layers=2, hidden_channels=8, num_bins=None, coupling=kind
    )
    assert any(isinstance(b, expected) for b in walk_bijectors(realnvp.bijector))
    points = tfp_glow.data.toy_density("two_moons", 64, seed=0)
    realnvp.initialize(points)
    assert np.all(np.isfinite(realnvp.log_prob(points).numpy()))


def test_unknown_coupling_names_the_choices():
    import tfp_glow

    with pytest.raises(ValueError, match="coupling.*spline"):
        tfp_glow.Glow(image_shape=(8, 8, 1), levels=2, steps_per_level=1, coupling="rqs")


@pytest.mark.slow
def test_glow_spline_at_the_protocols_size(tmp_path):
    """`coupling_kwargs` and `last_kernel` reach every coupling and network:
    a 6-bin spline Glow with 1x1 last convs has the digits protocol's size
    (2 x 8, width 64, about 150k parameters) and reloads from `.keras`."""
    import tfp_glow
    from tfp_glow.bijectors import keras_layers_of
    from tfp_glow.data import DIGITS_NUM_BINS, load_digits, preprocess

    images, _ = load_digits("train")
    x = np.asarray(preprocess(images[:64], DIGITS_NUM_BINS, seed=0), np.float32)
    keras.utils.set_random_seed(0)
    glow = tfp_glow.Glow(
        image_shape=(8, 8, 1),
        levels=2,
        steps_per_level=8,
        hidden_channels=64,
        num_bins=DIGITS_NUM_BINS,
        coupling="spline",
        coupling_kwargs={"num_bins": 6},
        last_kernel=1,
    )
    glow.initialize(x)
    dequantizer = glow.dequantizer.count_params()  # Glow's default q(u | k)
    splines = [
        b for b in walk_bijectors(glow.bijector) if isinstance(b, RationalQuadraticSplineCoupling)
    ]
    assert len(splines) == 16 and {b._num_bins for b in splines} == {6}
    networks = [
        layer for layer in keras_layers_of(glow.flow) if isinstance(layer, nets.GlowCouplingNet)
    ]
    assert len(networks) == 16
    assert {tuple(n.conv_out.conv.kernel.shape[:2]) for n in networks} == {(1, 1)}
    assert dequantizer == 11_040
    # The protocol's budget, 150k +- 10%, with or without the dequantizer.
    assert glow.count_params() - dequantizer == 151_548
    assert glow.count_params() == 162_588
    path = str(tmp_path / "spline6.keras")
    glow.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.get_config()["coupling_kwargs"] == {"num_bins": 6}
    assert loaded.get_config()["last_kernel"] == 1
    np.testing.assert_allclose(loaded.log_prob(x[:8]), glow.log_prob(x[:8]), rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(coupling="spline", coupling_kwargs={"num_bin": 6}), ValueError, "num_bins"),
        (
            dict(coupling="spline", coupling_kwargs={"mask": "checkerboard"}),
            ValueError,
            "coupling_kwargs",
        ),
        (dict(coupling="affine", coupling_kwargs={"num_bins": 6}), ValueError, "coupling_kwargs"),
        (dict(coupling="spline", coupling_kwargs=[("num_bins", 6)]), TypeError, "coupling_kwargs"),
        (dict(coupling="spline", coupling_kwargs={"num_bins": 1}), ValueError, "num_bins"),
        (dict(last_kernel=0), ValueError, "last_kernel"),
        (dict(last_kernel=1.0), TypeError, "last_kernel"),
    ],
)
def test_glow_coupling_options_bad_arguments(kwargs, error, match):
    import tfp_glow

    with pytest.raises(error, match=match):
        tfp_glow.Glow(
            image_shape=(8, 8, 1),
            levels=2,
            steps_per_level=1,
            hidden_channels=8,
            num_bins=17,
            **kwargs,
        )


# ---------------------------------------------- the derivative's floor, output_units_for

LARGE_PERTURBATION_CASES = [
    ("spline", "channel", 0, IMAGE),
    ("spline", "checkerboard", 1, VECTOR),
    ("mol", "checkerboard", 0, IMAGE),
    ("mol", "channel", 1, VECTOR),
]


def _perturbed_by(b, scale, seed):
    """`v += scale * N(0, 1)` on every variable (stateless draws)."""
    for i, v in enumerate(b.trainable_variables):
        v.assign_add(scale * tf.random.stateless_normal(v.shape, [seed, i], dtype=v.dtype))
    return b


def _documented_floor(b):
    """The least dy/dx each coupling's docstring promises."""
    if isinstance(b, LogisticMixtureCoupling):
        return b.min_derivative
    k, r = b.num_bins, b.max_derivative_ratio
    s_min = b._min_height / (1.0 - (k - 1) * b._min_width)
    return min(b._min_derivative, 8.0 * s_min / (2.0 + r) ** 2)


def _transformed(b, shape):
    """Where `b` transforms (True) and copies (False), broadcast to `shape`."""
    if b.mask == "checkerboard":
        return np.broadcast_to(checkerboard_mask_np(shape, b.parity) < 0.5, shape)
    half = np.arange(shape[-1]) >= shape[-1] // 2
    return np.broadcast_to(half if b.parity == 0 else ~half, shape)


def _slopes(b, x):
    """`y` and `dy/dx` of every element (1 where copied): a transformed element
    is the only one of the transformed outputs that depends on its input."""
    a = tf.constant(_transformed(b, x.shape[1:]))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = b.forward(x)
        transformed_sum = tf.reduce_sum(tf.where(a, y, tf.zeros_like(y)))
    return y, tf.where(a, tape.gradient(transformed_sum, x), tf.ones_like(x))


# Round trips of float32 x in about [-5, 5] after `v += 0.3 N(0, 1)`: the error
# is about eps * (size of y's terms) / (dy/dx), so the floor (5.6e-5 for the
# spline, whose y stays in [-4, 4]; 1e-3 for the mixture, whose y has terms in
# the hundreds) sets it.
# Before the floors: 0.16 (spline) and 1.0 (mixture).
PERTURBED_ROUND_TRIP_ATOL = {"spline": 2e-3, "mol": 1e-2}


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kind,mask,parity,shape", LARGE_PERTURBATION_CASES, ids=IDS)
def test_float32_derivative_bounded_and_round_trip_after_a_large_perturbation(
    kind, mask, parity, shape, seed
):
    """After `v += 0.3 N(0, 1)` on every weight the map's derivative stays above
    the documented floor (it reached 2e-6 for the spline, 0 for the mixture)
    and float32 round trips hold both ways."""
    keras.utils.set_random_seed(seed)  # the nets' hidden layers start random
    b, _ = make(kind, mask, parity, shape, tf.float32, perturb=0.0)
    _perturbed_by(b, 0.3, seed)
    x = 1.5 * tf.random.stateless_normal((64,) + shape, [seed, 999])
    y, slopes = _slopes(b, x)
    assert float(tf.reduce_min(slopes)) >= _documented_floor(b) * (1 - 1e-3)
    atol = PERTURBED_ROUND_TRIP_ATOL[kind]
    np.testing.assert_allclose(b.inverse(tf.identity(y)), x, atol=atol, rtol=0)
    z = 1.5 * tf.random.stateless_normal((64,) + shape, [seed, 5])
    np.testing.assert_allclose(b.forward(tf.identity(b.inverse(z))), z, atol=atol, rtol=0)


@pytest.mark.parametrize("kind", ["spline", "mol"])
def test_bounds_off_give_the_earlier_maps(kind):
    """`max_derivative_ratio=None` / `min_derivative=0`: the maps of models saved
    before the bounds (the spline's is TFP's, checked above; the mixture's
    differs by `m x`), which are not bounded below."""
    cls, options = (
        (RationalQuadraticSplineCoupling, {"num_bins": 5, "max_derivative_ratio": None})
        if kind == "spline"
        else (LogisticMixtureCoupling, {"num_components": 3, "min_derivative": 0.0})
    )
    least = []
    for seed in range(4):
        keras.utils.set_random_seed(seed)
        b, _ = make(kind, "checkerboard", 0, IMAGE, perturb=0.0)
        _perturbed_by(b, 0.3, seed)
        unbounded = cls(b.net, event_shape=IMAGE, mask="checkerboard", **options)  # same net
        x = 1.5 * tf.random.stateless_normal((64,) + IMAGE, [seed, 999])
        least.append(float(tf.reduce_min(_slopes(unbounded, x)[1])))
        if kind == "mol":
            transformed = _transformed(b, IMAGE)
            np.testing.assert_allclose(
                b.forward(x) - unbounded.forward(x),
                np.where(transformed, 1e-3 * x.numpy(), 0.0),
                atol=1e-4,
                rtol=0,
            )
    assert min(least) < _documented_floor(b) / 10, least


@pytest.mark.parametrize(
    "mask,shape",
    [("channel", IMAGE), ("checkerboard", IMAGE), ("channel", VECTOR), ("checkerboard", VECTOR)],
)
@pytest.mark.parametrize(
    "cls,option,value",
    [
        (RationalQuadraticSplineCoupling, "num_bins", 5),
        (RationalQuadraticSplineCoupling, "num_bins", 8),
        (LogisticMixtureCoupling, "num_components", 3),
        (LogisticMixtureCoupling, "num_components", 4),
    ],
)
def test_output_units_for_is_what_the_coupling_consumes(cls, option, value, mask, shape):
    """`output_units_for` is the network size the coupling asks its factory
    for and reads from a ready network: `(3K - 1) C_a` for the spline,
    `(3K + 2) C_a` for the mixture (not 2, as it was)."""
    asked = []

    def factory(units):
        asked.append(units)
        return _net(units, shape)

    units = cls.output_units_for(shape, mask, **{option: value})
    c_a = shape[-1] // 2 if mask == "channel" else shape[-1]
    assert units == cls.outputs_per_channel(value) * c_a
    b = cls(factory, mask=mask, event_shape=shape, **{option: value})
    assert asked == [units] and b.output_units == units
    x = tf.random.stateless_normal((2,) + shape, [1, 2])
    np.testing.assert_allclose(b.inverse(tf.identity(b.forward(x))), x, atol=1e-5)
    cls(_net(units, shape), mask=mask, event_shape=shape, **{option: value}).forward(x)
    with pytest.raises(ValueError, match=f"must return {units} channels"):
        cls(_net(units - 1, shape), mask=mask, event_shape=shape, **{option: value})


@pytest.mark.parametrize("cls", [RationalQuadraticSplineCoupling, LogisticMixtureCoupling])
def test_output_units_for_defaults_are_the_constructors(cls):
    b = cls(lambda units: _net(units), event_shape=IMAGE)
    assert cls.output_units_for(IMAGE) == b.output_units
