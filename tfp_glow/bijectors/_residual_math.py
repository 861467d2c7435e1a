"""The math of an invertible residual block `y = x + g(x)`, `Lip(g) < 1`.

Pure functions of `g` given as `fn(x, weights)` (`x`: `[N, *event]`,
`weights`: a list of tensors), so the Keras layer holding `g` runs once per
call to normalise its weights and every loop here reuses them.

* `exact_log_det`: `log det(I + J_g(x))` from the autodiff Jacobian
  (`jacobian`: one backward pass over the batch repeated D times) and a QR
  decomposition.
* `roulette_log_det`: the unbiased Russian-roulette estimate of the power
  series `log det(I + J) = sum_k (-1)^(k+1) tr(J^k) / k`, with the Neumann
  series gradient in a custom gradient (memory independent of the number of
  terms).
* `fixed_point_inverse`: `x` with `x + g(x) = y`, by `x <- y - g(x)`, with the
  implicit-function gradient.

`det(I + J) > 0` whenever `|J| < 1` (every eigenvalue of `I + J` has a positive
real part), so `log|det| = log det`.

#### References

[1] Behrmann et al. Invertible Residual Networks. ICML 2019 (the power series,
    Hutchinson's trace estimator, the fixed-point inverse).
[2] Chen et al. Residual Flows for Invertible Generative Modeling. NeurIPS 2019,
    eq. 6 (Russian roulette) and eq. 8 (Neumann gradient series).
"""

import math

import tensorflow as tf

from tfp_glow.bijectors.invertible_conv1x1 import _log_abs_det

NOISES = ("normal", "rademacher")


def _event_axes(x):
    return list(range(1, x.shape.rank))


def jacobian(fn, x, weights):
    """`J_g(x)` per example, `[N, D, D]` (`D` the event size).

    The `D` rows come from one backward pass over the batch repeated `D`
    times, with the unit vectors as output gradients: no per-call graph, as
    `batch_jacobian`'s vectorisation traces. Differentiable in `x` and
    `weights` (a second-order gradient).
    """
    event = x.shape[1:]
    size = event.num_elements()
    repeated = tf.repeat(x, size, axis=0)  # [N * D, *event], example-major
    with tf.GradientTape() as tape:
        tape.watch(repeated)
        g_repeated = fn(repeated, weights)
    basis = tf.reshape(tf.eye(size, dtype=x.dtype), [size] + event.as_list())
    basis = tf.tile(basis, [tf.shape(x)[0]] + [1] * event.rank)
    rows = tape.gradient(g_repeated, repeated, output_gradients=basis)
    return tf.reshape(rows, [-1, size, size])  # [n, i, :] = e_i^T J_n


def exact_log_det(fn, x, weights):
    """`log det(I + J_g(x))` per example: the Jacobian (`jacobian`), then a QR
    decomposition (`O(D^3)`: for small events)."""
    jac = jacobian(fn, x, weights)
    return _log_abs_det(tf.eye(tf.shape(jac)[-1], dtype=x.dtype) + jac)


