"""The residual block's estimator, gradient, Lipschitz bound and inverse.

The contract test (registry lines `residual_vector`, `residual_image`) checks
the exact log-det; here: the Russian-roulette estimate against the autodiff
`slogdet` (one draw within a few standard deviations of the estimator, the
mean of many draws within 4 standard errors), the Neumann gradient against
the gradient of the exact log-det (in expectation), spectral norms (by SVD)
after training, the fixed-point inverse's tolerance and implicit gradient,
the training step's draws (the same under XLA), and the argument checks.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import randomize

from tfp_glow import bijectors as B
from tfp_glow import nets
from tfp_glow.bijectors import _residual_math as M

DRAWS = 400


def _block(dim=3, log_det="roulette", dtype=tf.float64, scale=1.0, **kwargs):
    """A block whose log-det is far from 0: weights `scale * N(0, 1)` (normalised)."""
    net = nets.ResidualMLP(dim, 16, seed=3, dtype=tf.as_dtype(dtype).name)
    randomize(net, scale)
    return B.ResidualBlock(net, log_det=log_det, dtype=dtype, **kwargs)


def _strong_block(dtype=tf.float64):
    """`J_g` with eigenvalues far from 0 (of either sign) at `_strong_points`: two
    3 x 3 layers `Q` and `diag(1, -0.5, 0.8) Q^T` (normalised to 0.97), biases
    and inputs near 3, where LipSwish's slope is ~0.99."""
    net = nets.ResidualMLP(3, 3, num_hidden_layers=1, seed=3, dtype=tf.as_dtype(dtype).name)
    q = np.linalg.qr(np.random.default_rng(0).standard_normal((3, 3)))[0]
    net.linears[0].kernel.assign(q)
    net.linears[0].bias.assign([3.0, 3.0, 3.0])
    net.linears[1].kernel.assign(q.T * np.array([1.0, -0.5, 0.8])[:, None])
    return B.ResidualBlock(net, log_det="roulette", dtype=dtype)


def _strong_points(n, seed=0):
    return tf.constant(3 + 0.5 * np.random.default_rng(seed).standard_normal((n, 3)))


def _points(shape, dtype=tf.float64, seed=0):
    return tf.constant(np.random.default_rng(seed).standard_normal(shape), dtype)


