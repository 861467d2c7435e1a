"""TFP's own bijector contract, for every registry entry.

What TFP promises of any `tfb.Bijector` and checks in bijector_properties_test:
a batch shape (`experimental_batch_shape`), `copy()` giving the same map,
event shapes that keep the batch prefix (as `tfb.Reshape` / `tfb.Split` do),
`_is_increasing` for scalar maps (`cdf` / `quantile` of a transformed
distribution), `_is_permutation` implying a zero log-det, `validate_args`
raising `InvalidArgumentError` on bad values; and ours on top: an input of
unknown rank or channel count is refused with a ValueError that says so.
"""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp
from bijector_registry import IMAGE, REGISTRY
from helpers import perturb

from tfp_glow import bijectors as B

tfb = tfp.bijectors
tfd = tfp.distributions
NAMES = sorted(REGISTRY)
BATCH = 2


def build(name, dtype=tf.float32, seed=0):
    case = REGISTRY[name]
    rng = np.random.default_rng(seed)
    bijector = perturb(case.make(dtype), rng)
    return case, bijector, case.draw(rng, BATCH, dtype), case.kwargs(rng, BATCH)


def with_nan(t):
    return tf.tensor_scatter_nd_update(t, [[0] * t.shape.rank], tf.constant([np.nan], t.dtype))


# ------------------------------------------------------------------ batch shape, dtypes


@pytest.mark.parametrize("name", NAMES)
def test_batch_shape_is_scalar_and_dtypes_match(name):
    case, b, x, kw = build(name)
    nd = len(case.event_shape)
    y_nd = b.forward_event_ndims(nd)
    assert b.experimental_batch_shape() == []
    assert b.experimental_batch_shape(x_event_ndims=nd) == []
    assert b.experimental_batch_shape(y_event_ndims=y_nd) == []
    shape_tensor = b.experimental_batch_shape_tensor(x_event_ndims=nd)
    assert shape_tensor.dtype == tf.int32 and shape_tensor.shape == (0,)
    assert tfb.Invert(b).experimental_batch_shape() == []
    # A distribution built on it has no batch either.
    base = tfd.Sample(tfd.Normal(0.0, 1.0), b.forward_event_shape(case.event_shape))
    assert tfd.TransformedDistribution(base, tfb.Invert(b)).batch_shape == []
    # Batch shape [] means one log-det per event: the sample shape, or a constant.
    y = b.forward(x, **kw)
    assert np.shape(b.forward_log_det_jacobian(x, event_ndims=nd, **kw)) in ((), (BATCH,))
    assert b.forward_dtype(x.dtype) == y.dtype and b.inverse_dtype(y.dtype) == x.dtype
    if b._is_permutation:  # TFP: a permutation has a constant, zero log-det
        assert b.is_constant_jacobian
        np.testing.assert_array_equal(b.forward_log_det_jacobian(x, event_ndims=nd), 0.0)


# ------------------------------------------------------------------ scalar maps


@pytest.mark.parametrize("alpha", [0.05, 0.2])
def test_logit_preprocess_cdf_and_quantile_match_the_closed_form(alpha):
    # Invert(logit) maps a Logistic(0, 1) L to X = (sigmoid(L) - alpha) / (1 - 2 alpha);
    # sigmoid(L) is Uniform(0, 1), so P(X <= x) = alpha + (1 - 2 alpha) x.
    data = tfd.TransformedDistribution(tfd.Logistic(0.0, 1.0), tfb.Invert(B.LogitPreprocess(alpha)))
    np.testing.assert_allclose(data.cdf(0.3), alpha + (1 - 2 * alpha) * 0.3, rtol=1e-6)
    np.testing.assert_allclose(
        data.survival_function(0.3), 1 - alpha - (1 - 2 * alpha) * 0.3, rtol=1e-6
    )
    np.testing.assert_allclose(data.quantile(0.4), (0.4 - alpha) / (1 - 2 * alpha), rtol=1e-6)
    # And forward: Y = logit(alpha + (1 - 2 alpha) U) for U ~ Uniform(0, 1).
    logits = tfd.TransformedDistribution(tfd.Uniform(0.0, 1.0), B.LogitPreprocess(alpha))
    y = 0.7
    np.testing.assert_allclose(
        logits.cdf(y), (1 / (1 + np.exp(-y)) - alpha) / (1 - 2 * alpha), rtol=1e-6
    )
    p = alpha + (1 - 2 * alpha) * 0.4
    np.testing.assert_allclose(logits.quantile(0.4), np.log(p / (1 - p)), rtol=1e-5)


