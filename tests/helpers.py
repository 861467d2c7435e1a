"""Helpers shared by the tests: perturbing parameters, TFP's bijector checks.

`perturb` moves any object's trainable variables off their (often identity)
initial values. `assert_bijective_and_finite` and `theoretical_log_det` are
the checks of TFP's `bijector_test_util` (`assert_bijective_and_finite`,
`get_fldj_theoretical`), written for our bijectors: every intermediate goes
through `tf.identity` so TFP's cache cannot answer `inverse(forward(x))` with
`x`, and keyword arguments (`conditional_input`) reach every call.
"""

import numpy as np
import tensorflow as tf

__all__ = [
    "assert_bijective_and_finite",
    "perturb",
    "randomize",
    "stateless_draw",
    "theoretical_log_det",
]


def perturb(obj, rng=0, scale=0.1):
    """Adds `scale * N(0, 1)` noise to every variable in `obj.trainable_variables`.

    `obj` is anything with `trainable_variables`: a bijector, a distribution,
    a Keras layer or model. `rng` is a `np.random.Generator` (consumed in the
    variables' order) or a seed. Returns `obj`.
    """
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    for v in obj.trainable_variables:
        v.assign(v + tf.constant(scale * rng.standard_normal(tuple(v.shape)), v.dtype))
    return obj


def randomize(layer, scale=0.3):
    """Sets every trainable weight of `layer` to `scale * N(0, 1)` (stateless,
    seed `[1, i]` for the i-th weight): off its init, where a last layer is zero."""
    for i, v in enumerate(layer.trainable_variables):
        v.assign(tf.random.stateless_normal(v.shape, seed=[1, i], dtype=v.dtype) * scale)


def stateless_draw(shape, dtype=tf.float32, seed=0, stream=0):
    """A reproducible standard-normal tensor: seed `[seed, stream]`."""
    return tf.random.stateless_normal(shape, seed=[seed, stream], dtype=dtype)


def _assert_finite(name, value):
    value = np.asarray(value)
    if not np.isfinite(value).all():
        raise AssertionError(f"{name} is not finite: {value.ravel()[:10]}")


def assert_bijective_and_finite(
    bijector, x, y, event_ndims, kwargs=None, atol=0.0, rtol=1e-5, ldj_atol=None
):
    """Asserts `f^-1(f(x)) = x`, `f(f^-1(y)) = y`, `fldj(x) = -ildj(f(x))`,
    `fldj(f^-1(y)) = -ildj(y)`, with every value finite.

    `x` lies in the domain of `forward` and `y` in that of `inverse` (ideally
    near their edges); `event_ndims` is the rank of `x`'s event. The log-dets
    are compared within `ldj_atol` (default `atol`), sums of many terms.
    """
    kwargs = kwargs or {}
    ldj_atol = atol if ldj_atol is None else ldj_atol
    _assert_finite("x", x)
    _assert_finite("y", y)
    y_ndims = bijector.forward_event_ndims(event_ndims)
    f_x = bijector.forward(x, **kwargs)
    g_y = bijector.inverse(y, **kwargs)
    values = {
        "f(x)": f_x,
        "g(y)": g_y,
        "g(f(x))": bijector.inverse(tf.identity(f_x), **kwargs),
        "f(g(y))": bijector.forward(tf.identity(g_y), **kwargs),
        "fldj(x)": bijector.forward_log_det_jacobian(x, event_ndims=event_ndims, **kwargs),
        "ildj(f(x))": bijector.inverse_log_det_jacobian(
            tf.identity(f_x), event_ndims=y_ndims, **kwargs
        ),
        "ildj(y)": bijector.inverse_log_det_jacobian(y, event_ndims=y_ndims, **kwargs),
        "fldj(g(y))": bijector.forward_log_det_jacobian(
            tf.identity(g_y), event_ndims=event_ndims, **kwargs
        ),
    }
    for name, value in values.items():
        _assert_finite(name, value)
    np.testing.assert_allclose(values["g(f(x))"], x, atol=atol, rtol=rtol, err_msg="g(f(x))")
    np.testing.assert_allclose(values["f(g(y))"], y, atol=atol, rtol=rtol, err_msg="f(g(y))")
    batch = np.shape(x)[: np.ndim(x) - event_ndims]
    np.testing.assert_allclose(
        np.broadcast_to(-np.asarray(values["ildj(f(x))"]), batch),
        np.broadcast_to(values["fldj(x)"], batch),
        atol=ldj_atol,
        rtol=rtol,
        err_msg="ldj at x",
    )
    np.testing.assert_allclose(
        np.broadcast_to(-np.asarray(values["ildj(y)"]), batch),
        np.broadcast_to(values["fldj(g(y))"], batch),
        atol=ldj_atol,
        rtol=rtol,
        err_msg="ldj at y",
    )


def theoretical_log_det(fn, t, event_ndims, pfor=True):
    """`log|det d fn(t) / d t|` per batch member, from an autodiff Jacobian.

    The events of `t` (its last `event_ndims` dims) and of `fn(t)` are
    flattened into vectors and the batch into one axis; for the square
    Jacobian `J` of an invertible map this is `slogdet(J)`, otherwise TFP's
    `0.5 * log det(J^T J)` (the volume change onto the image). Returns the
    batch shape of `t`.
    """
    t = tf.convert_to_tensor(t)
    batch_shape = t.shape[: t.shape.rank - event_ndims]
    n = int(np.prod(batch_shape))
    flat = tf.reshape(t, [n, -1])
    # `pfor=True` vectorises the rows (one graph); `False` runs one eager
    # backward pass per output element. `pfor` traces a graph per call, a
    # loss only for tiny events of cheap maps, so `pfor` unless asked.
    with tf.GradientTape(persistent=not pfor) as tape:
        tape.watch(flat)
        out = tf.reshape(fn(tf.reshape(flat, t.shape)), [n, -1])
    jac = tape.batch_jacobian(out, flat, experimental_use_pfor=pfor)
    if jac.shape[-1] == jac.shape[-2]:
        log_det = tf.linalg.slogdet(jac)[1]
    else:
        log_det = 0.5 * tf.linalg.slogdet(tf.matmul(jac, jac, adjoint_a=True))[1]
    return tf.reshape(log_det, batch_shape)