def _slogdet(block, x):
    """log|det d(x + g(x))/dx| per example from a `batch_jacobian` (no code of ours)."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = block.forward(x)
    return tf.linalg.slogdet(tape.batch_jacobian(y, x))[1]


def _estimates(block, x, seeds, wrt=None):
    """Roulette log-dets (and gradients w.r.t. `wrt`) of `x`, one per seed."""
    g = block.residual_fn
    weights = g.normalized_weights(update=False)

    @tf.function(autograph=False)
    def one(seed):
        with tf.GradientTape() as tape:
            tape.watch(weights)
            ldj = M.roulette_log_det(g.call_with, x, weights, seed)
            total = tf.reduce_sum(ldj)
        if wrt is None:
            return ldj
        return ldj, tf.concat(
            [tf.reshape(t, [-1]) for t in tape.gradient(total, [weights[i] for i in wrt])], 0
        )

    outs = [one(tf.constant([s, 7], tf.int64)) for s in seeds]
    if wrt is None:
        return np.stack(outs), weights
    return np.stack([o[0] for o in outs]), np.stack([o[1] for o in outs]), weights


def test_roulette_estimate_is_unbiased_for_the_exact_log_det():
    block = _strong_block()
    x = _strong_points(4)
    exact = _slogdet(block, x).numpy()
    assert np.abs(exact).min() > 0.3, "weights too small for a meaningful check"
    draws, _ = _estimates(block, x, range(DRAWS))
    std = draws.std(axis=0, ddof=1)
    # One draw (the block's own, fixed seed) within 4 standard deviations.
    one = block.forward_log_det_jacobian(x, event_ndims=1).numpy()
    assert np.all(np.abs(one - exact) <= 4 * std), (one, exact, std)
    # The mean of the draws within 4 standard errors.
    np.testing.assert_array_less(np.abs(draws.mean(axis=0) - exact), 4 * std / np.sqrt(DRAWS))
    assert np.all(std > 0), "the estimator drew nothing random"


@pytest.mark.slow
def test_rademacher_probes_estimate_the_same_log_det():
    block = _strong_block()
    x = _strong_points(4, seed=1)
    g = block.residual_fn
    w = g.normalized_weights(update=False)
    fn = tf.function(
        lambda s: M.roulette_log_det(g.call_with, x, w, s, noise="rademacher"), autograph=False
    )
    draws = np.stack([fn(tf.constant([s, 1], tf.int64)) for s in range(DRAWS)])
    se = draws.std(axis=0, ddof=1) / np.sqrt(DRAWS)
    np.testing.assert_array_less(np.abs(draws.mean(axis=0) - _slogdet(block, x)), 4 * se)


def test_neumann_gradient_is_the_exact_gradient_in_expectation():
    block = _strong_block()
    x = _strong_points(2, seed=2)
    wrt = [0, 1, 2, 3, 4]  # [beta, W, b] of the first layer, [beta, W] of the second
    _, grads, weights = _estimates(block, x, range(DRAWS), wrt=wrt)
    with tf.GradientTape() as tape:
        tape.watch(weights)
        exact = tf.reduce_sum(M.exact_log_det(block.residual_fn.call_with, x, weights))
    expected = tf.concat(
        [tf.reshape(t, [-1]) for t in tape.gradient(exact, [weights[i] for i in wrt])], 0
    ).numpy()
    se = grads.std(axis=0, ddof=1) / np.sqrt(DRAWS)
    err = np.abs(grads.mean(axis=0) - expected)
    assert np.all(err <= 4 * se + 1e-9), f"worst {np.max(err / (se + 1e-12)):.2f} SE"
    assert np.abs(expected).max() > 0.1 and np.all(se > 0)


@pytest.mark.slow
def test_neumann_gradient_in_x_is_the_exact_gradient_in_expectation():
    block = _strong_block()
    x = _strong_points(2, seed=3)
    g = block.residual_fn
    w = g.normalized_weights(update=False)

    @tf.function(autograph=False)
    def grad(seed):
        with tf.GradientTape() as tape:
            tape.watch(x)
            total = tf.reduce_sum(M.roulette_log_det(g.call_with, x, w, seed))
        return tape.gradient(total, x)

    draws = np.stack([grad(tf.constant([s, 3], tf.int64)) for s in range(DRAWS)])
    with tf.GradientTape() as tape:
        tape.watch(x)
        exact = tf.reduce_sum(_slogdet(block, x))
    expected = tape.gradient(exact, x).numpy()
    se = draws.std(axis=0, ddof=1) / np.sqrt(DRAWS)
    assert np.all(np.abs(draws.mean(axis=0) - expected) <= 4 * se + 1e-9)


def _conv_operator_norm(layer, kernel):
    """Largest singular value of the convolution on `[H, W, C]` (matrix by columns)."""
    h, w, c = layer.input_event_shape
    basis = tf.reshape(tf.eye(h * w * c, dtype=kernel.dtype), [-1, h, w, c])
    columns = tf.reshape(layer._apply(kernel, basis), [h * w * c, -1])
    return np.linalg.svd(columns.numpy(), compute_uv=False)[0]


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_spectral_norms_stay_below_the_bound_after_training(kind):
    c = 0.9
    if kind == "mlp":
        net = nets.ResidualMLP(4, 16, lipschitz=c, seed=1)
        x = _points((32, 4), tf.float32)
    else:
        net = nets.ResidualCNN((4, 4, 2), 8, lipschitz=c, seed=1)
        x = _points((16, 4, 4, 2), tf.float32)
    block = B.ResidualBlock(net, log_det="exact")
    u_before = [layer.u.numpy().copy() for layer in net.linears]
    opt = keras.optimizers.Adam(0.05)
    variables = net.trainable_weights
    for step in range(8):
        with nets.dropout_active(tf.constant([step, 0], tf.int64)):
            with tf.GradientTape() as tape:
                # A loss that pushes the weights up: the normalisation must hold them.
                y, ldj = block.forward_and_log_det(x)
                loss = -tf.reduce_mean(ldj) - tf.reduce_mean(tf.square(y))
        opt.apply_gradients(zip(tape.gradient(loss, variables), variables))
    for layer, before in zip(net.linears, u_before):
        assert np.abs(layer.u.numpy() - before).max() > 0, "training calls did not iterate"
        raw = tf.convert_to_tensor(layer.kernel)
        kernel = layer.normalized_kernel(update=False)
        if kind == "mlp":
            sigma = np.linalg.svd(kernel.numpy(), compute_uv=False)[0]
            raw_sigma = np.linalg.svd(raw.numpy(), compute_uv=False)[0]
        else:
            sigma, raw_sigma = _conv_operator_norm(layer, kernel), _conv_operator_norm(layer, raw)
        assert raw_sigma > c, "training did not push the raw weights past the bound"
        # Power iteration approaches sigma from below: the bound holds to its
        # tolerance. On the trained convolution, whose top singular values lie
        # close together, the settled iteration is not deterministic across runs
        # (threaded float sums): of five runs on 2026-12-07, three within 1e-4 of
        # c, then 0.90011 and 0.9022 (a loaded full run), so the conv bound is
        # checked to 0.5%.
        upper = 1e-4 if kind == "mlp" else 5e-3
        assert c * (1 - 1e-3) <= sigma <= c * (1 + upper), (layer.name, sigma)
        # A training call normalises the same way (and stores the vectors it reached).
        trained = layer.normalized_kernel(update=True)
        np.testing.assert_allclose(trained, kernel, rtol=1e-3, atol=1e-6)
        np.testing.assert_allclose(layer.sigma_estimate().numpy(), raw_sigma, rtol=1e-3)


def test_lipswish_slope_is_at_most_one():
    t = tf.constant(np.linspace(-20, 20, 40001), tf.float64)
    for beta in (0.1, 1.0, 10.0):
        with tf.GradientTape() as tape:
            tape.watch(t)
            out = nets.LipSwish.activate(t, tf.constant(beta, tf.float64))
        slope = tape.gradient(out, t).numpy()
        assert np.abs(slope).max() <= 1.0 and np.abs(slope).max() > 0.99


@pytest.mark.parametrize("dtype, atol", [(tf.float32, 1e-6), (tf.float64, 1e-12)])
def test_fixed_point_inverse_reaches_its_tolerance(dtype, atol):
    block = _block(5, log_det="exact", dtype=dtype)
    assert block.atol == atol
    x = _points((6, 5), dtype, seed=4)
    y = block.forward(x)
    g = block.residual_fn
    w = g.normalized_weights(update=False)
    x_hat, iterations, last = M.fixed_point(
        lambda t: y - g.call_with(t, w), y, atol, block.max_iterations
    )
    assert float(last) <= atol and int(iterations) < block.max_iterations
    # |x_k - x*| <= L / (1 - L) |x_k - x_{k-1}|, the step's Euclidean norm <= sqrt(D) atol.
    lip = block.lipschitz_bound
    bound = lip / (1 - lip) * np.sqrt(5) * atol + 8 * np.finfo(dtype.as_numpy_dtype).eps
    assert np.abs(x_hat - x).max() <= bound
    np.testing.assert_array_equal(block.inverse(y), x_hat)
    # A cap of 2 iterations stops short of the tolerance.
    _, iterations, last = M.fixed_point(lambda t: y - g.call_with(t, w), y, atol, 2)
    assert int(iterations) == 2 and float(last) > atol


@pytest.mark.parametrize("log_det", ["exact", pytest.param("roulette", marks=pytest.mark.slow)])
def test_inverse_gradient_is_the_implicit_functions(log_det):
    """dx/dy = (I + J_g(x))^-1 (both adjoints: solve and iterate) and dx/dtheta
    against a central difference."""
    block = _block(3, log_det=log_det)
    y = _points((2, 3), seed=5)
    with tf.GradientTape() as tape:
        tape.watch(y)
        x = block.inverse(y)
    jac = tape.batch_jacobian(x, y)
    with tf.GradientTape() as tape:
        tape.watch(x)
        gx = block.residual_fn(x)
    expected = np.linalg.inv(np.eye(3) + tape.batch_jacobian(gx, x).numpy())
    np.testing.assert_allclose(jac, expected, atol=1e-9)
    # dx/dtheta on the normalised kernel tensor (a finite difference through the
    # power iteration would measure its tolerance instead).
    g = block.residual_fn
    weights = g.normalized_weights(update=False)
    adjoint = "solve" if log_det == "exact" else "iterate"

    def loss(ws):
        x = M.fixed_point_inverse(g.call_with, y, ws, 1e-13, 500, adjoint=adjoint)
        return tf.reduce_sum(x * y)

    direction = tf.constant(np.random.default_rng(6).standard_normal(weights[4].shape))
    with tf.GradientTape() as tape:
        tape.watch(weights)
        value = loss(weights)
    analytic = float(tf.reduce_sum(tape.gradient(value, weights[4]) * direction))
    eps = 1e-6
    moved = [
        loss(weights[:4] + [weights[4] + sign * eps * direction] + weights[5:]) for sign in (1, -1)
    ]
    np.testing.assert_allclose(analytic, float(moved[0] - moved[1]) / (2 * eps), rtol=1e-6)
    assert abs(analytic) > 1e-3


def test_training_steps_draw_afresh_and_reproducibly():
    block = _block(20, log_det="roulette", dtype=tf.float32, scale=0.5)
    assert block.log_det_mode == "roulette"  # "auto" above EXACT_MAX_DIMS too
    assert B.ResidualBlock(nets.ResidualMLP(20, 4), dtype=tf.float32).log_det_mode == "roulette"
    assert B.ResidualBlock(nets.ResidualMLP(4, 4), dtype=tf.float32).log_det_mode == "exact"
    x = _points((3, 20), tf.float32)

    def step_ldj(step):
        with nets.dropout_active(tf.constant([step, 0], tf.int64)):
            return block.forward_log_det_jacobian(x, event_ndims=1).numpy()

    outside = block.forward_log_det_jacobian(x, event_ndims=1).numpy()
    np.testing.assert_array_equal(outside, block.forward_log_det_jacobian(x, event_ndims=1))
    first = step_ldj(1)
    assert np.abs(first - step_ldj(2)).max() > 1e-2
    # The same step draws the same terms and probes (the stored power-iteration
    # vectors moved by the first call: the weights agree to its tolerance).
    np.testing.assert_allclose(first, step_ldj(1), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_roulette_block_compiles_with_xla():
    block = _block(20, log_det="roulette", dtype=tf.float32, scale=0.5)
    x = _points((3, 20), tf.float32)
    expected = block.forward_and_log_det(x)
    compiled = tf.function(block.forward_and_log_det, jit_compile=True)(x)
    np.testing.assert_allclose(compiled[0], expected[0], atol=1e-5)
    np.testing.assert_allclose(compiled[1], expected[1], atol=1e-4)


def test_networks_round_trip_their_config():
    for net, x in (
        (
            nets.ResidualMLP(3, 8, num_hidden_layers=1, lipschitz=0.8, seed=2),
            _points((2, 3), tf.float32),
        ),
        (nets.ResidualCNN((4, 4, 2), 4, lipschitz=0.8, seed=2), _points((2, 4, 4, 2), tf.float32)),
    ):
        twin = type(net).from_config(net.get_config())
        twin.set_weights(net.get_weights())
        np.testing.assert_array_equal(twin(x), net(x))
        assert twin.lipschitz_bound == pytest.approx(0.8 ** len(net.linears))


@pytest.mark.parametrize(
    "make, argument",
    [
        (lambda: nets.ResidualMLP(3, lipschitz=1.0), "lipschitz"),
        (lambda: nets.ResidualMLP(3, lipschitz=0.0), "lipschitz"),
        (lambda: nets.ResidualCNN((4, 4, 2), lipschitz=1.5), "lipschitz"),
        (lambda: nets.SpectralDense(2, 3, lipschitz=-0.5), "lipschitz"),
        (lambda: B.ResidualBlock(nets.ResidualMLP(3), log_det="hutchinson"), "log_det"),
        (lambda: B.ResidualBlock(nets.ResidualMLP(3), geometric_p=1.0), "geometric_p"),
        (lambda: B.ResidualBlock(nets.ResidualMLP(3), noise="uniform"), "noise"),
        (lambda: B.ResidualBlock(nets.ResidualMLP(3), atol=0.0), "atol"),
        (lambda: B.ResidualBlock(nets.ResidualMLP(3), event_shape=(4,)), "event_shape"),
        (lambda: B.ResidualBlock(nets.ResidualMLP(3), dtype=tf.float64), "residual_fn"),
    ],
)
def test_bad_arguments_are_value_errors_naming_them(make, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        make()


def test_an_unconstrained_network_is_a_type_error():
    with pytest.raises(TypeError, match="residual_fn"):
        B.ResidualBlock(keras.layers.Dense(3))
