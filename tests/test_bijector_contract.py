"""The bijector contract, checked for every entry of the registry.

TFP's `assert_bijective_and_finite` (round trips both ways through
`tf.identity`, so TFP's cache cannot answer `inverse(forward(x))` with `x`;
fldj == -ildj at x and at y; at the edges of the domain and range), log-dets
of both directions against the slogdet of an autodiff Jacobian (TFP's
`get_fldj_theoretical`) on perturbed parameters, unknown batch under
`tf.function`, float32 and float64, gradients to every trainable variable,
no stale cached result, no cache shared between instances. Conditional
entries run every test with their context (`conditional_input`), held fixed
for the Jacobians, and the context must reach the map and its weights.
"""

import numpy as np
import pytest
import tensorflow as tf
from bijector_registry import REGISTRY, SLOW_REGISTRY, context_weights
from helpers import assert_bijective_and_finite, perturb, theoretical_log_det

DTYPES = [tf.float32, tf.float64]
ROUND_TRIP_ATOL = {tf.float32: 1e-5, tf.float64: 1e-10}
LOG_DET_ATOL = {tf.float32: 2e-3, tf.float64: 1e-8}
BATCH = 3
CASES = {**REGISTRY, **SLOW_REGISTRY}


def names(selected):
    """`selected` names in order, those of SLOW_REGISTRY marked slow."""
    return [
        pytest.param(n, marks=pytest.mark.slow) if n in SLOW_REGISTRY else n
        for n in sorted(selected)
    ]


def build(name, dtype, seed=0):
    case = CASES[name]
    rng = np.random.default_rng(seed)
    bijector = case.make(dtype)
    perturb(bijector, rng)
    return case, bijector, case.draw(rng, BATCH, dtype), case.kwargs(rng, BATCH, dtype)


