"""The small (8x8x1) training step's overhead over its networks, lever by lever.

At 8x8x1 (L=2, K=8, width 64, batch 64; `common.SIZES["small"]`) the
flow's training step costs more than its bare coupling networks forward and
backward, and the benchmarks' breakdown blames the Adam update of 194 small
variables. Each lever here keeps the math exact:

* `step` mode, interleaved round by round:
  - `keras_adam`: forward, gradient, Keras 3 Adam (`common.Bench.train_step`);
  - `fused_adam`: the same step with one `ResourceApplyAdam` kernel per
    variable (Keras Adam's update rule; the weights after one step from the
    same start are compared, and after three, where Adam's `m / sqrt(v)`
    amplifies float32 rounding in near-zero gradients);
  - `nets_step`: the bare coupling networks forward and backward (the floor);
  - `tfb.Glow`: TFP's Glow at the same architecture, its tf_keras Adam;
  - `adam/194_variables` vs `adam/packed`: Keras Adam alone, inside one
    `tf.function`, on the model's 194 variables and on the same parameters
    packed into one variable per (level, kind, shape) - the ceiling of
    "fewer, larger variables", which the flow would then have to slice;
* `fit` mode: `fit` on the 1,408 training digits that fill whole batches
  (22 steps an epoch), with `steps_per_execution` 1, 4 and 22; per-epoch
  time, the first epoch (tracing) dropped.

    python benchmarks/small_step_levers.py step --repeats 40 --out results/small_step_levers.json
    python benchmarks/small_step_levers.py fit --epochs 6 --out results/small_step_spe.json
"""

import argparse
import collections
import json
import os
import statistics
import sys
import time

import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


