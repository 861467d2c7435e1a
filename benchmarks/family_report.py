"""table.md and table.json of the family table, from the JSON files in rows/.

Each peer (zuko) row follows the tfp_glow row that names it as its `peer`;
that row's last column is the difference to it: test bits/dim (ours minus
zuko's, negative = ours better) and the train step ratio (ours / zuko's,
below 1 = ours faster). Every row carries its own date and load (rows/*.json).
"""

import glob
import json
import os

COLUMNS = (
    "family | implementation | input | params | epochs | test bpd, end | "
    "best on the curve (epoch) | train bpd | train step ms, median (CPU ms) | "
    "sample 64, ms | KL to 8 Gaussians, nats (2-D params) | vs zuko: Δ bpd, step ratio"
)


def _load_runs(runs_dir):
    runs = {}
    for path in sorted(glob.glob(os.path.join(runs_dir, "*.json"))):
        if path.endswith(".partial.json"):
            continue
        with open(path) as f:
            run = json.load(f)
        runs[run["name"]] = run
    return runs


def _f(value, fmt="{:.3f}"):
    return "–" if value is None else fmt.format(value)


def _kl(run):
    kl = run.get("kl_2d")
    if not kl:
        return "–"
    return f"{kl['kl_nats']:.3f} ± {kl['kl_standard_error']:.3f} ({kl['params']:,})"


def _implementation(name, run, families, peers):
    if name in peers:
        kwargs = ", ".join(
            f"{k}={tuple(v) if isinstance(v, list) else v}"
            for k, v in peers[name]["kwargs"].items()
        )
        return (
            f"zuko {run.get('versions', {}).get('zuko', '1.6')} "
            f"`{peers[name]['flow']}({kwargs or 'defaults'})`, Adam 1e-3"
        )
    spec = run["spec"]
    kwargs = ", ".join(
        f"{k}={tuple(v) if isinstance(v, list) else v}"
        for k, v in spec["digits"].items()
        if k not in ("image_shape", "input_shape")
    )
    opt = (
        "library defaults"
        if spec["optimizer"] == "default"
        else "`recommended_optimizer("
        + ", ".join(f"{k}={v:g}" for k, v in spec.get("optimizer_kwargs", {}).items())
        + ")`"
        if spec["optimizer"] == "recommended"
        else "Adam 1e-3"
    )
    return f"tfp_glow `{spec['builder']}({kwargs})`, {opt}"


def _kl_budgets(runs):
    """'390 steps of batch 512 (ffjord: 100 steps of batch 256)': the KL fits' budgets."""
    budgets = {}
    for name, run in runs.items():
        if run.get("kl_2d"):
            kl = run["kl_2d"]
            budgets.setdefault(f"{kl['steps']} steps of batch {kl['batch']}", []).append(name)
    if not budgets:
        return "no KL fits"
    common = max(budgets, key=lambda b: len(budgets[b]))
    others = [f"{', '.join(names)}: {b}" for b, names in budgets.items() if b != common]
    return common + (f" ({'; '.join(others)})" if others else "")


def _row(name, run, families, peers, runs):
    test = _f(run.get("test_bpd"))
    if run.get("test_bpd_uniform") is not None:
        test += f" (uniform {run['test_bpd_uniform']:.3f})"
    best = (
        "–"
        if run.get("best_test_bpd") is None
        else f"{run['best_test_bpd']:.3f} ({run['best_epoch']})"
    )
    epochs = str(run.get("epochs", "–"))
    if run.get("stopped"):
        done = run["curve"][-1]["epoch"] if run.get("curve") else 0
        epochs = f"{done} of {epochs} (stopped: {run['stopped']})"
    step = (
        "–"
        if run.get("train_step_ms_median") is None
        else f"{run['train_step_ms_median']:.1f} ({run['train_step_cpu_ms_median']:.1f})"
    )
    family = name if name in families else peers[name]["flow"]
    versus = "–"
    peer = families.get(name, {}).get("peer")
    if peer in runs and run.get("test_bpd") is not None and runs[peer].get("test_bpd"):
        other = runs[peer]
        ratio = (
            "–"
            if not (run.get("train_step_ms_median") and other.get("train_step_ms_median"))
            else f"{run['train_step_ms_median'] / other['train_step_ms_median']:.2f}x"
        )
        versus = f"{run['test_bpd'] - other['test_bpd']:+.3f}, {ratio}"
    params = "–" if run.get("params") is None else f"{run['params']:,}"
    return (
        f"| {family} | {_implementation(name, run, families, peers)} | "
        f"{run.get('input', '–')} | {params} | {epochs} | {test} | {best} | "
        f"{_f(run.get('train_bpd'))} | {step} | {_f(run.get('sample_64_ms'), '{:.1f}')} | "
        f"{_kl(run)} | {versus} |"
    )


def _order(runs, families, peers):
    """tfp_glow rows in registry order, each followed by its peer; then the rest."""
    order = []
    for name in families:
        if name in runs:
            order.append(name)
        peer = families[name].get("peer")
        if peer in runs and peer not in order:
            order.append(peer)
    return (
        order
        + [n for n in peers if n in runs and n not in order]
        + [n for n in runs if n not in order and n not in peers and n not in families]
    )


