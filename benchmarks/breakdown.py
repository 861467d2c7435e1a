"""Where tfp_glow's training step goes beyond its coupling networks.

At one size, for plain `tf.function` and XLA, times (interleaved):

* `nets`: the coupling networks alone, forward and backward, one after the
  other (the denominator of the flow overhead);
* `forward`: `log_prob` of a batch;
* `forward+gradient`: `-mean log p(x)` and its gradient, no update;
* `adam`: `optimizer.apply` of precomputed gradients to every variable;
* `train_step`: all of it.

So `forward+gradient - nets` is the flow's own math (ActNorm, 1x1 convs,
coupling arithmetic, split priors, log-dets) and `adam` the optimizer.

    python benchmarks/breakdown.py --size small --out results/breakdown_small.json
"""

import argparse
import json
import os
import sys

import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def run(size, repeats, lib="ours"):
    x = common.batch_of(size)
    out = {"size": size, "lib": lib, "modes": {}}
    for jit in (False, True):
        bench = common.Bench(lib, size, x, jit_compile=jit)
        model, variables, opt = bench.model, bench.variables, bench.optimizer

        def fwd_grad(x):
            with tf.GradientTape() as tape:
                loss = -tf.reduce_mean(model.log_prob(x))
            return tape.gradient(loss, variables)

        fwd_grad = tf.function(fwd_grad, jit_compile=jit)
        grads = [tf.identity(g) for g in fwd_grad(x)]
        adam = tf.function(lambda g: opt.apply(g, variables) or tf.constant(0.0), jit_compile=jit)
        calls = {
            "nets": (bench.nets_step, (x,)),
            "forward": (bench.log_prob, (x,)),
            "forward+gradient": (fwd_grad, (x,)),
            "adam": (adam, (grads,)),
            "train_step": (bench.train_step, (x,)),
        }
        mode = "xla" if jit else "graph"
        print(f"[{size}] {mode} ...", flush=True)
        timed = common.time_interleaved(calls, repeats)
        for name, t in timed.items():
            print(
                f"  {name:<18} {t['median_ms']:8.1f} ms (cpu {t['cpu_median_ms']:.1f})", flush=True
            )
        out["modes"][mode] = {k: v["median_ms"] for k, v in timed.items()}
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=sorted(common.SIZES))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out = run(args.size, args.repeats)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
