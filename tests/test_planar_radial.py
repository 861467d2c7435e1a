"""PlanarFlow and RadialFlow beyond the shared contract (tests/bijector_registry.py).

The contract test checks both near their invertibility limits; here: the
constraints hold for any raw parameters, both inverses are accurate at the
hard points (the planar limit `w . u_hat -> -1`, large `|b|`, large inputs;
the radial centre `z0` and `beta -> -alpha`), the planar inverse's gradients
(one Newton step with gradients after the root solve) match finite
differences, both start as the identity, and bad arguments raise.
"""

import numpy as np
import pytest
import tensorflow as tf

from tfp_glow.bijectors import PlanarFlow, RadialFlow

F64 = tf.float64


def planar(d, w, u, b=0.0, dtype=F64):
    flow = PlanarFlow(d, seed=0, dtype=dtype)
    flow.w.assign(np.asarray(w, float))
    flow.u.assign(np.asarray(u, float))
    flow.b.assign(b)
    return flow


@pytest.mark.parametrize("scale_w", [0.0, 1e-150, 1e-3, 1.0, 1e3])
@pytest.mark.parametrize("wu_sign", [-1.0, 1.0])
def test_planar_constraint_holds_for_any_raw_parameters(scale_w, wu_sign):
    """`w . u_hat = -1 + softplus(w . u) >= -1` even for u aligned against w
    with |w . u| up to 1e6 (and w = 0, where u_hat = u)."""
    rng = np.random.default_rng(0)
    for _ in range(5):
        w = scale_w * rng.standard_normal(3)
        u = wu_sign * 1e3 * rng.standard_normal(3)
        if scale_w:  # the adversarial part: u = -(large) w / ||w||^2 too
            u = u + wu_sign * 1e6 * w / np.dot(w, w)
        flow = planar(3, w, u)
        c = float(flow.w_dot_u_hat())  # what the log-det and the inverse use
        dot = float(tf.reduce_sum(flow.w * flow.constrained_u()))
        wu = float(np.dot(w, u))
        if scale_w == 0.0:
            np.testing.assert_array_equal(flow.constrained_u(), u)
            continue
        expected = -1.0 + np.logaddexp(0.0, wu)
        assert c >= -1.0
        np.testing.assert_allclose(c, expected, rtol=1e-12)
        # The rounded u_hat meets it up to rounding relative to |w||u|.
        np.testing.assert_allclose(
            dot, expected, rtol=1e-9, atol=1e-14 * max(1.0, np.linalg.norm(w) * np.linalg.norm(u))
        )


def test_radial_constraint_holds_for_any_raw_parameters():
    flow = RadialFlow(2, seed=0, dtype=F64)
    for a_raw in (-50.0, -5.0, 0.0, 30.0):
        for b_raw in (-700.0, -50.0, 0.0, 50.0):
            flow.alpha_raw.assign(a_raw)
            flow.beta_raw.assign(b_raw)
            alpha, beta = (float(t) for t in flow.alpha_and_beta())
            assert alpha > 0 and beta >= -alpha