def flat_event(t, event_ndims):
    return tf.reshape(t, [t.shape[0], -1]) if event_ndims > 1 else t


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("name", names(CASES))
class TestContract:
    def test_bijective_and_finite(self, name, dtype):
        """Round trips both ways, fldj == -ildj at x and at y, all finite (TFP's
        `assert_bijective_and_finite`), at the edges of the domain and range."""
        case, b, x, kw = build(name, dtype)
        y = case.draw_codomain(np.random.default_rng(5), BATCH, dtype, b)
        assert_bijective_and_finite(
            b,
            x,
            y,
            len(case.event_shape),
            kw,
            atol=ROUND_TRIP_ATOL[dtype],
            rtol=1e-5,
            ldj_atol=LOG_DET_ATOL[dtype],
        )
        assert b.forward(x, **kw).dtype == dtype and b.inverse(y, **kw).dtype == dtype

    def test_log_det_matches_autodiff_jacobian(self, name, dtype):
        case, b, x, kw = build(name, dtype)
        nd = len(case.event_shape)
        tol = dict(atol=LOG_DET_ATOL[dtype], rtol=1e-5)
        expected = theoretical_log_det(lambda t: b.forward(t, **kw), x, nd)
        fldj = b.forward_log_det_jacobian(x, event_ndims=nd, **kw)
        np.testing.assert_allclose(np.broadcast_to(fldj, [BATCH]), expected, **tol)
        # The inverse direction on its own points of the range.
        y = case.draw_codomain(np.random.default_rng(5), BATCH, dtype, b)
        y_nd = b.forward_event_ndims(nd)
        expected_inverse = theoretical_log_det(lambda t: b.inverse(t, **kw), y, y_nd)
        ildj = b.inverse_log_det_jacobian(y, event_ndims=y_nd, **kw)
        np.testing.assert_allclose(np.broadcast_to(ildj, [BATCH]), expected_inverse, **tol)
        if case.volume_preserving:
            np.testing.assert_array_equal(np.broadcast_to(fldj, [BATCH]), 0.0)
        # The one-pass API agrees with TFP's public methods.
        y_fast, ldj_fast = b.forward_and_log_det(x, **kw)
        np.testing.assert_allclose(y_fast, b.forward(x, **kw), atol=ROUND_TRIP_ATOL[dtype])
        np.testing.assert_allclose(
            np.broadcast_to(
                tf.reduce_sum(ldj_fast, axis=list(range(-(nd - b.forward_min_event_ndims), 0)))
                if nd > b.forward_min_event_ndims
                else ldj_fast,
                [BATCH],
            ),
            expected,
            **tol,
        )
        x_fast, ildj_fast = b.inverse_and_log_det(y, event_ndims=y_nd, **kw)
        np.testing.assert_allclose(x_fast, b.inverse(y, **kw), atol=ROUND_TRIP_ATOL[dtype])
        np.testing.assert_allclose(np.broadcast_to(ildj_fast, [BATCH]), expected_inverse, **tol)

    def test_tf_function_unknown_batch(self, name, dtype):
        case, b, x, kw = build(name, dtype)
        nd = len(case.event_shape)
        spec = tf.TensorSpec([None] + list(case.event_shape), dtype)
        label_spec = (
            [
                tf.TensorSpec(
                    [None] + kw["conditional_input"].shape[1:], kw["conditional_input"].dtype
                )
            ]
            if kw
            else []
        )

        @tf.function(input_signature=[spec] + label_spec)
        def round_trip(x, *labels):
            k = {"conditional_input": labels[0]} if labels else {}
            y = b.forward(x, **k)
            fldj = b.forward_log_det_jacobian(x, event_ndims=nd, **k)
            return y, b.inverse(tf.identity(y), **k), fldj

        args = [x] + ([kw["conditional_input"]] if kw else [])
        y, x_back, fldj = round_trip(*args)
        np.testing.assert_allclose(y, b.forward(x, **kw), atol=ROUND_TRIP_ATOL[dtype])
        np.testing.assert_allclose(x_back, x, atol=ROUND_TRIP_ATOL[dtype])
        np.testing.assert_allclose(
            np.broadcast_to(fldj, [BATCH]),
            np.broadcast_to(b.forward_log_det_jacobian(x, event_ndims=nd, **kw), [BATCH]),
            atol=LOG_DET_ATOL[dtype],
        )
        # A different batch size runs the same trace (no retracing).
        more = tf.concat([x, x], axis=0)
        more_args = [more] + ([tf.concat([kw["conditional_input"]] * 2, 0)] if kw else [])
        y2, _, _ = round_trip(*more_args)
        assert y2.shape[0] == 2 * BATCH
        assert round_trip.experimental_get_tracing_count() == 1

    def test_gradients_reach_every_trainable_variable(self, name, dtype):
        case, b, x, kw = build(name, dtype)
        variables = b.trainable_variables
        if not variables:
            pytest.skip(f"{name} has no trainable variables")
        nd = len(case.event_shape)
        weights = tf.constant(
            np.random.default_rng(1).standard_normal(b.forward(x, **kw).shape), dtype
        )
        with tf.GradientTape() as tape:
            y = b.forward(x, **kw)
            loss = tf.reduce_sum(y * weights) + tf.reduce_sum(
                b.forward_log_det_jacobian(x, event_ndims=nd, **kw)
            )
        grads = tape.gradient(loss, variables)
        for v, g in zip(variables, grads):
            assert g is not None, f"no gradient reaches {v.name}"
            assert float(tf.reduce_max(tf.abs(g))) > 0, f"zero gradient for {v.name}"

    def test_no_stale_result_after_assign(self, name, dtype):
        case, b, x, kw = build(name, dtype)
        if not b.trainable_variables:
            pytest.skip(f"{name} has no variables to change")
        nd = len(case.event_shape)
        y_before = b.forward(x, **kw)  # kept alive: TFP would keep its cache entry
        fldj_before = b.forward_log_det_jacobian(x, event_ndims=nd, **kw)
        perturb(b, np.random.default_rng(7), scale=0.05)
        y_after = b.forward(x, **kw)
        fresh_y = b.forward_and_log_det(tf.identity(x), **kw)[0]
        np.testing.assert_allclose(y_after, fresh_y, atol=ROUND_TRIP_ATOL[dtype])
        assert float(tf.reduce_max(tf.abs(y_after - y_before))) > 1e-4
        x_back = b.inverse(y_before, **kw)
        fresh_x = b.inverse_and_log_det(tf.identity(y_before), **kw)[0]
        np.testing.assert_allclose(x_back, fresh_x, rtol=1e-4, atol=ROUND_TRIP_ATOL[dtype])
        assert float(tf.reduce_max(tf.abs(x_back - x))) > 1e-4, "inverse served from cache"
        fldj_after = b.forward_log_det_jacobian(x, event_ndims=nd, **kw)
        if case.volume_preserving:  # NICE: the log-det is 0 for any parameters
            np.testing.assert_array_equal(fldj_after, 0.0)
        else:
            assert float(tf.reduce_max(tf.abs(fldj_after - fldj_before))) > 1e-6
        del fldj_before

    def test_instances_never_share_cache(self, name, dtype):
        case, b1, x, kw = build(name, dtype, seed=0)
        if not b1.trainable_variables:
            pytest.skip(f"{name} has no variables, identical instances are equal maps")
        b2 = case.make(dtype)
        perturb(b2, np.random.default_rng(99))
        assert b1 != b2
        y1 = b1.forward(x, **kw)

        @tf.function
        def both(x):
            return b1.forward(x, **kw), b2.forward(x, **kw)

        g1, g2 = both(x)
        y2 = b2.forward(x, **kw)
        np.testing.assert_allclose(g1, y1, atol=ROUND_TRIP_ATOL[dtype])
        np.testing.assert_allclose(g2, y2, atol=ROUND_TRIP_ATOL[dtype])
        assert float(tf.reduce_max(tf.abs(y1 - y2))) > 1e-3


