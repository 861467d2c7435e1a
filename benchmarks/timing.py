"""Step time, log_prob and sampling throughput, and flow overhead at one size.

Builds tfp_glow's Glow (plain `tf.function`, XLA, and with bfloat16
coupling networks) and `tfb.Glow` at the matched architecture of
`common.SIZES[size]`, then times, interleaved round by round (so load on the
machine hits every variant alike):

* `train_step`: forward, gradient and one Adam update, batch 64;
* `model_train_step` (tfp_glow): `FlowModel.train_step`, the step `fit` runs;
* `log_prob`: batch 64 -> images/s;
* `sample`: 64 images -> images/s;
* peak memory of a training step: RSS growth while one step runs, over the
  RSS just before it, after `malloc_trim` (`common.step_memory`);
* `nets_step`: the same coupling networks alone (inputs of the shapes they
  see in the flow, one after the other), forward and backward -> flow
  overhead = train_step / nets_step;
* `nets_forward`: the same networks forward only -> sampling overhead =
  sample / nets_forward.

    python benchmarks/timing.py --size small --repeats 20 --out results/timing_small.json
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

VARIANTS = {
    "tfp_glow": ("ours", False),
    "tfp_glow_xla": ("ours", True),
    "tfp_glow_bf16": ("ours_bf16", False),
    "tfb.Glow": ("tfp", False),
}
KINDS = ("train_step", "model_train_step", "log_prob", "sample", "nets_step", "nets_forward")


def run(size, repeats, variants=tuple(VARIANTS), kinds=KINDS, warmup=2, profile=False):
    x = common.batch_of(size)
    benches = {
        name: common.Bench(*VARIANTS[name][:1], size, x, jit_compile=VARIANTS[name][1])
        for name in variants
    }
    out = {
        "size": size,
        "config": common.SIZES[size],
        "batch": common.BATCH,
        "variables": {n: len(b.variables) for n, b in benches.items()},
        "parameters": {
            n: int(sum(v.shape.num_elements() for v in b.variables)) for n, b in benches.items()
        },
        "variants": {n: {} for n in variants},
    }
    for kind in kinds:
        calls = {}
        for name, bench in benches.items():
            fn = getattr(bench, kind)
            if fn is not None:
                calls[name] = (fn, () if kind == "sample" else (x,))
        print(f"[{size}] timing {kind} ...", flush=True)
        timed = common.time_interleaved(calls, repeats, warmup=warmup)
        for name, t in timed.items():
            if kind in ("log_prob", "sample"):
                t["images_per_s"] = common.BATCH / (t["median_ms"] / 1e3)
            if kind == "train_step":
                t["peak_memory_mb"] = common.step_memory(calls[name][0], (x,)) / 2**20
            out["variants"][name][kind] = t
            print(
                f"  {name:<14} {t['median_ms']:9.1f} ms (min {t['min_ms']:.1f}, "
                f"cpu {t['cpu_median_ms']:.1f}, first call {t['first_call_s']:.1f} s)"
                + (f", peak +{t['peak_memory_mb']:.1f} MB" if "peak_memory_mb" in t else ""),
                flush=True,
            )
    if profile:
        import profile_ops

        for kind in ("train_step", "sample"):
            if kind not in kinds:
                continue
            for name, bench in benches.items():
                # XLA runs one cluster: no per-op events to break down. The
                # bf16 variant's profile is not among BENCHMARKS.md's tables.
                if bench.jit or bench.lib == "ours_bf16":
                    continue
                print(f"[{size}] profiling {name} {kind} ...", flush=True)
                args = () if kind == "sample" else (x,)
                per_op = profile_ops.profile_step(getattr(bench, kind), args, steps=3)
                out["variants"][name][f"{kind}_profile"] = {
                    op: {"ms": us / 1000, "count": n} for op, (us, n) in per_op.items()
                }
                print(profile_ops.format_breakdown(per_op, top=8), flush=True)
    for res in out["variants"].values():
        if "train_step" in res and "nets_step" in res:
            res["flow_overhead"] = res["train_step"]["median_ms"] / res["nets_step"]["median_ms"]
        if "sample" in res and "nets_forward" in res:
            res["sampling_overhead"] = res["sample"]["median_ms"] / res["nets_forward"]["median_ms"]
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=sorted(common.SIZES))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also break the graph-mode train step and sampling down by op type",
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out = run(
        args.size,
        args.repeats,
        tuple(args.variants.split(",")),
        tuple(args.kinds.split(",")),
        args.warmup,
        args.profile,
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