class FusedAdam:
    """Adam as one `ResourceApplyAdam` kernel per variable (Keras' rule).

    m <- b1 m + (1 - b1) g,   v <- b2 v + (1 - b2) g^2
    w <- w - lr sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)
    """

    def __init__(self, variables, learning_rate=1e-3, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
        self.variables = [getattr(v, "value", v) for v in variables]
        self.m = [tf.Variable(tf.zeros_like(v)) for v in self.variables]
        self.v = [tf.Variable(tf.zeros_like(v)) for v in self.variables]
        self.step = tf.Variable(0.0)
        self.hyper = (learning_rate, beta_1, beta_2, epsilon)

    def apply(self, grads):
        lr, b1, b2, eps = self.hyper
        t = self.step.assign_add(1.0)
        b1_power, b2_power = tf.pow(b1, t), tf.pow(b2, t)
        for var, m, v, g in zip(self.variables, self.m, self.v, grads):
            tf.raw_ops.ResourceApplyAdam(
                var=var.handle,
                m=m.handle,
                v=v.handle,
                beta1_power=b1_power,
                beta2_power=b2_power,
                lr=tf.constant(lr),
                beta1=tf.constant(b1),
                beta2=tf.constant(b2),
                epsilon=tf.constant(eps),
                grad=g,
            )


def _packed_shapes(variables):
    """One shape per (level, kind, shape) group: the group's variables stacked."""
    groups = collections.Counter((v.path.split("/")[-1], tuple(v.shape)) for v in variables)
    return [(n,) + shape for (_, shape), n in groups.items()]


def adam_alone(shapes):
    """A `tf.function` running one Keras Adam update on variables of `shapes`."""
    import keras

    variables = [keras.Variable(np.zeros(s, np.float32)) for s in shapes]
    optimizer = keras.optimizers.Adam(1e-3)
    optimizer.build(variables)

    @tf.function
    def update():
        # Gradients made inside the call, one cheap op per variable in both
        # layouts, so only the optimizer's per-variable cost differs.
        grads = [tf.fill(tf.shape(v), 1e-3) for v in variables]
        optimizer.apply(grads, variables)
        return tf.constant(0.0)

    return update, len(variables)


def fused_train_step(bench):
    """`bench.train_step` with `FusedAdam` in place of Keras Adam."""
    fused = FusedAdam(bench.variables)

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            loss = -tf.reduce_mean(bench.model.log_prob(x))
        fused.apply(tape.gradient(loss, bench.variables))
        return loss

    return step


def check_fused_matches_keras(x, steps=(1, 3)):
    """{n: max |w_fused - w_keras|} after n updates from one init, n in `steps`."""
    a, b = common.Bench("ours", "small", x), common.Bench("ours", "small", x)
    for va, vb in zip(a.variables, b.variables):
        vb.assign(va)
    fused_step = fused_train_step(b)
    out = {}
    for n in range(1, max(steps) + 1):
        a.train_step(x)
        fused_step(x)
        if n in steps:
            out[str(n)] = max(
                float(np.max(np.abs(va.numpy() - vb.numpy())))
                for va, vb in zip(a.variables, b.variables)
            )
    return out


def run_step(repeats):
    x = common.batch_of("small")
    keras_bench = common.Bench("ours", "small", x)
    fused_bench = common.Bench("ours", "small", x)
    fused_step = fused_train_step(fused_bench)
    variables = fused_bench.variables

    shapes = [tuple(v.shape) for v in variables]
    packed = _packed_shapes(variables)
    adam_all, n_all = adam_alone(shapes)
    adam_packed, n_packed = adam_alone(packed)
    tfp_bench = common.Bench("tfp", "small", x)
    calls = {
        "keras_adam": (keras_bench.train_step, (x,)),
        "tfb.Glow": (tfp_bench.train_step, (x,)),
        "fused_adam": (fused_step, (x,)),
        "nets_step": (keras_bench.nets_step, (x,)),
        f"adam/{n_all}_variables": (adam_all, ()),
        f"adam/packed_{n_packed}_variables": (adam_packed, ()),
    }
    timed = common.time_interleaved(calls, repeats, warmup=3)
    floor = timed["nets_step"]["median_ms"]
    return {
        "mode": "step",
        "size": "small",
        "config": common.SIZES["small"],
        "machine": common.machine_info(),
        "repeats": repeats,
        "timings": timed,
        "vs_nets_step": {k: v["median_ms"] / floor for k, v in timed.items()},
        "fused_vs_keras_max_abs_weight_diff": check_fused_matches_keras(x),
    }


class _EpochTimes:
    def __init__(self):
        import keras

        class Callback(keras.callbacks.Callback):
            def on_epoch_begin(cb, epoch, logs=None):
                cb.t0 = time.perf_counter()

            def on_epoch_end(cb, epoch, logs=None):
                self.times.append(time.perf_counter() - cb.t0)

        self.times, self.callback = [], Callback()


def run_fit(epochs, values=(1, 4, 22)):
    import keras

    from tfp_glow import data

    images, _ = data.load_digits("train")
    images = images[:1408]  # 22 whole batches of 64: no partial last batch
    x = data.preprocess(tf.constant(images), common.SIZES["small"]["num_bins"], True, 0).numpy()
    out = {
        "mode": "fit",
        "size": "small",
        "config": common.SIZES["small"],
        "machine": common.machine_info(),
        "epochs": epochs,
        "steps_per_epoch": 22,
        "runs": {},
    }
    for spe in values:
        keras.utils.set_random_seed(0)
        model = common.build_ours("small")
        model.initialize(x[:64])
        model.compile(keras.optimizers.Adam(1e-3), steps_per_execution=spe)
        timer = _EpochTimes()
        model.fit(
            x, batch_size=64, epochs=epochs, shuffle=False, verbose=0, callbacks=[timer.callback]
        )
        per_epoch = statistics.median(timer.times[1:])
        out["runs"][str(spe)] = {
            "epoch_s": timer.times,
            "median_epoch_s": per_epoch,
            "ms_per_step": 1e3 * per_epoch / 22,
        }
        print(f"steps_per_execution={spe}: {1e3 * per_epoch / 22:.1f} ms/step", flush=True)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["step", "fit"])
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out = run_step(args.repeats) if args.mode == "step" else run_fit(args.epochs)
    if args.mode == "step":
        for name, t in out["timings"].items():
            print(f"{name:<28}{t['median_ms']:>8.2f} ms  ({out['vs_nets_step'][name]:.3f}x nets)")
        print(
            "fused vs Keras Adam, max |weight diff| after n steps:",
            out["fused_vs_keras_max_abs_weight_diff"],
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
