"""tfp_glow bijectors inside stock TFP: Chain, Invert, TransformedDistribution,
joint distributions, plain GradientTape training, Keras tracking, XLA."""

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp
from helpers import perturb

from tfp_glow import bijectors as B
from tfp_glow import nets

tfb = tfp.bijectors
tfd = tfp.distributions
IMAGE = (4, 4, 4)
VECTOR = (2,)


@pytest.fixture(autouse=True)
def _seeded():
    keras.utils.set_random_seed(7)  # the nets' Glorot init


def image_flow(dtype=tf.float32):
    """Normalizing direction: ActNorm -> LU 1x1 conv -> affine coupling (channel
    mask) -> additive coupling (checkerboard mask, parity 1)."""
    dt = tf.as_dtype(dtype).name
    return tfb.Chain(
        [
            B.AdditiveCoupling(
                nets.GlowCouplingNet(8, 4, dtype=dt),
                mask="checkerboard",
                parity=1,
                event_shape=IMAGE,
                dtype=dtype,
            ),
            B.AffineCoupling(nets.GlowCouplingNet(8, 4, dtype=dt), event_shape=IMAGE, dtype=dtype),
            B.InvertibleConv1x1(4, seed=0, dtype=dtype),
            B.ActNorm(4, dtype=dtype),
        ]
    )


def vector_flow(dtype=tf.float32, hidden=16):
    dt = tf.as_dtype(dtype).name
    return tfb.Chain(
        [
            B.AffineCoupling(
                nets.MLPCouplingNet(hidden, 2, dtype=dt), parity=1, event_shape=VECTOR, dtype=dtype
            ),
            B.InvertibleConv1x1(2, event_ndims=1, seed=1, dtype=dtype),
            B.AffineCoupling(
                nets.MLPCouplingNet(hidden, 2, dtype=dt), event_shape=VECTOR, dtype=dtype
            ),
            B.ActNorm(2, event_ndims=1, dtype=dtype),
        ]
    )


FLOWS = {"image": (image_flow, IMAGE), "vector": (vector_flow, VECTOR)}


def standard_normal(event_shape, dtype=tf.float32):
    return tfd.Sample(tfd.Normal(tf.constant(0.0, dtype), tf.constant(1.0, dtype)), event_shape)


def flow_distribution(kind, dtype=tf.float32):
    make, shape = FLOWS[kind]
    f = make(dtype)
    perturb(f)
    return f, tfd.TransformedDistribution(standard_normal(shape, dtype), tfb.Invert(f))


def draw(shape, batch=5, dtype=tf.float32, seed=3):
    return tf.constant(np.random.default_rng(seed).standard_normal((batch,) + shape), dtype)


def by_hand_log_prob(chain, x):
    """log N(f(x); 0, I) + sum_k log|det J_k|, one bijector at a time.

    Each bijector's own log-det is checked against an autodiff Jacobian in
    the contract test; what this reference checks is TFP's composition
    (`tfb.Chain` order, `tfb.Invert`, `TransformedDistribution`'s event sums)
    against a sum written out with numpy.
    """
    h = x
    total = np.zeros(x.shape[0])
    event_axes = tuple(range(1, x.shape.rank))
    for b in reversed(chain.bijectors):  # Chain applies its last bijector first
        h_next, ldj = b.forward_and_log_det(h)
        # Reduced over the event already (a scalar where it does not depend on x).
        total += np.broadcast_to(np.asarray(ldj, np.float64), total.shape)
        h = h_next
    z = np.asarray(h, np.float64)
    d = int(np.prod(z.shape[1:]))
    base = -0.5 * (z**2).sum(axis=event_axes) - 0.5 * d * np.log(2 * np.pi)
    return base + total