def _peer_check(runs, peers):
    lines = [
        "| zuko row | test bpd, end: this run / the issue's | params: this run / "
        "the issue's | train step ms: this run / the issue's |",
        "|---|---|---|---|",
    ]
    for name, entry in peers.items():
        if name not in runs:
            continue
        run, issue = runs[name], entry["issue"]
        lines.append(
            f"| {entry['flow']} | {_f(run.get('test_bpd'))} / {issue['bpd']:.2f} | "
            f"{run.get('params', 0):,} / {issue['params']} | "
            f"{_f(run.get('train_step_ms_median'), '{:.1f}')} / {issue['step_ms']} |"
        )
    return lines if len(lines) > 2 else []


def _vi_table(vi_dir):
    """The planar and radial rows: benchmarks/vi_energy.py's results.json, merged
    (ELBO and KL(q || p) per energy density, per flow and K)."""
    path = os.path.join(vi_dir, "results.json")
    if not os.path.exists(path):
        return [
            "Planar and radial flows: no density-fitting row (they are VI flows); "
            "their ELBO and KL to the energy densities come from "
            "benchmarks/vi_energy.py (no benchmarks/results/vi_energy/results.json "
            "when this table was written)."
        ]
    with open(path) as f:
        report = json.load(f)
    results = report.get("results", [])
    energies = sorted({r["energy"] for r in results})
    flows = []
    for r in results:
        if (r["flow"], r["K"]) not in flows:
            flows.append((r["flow"], r["K"]))
    cell = {(r["flow"], r["K"], r["energy"]): r for r in results}
    lines = [
        "Planar and radial flows are VI flows (`tfp_glow.vi.flow_surrogate_posterior`): "
        "their rows are benchmarks/vi_energy.py's fits to the energy densities of "
        "Rezende & Mohamed (2015), merged from benchmarks/results/vi_energy/"
        "results.json (its table.md has the command, machine and load): "
        "ELBO ± se / KL(q || p) in nats, with `coupling` the library's default "
        "surrogate for reference.",
        "",
        "| flow | K | params | " + " | ".join(energies) + " |",
        "|---|---|---|" + "---|" * len(energies),
    ]
    for flow, k in flows:
        params = next(r["parameters"] for r in results if (r["flow"], r["K"]) == (flow, k))
        cells = [
            f"{c['elbo']:.3f} ± {c['elbo_se']:.3f} / {c['kl']:.3f}"
            if (c := cell.get((flow, k, e)))
            else "–"
            for e in energies
        ]
        lines.append(f"| {flow} | {k} | {params:,} | " + " | ".join(cells) + " |")
    return lines


def markdown(invocations, runs, families, peers, vi_dir):
    head = [
        f"Generated {inv['date_utc']} by `{inv['command']}` in "
        f"{inv['wall_s'] / 60:.1f} min on {inv['machine']}; load average (1, 5, 15 min) "
        f"{', '.join(f'{v:.1f}' for v in inv['loadavg_start'])} at the start, "
        f"{', '.join(f'{v:.1f}' for v in inv['loadavg_end'])} at the end."
        for inv in invocations
    ] + [
        "Each row ran in its own process with 2 threads, one row at a time "
        "(dates and loads per row in rows/*.json).",
        "",
    ]
    skipped = {k: v for inv in invocations for k, v in inv.get("skipped", {}).items()}
    order = _order(runs, families, peers)
    table = ["| " + COLUMNS + " |", "|" + "---|" * (COLUMNS.count("|") + 1)]
    table += [_row(n, runs[n], families, peers, runs) for n in order]
    notes = [
        "",
        "Digits protocol, split seed 0, init seed 0; test bits/dim is the mean over "
        "the 4 fixed noise draws of the 300 held-out images; with variational "
        "dequantization (Glow's default) it is the variational bound, the uniform-"
        "noise figure in brackets. Best: minimum over epochs 1, 10, 20, ..., end. "
        "Train step: median wall time after the first epoch (CPU time of the "
        "process in brackets). Sample 64: median of 3 calls after a first. KL: "
        "the family's 2-D member (its parameters in brackets) fitted to 8 Gaussians "
        f"({_kl_budgets(runs)}; Adam with a linear warm-up to 3e-3 and cosine decay, "
        "toy_kl.py's recipe), ± one standard error on 20,000 held-out draws.",
        "",
    ] + _vi_table(vi_dir)
    versions = {}
    for run in runs.values():
        versions.update(run.get("versions", {}))
    if versions:
        notes += [
            "",
            "Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())) + ".",
        ]
    if skipped:
        notes += ["", "Not run: " + "; ".join(f"{k} ({v})" for k, v in skipped.items()) + "."]
    check = _peer_check(runs, peers)
    if check:
        notes += ["", "zuko against the issue's figures for it:", ""] + check
    return "\n".join(head + table + notes) + "\n"


def write(out_dir, invocations, families, peers, vi_dir):
    if isinstance(invocations, dict):  # one invocation
        invocations = [invocations]
    runs = _load_runs(os.path.join(out_dir, "rows"))
    text = markdown(invocations, runs, families, peers, vi_dir)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out_dir, "table.json"), "w") as f:
        json.dump(
            {"invocations": invocations, "families": families, "peers": peers, "runs": runs},
            f,
            indent=1,
            default=str,
        )
    print(text)
