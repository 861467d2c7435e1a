"""XLA (`jit_compile=True`) compatibility of every tfp_glow bijector.

For each configuration of the shared contract registry
(`tests/bijector_registry.py`), compiles forward + log-det, inverse +
log-det and the gradient of the log-det sum w.r.t. every trainable variable
with XLA, with an unknown batch dimension, and compares them with the plain
`tf.function` results (float32). Also compiles `Glow`, `RealNVP` and `NICE`
training steps (forward, gradient, Adam) with XLA.

    python benchmarks/xla_check.py [--out results/xla_check.json]
"""

import json
import os
import sys

import numpy as np
import tensorflow as tf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))


def _bijector_check(name, case):
    from bijector_registry import perturb

    from tfp_glow.bijectors import forward_and_log_det, inverse_and_log_det

    rng = np.random.default_rng(0)
    bij = case.make(tf.float32)
    x = case.draw(rng, 5, tf.float32)
    kwargs = case.kwargs(rng, 5)
    if bij.trainable_variables:
        perturb(bij, rng)
    variables = list(bij.trainable_variables)

    def fn(x, **kw):
        with tf.GradientTape() as tape:
            y, fldj = forward_and_log_det(bij, x, **kw)
            x_back, ildj = inverse_and_log_det(bij, tf.identity(y), **kw)
            total = tf.reduce_sum(fldj) + tf.reduce_sum(ildj) + tf.reduce_sum(y**2)
        grads = tape.gradient(total, variables) if variables else []
        return [y, fldj, x_back, ildj] + [g for g in grads if g is not None]

    spec = tf.TensorSpec([None] + list(x.shape[1:]), x.dtype)
    plain = tf.function(fn)(x, **kwargs)
    try:
        compiled = tf.function(fn, jit_compile=True)
        tf.function(fn, jit_compile=True).get_concrete_function(spec, **kwargs)
        xla = compiled(x, **kwargs)
    except Exception as exc:  # noqa: BLE001 -- reported
        return f"fails: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    worst = max(float(tf.reduce_max(tf.abs(a - b))) for a, b in zip(plain, xla))
    return "ok" if worst < 1e-3 else f"mismatch: max |xla - plain| = {worst:.2e}"


def _model_check(name, make, shape):
    import keras

    model = make()
    x = tf.random.uniform((8,) + shape, -0.45, 0.45, seed=0)
    model.initialize(x)
    opt = keras.optimizers.Adam(1e-3)
    variables = model.trainable_variables

    def step(x):
        with tf.GradientTape() as tape:
            loss = -tf.reduce_mean(model.log_prob(x))
        opt.apply(tape.gradient(loss, variables), variables)
        return loss

    try:
        loss = tf.function(step, jit_compile=True)(x)
        sample = tf.function(lambda: model.sample(4), jit_compile=True)()
    except Exception as exc:  # noqa: BLE001 -- reported
        return f"fails: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    ok = bool(tf.math.is_finite(loss)) and bool(tf.reduce_all(tf.math.is_finite(sample)))
    return "ok" if ok else "non-finite"


def main():
    from bijector_registry import REGISTRY

    import tfp_glow

    results = {"bijectors": {}, "models": {}}
    for name, case in REGISTRY.items():
        results["bijectors"][name] = _bijector_check(name, case)
        print(f"{name:<34} {results['bijectors'][name]}", flush=True)
    models = {
        "Glow": (
            lambda: tfp_glow.Glow(
                (8, 8, 1),
                levels=2,
                steps_per_level=2,
                hidden_channels=16,
                num_bins=17,
                dropout=0.0,
                dequantization="uniform",
            ),
            (8, 8, 1),
        ),
        "RealNVP": (
            lambda: tfp_glow.RealNVP((8, 8, 1), levels=2, hidden_channels=16, num_bins=17),
            (8, 8, 1),
        ),
        "NICE": (lambda: tfp_glow.NICE((8, 8, 1), hidden_units=32, num_bins=17), (8, 8, 1)),
        "RealNVP (2-D)": (
            lambda: tfp_glow.RealNVP((2,), hidden_channels=16, coupling_layers=4, num_bins=None),
            (2,),
        ),
    }
    for name, (make, shape) in models.items():
        results["models"][name] = _model_check(name, make, shape)
        print(f"{name:<34} {results['models'][name]}", flush=True)
    return results


if __name__ == "__main__":
    results = main()
    if len(sys.argv) == 3 and sys.argv[1] == "--out":
        with open(sys.argv[2], "w") as f:
            json.dump(results, f, indent=2)