# ------------------------------------------------------------------ TFP composition


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kind", sorted(FLOWS))
def test_log_prob_equals_base_log_prob_plus_fldj(kind, dtype):
    f, dist = flow_distribution(kind, dtype)
    x = draw(FLOWS[kind][1], dtype=dtype)
    lp = dist.log_prob(x)
    assert lp.shape == (5,) and lp.dtype == dtype
    expected = by_hand_log_prob(f, x)
    tol = dict(rtol=1e-5, atol=1e-3) if dtype == tf.float32 else dict(rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(lp, expected, **tol)
    # ... and with TFP's own pieces.
    nd = len(FLOWS[kind][1])
    tfp_way = dist.distribution.log_prob(f.forward(x)) + f.forward_log_det_jacobian(
        x, event_ndims=nd
    )
    np.testing.assert_allclose(lp, tfp_way, **tol)
    # The flow is not the identity: the log-det contributes.
    assert np.abs(np.asarray(lp) - dist.distribution.log_prob(x).numpy()).max() > 1e-2


@pytest.mark.parametrize("kind", sorted(FLOWS))
def test_invert_and_chain_compose_unchanged(kind):
    f, _ = flow_distribution(kind)
    shape = FLOWS[kind][1]
    nd = len(shape)
    x = draw(shape)
    inv = tfb.Invert(f)
    np.testing.assert_allclose(inv.forward(tf.identity(x)), f.inverse(tf.identity(x)), atol=1e-6)
    np.testing.assert_allclose(inv.inverse(tf.identity(x)), f.forward(tf.identity(x)), atol=1e-6)
    np.testing.assert_allclose(
        inv.forward_log_det_jacobian(x, event_ndims=nd),
        f.inverse_log_det_jacobian(x, event_ndims=nd),
        atol=1e-4,
    )
    # Chain of Invert and the flow is the identity.
    ident = tfb.Chain([inv, f])
    np.testing.assert_allclose(ident.forward(x), x, atol=1e-5)
    np.testing.assert_allclose(ident.forward_log_det_jacobian(x, event_ndims=nd), 0.0, atol=1e-4)


@pytest.mark.parametrize("kind", sorted(FLOWS))
def test_sample_has_right_shape_and_finite_values(kind):
    f, dist = flow_distribution(kind)
    shape = FLOWS[kind][1]
    s = dist.sample(5, seed=(1, 2))
    assert s.shape == (5,) + shape
    assert np.all(np.isfinite(s.numpy()))
    lp = dist.log_prob(s)
    assert lp.shape == (5,) and np.all(np.isfinite(lp.numpy()))
    # sample() maps base draws through the generative direction f^-1.
    z = dist.distribution.sample(5, seed=(1, 2))
    np.testing.assert_allclose(s, f.inverse(z), atol=1e-5)


@pytest.mark.parametrize("kind", sorted(FLOWS))
def test_sample_and_log_prob_with_any_sample_shape(kind):
    f, dist = flow_distribution(kind)
    shape = FLOWS[kind][1]
    one = dist.sample(seed=(3, 4))  # no sample dimension at all
    assert one.shape == shape
    lp_one = dist.log_prob(one)
    assert lp_one.shape == ()
    np.testing.assert_allclose(lp_one, dist.log_prob(one[None])[0], rtol=1e-5, atol=1e-4)
    grid = dist.sample([2, 3], seed=(5, 6))
    assert grid.shape == (2, 3) + shape
    lp_grid = dist.log_prob(grid)
    assert lp_grid.shape == (2, 3)
    np.testing.assert_allclose(
        tf.reshape(lp_grid, [6]),
        dist.log_prob(tf.reshape(grid, (6,) + shape)),
        rtol=1e-5,
        atol=1e-4,
    )


@pytest.mark.parametrize("kind", sorted(FLOWS))
def test_trainable_variables_contain_every_keras_variable(kind):
    f, dist = flow_distribution(kind)
    layers = B.keras_layers_of(f)
    assert len(layers) == 4  # two nets, the conv's and ActNorm's parameter layers
    expected = {v.value.ref() for layer in layers for v in layer.trainable_weights}
    got = {v.ref() for v in dist.trainable_variables}
    assert expected and expected <= got
    assert got == expected  # and nothing else
    every = {v.value.ref() for layer in layers for v in layer.weights}
    assert every <= {v.ref() for v in dist.variables}
    assert every - expected  # ActNorm's flag, the conv's P and sign: saved, not trained


def test_gradient_tape_adam_lowers_nll_of_correlated_gaussian():
    rng = np.random.default_rng(0)
    cov = np.array([[1.0, 0.95], [0.95, 1.0]]) * 4.0
    data = tf.constant(rng.multivariate_normal([2.0, -1.0], cov, size=512), tf.float32)
    f = vector_flow(hidden=16)
    dist = tfd.TransformedDistribution(standard_normal(VECTOR), tfb.Invert(f))
    variables = dist.trainable_variables
    optimizer = keras.optimizers.Adam(2e-2)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = -tf.reduce_mean(dist.log_prob(data))
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss

    def nll():
        return float(-tf.reduce_mean(dist.log_prob(data)))

    start = nll()
    for _ in range(30):
        step()
    end = nll()
    # Standard normal on this data: ~7.4 nats; the true density: ~2.3 nats.
    assert start > 6.0, start
    assert end < start - 2.0, (start, end)
    assert np.isfinite(end)


# ------------------------------------------------------------------ the one-pass walker


def mixed_chain():
    """Stock TFP bijectors around tfp_glow ones (one class-conditional, one
    inverted); the event changes rank at the Reshape: [2, 2] -> [4]."""
    prior = B.LearnedPrior((4,), num_classes=3, name="prior")
    chain = tfb.Chain(
        [
            B.ActNorm(4, event_ndims=1),
            tfb.Scale(1.5),
            tfb.Invert(B.InvertibleConv1x1(4, event_ndims=1, seed=2)),
            tfb.Shift(0.3),
            prior,
            tfb.Reshape([4], event_shape_in=[2, 2]),
        ]
    )
    return perturb(chain, 4), prior


def test_one_pass_walker_equals_tfp_on_any_composition_both_ways():
    chain, prior = mixed_chain()
    x = draw((2, 2), batch=3)
    labels = tf.constant([0, 2, 1])
    by_name = {prior.name: {"conditional_input": labels}}  # TFP's Chain kwargs
    # `conditional_input` reaches tfp_glow bijectors only: tfb.Scale would raise.
    y, fldj = B.forward_and_log_det(chain, x, 2, conditional_input=labels)
    np.testing.assert_allclose(y, chain.forward(x, **by_name), atol=1e-5)
    np.testing.assert_allclose(fldj, chain.forward_log_det_jacobian(x, 2, **by_name), atol=1e-5)
    assert fldj.shape == (3,)
    x_back, ildj = B.inverse_and_log_det(chain, tf.identity(y), 1, conditional_input=labels)
    np.testing.assert_allclose(x_back, x, atol=1e-5)
    np.testing.assert_allclose(ildj, chain.inverse_log_det_jacobian(y, 1, **by_name), atol=1e-5)
    np.testing.assert_allclose(ildj, -fldj, atol=1e-5)
    # One walker: the inverse of a flow is the forward of its Invert, and back.
    z, ldj = B.forward_and_log_det(tfb.Invert(chain), y, 1, conditional_input=labels)
    np.testing.assert_array_equal(z, x_back)
    np.testing.assert_array_equal(ldj, ildj)
    # Default event_ndims: forward_min_event_ndims (FlowBijector's method semantics).
    act = chain.bijectors[0]
    v = draw((4,), batch=3)
    for got, want in zip(act.forward_and_log_det(v), B.forward_and_log_det(act, v)):
        np.testing.assert_array_equal(got, want)
    scale, ldj = B.forward_and_log_det(tfb.Scale(2.0), v)  # any bijector, event_ndims 0
    np.testing.assert_array_equal(scale, 2 * v)
    np.testing.assert_allclose(ldj, np.log(2.0), rtol=1e-6)


def test_one_pass_walker_invert_of_a_rank_changing_flow():
    from bijector_registry import small_multi_scale

    flow = perturb(small_multi_scale(tf.float32), 1)
    generative = tfb.Invert(flow)  # latent [32] -> image [4, 4, 2]
    z = draw((32,), batch=3)
    x, ldj = B.forward_and_log_det(generative, z)
    np.testing.assert_allclose(x, generative.forward(z), atol=1e-5)
    np.testing.assert_allclose(ldj, generative.forward_log_det_jacobian(z, 1), atol=1e-4)
    back, ildj = B.inverse_and_log_det(generative, tf.identity(x))
    np.testing.assert_allclose(back, z, atol=1e-5)
    np.testing.assert_allclose(ildj, -ldj, atol=1e-4)


def test_one_pass_constant_log_det_over_extra_event_dims():
    act = perturb(B.ActNorm(3, event_ndims=1), 0)
    x = draw((5, 3), batch=2)
    _, ldj = B.forward_and_log_det(act, x, event_ndims=2)
    expected = 5 * float(tf.reduce_sum(act.log_scale))
    np.testing.assert_allclose(np.broadcast_to(ldj, [2]), expected, rtol=1e-6)
    np.testing.assert_allclose(act.forward_log_det_jacobian(x, event_ndims=2), expected, rtol=1e-6)
    _, ildj = B.inverse_and_log_det(tfb.Chain([act]), x, event_ndims=2)
    np.testing.assert_allclose(np.broadcast_to(ildj, [2]), -expected, rtol=1e-6)


# ------------------------------------------------------------------ joint distributions


def test_joint_distribution_with_flow_latent():
    f, flow_dist = flow_distribution("vector")

    @tfd.JointDistributionCoroutineAutoBatched
    def model():
        z = yield tfd.TransformedDistribution(standard_normal(VECTOR), tfb.Invert(f), name="z")
        yield tfd.Independent(tfd.Normal(z, 0.1), 1, name="x")

    z, x = model.sample(seed=(7, 8))
    assert z.shape == VECTOR and x.shape == VECTOR
    assert np.all(np.isfinite(z.numpy())) and np.all(np.isfinite(x.numpy()))
    lp = model.log_prob((z, x))
    expected = flow_dist.log_prob(z) + tfd.Independent(tfd.Normal(z, 0.1), 1).log_prob(x)
    assert np.isfinite(lp.numpy())
    np.testing.assert_allclose(lp, expected, rtol=1e-5, atol=1e-4)
    # An observed x conditions the latent: the posterior is a function of z.
    x_obs = tf.constant([0.5, -0.5])
    np.testing.assert_allclose(
        model.log_prob(z=z, x=x_obs),
        flow_dist.log_prob(z) + tfd.Independent(tfd.Normal(z, 0.1), 1).log_prob(x_obs),
        rtol=1e-5,
        atol=1e-4,
    )


def test_joint_distribution_sequential_batched_samples():
    f, flow_dist = flow_distribution("vector")
    model = tfd.JointDistributionSequential(
        [
            tfd.TransformedDistribution(standard_normal(VECTOR), tfb.Invert(f)),
            lambda z: tfd.Independent(tfd.Normal(z, 0.1), 1),
        ]
    )
    z, x = model.sample(4, seed=(9, 10))
    assert z.shape == (4,) + VECTOR and x.shape == (4,) + VECTOR
    lp = model.log_prob([z, x])
    expected = flow_dist.log_prob(z) + tfd.Independent(tfd.Normal(z, 0.1), 1).log_prob(x)
    np.testing.assert_allclose(lp, expected, rtol=1e-5, atol=1e-4)
    assert lp.shape == (4,) and np.all(np.isfinite(lp.numpy()))


# ------------------------------------------------------------------ Keras tracking


class FlowHolder(keras.Model):
    """Stores the flow's Keras layers as a plain attribute: Keras tracks them."""

    def __init__(self, bijector, **kwargs):
        super().__init__(**kwargs)
        self.bijector = bijector
        self.flow_layers = B.keras_layers_of(bijector)
        self.built = True

    def call(self, x):
        return self.bijector.forward(x)


@pytest.mark.parametrize("kind", sorted(FLOWS))
def test_keras_model_holding_layers_lists_every_variable(kind):
    f, _ = flow_distribution(kind)
    model = FlowHolder(f)
    layers = B.keras_layers_of(f)
    expected = {id(v) for layer in layers for v in layer.trainable_weights}
    assert {id(v) for v in model.trainable_variables} == expected
    assert {id(v) for v in model.weights} == {id(v) for layer in layers for v in layer.weights}
    assert len(model.non_trainable_weights) == 3  # ActNorm flag, conv P and sign
    assert model.count_params() == sum(int(np.prod(v.shape)) for v in model.weights)


def test_keras_model_gradients_reach_every_trainable_variable():
    f, dist = flow_distribution("image")
    model = FlowHolder(f)
    x = draw(IMAGE)
    with tf.GradientTape() as tape:
        loss = -tf.reduce_mean(dist.log_prob(x)) + tf.reduce_sum(model(x) * 0.1)
    grads = tape.gradient(loss, model.trainable_variables)
    for v, g in zip(model.trainable_variables, grads):
        assert g is not None, v.path
        assert float(tf.reduce_max(tf.abs(g))) > 0, v.path


def test_checkpoint_of_keras_layers_restores_a_whole_multi_scale_flow(tmp_path):
    from bijector_registry import small_multi_scale

    def distribution(flow):
        return tfd.TransformedDistribution(standard_normal([32]), tfb.Invert(flow))

    saved = small_multi_scale(tf.float32)
    perturb(saved)
    x = draw((4, 4, 2))
    with B.data_dependent_init():
        saved.forward(x)
    path = tf.train.Checkpoint(layers=B.keras_layers_of(saved)).save(str(tmp_path / "flow"))
    fresh = small_multi_scale(tf.float32)
    assert np.abs(distribution(fresh).log_prob(x) - distribution(saved).log_prob(x)).max() > 1e-2
    tf.train.Checkpoint(layers=B.keras_layers_of(fresh)).restore(path).assert_consumed()
    np.testing.assert_array_equal(distribution(fresh).log_prob(x), distribution(saved).log_prob(x))
    saved_values = [v.numpy() for v in saved.variables]
    for got, want in zip(fresh.variables, saved_values):
        np.testing.assert_array_equal(got.numpy(), want)


# ------------------------------------------------------------------ XLA


def test_xla_log_prob_with_unknown_batch_matches_eager():
    f = tfb.Chain(
        [
            B.AffineCoupling(nets.GlowCouplingNet(8, 8), mask="checkerboard", event_shape=IMAGE),
            B.AffineCoupling(nets.GlowCouplingNet(8, 4), event_shape=IMAGE),
            B.InvertibleConv1x1(4, seed=0),
            B.ActNorm(4),
        ]
    )
    dist = tfd.TransformedDistribution(standard_normal(IMAGE), tfb.Invert(f))
    x = draw(IMAGE, batch=6)
    f.bijectors[-1].initialize(x)
    perturb(f)

    @tf.function(
        jit_compile=True, input_signature=[tf.TensorSpec([None] + list(IMAGE), tf.float32)]
    )
    def log_prob(x):
        return dist.log_prob(x)

    eager = dist.log_prob(x)
    np.testing.assert_allclose(log_prob(x), eager, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(log_prob(x[:2]), eager[:2], rtol=1e-5, atol=1e-3)
    assert log_prob.experimental_get_tracing_count() == 1
    # Gradients compile as well.

    @tf.function(
        jit_compile=True, input_signature=[tf.TensorSpec([None] + list(IMAGE), tf.float32)]
    )
    def nll_and_grads(x):
        with tf.GradientTape() as tape:
            loss = -tf.reduce_mean(dist.log_prob(x))
        return loss, tape.gradient(loss, dist.trainable_variables)

    loss, grads = nll_and_grads(x)
    np.testing.assert_allclose(loss, -tf.reduce_mean(eager), rtol=1e-5)
    assert all(g is not None and np.all(np.isfinite(g.numpy())) for g in grads)
