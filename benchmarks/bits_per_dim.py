"""Test bits/dim on the built-in digits after the same training for both libraries.

tfp_glow's Glow and `tfb.Glow` at the small matched architecture
(`common.SIZES["small"]`) are trained for `--epochs` epochs on the 1,437
training digits with Adam(1e-3), batch 64 (the same 22 full batches per epoch
in the same order for both, dequantized with the same seeds), from the same
data-dependent ActNorm initialisation batch. Every few epochs and at the end
both are evaluated on the 360 test digits, dequantized with a fixed seed:

    bits/dim = (-log p(x) + D log 17) / (D ln 2)

    python benchmarks/bits_per_dim.py --epochs 25 --out results/bpd.json
"""

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

SIZE = "small"


def _bpd(log_prob, num_dims, num_bins):
    return (-log_prob + num_dims * math.log(num_bins)) / (num_dims * math.log(2.0))


def train_and_evaluate(lib, epochs, eval_every=5, seed=0, jit_compile=False):
    from tfp_glow import data

    cfg = common.SIZES[SIZE]
    num_dims = int(np.prod(cfg["image_shape"]))
    train = data.digits_dataset("train", batch_size=common.BATCH, seed=seed, drop_remainder=True)
    test_images, _ = data.load_digits("test")
    x_test = data.preprocess(tf.constant(test_images), cfg["num_bins"], True, seed=1234)
    x_init = next(iter(train))
    bench = common.Bench(lib, SIZE, x_init, jit_compile=jit_compile, seed=seed)
    evaluate = tf.function(lambda x: tf.reduce_mean(bench.model.log_prob(x)))
    history, epoch_times, first_step = [], [], None
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        for x in train:
            if first_step is None:
                s0 = time.perf_counter()
                loss = bench.train_step(x)
                common._block(loss)
                first_step = time.perf_counter() - s0
                t0 += first_step  # the epoch time excludes tracing
            else:
                loss = bench.train_step(x)
        common._block(loss)
        epoch_times.append(time.perf_counter() - t0)
        if epoch % eval_every == 0 or epoch == epochs:
            bpd = float(_bpd(evaluate(x_test), num_dims, cfg["num_bins"]))
            history.append({"epoch": epoch, "test_bits_per_dim": bpd})
            print(
                f"  {lib} epoch {epoch}: test bits/dim {bpd:.3f} ({epoch_times[-1]:.1f} s/epoch)",
                flush=True,
            )
    finite = [h["test_bits_per_dim"] for h in history if math.isfinite(h["test_bits_per_dim"])]
    return {
        "epochs": epochs,
        "test_bits_per_dim": history[-1]["test_bits_per_dim"],
        "best_test_bits_per_dim": min(finite) if finite else float("nan"),
        "history": history,
        "first_step_s": first_step,
        "median_epoch_s": float(np.median(epoch_times)),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--libs", default="ours,tfp")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out = {
        "size": SIZE,
        "config": common.SIZES[SIZE],
        "optimizer": "Adam(1e-3)",
        "batch": common.BATCH,
    }
    for lib in args.libs.split(","):
        name = {"ours": "tfp_glow", "tfp": "tfb.Glow"}[lib]
        out[name] = train_and_evaluate(lib, args.epochs, args.eval_every)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