def test_is_increasing_agrees_with_the_sign_of_the_derivative():
    # TFP's property test: where dy/dx is finite, is_increasing <=> dy/dx >= 0.
    logit = B.LogitPreprocess(0.05)
    x = tf.constant(np.linspace(0.0, 1.0, 11), tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = logit.forward(x)
    dydx = tape.gradient(y, x).numpy()
    assert logit._internal_is_increasing() and np.all(dydx > 0)


# ------------------------------------------------------------------ copy


def outputs(b, x, y, kw, nd):
    """forward, fldj, inverse, ildj (one pass each way)."""
    return B.forward_and_log_det(b, x, nd, **kw) + B.inverse_and_log_det(
        b, y, b.forward_event_ndims(nd), **kw
    )


@pytest.mark.parametrize("name", NAMES)
def test_copy_computes_the_same_map_and_shares_the_state(name):
    case, b, x, kw = build(name)
    nd = len(case.event_shape)
    y = case.draw_codomain(np.random.default_rng(1), BATCH, tf.float32, b)
    twin = b.copy()
    assert type(twin) is type(b) and twin is not b
    assert [id(v) for v in twin.variables] == [id(v) for v in b.variables]
    want = outputs(b, x, y, kw, nd)
    for got, expected in zip(outputs(twin, x, y, kw, nd), want):
        np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(twin.forward(x, **kw), want[0])  # TFP's public path too
    renamed = b.copy(name="renamed", validate_args=True)
    assert renamed.name == "renamed" and renamed.validate_args
    assert [id(v) for v in renamed.variables] == [id(v) for v in b.variables]
    if not b.trainable_variables:
        return
    perturb(b, 3, scale=0.05)  # the original's variables change: the copy follows
    after = twin.forward(x, **kw)
    np.testing.assert_array_equal(after, b.forward(x, **kw))
    assert float(tf.reduce_max(tf.abs(after - want[0]))) > 1e-4


COPY_OVERRIDES = {
    "actnorm_channels": (lambda: B.ActNorm(4), dict(channels=5), r"\['channels'\]"),
    "actnorm_dtype": (lambda: B.ActNorm(4), dict(dtype=tf.float64), r"\['dtype'\]"),
    "conv_lu": (lambda: B.InvertibleConv1x1(4, seed=0), dict(lu=False), r"\['lu'\]"),
    "conv_seed": (lambda: B.InvertibleConv1x1(4, seed=0), dict(seed=1), r"\['seed'\]"),
    "factor_out_fraction": (
        lambda: B.FactorOut(4),
        dict(split_fraction=0.25),
        r"\['split_fraction'\]",
    ),
    "learned_prior_shape": (
        lambda: B.LearnedPrior(IMAGE),
        dict(event_shape=(2, 2, 4)),
        r"\['event_shape'\]",
    ),
    "coupling_mask": (REGISTRY["affine_channel_p0"].make, dict(mask="checkerboard"), r"\['mask'\]"),
}


@pytest.mark.parametrize("name", sorted(COPY_OVERRIDES))
def test_copy_refuses_to_override_what_defines_the_state(name):
    make, override, pattern = COPY_OVERRIDES[name]
    b = make(tf.float32) if name.startswith("coupling") else make()
    with pytest.raises(ValueError, match=r"shares the variables.*cannot override " + pattern):
        b.copy(**override)
    # The same value is no change; an unknown parameter is a TypeError.
    key = next(iter(override))
    assert b.copy(**{key: b.parameters[key]}).variables == b.variables
    with pytest.raises(TypeError, match=r"unknown parameters \['bogus'\]"):
        b.copy(bogus=1)


# ------------------------------------------------------------------ event shapes


@pytest.mark.parametrize("name", NAMES)
def test_event_shapes_keep_the_batch_prefix(name):
    case = REGISTRY[name]
    b = case.make(tf.float32)
    event, out = (
        case.event_shape,
        tuple(REGISTRY[name].make(tf.float32).forward_event_shape(case.event_shape)),
    )
    for prefix in [(), (3,), (3, 5)]:
        assert b.forward_event_shape(prefix + event) == prefix + out
        assert b.inverse_event_shape(prefix + out) == prefix + event
        np.testing.assert_array_equal(b.forward_event_shape_tensor(prefix + event), prefix + out)
        np.testing.assert_array_equal(b.inverse_event_shape_tensor(prefix + out), prefix + event)


def test_shape_changing_event_shapes_follow_tfp_reshape():
    """Squeeze and MultiScaleFlow reshape events as `tfb.Reshape` does."""
    from bijector_registry import small_multi_scale

    msf = small_multi_scale(tf.float32)
    for ours, theirs, shape in [
        (B.Squeeze(), tfb.Reshape([4, 4, 4], event_shape_in=[8, 8, 1]), [3, 8, 8, 1]),
        (msf, tfb.Reshape([32], event_shape_in=[4, 4, 2]), [3, 4, 4, 2]),
    ]:
        out = theirs.forward_event_shape(shape)
        assert ours.forward_event_shape(shape) == out
        assert ours.inverse_event_shape(out) == theirs.inverse_event_shape(out) == shape

        @tf.function(input_signature=[tf.TensorSpec([None] + shape[1:], tf.float32)])
        def shapes(x, ours=ours):
            return ours.forward_event_shape_tensor(tf.shape(x))

        np.testing.assert_array_equal(shapes(tf.zeros([7] + shape[1:])), [7] + out[1:])
    with pytest.raises(ValueError, match=r"needs height divisible by 2; `input_shape`"):
        B.Squeeze().forward_event_shape([3, 5, 4, 1])
    with pytest.raises(ValueError, match=r"`input_shape` must end in the event shape"):
        msf.forward_event_shape([3, 4, 4, 3])


# ------------------------------------------------------------------ unknown rank


@pytest.mark.parametrize("name", NAMES)
def test_input_of_unknown_rank_or_channels_raises_naming_the_requirement(name):
    case, b, x, kw = build(name)
    nd = len(case.event_shape)
    y = b.forward(x, **kw)
    calls = {
        "forward": lambda t: b.forward(t, **kw),
        "inverse": lambda t: b.inverse(t, **kw),
        "forward_and_log_det": lambda t: B.forward_and_log_det(b, t, nd, **kw),
        "inverse_and_log_det": lambda t: B.inverse_and_log_det(
            b, t, b.forward_event_ndims(nd), **kw
        ),
    }
    for method, call in calls.items():
        value = y if method.startswith("inverse") else x
        unknown_channels = value.shape[:-1].concatenate([None])
        for shape in (None, unknown_channels):
            fn = tf.function(call, input_signature=[tf.TensorSpec(shape, tf.float32)])
            if case.elementwise:  # any rank is fine: the values match eager
                np.testing.assert_allclose(
                    tf.nest.flatten(fn(value))[0], tf.nest.flatten(call(value))[0], rtol=1e-6
                )
                continue
            with pytest.raises(
                ValueError,
                match=r"needs `[xy]` of known rank .* and a "
                r"known channel count",
            ):
                fn.get_concrete_function()


# ------------------------------------------------------------------ validate_args


@pytest.mark.parametrize("name", NAMES)
def test_validate_args_rejects_non_finite_values(name):
    case, b, x, kw = build(name)
    checked = b.copy(validate_args=True)
    spec = tf.TensorSpec([None] + list(case.event_shape), tf.float32)
    traced = tf.function(lambda t: checked.forward(t, **kw), input_signature=[spec])
    y = traced(x)  # valid values pass
    for call in (
        lambda t: checked.forward(t, **kw),
        traced,
        lambda t: B.forward_and_log_det(checked, t, **kw)[0],
    ):
        with pytest.raises(tf.errors.InvalidArgumentError, match="`x` must be finite"):
            call(with_nan(x))
    with pytest.raises(tf.errors.InvalidArgumentError, match="`y` must be finite"):
        checked.inverse(with_nan(y), **kw)
    assert np.isnan(b.forward(with_nan(x), **kw).numpy()).any()  # unchecked: NaN flows
    if not b.keras_layers:  # no variables of its own (MultiScaleFlow: its parts check theirs)
        return
    first = next(v for layer in b.keras_layers for v in layer.trainable_weights)
    first.assign(tf.fill(first.shape, np.nan))
    with pytest.raises(tf.errors.InvalidArgumentError, match="is not finite"):
        checked.forward(x, **kw)
    with pytest.raises(tf.errors.InvalidArgumentError, match="is not finite"):
        traced(x)


def test_validate_args_logit_preprocess_input_in_unit_interval():
    logit = B.LogitPreprocess(0.05, validate_args=True)
    np.testing.assert_allclose(
        logit.forward(tf.constant([0.0, 1.0])), [-np.log(19.0), np.log(19.0)], rtol=1e-5
    )
    traced = tf.function(logit.forward, input_signature=[tf.TensorSpec(None, tf.float32)])
    for bad in ([0.5, 1.5], [-0.1, 0.5]):
        for call in (logit.forward, traced):
            with pytest.raises(tf.errors.InvalidArgumentError, match=r"must lie in \[0, 1\]"):
                call(tf.constant(bad))
    assert np.isnan(B.LogitPreprocess(0.05).forward(tf.constant([1.5])).numpy()).all()


def test_validate_args_squeeze_sizes_unknown_while_tracing():
    squeeze = B.Squeeze(validate_args=True)
    traced = tf.function(
        squeeze.forward, input_signature=[tf.TensorSpec([None, None, None, 2], tf.float32)]
    )
    assert traced(tf.zeros([1, 4, 6, 2])).shape == (1, 2, 3, 8)
    with pytest.raises(tf.errors.InvalidArgumentError, match="needs height divisible by 2"):
        traced(tf.zeros([1, 5, 4, 2]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="needs width divisible by 2"):
        traced(tf.zeros([1, 4, 3, 2]))


def test_validate_args_conv_rejects_a_singular_kernel():
    full = B.InvertibleConv1x1(4, lu=False, seed=0, validate_args=True)
    x = tf.ones([1, 2, 2, 4])
    full.forward(x)
    full.kernel.assign(tf.constant(np.outer(np.arange(4.0), np.ones(4)), tf.float32))
    with pytest.raises(tf.errors.InvalidArgumentError, match="kernel W is singular"):
        full.forward(x)
    lu = B.InvertibleConv1x1(4, seed=0, validate_args=True)
    lu.log_s.assign(tf.constant([0.0, np.inf, 0.0, 0.0], tf.float32))
    with pytest.raises(tf.errors.InvalidArgumentError, match="log_s is not finite"):
        lu.inverse(x)


@pytest.mark.parametrize(
    "make",
    [
        lambda: B.FactorOut(4, num_classes=3, validate_args=True),
        lambda: B.LearnedPrior(IMAGE, num_classes=3, validate_args=True),
    ],
    ids=["factor_out", "learned_prior"],
)
def test_validate_args_class_labels_in_range(make):
    b = make()
    x = tf.ones([2] + list(IMAGE))
    b.forward(x, conditional_input=tf.constant([0, 2]))
    traced = tf.function(lambda t, labels: b.forward(t, conditional_input=labels))
    for labels in ([0, 3], [-1, 0]):
        for call in (lambda t, lab: b.forward(t, conditional_input=lab), traced):
            with pytest.raises(
                tf.errors.InvalidArgumentError, match=r"labels must lie in \[0, 3\)"
            ):
                call(x, tf.constant(labels))


# ------------------------------------------------------------------ constant Jacobians


@pytest.mark.parametrize(
    "name", [n for n in NAMES if REGISTRY[n].make(tf.float64).is_constant_jacobian]
)
def test_constant_jacobian_declarations_are_affine_maps(name):
    # TFP's mean, mode and entropy of a transformed distribution trust
    # is_constant_jacobian: f(x) = A x + b, so f is linear along any line.
    case, b, x1, kw = build(name, tf.float64)
    x2 = case.draw(np.random.default_rng(7), BATCH, tf.float64)
    nd = len(case.event_shape)
    for a in (0.3, 2.5):
        np.testing.assert_allclose(
            b.forward(a * x1 + (1 - a) * x2, **kw),
            a * b.forward(x1, **kw) + (1 - a) * b.forward(x2, **kw),
            rtol=1e-9,
            atol=1e-9,
        )
    np.testing.assert_allclose(
        b.forward_log_det_jacobian(x1, event_ndims=nd, **kw),
        b.forward_log_det_jacobian(x2, event_ndims=nd, **kw),
        rtol=1e-12,
    )


def _bounded(log_scale):
    return 10.0 * np.tanh(np.asarray(log_scale) / 10.0)  # standardize.MAX_LOG_SCALE


def test_learned_prior_declares_constant_jacobian_so_mean_and_entropy_work():
    prior = perturb(B.LearnedPrior(IMAGE), np.random.default_rng(1), scale=0.5)
    assert prior.is_constant_jacobian
    d = int(np.prod(IMAGE))
    data = tfd.TransformedDistribution(tfd.Sample(tfd.Normal(0.0, 1.0), IMAGE), tfb.Invert(prior))
    # x = z sigma + mu with z ~ N(0, I): mean and mode mu, entropy
    # D/2 log(2 pi e) + sum log sigma.
    np.testing.assert_allclose(data.mean(), prior.mean.numpy(), rtol=1e-6)
    np.testing.assert_allclose(data.mode(), prior.mean.numpy(), rtol=1e-6)
    np.testing.assert_allclose(
        data.entropy(),
        d / 2 * np.log(2 * np.pi * np.e) + _bounded(prior.log_scale).sum(),
        rtol=1e-6,
    )


def test_learned_prior_flow_mean_and_entropy_match_monte_carlo():
    rng = np.random.default_rng(2)
    flow = tfb.Chain(
        [
            perturb(B.LearnedPrior(IMAGE), rng, scale=0.5),
            perturb(B.InvertibleConv1x1(4, seed=0), rng, scale=0.5),
            perturb(B.ActNorm(4), rng, scale=0.5),
        ]
    )  # data -> latent
    assert flow.is_constant_jacobian
    data = tfd.TransformedDistribution(tfd.Sample(tfd.Normal(0.0, 1.0), IMAGE), tfb.Invert(flow))
    x = data.sample(20000, seed=(3, 4))
    mean = x.numpy().mean(0)
    se = x.numpy().std(0) / np.sqrt(len(x))
    assert np.all(np.abs(data.mean().numpy() - mean) < 5 * se)
    nll = -data.log_prob(x).numpy()
    assert abs(data.entropy().numpy() - nll.mean()) < 5 * nll.std() / np.sqrt(len(nll))


def test_class_conditional_learned_prior_mean_and_entropy_per_label():
    prior = perturb(B.LearnedPrior(IMAGE, num_classes=3), np.random.default_rng(5), 0.5)
    labels = np.array([0, 2])
    # One distribution per label: the base has the labels' batch shape.
    data = tfd.TransformedDistribution(
        tfd.Sample(tfd.Normal(tf.zeros([2]), 1.0), IMAGE), tfb.Invert(prior)
    )
    kw = dict(bijector_kwargs=dict(conditional_input=tf.constant(labels)))
    d_mean, d_log_scale = np.split(prior._class_table.numpy()[labels], 2, axis=-1)
    mean = prior.mean.numpy() + d_mean[:, None, None, :]
    log_scale = _bounded(prior.log_scale.numpy() + d_log_scale[:, None, None, :])
    d = int(np.prod(IMAGE))
    np.testing.assert_allclose(data.mean(**kw), mean, rtol=1e-6)
    np.testing.assert_allclose(
        data.entropy(**kw), d / 2 * np.log(2 * np.pi * np.e) + log_scale.sum((1, 2, 3)), rtol=1e-6
    )