def _vjp(fn, x, weights, cotangent):
    """`cotangent^T J_g(x)` (one forward and one backward pass of `g`)."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        gx = fn(x, weights)
    return tape.gradient(gx, x, output_gradients=cotangent)


def _mix32(h):
    """MurmurHash3's 32-bit finaliser: every input bit flips each output bit
    with probability ~1/2."""
    for shift, factor in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):
        h = tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, tf.constant(shift, tf.uint32)))
        h = h * tf.constant(factor, tf.uint32)
    return tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, tf.constant(16, tf.uint32)))


def _hashed_bits(seed, count):
    """`count` uint32 words hashed from a `[2]` integer seed and their index.

    A counter-based generator of plain integer ops: unlike TF's stateless
    generators (whose XLA kernels draw other numbers than the CPU/GPU ones), it
    gives the same draws in eager mode, in a graph and under XLA, so a block's
    estimate does not depend on how its step was compiled.
    """
    words = tf.cast(tf.bitwise.bitwise_and(tf.cast(seed, tf.int64), 0xFFFFFFFF), tf.uint32)
    high = tf.cast(tf.bitwise.right_shift(tf.cast(seed, tf.int64), 32), tf.uint32)
    key = _mix32(_mix32(words[0] ^ tf.constant(0x9E3779B9, tf.uint32)) ^ high[0])
    key = _mix32(_mix32(key ^ words[1]) ^ high[1])
    index = tf.cast(tf.range(count), tf.uint32)
    return _mix32(_mix32(index ^ key) + tf.constant(0x7F4A7C15, tf.uint32) * key)


def _hashed_uniform(seed, shape, dtype):
    """Uniform on (0, 1) (24 random bits, never 0 or 1) of `shape`."""
    bits = _hashed_bits(seed, tf.reduce_prod(shape))
    top = tf.cast(tf.bitwise.right_shift(bits, tf.constant(8, tf.uint32)), dtype)
    return tf.reshape((top + 0.5) * 2.0**-24, shape)


def draw_series_length(seed, geometric_p):
    """`N ~ Geometric(p)` on `{1, 2, ...}` from a `[2]` seed:
    `N = 1 + floor(log U / log(1 - p))`, so `P(N >= m) = (1 - p)^(m - 1)`."""
    u = _hashed_uniform(seed, [], tf.float64)
    log_keep = tf.math.log1p(tf.constant(-geometric_p, tf.float64))
    return 1 + tf.cast(tf.floor(tf.math.log(u) / log_keep), tf.int32)


def draw_probe(seed, shape, dtype, noise):
    """Hutchinson's probe `v` (`E[v v^T] = I`): N(0, I) (Box-Muller) or Rademacher."""
    if noise == "normal":
        u = _hashed_uniform(seed, tf.concat([[2], shape], 0), dtype)
        return tf.sqrt(-2.0 * tf.math.log(u[0])) * tf.cos(2.0 * math.pi * u[1])
    return tf.where(
        _hashed_uniform(seed, shape, dtype) < 0.5, tf.ones(shape, dtype), -tf.ones(shape, dtype)
    )


def _power_series(fn, x, weights, probe, num_terms, n_exact, geometric_p):
    """`(estimate, neumann)` from `num_terms` vector-Jacobian products.

    With `w_k = 1 / P(term k is computed)` (1 for `k <= n_exact`, else
    `(1 - p)^-(k - n_exact - 1)`) and `u_k = v^T J^k`:

        estimate = sum_{k=1}^{n} (-1)^(k+1) w_k <u_k, v> / k
        neumann  = sum_{k=1}^{n} (-1)^(k+1) w_k u_{k-1}
    """
    dtype = x.dtype
    axes = _event_axes(x)
    log_keep = tf.math.log1p(tf.constant(-geometric_p, dtype))

    def body(k, u, estimate, neumann):
        kf = tf.cast(k, dtype)
        weight = tf.where(
            k <= n_exact, tf.ones([], dtype), tf.exp(-(kf - n_exact - 1.0) * log_keep)
        )
        sign = tf.where(k % 2 == 1, tf.ones([], dtype), -tf.ones([], dtype))
        neumann = neumann + sign * weight * u
        u = _vjp(fn, x, weights, u)
        estimate = estimate + sign * weight / kf * tf.reduce_sum(u * probe, axis=axes)
        return k + 1, u, estimate, neumann

    zeros = tf.zeros(tf.shape(x)[:1], dtype)
    _, _, estimate, neumann = tf.while_loop(
        lambda k, *_: k <= num_terms, body, (tf.constant(1), probe, zeros, tf.zeros_like(probe))
    )
    return estimate, neumann


