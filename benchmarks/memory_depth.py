"""Training memory and step time against depth: standard / checkpoint /
reversible backprop (`tfp_glow.training.reversible`) and TFP's `tfb.Glow`.

Glow on 32x32x3 noise images (uniform levels, dequantized), 2 levels of K
steps (ActNorm, LU 1x1 conv, affine coupling; networks of width 64), batch
32, split priors, no learned top prior (as `tfb.Glow` has none); the
architecture of `common.py`. One training step = `-mean log p(x)` and its
gradient w.r.t. every trainable variable, in one `tf.function` (no
optimizer update, the same for every variant). For K = 2, 4, 8, 16, 32:

* peak memory: each (variant, K) in a fresh subprocess with TensorFlow's BFC
  allocator on the CPU (`TF_CPU_ALLOCATOR_USE_BFC=true`), so
  `tf.config.experimental.get_memory_info("CPU:0")` reports tensor bytes:
  the step's peak minus what is live just before it (variables included in
  neither). Exact, and the same meter for every variant;
* peak RSS growth of a step (`common.step_memory`: RSS sampled every ms
  after `malloc_trim`), and the step time, every variant of one K in one
  subprocess, timed interleaved round by round (`common.time_interleaved`)
  so load on the machine hits them alike. The table shows the median CPU
  time of the process per step (all threads; steadier than wall time on a
  shared machine) and the fastest wall time;
* the largest K each variant trains within `--budget-mb` (measured, and
  from a straight-line fit of memory against K).

`--variants loop:standard loop:reversible` (opt-in) adds a user's own eager
loop: `-mean FlowModel.log_prob(x, backprop=...)` under a GradientTape (the
same flow, a compiled function per mode); `fit:standard fit:reversible` (opt-in,
memory only) one step of `model.fit` (`memory_fit.py`). At K = 4 on a 2-core Xeon
(2026-12-07, BFC peak MB): loop:standard 124.9, loop:reversible 74.0, against
standard 86.3 and reversible 71.4 in one tf.function.

`--reconstruction` instead measures how exactly "reversible" rebuilds each
block's input in float32 on a deeper Glow (3 levels x 32 steps, width 64,
batch 4), and the gradient error of each mode in float32 against float64
standard backprop on the same weights, for weights moved off their init by
several sizes (see `reconstruction`).

    nice -n 10 python benchmarks/memory_depth.py --out benchmarks/results/memory_depth.json
    nice -n 10 python benchmarks/memory_depth.py --reconstruction \\
        --out benchmarks/results/reconstruction_depth.json
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

VARIANTS = ("standard", "checkpoint", "reversible", "tfb.Glow")
# Opt-in (`--variants loop:standard loop:reversible`): a user's own eager
# GradientTape loop over `FlowModel.log_prob(x, backprop=...)`, the same flow.
LOOP_VARIANTS = ("loop:standard", "loop:checkpoint", "loop:reversible")
# Opt-in: one step of `model.fit` (optimizer update, guard, metrics); memory only.
FIT_VARIANTS = ("fit:standard", "fit:checkpoint", "fit:reversible")
DEPTHS = (2, 4, 8, 16, 32)
CONFIG = dict(image_shape=(32, 32, 3), levels=2, width=64, num_bins=256, batch=32)


# -- one point (runs in a subprocess) ------------------------------------------
def _size(steps):
    """Registers this depth in `common.SIZES` (for `TFPGlow` and `batch_of`)."""
    import common

    name = f"depth_{steps}"
    common.SIZES[name] = dict(
        image_shape=CONFIG["image_shape"],
        levels=CONFIG["levels"],
        steps=steps,
        width=CONFIG["width"],
        num_bins=CONFIG["num_bins"],
    )
    return name


def build_step(variant, steps, x, jit_compile=False):
    """`(step, parameter count)`: `step(x)` returns the loss and the gradients."""
    import common
    import tensorflow as tf

    if variant in LOOP_VARIANTS:
        from memory_fit import custom_loop_step

        return custom_loop_step(variant.split(":")[1], _flow(steps), x, CONFIG)
    if variant == "tfb.Glow":
        model = common.TFPGlow(_size(steps)).initialize(x)
        variables = list(model.trainable_variables)

        def loss_fn(x):
            return -tf.reduce_mean(model.log_prob(x))
    else:
        from tfp_glow import models
        from tfp_glow.bijectors import data_dependent_init, forward_and_log_det
        from tfp_glow.training import reversible

        flow = models.build_glow_flow(
            image_shape=CONFIG["image_shape"],
            levels=CONFIG["levels"],
            steps_per_level=steps,
            hidden_channels=CONFIG["width"],
            coupling="affine",
            permutation="conv_lu",
            learn_top_prior=False,
            seed=0,
        )
        with data_dependent_init():
            forward_and_log_det(flow, x)
        variables = list(flow.trainable_variables)
        half_log_2pi = 0.5 * np.log(2.0 * np.pi)

        def loss_fn(x):
            z, ldj = reversible.forward_and_log_det(flow, x, backprop=variant)
            log_prior = tf.reduce_sum(-0.5 * tf.square(z) - half_log_2pi, axis=-1)
            return -tf.reduce_mean(log_prior + ldj)

    def step(x):
        with tf.GradientTape() as tape:
            loss = loss_fn(x)
        return loss, tape.gradient(loss, variables)

    params = int(sum(v.shape.num_elements() for v in variables))
    return tf.function(step, jit_compile=jit_compile), params


def _flow(steps):
    from tfp_glow import models

    return models.build_glow_flow(
        image_shape=CONFIG["image_shape"],
        levels=CONFIG["levels"],
        steps_per_level=steps,
        hidden_channels=CONFIG["width"],
        coupling="affine",
        permutation="conv_lu",
        learn_top_prior=False,
        seed=0,
    )


def memory_point(variant, steps, jit_compile, calls=2):
    """Peak tensor bytes of one step above those live before it (BFC stats)."""
    import gc

    import common
    import tensorflow as tf

    x = common.batch_of(_size(steps), batch=CONFIG["batch"])
    if variant in FIT_VARIANTS:
        from memory_fit import fit_memory_point

        return fit_memory_point(variant.split(":")[1], lambda: _flow(steps), x, CONFIG, calls)
    step, params = build_step(variant, steps, x, jit_compile)
    t0 = time.perf_counter()
    common._block(step(x))
    first = time.perf_counter() - t0
    peaks = []
    for _ in range(calls):
        gc.collect()
        tf.config.experimental.reset_memory_stats("CPU:0")
        live = tf.config.experimental.get_memory_info("CPU:0")["current"]
        out = step(x)
        common._block(out)
        peaks.append(tf.config.experimental.get_memory_info("CPU:0")["peak"] - live)
        del out
    return {"peak_bytes": max(peaks), "parameters": params, "first_call_s": first}


def timing_point(steps, variants, jit_compile, repeats):
    """Every variant at one depth in this process: RSS growth, then interleaved timing."""
    import common

    x = common.batch_of(_size(steps), batch=CONFIG["batch"])
    calls, out = {}, {}
    for variant in variants:
        step, _ = build_step(variant, steps, x, jit_compile)
        t0 = time.perf_counter()
        common._block(step(x))
        out[variant] = {"first_call_s": time.perf_counter() - t0}
        calls[variant] = (step, (x,))
    for variant in variants:
        out[variant]["rss_peak_bytes"] = common.step_memory(calls[variant][0], (x,))
    timed = common.time_interleaved(calls, repeats, warmup=1)
    for variant in variants:
        out[variant].update(
            {k: timed[variant][k] for k in ("median_ms", "min_ms", "cpu_median_ms", "repeats")}
        )
    return out


# -- float32 reconstruction at depth ---------------------------------------------
def _actnorms(flow):
    from tfp_glow.bijectors import ActNorm
    from tfp_glow.bijectors.base import sub_bijectors

    found = []

    def visit(b):
        if isinstance(b, ActNorm):
            found.append(b)
        for child in sub_bijectors(b):
            visit(child)

    visit(flow)
    return found


def _evaluate(f32, f64, x32, x64, **row):
    """Rebuild errors of `f32` on `x32`, and each mode's float32 gradient error
    against float64 standard backprop of `f64` (the same weights)."""
    import tensorflow as tf

    from tfp_glow.bijectors import forward_and_log_det
    from tfp_glow.training import reversible

    def grads(flow, x, mode):
        variables = list(flow.trainable_variables)
        with tf.GradientTape() as tape:
            tape.watch(x)
            z, ldj = reversible.forward_and_log_det(flow, x, backprop=mode)
            loss = -tf.reduce_mean(tf.reduce_sum(-0.5 * tf.square(z), -1) + ldj)
        return [g.numpy().astype(np.float64) for g in tape.gradient(loss, [x] + variables)]

    def rel(a, b):
        return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))

    blocks = reversible.reconstruction_errors(f32, x32)
    ldj64 = forward_and_log_det(f64, x64)[1].numpy()
    row.update(
        {
            "blocks": blocks,
            "rebuild_rel_max": max(b["rel_max"] for b in blocks),
            "ldj_float32_vs_float64_rel": float(
                np.max(np.abs(forward_and_log_det(f32, x32)[1].numpy() - ldj64))
                / np.max(np.abs(ldj64))
            ),
        }
    )
    truth = grads(f64, x64, "standard")
    for mode in ("standard", "checkpoint", "reversible"):
        g = grads(f32, x32, mode)
        errs = [rel(a, b) for a, b in zip(g, truth)]
        whole = rel(
            np.concatenate([a.ravel() for a in g]), np.concatenate([b.ravel() for b in truth])
        )
        row[mode] = {
            "worst_tensor_rel": max(errs),
            "median_tensor_rel": float(np.median(errs)),
            "all_params_rel": whole,
            "input_grad_rel": errs[0],
            "finite": bool(all(np.all(np.isfinite(a)) for a in g)),
        }
    print(json.dumps({k: v for k, v in row.items() if k != "blocks"}), flush=True)
    return row


def _float64_twin(build, f32):
    f64 = build("float64")
    # Same builder, same order: only auto-generated layer names differ.
    assert [v.shape for v in f64.variables] == [v.shape for v in f32.variables]
    for v64, v32 in zip(f64.variables, f32.variables):
        v64.assign(v32.numpy().astype(np.float64))
    return f64


def reconstruction(
    levels=3,
    steps=32,
    width=64,
    batch=4,
    settings=(
        ("normalized", 0.01),
        ("normalized", 0.03),
        ("normalized", 0.1),
        ("normalized", 0.3),
        ("raw", 0.01),
        ("raw", 0.03),
    ),
):
    """Float32 rebuild and gradient errors on a deep Glow with moved weights.

    Weights: every trainable variable moved by `scale * N(0, 1)` from its
    init, then either ActNorm is initialised on the batch ("normalized":
    every step's input standardised, as training keeps it roughly) or ActNorm
    was initialised first and is moved too ("raw", as
    tests/test_exactness_at_depth.py; activations drift in scale with depth).
    """
    import keras
    import tensorflow as tf

    from tfp_glow import models
    from tfp_glow.bijectors import data_dependent_init, forward_and_log_det

    def build(dtype):
        return models.build_glow_flow(
            image_shape=(32, 32, 3),
            levels=levels,
            steps_per_level=steps,
            hidden_channels=width,
            learn_top_prior=True,
            seed=1,
            dtype=dtype,
        )

    results = []
    for protocol, scale in settings:
        keras.utils.set_random_seed(7)
        rng = np.random.default_rng(7)
        f32 = build("float32")
        x = rng.uniform(-0.5, 0.5, (batch, 32, 32, 3))
        x32 = tf.constant(x, tf.float32)
        if protocol == "raw":
            with data_dependent_init():
                forward_and_log_det(f32, x32)
        for v in f32.trainable_variables:
            v.assign(v.numpy() + scale * rng.standard_normal(v.shape).astype(np.float32))
        if protocol == "normalized":
            for act in _actnorms(f32):
                act.initialized.assign(0.0)
            with data_dependent_init():
                forward_and_log_det(f32, x32)
        results.append(
            _evaluate(
                f32,
                _float64_twin(build, f32),
                x32,
                tf.constant(x, tf.float64),
                protocol=protocol,
                scale=scale,
            )
        )
    return {
        "levels": levels,
        "steps_per_level": steps,
        "width": width,
        "batch": batch,
        "results": results,
    }


def trained_reconstruction(train_steps=(0, 300, 1000), levels=2, steps=8, width=64, batch=64):
    """The same errors on the digits Glow (8x8x1) trained with Adam(1e-3), batch 64."""
    import keras
    import tensorflow as tf

    from tfp_glow import models
    from tfp_glow.bijectors import data_dependent_init, forward_and_log_det
    from tfp_glow.data import DIGITS_NUM_BINS, load_digits, preprocess
    from tfp_glow.training import reversible

    def build(dtype):
        return models.build_glow_flow(
            image_shape=(8, 8, 1),
            levels=levels,
            steps_per_level=steps,
            hidden_channels=width,
            learn_top_prior=True,
            seed=1,
            dtype=dtype,
        )

    keras.utils.set_random_seed(3)
    images = load_digits("train")[0]
    flow = build("float32")
    variables = list(flow.trainable_variables)
    opt = keras.optimizers.Adam(1e-3)
    data = preprocess(tf.constant(images[:batch]), DIGITS_NUM_BINS, True, 0)
    with data_dependent_init():
        forward_and_log_det(flow, data)

    @tf.function
    def train(x):
        with tf.GradientTape() as tape:
            z, ldj = reversible.forward_and_log_det(flow, x)
            loss = -tf.reduce_mean(tf.reduce_sum(-0.5 * tf.square(z), -1) + ldj)
        opt.apply(tape.gradient(loss, variables), variables)
        return loss

    results, done, rng = [], 0, np.random.default_rng(0)
    for target in train_steps:
        while done < target:
            idx = rng.integers(0, len(images), batch)
            train(preprocess(tf.constant(images[idx]), DIGITS_NUM_BINS, True, done))
            done += 1
        x = preprocess(tf.constant(images[-8:]), DIGITS_NUM_BINS, True, 1)
        results.append(
            _evaluate(
                flow,
                _float64_twin(build, flow),
                tf.cast(x, tf.float32),
                tf.cast(x, tf.float64),
                protocol="digits_trained",
                train_steps=target,
            )
        )
    return {"levels": levels, "steps_per_level": steps, "width": width, "results": results}


# -- driver ---------------------------------------------------------------------
def _subprocess(args, env_extra=None, timeout=3600):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **(env_extra or {}))
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__)] + args,
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1:] or ["rc != 0"]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def largest_within(points, budget_bytes):
    """Largest measured K within the budget, and the straight-line estimate."""
    ok = [k for k, b in points.items() if b is not None and b <= budget_bytes]
    ks = sorted(k for k, b in points.items() if b is not None)
    estimate = None
    if len(ks) >= 2:
        slope, intercept = np.polyfit(ks, [points[k] for k in ks], 1)
        estimate = (
            float("inf") if slope <= 0 else max(0.0, float((budget_bytes - intercept) / slope))
        )
    return (max(ok) if ok else None), estimate


def table(result, budget_mb):
    mb = 2.0**20
    variants, depths = result["variants"], result["depths"]
    lines = [
        "| K (steps/level) | "
        + " | ".join(f"{v} peak MB (RSS MB)" for v in variants)
        + " | "
        + " | ".join(f"{v} step CPU ms (wall min)" for v in variants)
        + " |",
        "|---" * (1 + 2 * len(variants)) + "|",
    ]
    for k in depths:
        mem, tim = result["memory"][str(k)], result["timing"][str(k)]
        cells = []
        for v in variants:
            peak = mem[v].get("peak_bytes")
            rss = tim.get(v, {}).get("rss_peak_bytes")
            cells.append(
                "error"
                if peak is None
                else f"{peak / mb:.1f} ({rss / mb:.1f})"
                if rss is not None
                else f"{peak / mb:.1f}"
            )
        for v in variants:
            t = tim.get(v, {})
            cells.append(
                ("error" if t else "-")
                if "cpu_median_ms" not in t
                else f"{t['cpu_median_ms']:.0f} ({t['min_ms']:.0f})"
            )
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    first, last = str(min(depths)), str(max(depths))
    peaks_last, peaks_first = result["memory"][last], result["memory"][first]
    lines.append(
        f"| peak K={last} / K={first} | "
        + " | ".join(
            f"{peaks_last[v]['peak_bytes'] / peaks_first[v]['peak_bytes']:.2f}"
            if "peak_bytes" in peaks_last[v] and "peak_bytes" in peaks_first[v]
            else "-"
            for v in variants
        )
        + " |"
    )
    lines.append("")
    lines.append(
        f"| largest K within {budget_mb:g} MB | "
        + " | ".join(
            f"{v}: {result['largest_k'][v]['measured']} (fit {result['largest_k'][v]['fit']})"
            for v in variants
        )
        + " |"
    )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=list(DEPTHS))
    parser.add_argument(
        "--variants",
        nargs="+",
        default=list(VARIANTS),
        choices=VARIANTS + LOOP_VARIANTS + FIT_VARIANTS,
    )
    parser.add_argument(
        "--no-timing",
        action="store_true",
        help="peak memory only (the fit: variants are never timed)",
    )
    parser.add_argument("--budget-mb", type=float, default=64.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--jit", action="store_true", help="compile the steps with XLA")
    parser.add_argument("--out", default=None)
    parser.add_argument("--reconstruction", action="store_true")
    parser.add_argument("--recon-steps", type=int, default=32)
    parser.add_argument("--recon-width", type=int, default=64)
    parser.add_argument("--worker", choices=("memory", "timing"), help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker == "memory":
        print(json.dumps(memory_point(args.variant, args.depths[0], args.jit)))
        return
    if args.worker == "timing":
        print(json.dumps(timing_point(args.depths[0], args.variants, args.jit, args.repeats)))
        return
    import common

    if args.reconstruction:
        result = {
            "machine": common.machine_info(),
            "deep_glow": reconstruction(steps=args.recon_steps, width=args.recon_width),
            "trained_digits_glow": trained_reconstruction(),
        }
    else:
        result = {
            "machine": common.machine_info(),
            "config": CONFIG,
            "jit": args.jit,
            "variants": args.variants,
            "depths": args.depths,
            "budget_mb": args.budget_mb,
            "memory": {},
            "timing": {},
        }
        jit = ["--jit"] if args.jit else []
        for k in args.depths:
            mem = {}
            for v in args.variants:
                t0 = time.time()
                mem[v] = _subprocess(
                    ["--worker", "memory", "--variant", v, "--depths", str(k)] + jit,
                    {"TF_CPU_ALLOCATOR_USE_BFC": "true"},
                )
                print(f"[memory] K={k} {v}: {mem[v]} ({time.time() - t0:.0f} s)", flush=True)
            result["memory"][str(k)] = mem
            timed = [v for v in args.variants if v not in FIT_VARIANTS]
            if args.no_timing or not timed:
                result["timing"][str(k)] = {}
                continue
            t0 = time.time()
            result["timing"][str(k)] = _subprocess(
                [
                    "--worker",
                    "timing",
                    "--depths",
                    str(k),
                    "--repeats",
                    str(args.repeats),
                    "--variants",
                ]
                + timed
                + jit
            )
            print(
                f"[timing] K={k}: {result['timing'][str(k)]} ({time.time() - t0:.0f} s)", flush=True
            )
        budget = args.budget_mb * 2**20
        result["largest_k"] = {}
        for v in args.variants:
            points = {k: result["memory"][str(k)][v].get("peak_bytes") for k in args.depths}
            measured, fit = largest_within(points, budget)
            result["largest_k"][v] = {
                "measured": measured,
                "fit": None if fit is None else round(fit, 1),
            }
        result["load_average_at_end"] = list(os.getloadavg())
        print(table(result, args.budget_mb))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
