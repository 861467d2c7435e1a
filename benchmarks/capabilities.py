"""Can each library run a flow with a dynamic batch inside `tf.function`?

For tfp_glow and `tfb.Glow` (the matched 8x8x1 Glow, with one step per
level and width 16 to keep it quick: the checks concern shapes, not depth),
each check traces one
`tf.function` with `input_signature` batch dimension `None` (so one trace
serves every batch size) and calls it with batches of 3 and 64:

* `log_prob`: density of a batch;
* `train_step`: `-mean log p(x)`, gradient and an Adam update;
* `sample`: `n` drawn from a scalar int32 tensor argument (unknown `n`);
* each of them again with `jit_compile=True` (XLA) for tfp_glow.

An entry is `"ok"` or the exception type and the first line of its message.

    python benchmarks/capabilities.py
"""

import json
import os
import sys

import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def _first_line(exc):
    text = str(exc).strip().splitlines()
    # TF wraps graph errors in a long "in user code" trace: keep the cause.
    for line in reversed(text):
        line = line.strip()
        if line and not line.startswith(("File ", "in user code", "Call context")):
            name = type(exc).__name__
            return line[:200] if line.startswith(name) else f"{name}: {line[:200]}"
    return type(exc).__name__


def _try(fn):
    try:
        fn()
        return "ok"
    except Exception as exc:  # noqa: BLE001 -- recorded, not hidden
        return "fails: " + _first_line(exc)


def check(lib, jit_compile=False, size="tiny"):
    x64 = common.batch_of(size)
    x3 = x64[:3]
    bench = common.Bench(lib, size, x64)
    model, variables, opt = bench.model, bench.variables, bench.optimizer
    spec = tf.TensorSpec([None] + list(common.SIZES[size]["image_shape"]), tf.float32)

    log_prob = tf.function(model.log_prob, input_signature=[spec], jit_compile=jit_compile)

    def train(x):
        with tf.GradientTape() as tape:
            loss = -tf.reduce_mean(model.log_prob(x))
        grads = tape.gradient(loss, variables)
        if lib == "ours":
            opt.apply(grads, variables)
        else:
            opt.apply_gradients(zip(grads, variables))
        return loss

    train = tf.function(train, input_signature=[spec], jit_compile=jit_compile)
    sample = tf.function(
        lambda n: model.sample(n),
        input_signature=[tf.TensorSpec([], tf.int32)],
        jit_compile=jit_compile,
    )

    def run_log_prob():
        for x in (x3, x64):
            out = log_prob(x)
            if out.shape != (x.shape[0],) or not bool(tf.reduce_all(tf.math.is_finite(out))):
                raise RuntimeError(f"log_prob gave shape {out.shape} / non-finite values")

    def run_train():
        for x in (x3, x64):
            if not bool(tf.math.is_finite(train(x))):
                raise RuntimeError("non-finite loss")

    def run_sample():
        for n in (3, 64):
            out = sample(tf.constant(n))
            if out.shape[0] != n:
                raise RuntimeError(f"sample({n}) gave shape {out.shape}")

    return {
        "log_prob": _try(run_log_prob),
        "train_step": _try(run_train),
        "sample": _try(run_sample),
    }


def main():
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results = {
        "tfp_glow": check("ours"),
        "tfp_glow (XLA)": check("ours", jit_compile=True),
        "tfb.Glow": check("tfp"),
    }
    print(json.dumps(results, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