@pytest.mark.parametrize("dtype,atol", [(tf.float32, 2e-5), (F64, 1e-12)])
@pytest.mark.parametrize("raw_wu,b", [(-30.0, 0.0), (-5.0, 3.0), (0.0, -20.0), (8.0, 1.0)])
def test_planar_inverse_is_accurate_at_the_hard_points(dtype, atol, raw_wu, b):
    """`w . u_hat` from -1 + 1e-13 (raw -30) to 7 (raw 8), |b| up to 20, inputs
    up to |x| ~ 30: both round trips agree to `atol * max(1, |x|)`."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal(4)
    flow = planar(4, w, raw_wu * w / np.dot(w, w), b, dtype)
    x = tf.constant(
        np.concatenate(
            [rng.standard_normal((64, 4)), 30.0 * rng.standard_normal((8, 4)), np.zeros((1, 4))]
        ),
        dtype,
    )
    scale = np.maximum(1.0, np.abs(x.numpy()))
    y = flow.forward(x)
    np.testing.assert_array_less(np.abs(flow.inverse(tf.identity(y)) - x), atol * scale + 0)
    np.testing.assert_array_less(
        np.abs(flow.forward(flow.inverse(tf.identity(x))) - x), atol * scale
    )
    np.testing.assert_allclose(
        flow.inverse_log_det_jacobian(tf.identity(y), 1),
        -flow.forward_log_det_jacobian(x, 1),
        atol=100 * atol,
    )


def test_planar_inverse_gradients_match_finite_differences():
    """The inverse's gradient w.r.t. w, u, b (through the implicit-function
    Newton step, not the loop) against central differences, float64."""
    rng = np.random.default_rng(2)
    w, u = rng.standard_normal(3), rng.standard_normal(3)
    flow = planar(3, w, u - 4.0 * w / np.dot(w, w), 0.7)
    y = tf.constant(rng.standard_normal((5, 3)), F64)
    weights = tf.constant(rng.standard_normal((5, 3)), F64)

    def loss():
        x, ildj = flow.inverse_and_log_det(y)
        return tf.reduce_sum(x * weights) + tf.reduce_sum(ildj)

    with tf.GradientTape() as tape:
        value = loss()
    grads = tape.gradient(value, flow.trainable_variables)
    for var, grad in zip(flow.trainable_variables, grads):
        base = np.array(var.numpy())
        numeric = np.zeros_like(base)
        for i in np.ndindex(base.shape):
            for sign in (1.0, -1.0):
                bumped = base.copy()
                bumped[i] += sign * 1e-6
                var.assign(bumped)
                numeric[i] += sign * float(loss()) / 2e-6
            var.assign(base)
        np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype,atol", [(tf.float32, 1e-5), (F64, 1e-13)])
@pytest.mark.parametrize("beta_raw", [-20.0, -3.0, 0.0, 5.0])
def test_radial_inverse_is_accurate_at_the_centre_and_far_away(dtype, atol, beta_raw):
    """beta from -alpha + 2e-9 (raw -20) to 4.4 (raw 5), points at z0, next to
    it and at radius ~1e3: both round trips agree to `atol * max(1, |x|)`."""
    flow = RadialFlow(3, seed=4, dtype=dtype)
    flow.beta_raw.assign(beta_raw)
    z0 = flow.z0.numpy().astype(np.float64)
    rng = np.random.default_rng(3)
    x = np.concatenate(
        [
            rng.standard_normal((32, 3)),
            1e3 * rng.standard_normal((4, 3)),
            z0[None],
            z0[None] + 1e-3 * rng.standard_normal((4, 3)),
        ]
    )
    x = tf.constant(x, dtype)
    scale = np.maximum(1.0, np.abs(x.numpy()))
    y = flow.forward(x)
    np.testing.assert_array_less(np.abs(flow.inverse(tf.identity(y)) - x), atol * scale)
    np.testing.assert_array_less(
        np.abs(flow.forward(flow.inverse(tf.identity(x))) - x), atol * scale
    )
    assert np.all(np.isfinite(flow.forward_log_det_jacobian(x, 1)))


def test_radial_log_det_at_the_centre_is_the_limit():
    """At z = z0 the Jacobian is (1 + beta / alpha) I: log-det D log(s / alpha)."""
    flow = RadialFlow(3, seed=0, dtype=F64)
    flow.alpha_raw.assign(0.3)
    flow.beta_raw.assign(-1.2)
    alpha = np.logaddexp(0.0, 0.3)
    s = np.logaddexp(0.0, -1.2)
    z0 = tf.convert_to_tensor(flow.z0)[None]
    np.testing.assert_allclose(
        flow.forward_log_det_jacobian(z0, 1), [3 * np.log(s / alpha)], rtol=1e-12
    )


@pytest.mark.parametrize("cls", [PlanarFlow, RadialFlow])
def test_both_start_as_the_identity(cls):
    flow = cls(5, seed=7, dtype=F64)
    x = tf.constant(np.random.default_rng(0).standard_normal((6, 5)), F64)
    y, ldj = flow.forward_and_log_det(x)
    np.testing.assert_allclose(y, x, atol=1e-14)
    np.testing.assert_allclose(ldj, 0.0, atol=1e-14)
    assert (
        float(
            tf.reduce_max(
                tf.abs(
                    cls(5, seed=8).trainable_variables[0] - cls(5, seed=7).trainable_variables[0]
                )
            )
        )
        > 0
    )


@pytest.mark.parametrize("cls", [PlanarFlow, RadialFlow])
@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(event_size=(2, 2)), "acts on vectors"),
        (dict(event_size=0), "`event_size` must be a positive int"),
        (dict(event_size=2.0), "`event_size` must be a positive int"),
        (dict(event_size=True), "`event_size` must be a positive int"),
        (dict(event_size=2, seed=-1), "`seed`"),
    ],
)
def test_bad_constructor_arguments_raise(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


@pytest.mark.parametrize("cls", [PlanarFlow, RadialFlow])
def test_inputs_that_are_not_vectors_of_the_event_size_raise(cls):
    flow = cls(3, seed=0)
    with pytest.raises(ValueError, match=r"`x` must have 3 coordinates in its last axis"):
        flow.forward(tf.zeros([2, 4]))
    with pytest.raises(ValueError, match=r"`y` must have 3 coordinates in its last axis"):
        flow.inverse(tf.zeros([2, 2, 2]))
    with pytest.raises(ValueError, match=r"`x` must be vectors of shape \[\.\.\., 3\]"):
        flow.forward(tf.constant(1.0))
    # A batch of any rank of [3] vectors is fine.
    assert flow.forward(tf.zeros([2, 5, 3])).shape == (2, 5, 3)