CONDITIONAL = [name for name, case in CASES.items() if case.conditional is not None]


@pytest.mark.parametrize("name", names(CONDITIONAL))
def test_context_reaches_the_map_and_its_weights(name):
    """The context changes the map, and the loss has a nonzero gradient with
    respect to the (float) context and to every weight that multiplies it
    (the context's rows of a coupling network's first kernel, a prior's
    context map): the context path trains."""
    case, b, x, kw = build(name, tf.float64)
    nd = len(case.event_shape)
    context = kw["conditional_input"]
    weights = tf.constant(np.random.default_rng(1).standard_normal(b.forward(x, **kw).shape))
    targets = context_weights(b)
    assert targets, f"{name} has no context weights"
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(context)
        y, ldj = b.forward_and_log_det(x, nd, conditional_input=context)
        loss = tf.reduce_sum(y * weights) + tf.reduce_sum(ldj)
    for variable, index in targets:
        grad = tape.gradient(loss, variable)
        assert grad is not None, f"no gradient reaches {variable.name}"
        assert float(tf.reduce_max(tf.abs(tf.convert_to_tensor(grad)[index]))) > 0, (
            f"zero gradient for the context part of {variable.name}"
        )
    if context.dtype.is_floating:
        grad = tape.gradient(loss, context)
        assert np.all(np.isfinite(grad)) and float(tf.reduce_max(tf.abs(grad))) > 0
        other = context + tf.constant(0.5, context.dtype)
    else:
        other = (context + 1) % case.conditional
    y_other, ldj_other = b.forward_and_log_det(x, nd, conditional_input=other)
    assert float(tf.reduce_max(tf.abs(y_other - y))) > 1e-4
    if not case.volume_preserving:
        assert float(tf.reduce_max(tf.abs(ldj_other - ldj))) > 1e-6
    # Missing context: a ValueError naming `conditional_input`.
    with pytest.raises(ValueError, match="conditional_input"):
        b.forward_and_log_det(x, nd)
