"""Runs every benchmark and writes `results/results.json` and BENCHMARKS.md's tables.

    python benchmarks/run_all.py            # full run (~25 min on 2 cores)
    python benchmarks/run_all.py --quick    # smoke run (fewer repeats, 1 epoch)

Each part runs in its own process (so one library's memory and traced
graphs never affect another part): `capabilities.py`, `xla_check.py`,
`timing.py --size small`, `timing.py --size cifar`, `breakdown.py --size
small`, `bits_per_dim.py`. The
tables between the `results:start` / `results:end` markers of BENCHMARKS.md
are regenerated; the rest of the file is left as written.
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
MARK_START, MARK_END = "<!-- results:start -->", "<!-- results:end -->"

sys.path.insert(0, HERE)
import common  # noqa: E402


def _run_part(name, args, out_path, log):
    """Runs `python benchmarks/<args>` writing JSON to `out_path`; returns it."""
    cmd = [sys.executable, os.path.join(HERE, args[0])] + args[1:] + ["--out", out_path]
    print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT)
    with open(log, "w") as f:
        proc = subprocess.run(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT
        )
        f.write(proc.stdout)
    elapsed = time.perf_counter() - t0
    for line in proc.stdout.splitlines():
        if line.startswith(("[", "  ", "op type", "(other)", "total op")) or "ok" in line:
            print("   " + line, flush=True)
    if proc.returncode != 0 or not os.path.exists(out_path):
        tail = "\n".join(proc.stdout.splitlines()[-15:])
        print(f"!! {name} failed (exit {proc.returncode}):\n{tail}", flush=True)
        return {"error": f"exit {proc.returncode}", "log_tail": tail, "seconds": elapsed}
    with open(out_path) as f:
        result = json.load(f)
    result["seconds"] = elapsed
    print(f"   ({elapsed:.0f} s)", flush=True)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="few repeats, 1 epoch: checks that everything runs"
    )
    parser.add_argument(
        "--skip",
        default="",
        help="comma-separated parts not to run "
        "(their latest results/<part>.json, if any, is reused): "
        "capabilities,xla_check,small,cifar,breakdown,bits_per_dim",
    )
    parser.add_argument("--epochs", type=int, default=None)
    args = parser.parse_args()
    os.makedirs(RESULTS, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    quick = args.quick
    epochs = args.epochs or (1 if quick else 25)
    parts = {
        "capabilities": ["capabilities.py"],
        "xla_check": ["xla_check.py"],
        "small": ["timing.py", "--size", "small", "--repeats", "5" if quick else "30", "--profile"],
        "cifar": [
            "timing.py",
            "--size",
            "cifar",
            "--repeats",
            "2" if quick else "6",
            "--warmup",
            "1",
            "--profile",
        ],
        "breakdown": ["breakdown.py", "--size", "small", "--repeats", "5" if quick else "20"],
        "bits_per_dim": [
            "bits_per_dim.py",
            "--epochs",
            str(epochs),
            "--eval-every",
            "1" if quick else "5",
        ],
    }
    previous = {}
    if os.path.exists(os.path.join(RESULTS, "results.json")):
        with open(os.path.join(RESULTS, "results.json")) as f:
            previous = json.load(f).get("parts", {})
    started = time.perf_counter()
    results = {
        "generated": datetime.datetime.now().isoformat(timespec="seconds"),
        "quick": quick,
        "machine": common.machine_info(),
        "parts": {},
    }
    for name, part in parts.items():
        if name in skip:
            # Reuse the part's latest results, if any, in the tables.
            old = os.path.join(RESULTS, f"{name}.json")
            if os.path.exists(old):
                with open(old) as f:
                    reused = {**json.load(f), "reused": True}
                for key in ("seconds", "load_average_after"):
                    if key in previous.get(name, {}):
                        reused[key] = previous[name][key]
                results["parts"][name] = reused
            continue
        out = os.path.join(RESULTS, f"{name}.json")
        log = os.path.join(RESULTS, f"{name}.log")
        results["parts"][name] = _run_part(name, part, out, log)
        results["parts"][name]["load_average_after"] = list(os.getloadavg())
    results["total_seconds"] = time.perf_counter() - started
    results["all_parts_seconds"] = sum(p.get("seconds", 0.0) for p in results["parts"].values())
    path = os.path.join(RESULTS, "results.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    write_markdown(results, os.path.join(ROOT, "BENCHMARKS.md"))
    print(
        f"wrote {os.path.relpath(path, ROOT)} and BENCHMARKS.md "
        f"({results['total_seconds'] / 60:.1f} min)"
    )


# -- markdown -------------------------------------------------------------------
VARIANT_LABELS = {
    "tfp_glow": "tfp_glow",
    "tfp_glow_xla": "tfp_glow (XLA)",
    "tfp_glow_bf16": "tfp_glow (bf16 nets)",
    "tfb.Glow": "tfb.Glow",
}


def _fmt(value, digits=1):
    if value is None:
        return "–"
    if isinstance(value, str):
        return value
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _ratio(a, b, digits=2):
    if a is None or b is None or b == 0:
        return "–"
    return f"{a / b:.{digits}f}"


def timing_table(part):
    v = part["variants"]
    cfg = part["config"]
    h, w, c = cfg["image_shape"]
    rows = [
        ("train step, median (ms) ↓", ("train_step", "median_ms"), 1),
        ("train step, min (ms) ↓", ("train_step", "min_ms"), 1),
        ("train step, CPU time (ms) ↓", ("train_step", "cpu_median_ms"), 1),
        ("first train step: trace + compile (s) ↓", ("train_step", "first_call_s"), 1),
        ("FlowModel.train_step as `fit` runs it (ms) ↓", ("model_train_step", "median_ms"), 1),
        ("its first call: trace + compile (s) ↓", ("model_train_step", "first_call_s"), 1),
        ("log_prob (images/s) ↑", ("log_prob", "images_per_s"), 0),
        ("sampling (images/s) ↑", ("sample", "images_per_s"), 0),
        ("peak memory of a train step (MB) ↓", ("train_step", "peak_memory_mb"), 1),
        ("bare coupling nets fwd+bwd (ms)", ("nets_step", "median_ms"), 1),
        ("flow overhead (train step / bare nets) ↓", ("flow_overhead",), 2),
        ("bare coupling nets forward only (ms)", ("nets_forward", "median_ms"), 1),
        ("sampling overhead (sample / nets forward) ↓", ("sampling_overhead",), 2),
    ]
    names = [n for n in VARIANT_LABELS if n in v]
    ours = [n for n in names if n != "tfb.Glow"]
    head = (
        f"**{h}x{w}x{c}, L={cfg['levels']}, K={cfg['steps']}, width {cfg['width']}, "
        f"batch {part['batch']}** ({_fmt(part['parameters'].get('tfp_glow'), 0)} "
        f"parameters in tfp_glow, {_fmt(part['parameters'].get('tfb.Glow'), 0)} in "
        f"tfb.Glow)\n\n"
    )
    cols = [VARIANT_LABELS[n] for n in names]
    ratio_cols = [f"{VARIANT_LABELS[n]} / tfb.Glow" for n in ours] if "tfb.Glow" in v else []
    lines = [
        "| | " + " | ".join(cols + ratio_cols) + " |",
        "|---" * (len(cols) + len(ratio_cols) + 1) + "|",
    ]
    for label, keys, digits in rows:
        vals = [_get(v[n], *keys) for n in names]
        tfp = _get(v.get("tfb.Glow", {}), *keys)
        ratios = [_ratio(_get(v[n], *keys), tfp) for n in ours] if ratio_cols else []
        lines.append(f"| {label} | " + " | ".join([_fmt(x, digits) for x in vals] + ratios) + " |")
    return head + "\n".join(lines)


def profile_table(part, name, kind="train_step", top=6):
    prof = _get(part, "variants", name, f"{kind}_profile")
    if not prof:
        return ""
    total = sum(p["ms"] for p in prof.values()) or 1.0
    rows = sorted(prof.items(), key=lambda kv: -kv[1]["ms"])
    conv = sum(p["ms"] for k, p in prof.items() if "Conv2D" in k)
    per = "step" if kind == "train_step" else "call"
    lines = [
        f"*{VARIANT_LABELS[name]}*: {_fmt(total)} ms of op time per {per} "
        f"({sum(p['count'] for p in prof.values())} ops), convolutions "
        f"{100 * conv / total:.0f}%",
        "",
        f"| op type | ms/{per} | share | ops/{per} |",
        "|---|---|---|---|",
    ]
    for op, p in rows[:top]:
        lines.append(f"| {op} | {p['ms']:.2f} | {100 * p['ms'] / total:.0f}% | {p['count']} |")
    rest = sum(p["ms"] for _, p in rows[top:])
    lines.append(f"| (other) | {rest:.2f} | {100 * rest / total:.0f}% | |")
    return "\n".join(lines)


def targets_table(parts):
    """Each target per size: float32 tfp_glow (plain, XLA) and bf16 nets."""

    def factor(size, name, kind, invert):
        p = parts.get(size, {})
        if kind == "flow_overhead":
            return _get(p, "variants", name, "flow_overhead")
        ours = _get(p, "variants", name, kind, "median_ms")
        tfp = _get(p, "variants", "tfb.Glow", kind, "median_ms")
        return tfp / ours if ours and tfp else None

    def cell(size, kind):
        vals = {
            n: factor(size, n, kind, True) for n in ("tfp_glow", "tfp_glow_xla", "tfp_glow_bf16")
        }
        if vals["tfp_glow"] is None:
            return "–", None, None
        suffix = "" if kind == "flow_overhead" else "x"
        text = f"{vals['tfp_glow']:.2f}{suffix}"
        extra = [
            f"{lab} {vals[n]:.2f}{suffix}"
            for n, lab in (("tfp_glow_xla", "XLA"), ("tfp_glow_bf16", "bf16 nets"))
            if vals[n]
        ]
        if extra:
            text += " (" + ", ".join(extra) + ")"
        fp32 = [vals[n] for n in ("tfp_glow", "tfp_glow_xla") if vals[n] is not None]
        bf16 = vals["tfp_glow_bf16"]
        return text, fp32, bf16

    lines = [
        "| target | small (8x8x1) | 32x32x3 | met in float32? | met with bf16 nets? |",
        "|---|---|---|---|---|",
    ]
    for label, kind, goal, lower in (
        ("train step ≥ 1.5x faster than tfb.Glow", "train_step", 1.5, False),
        ("sampling ≥ 2x faster than tfb.Glow", "sample", 2.0, False),
        ("flow overhead over its bare nets < 1.3", "flow_overhead", 1.3, True),
    ):
        cells, met32, met16 = [], True, True
        for size in ("small", "cifar"):
            text, fp32, bf16 = cell(size, kind)
            cells.append(text)
            ok = (lambda x: x < goal) if lower else (lambda x: x >= goal)
            met32 = met32 and bool(fp32) and any(ok(x) for x in fp32)
            met16 = (
                met16
                and bool(fp32)
                and (any(ok(x) for x in fp32) or (bf16 is not None and ok(bf16)))
            )
        lines.append(
            f"| {label} | "
            + " | ".join(cells)
            + f" | {'yes' if met32 else 'no'} | {'yes' if met16 else 'no'} |"
        )
    return "\n".join(lines)


def breakdown_table(part):
    modes = part.get("modes", {})
    rows = ("nets", "forward", "forward+gradient", "adam", "train_step")
    labels = {
        "nets": "bare coupling nets, fwd+bwd (sequential)",
        "forward": "log_prob (forward)",
        "forward+gradient": "forward + gradient",
        "adam": "Adam update alone",
        "train_step": "train step (all)",
    }
    lines = ["| ms, median | " + " | ".join(modes) + " |", "|---" * (len(modes) + 1) + "|"]
    for r in rows:
        lines.append(f"| {labels[r]} | " + " | ".join(_fmt(modes[m].get(r)) for m in modes) + " |")
    return "\n".join(lines)


def capabilities_table(part):
    libs = [k for k in ("tfp_glow", "tfp_glow (XLA)", "tfb.Glow") if k in part]
    lines = [
        "| dynamic batch (`None`) under `tf.function` | " + " | ".join(libs) + " |",
        "|---" * (len(libs) + 1) + "|",
    ]
    for check in ("log_prob", "train_step", "sample"):
        lines.append(
            f"| {check} | " + " | ".join(part[lib][check].replace("|", "/") for lib in libs) + " |"
        )
    return "\n".join(lines)


def bpd_table(part):
    lines = [
        "| library | epochs | test bits/dim at the end | best on the way | "
        "s/epoch (median) | first step: trace + compile (s) |",
        "|---|---|---|---|---|---|",
    ]
    for lib in ("tfp_glow", "tfb.Glow"):
        r = part.get(lib)
        if not r:
            continue
        lines.append(
            f"| {lib} | {r['epochs']} | {r['test_bits_per_dim']:.3f} | "
            f"{r['best_test_bits_per_dim']:.3f} | {r['median_epoch_s']:.2f} | "
            f"{r['first_step_s']:.1f} |"
        )
    return "\n".join(lines)


def xla_line(part):
    bij, models = part.get("bijectors", {}), part.get("models", {})
    bad = {k: v for k, v in {**bij, **models}.items() if v != "ok"}
    text = (
        f"XLA (`jit_compile=True`): {sum(v == 'ok' for v in bij.values())}/{len(bij)} "
        f"contract-registry bijectors compile and match the plain graph "
        f"(forward, inverse, log-dets, gradients, unknown batch); training steps "
        f"of " + ", ".join(f"{k} {v}" for k, v in models.items()) + "."
    )
    if bad:
        text += " Failing: " + "; ".join(f"{k}: {v}" for k, v in bad.items())
    return text


def results_markdown(results):
    m = results["machine"]
    parts = results["parts"]
    reused = [n for n, p in parts.items() if p.get("reused")]
    total = results.get("all_parts_seconds", results["total_seconds"])
    out = [
        f"Generated {results['generated']} by `python benchmarks/run_all.py"
        f"{' --quick' if results['quick'] else ''}`; all parts together take "
        f"{total / 60:.1f} min"
        + (f" ({', '.join(reused)} reused from the previous run)" if reused else "")
        + f" on {m['cpu']}, {m['cores']} cores; "
        f"TensorFlow {m['tensorflow']}, TFP {m['tensorflow_probability']}, Keras "
        f"{m['keras']}, tf_keras {m['tf_keras']}, Python {m['python']}. Load average "
        f"(1 min) at the start: {m['load_average_at_start'][0]:.1f}.",
        "",
    ]
    if results["quick"]:
        out += ["**Quick run: few repeats and 1 epoch; use the full run for numbers.**", ""]
    if any(p in parts for p in ("small", "cifar")):
        out += ["### Targets", "", targets_table(parts), ""]
    for size in ("small", "cifar"):
        p = parts.get(size)
        if p and "variants" in p:
            out += [f"### Speed and memory, {size}", "", timing_table(p), ""]
        elif p:
            out += [f"### {size}: failed ({p.get('error')})", ""]
    if "breakdown" in parts and "modes" in parts["breakdown"]:
        out += [
            "### Breakdown of tfp_glow's small train step",
            "",
            breakdown_table(parts["breakdown"]),
            "",
        ]
    if "bits_per_dim" in parts and "tfp_glow" in parts["bits_per_dim"]:
        out += [
            "### Test bits/dim on the built-in digits (8x8x1, 17 levels)",
            "",
            bpd_table(parts["bits_per_dim"]),
            "",
        ]
    if "capabilities" in parts and "tfp_glow" in parts["capabilities"]:
        out += ["### Capabilities", "", capabilities_table(parts["capabilities"]), ""]
    if "xla_check" in parts and "bijectors" in parts["xla_check"]:
        out += [xla_line(parts["xla_check"]), ""]
    for kind, title in (("train_step", "a train step"), ("sample", "sampling 64 images")):
        profiles = []
        for size in ("small", "cifar"):
            for name in ("tfp_glow", "tfb.Glow"):
                table = profile_table(parts.get(size, {}), name, kind)
                if table:
                    profiles += [f"**{size}**, " + table, ""]
        if profiles:
            out += [f"### Where {title} spends its time (graph mode, by op type)", ""]
            out += profiles
    return "\n".join(out).rstrip() + "\n"


def write_markdown(results, path):
    generated = results_markdown(results)
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
    else:
        text = f"# Benchmarks\n\n{MARK_START}\n{MARK_END}\n"
    if MARK_START in text and MARK_END in text:
        head, rest = text.split(MARK_START, 1)
        _, tail = rest.split(MARK_END, 1)
        text = f"{head}{MARK_START}\n{generated}{MARK_END}{tail}"
    else:
        text = f"{text.rstrip()}\n\n{MARK_START}\n{generated}{MARK_END}\n"
    with open(path, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