def roulette_log_det(fn, x, weights, seed, n_exact=2, geometric_p=0.5, noise="normal"):
    """Unbiased estimate of `log det(I + J_g(x))` per example (Chen et al. 2019).

        log det(I + J) = E_{N, v}[ sum_{k=1}^{n_exact + N} (-1)^(k+1) / k
                                   * v^T J^k v / P(term k is computed) ]

    `N ~ Geometric(p)` (one draw per call, shared by the batch; terms
    `1..n_exact` are always computed), `v` a Hutchinson probe per example, both
    drawn from `seed` (a `[2]` int tensor). The gradient (in `x` and `weights`)
    is the Neumann series estimate of `tr((I + J)^-1 dJ)` (Chen et al., eq. 8),

        d log det(I + J) ~ sum_{k=0}^{n-1} (-1)^k w_{k+1} (v^T J^k) dJ v,

    computed from the same `v^T J^k` in a custom gradient: one double-backward
    pass, whatever the number of terms (no term is kept for backprop).
    """
    seed = tf.cast(seed, tf.int64)
    fold = tf.random.experimental.stateless_fold_in
    num_terms = n_exact + draw_series_length(fold(seed, 0), geometric_p)
    probe = draw_probe(fold(seed, 1), tf.shape(x), x.dtype, noise)
    weights = list(weights)
    axes = _event_axes(x)

    @tf.custom_gradient
    def estimate(x, *weights):
        value, neumann = _power_series(fn, x, list(weights), probe, num_terms, n_exact, geometric_p)

        def grad(upstream):
            sources = [x] + list(weights)
            with tf.GradientTape() as tape:
                tape.watch(sources)
                # neumann^T J v: its gradient is the Neumann estimate.
                surrogate = tf.reduce_sum(_vjp(fn, x, list(weights), neumann) * probe, axis=axes)
            grads = tape.gradient(surrogate, sources, output_gradients=upstream)
            return [tf.zeros_like(s) if g is None else g for s, g in zip(sources, grads)]

        return value, grad

    return estimate(x, *weights)


def fixed_point(step, start, atol, max_iterations):
    """Iterates `t <- step(t)` from `start` until the largest change of an
    element is <= `atol` (or `max_iterations`). Returns `(t, iterations,
    last change)`."""

    def moving(i, t, change):
        return change > atol

    def body(i, t, change):
        new = step(t)
        return i + 1, new, tf.reduce_max(tf.abs(new - t))

    inf = tf.constant(float("inf"), start.dtype)
    iterations, t, change = tf.while_loop(
        moving, body, (tf.constant(0), start, inf), maximum_iterations=max_iterations
    )
    return t, iterations, change


def fixed_point_inverse(fn, y, weights, atol, max_iterations, adjoint="iterate"):
    """`x` with `x + g(x) = y`, by `x_{k+1} = y - g(x_k)` from `x_0 = y`.

    `x -> y - g(x)` contracts by `L = Lip(g) < 1`, so the iteration converges
    (Banach); it stops when the largest change of an element is <= `atol`, and
    then `|x_k - x*| <= L / (1 - L) |x_k - x_{k-1}|` (Euclidean norm of the
    event). The gradient is the implicit function's, at the solution:
    `dx/dy = (I + J)^-1` and `dx/dtheta = -(I + J)^-1 dg/dtheta`. The vector
    `b = (I + J^T)^-1 a` it needs is, with `adjoint="iterate"`, the fixed point
    of `b <- a - J^T b` (same contraction), iterated to `atol` relative to
    `max|a|`; with `adjoint="solve"` (small events), a linear solve with the
    Jacobian (`jacobian`).
    """
    weights = list(weights)

    @tf.custom_gradient
    def solve(y, *weights):
        weights = list(weights)
        x, _, _ = fixed_point(lambda t: y - fn(t, weights), y, atol, max_iterations)

        def grad(upstream):
            if adjoint == "solve":
                jac = jacobian(fn, x, weights)
                eye = tf.eye(tf.shape(jac)[-1], dtype=jac.dtype)
                flat = tf.reshape(upstream, [tf.shape(upstream)[0], -1, 1])
                b = tf.reshape(
                    tf.linalg.solve(eye + tf.linalg.matrix_transpose(jac), flat), tf.shape(upstream)
                )
            else:
                scale = tf.maximum(tf.reduce_max(tf.abs(upstream)), tf.constant(1e-30, y.dtype))
                b, _, _ = fixed_point(
                    lambda t: upstream - _vjp(fn, x, weights, t),
                    upstream,
                    atol * scale,
                    max_iterations,
                )
            with tf.GradientTape() as tape:
                tape.watch(weights)
                gx = fn(x, weights)
            grads = tape.gradient(gx, weights, output_gradients=-b)
            return [b] + [tf.zeros_like(w) if g is None else g for w, g in zip(weights, grads)]

        return x, grad

    return solve(y, *weights)
