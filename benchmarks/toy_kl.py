"""KL(p || q) of flows fitted to 2-D toy densities whose log p is known exactly.

Samples of `p` come from `tfp_glow.data.toy_density` (FFJORD's generators,
standardised); their exact log densities are written out below. A flow `q`
is fitted by maximum likelihood on fresh draws of `p`, then

    KL(p || q) = E_p[log p(x) - log q(x)]  ~  mean over N = 100,000 draws of p

(independent of the training draws), reported with its standard error
`std / sqrt(N)`. The flows (`--flow`, benchmarks/toy_flows.py): `realnvp`,
`spline`, `glow` (tfp_glow couplings), `maf`, `iaf`, `nsf_ar` (TFP's
`MaskedAutoregressiveFlow` with `tfp_glow.nets.MADE`) and `ffjord` (TFP's
`FFJORD` with `tfp_glow.nets.ODENet`), all trained by `FlowModel.fit` with
Adam (linear warm-up, cosine decay). Each run also reports its parameter
count, the median training step (ms, timed inside `fit` after warm-up) and
the time to sample 1,000 points and to evaluate `log_prob` of 1,000.

    nice -n 10 python benchmarks/toy_kl.py --density two_moons --flow maf
    nice -n 10 python benchmarks/toy_kl.py --check-log-p     # the exact densities
    nice -n 10 python benchmarks/toy_kl.py --table           # every flow x density

`--table` runs each (flow, density) in turn, in one process, with the
settings of `TABLE` (below: half the steps for `iaf` and `nsf_ar`, 500 steps
of batch 256 for `ffjord`, whose steps cost ~20x more), writing
benchmarks/results/toy_kl/table/<flow>_<density>.json as each finishes, then
benchmarks/results/toy_kl/table.md and table.json (~30-40 minutes on 2
cores). Options given with `--table` (`--epochs`, `--batch`, ...) override
`TABLE`; `--flows`/`--densities` pick a subset, `--resume` keeps finished
runs, `--report-only` only rebuilds the table, `--table-dir` writes elsewhere.
"""

import argparse
import functools
import json
import math
import os
import time

import numpy as np
import report  # benchmarks/, the script's own folder
import toy_flows

DENSITIES = ("8gaussians", "checkerboard", "two_moons")
HERE = os.path.dirname(os.path.abspath(__file__))
TABLE_DIR = os.path.join(HERE, "results", "toy_kl")

# --------------------------------------------------------------- exact log p

# 8 Gaussians: x = (c_j + 0.5 eps) / (sqrt(2) sqrt(4.125)), c_j = 4 (cos a_j, sin a_j),
# a_j = j pi / 4, j uniform on 0..7, eps ~ N(0, I): an equal mixture of 8
# isotropic Gaussians with means c_j / (sqrt 2 sqrt 4.125) and std 0.5 / (sqrt 2 sqrt 4.125).
_G_SCALE = math.sqrt(2.0) * math.sqrt(4.125)
_G_SIGMA = 0.5 / _G_SCALE
_G_MEANS = (
    4.0
    * np.stack([np.cos(np.arange(8) * np.pi / 4), np.sin(np.arange(8) * np.pi / 4)], axis=1)
    / _G_SCALE
)

# Checkerboard: (x1, x2) raw uniform on the cells of [-2, 2)^2 where
# floor(x1) + floor(x2) is even (area 8, density 1/8), scaled by sqrt(3) / 2:
# density 1/8 / (3/4) = 1/6 on the scaled cells, 0 elsewhere.
_C_SCALE = 2.0 / (4.0 / math.sqrt(3.0))

# Two moons: y = m(t) + 0.1 eps, t ~ U(0, pi), the upper arc m(t) = (cos t, sin t)
# or the lower arc (1 - cos t, 1/2 - sin t) with probability 1/2 each, eps ~ N(0, I);
# x = (y - mu) / s. So p_y(y) = 1/2 sum over arcs of (1/pi) int_0^pi N(y; m(t), 0.01 I) dt,
# done by the midpoint rule on _M_NODES nodes per arc (spacing pi / 4000 = 0.0008,
# << the noise 0.1: the rule's error is ~1e-7 relative), and p(x) = p_y(mu + s x) s1 s2.
_M_NOISE = 0.1
_M_MU = np.array([0.5, 0.25])
_M_STD = np.array([math.sqrt(0.76), math.sqrt(0.5725 - 1.0 / math.pi)])
_M_NODES = 4000
_M_T = (np.arange(_M_NODES) + 0.5) * math.pi / _M_NODES
_M_CENTRES = np.concatenate(
    [
        np.stack([np.cos(_M_T), np.sin(_M_T)], 1),
        np.stack([1.0 - np.cos(_M_T), 0.5 - np.sin(_M_T)], 1),
    ]
)


def _log_mean_exp(a):
    m = a.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(a - m).mean(axis=1, keepdims=True)))[:, 0]


def log_p_8gaussians(x):
    d2 = ((x[:, None, :] - _G_MEANS[None]) ** 2).sum(-1)
    return _log_mean_exp(-d2 / (2 * _G_SIGMA**2)) - math.log(2 * math.pi * _G_SIGMA**2)


def log_p_checkerboard(x):
    raw = x / _C_SCALE
    inside = np.all((raw >= -2.0) & (raw < 2.0), axis=1)
    even = (np.floor(raw[:, 0]) + np.floor(raw[:, 1])) % 2 == 0
    return np.where(inside & even, -math.log(6.0), -np.inf)


def log_p_two_moons(x, chunk=1024):
    y = np.asarray(x, np.float64) * _M_STD + _M_MU
    c2 = (_M_CENTRES**2).sum(1)
    out = np.empty(len(y))
    for i in range(0, len(y), chunk):
        yc = y[i : i + chunk]
        d2 = np.maximum((yc**2).sum(1)[:, None] + c2[None] - 2.0 * yc @ _M_CENTRES.T, 0.0)
        out[i : i + chunk] = _log_mean_exp(-d2 / (2 * _M_NOISE**2))
    return out - math.log(2 * math.pi * _M_NOISE**2) + float(np.log(_M_STD).sum())


LOG_P = {
    "8gaussians": log_p_8gaussians,
    "checkerboard": log_p_checkerboard,
    "two_moons": log_p_two_moons,
}
# Grid of the integral check: fine for the checkerboard's edges; 400 for two moons
# (spacing 0.015 << its noise, 0.11 and 0.2 after standardising; each point costs 8,000 terms).
CHECK_GRID = {"8gaussians": 1200, "checkerboard": 1200, "two_moons": 400}
# Points per bin side of the histogram check's bin masses (many for the
# checkerboard's edges, which cut through bins; few for two moons' cost).
CHECK_SUB = {"8gaussians": 8, "checkerboard": 32, "two_moons": 4}


def check_log_p(name, extent=3.0, bins=48, n_hist=200_000):
    """Integral of exp(log p) on a grid (should be 1), log p finite on samples,
    and a histogram of `n_hist` samples against the density's bin masses (each
    the mean of p over `CHECK_SUB` x `CHECK_SUB` points of the bin): the total variation
    `0.5 sum |hist - mass|` beside what sampling noise alone gives,
    `0.5 sum sqrt(2 mass (1 - mass) / (pi n))`."""
    from tfp_glow.data import toy_density

    t = np.linspace(-extent, extent, CHECK_GRID[name])
    cell = (t[1] - t[0]) ** 2
    xx = np.stack(np.meshgrid(t, t), -1).reshape(-1, 2)
    integral = float(np.exp(LOG_P[name](xx)).sum() * cell)
    samples = toy_density(name, n_hist, seed=123).astype(np.float64)
    finite = float(np.isfinite(LOG_P[name](samples[:20_000])).mean())
    edges, sub = np.linspace(-extent, extent, bins + 1), CHECK_SUB[name]
    width = edges[1] - edges[0]
    u = edges[:-1, None] + (np.arange(sub)[None] + 0.5) * width / sub  # [bins, sub]
    gx, gy = np.meshgrid(u.reshape(-1), u.reshape(-1), indexing="ij")
    dens = np.exp(LOG_P[name](np.stack([gx.ravel(), gy.ravel()], 1)))
    mass = dens.reshape(bins, sub, bins, sub).mean(axis=(1, 3)) * width**2
    hist = np.histogram2d(samples[:, 0], samples[:, 1], [edges, edges])[0] / n_hist
    return {
        "integral_on_grid": integral,
        "grid": CHECK_GRID[name],
        "fraction_of_samples_in_support": finite,
        "histogram_bins": bins,
        "histogram_points_per_bin_side": sub,
        "histogram_samples": n_hist,
        "histogram_total_variation": float(0.5 * np.abs(hist - mass).sum()),
        "total_variation_from_sampling_noise": float(
            0.5 * np.sqrt(2 * mass * (1 - mass) / (math.pi * n_hist)).sum()
        ),
        "histogram_max_abs_diff": float(np.abs(hist - mass).max()),
        "mass_in_box": float(mass.sum()),
        "samples_in_box": float(hist.sum()),
    }


# ----------------------------------------------------------------------- run


@functools.lru_cache(maxsize=4)
def eval_set(density, n, seed):
    """The held-out draws of p and their exact log p (cached: `--table` reuses
    them for every flow; two moons' log p of 100,000 draws takes ~20 s)."""
    from tfp_glow.data import toy_density

    x = toy_density(density, n, seed=(seed, 2))
    log_p = LOG_P[density](x.astype(np.float64))
    if not np.all(np.isfinite(log_p)):
        raise SystemExit("a draw of p has log p = -inf: the exact density is wrong")
    return x, log_p


def run(args):
    import keras
    import tensorflow as tf

    from tfp_glow.data import toy_density
    from tfp_glow.training import WarmupSchedule

    t0 = time.perf_counter()
    load_start = os.getloadavg()
    keras.utils.set_random_seed(args.seed)
    model, masked = toy_flows.build_flow(
        args.flow, args.layers, args.hidden, args.bins, args.tail_bound, args.unroll_loop
    )
    train = toy_density(args.density, args.train_samples, seed=(args.seed, 1))
    model.initialize(train[:4096])
    steps_per_epoch = args.train_samples // args.batch
    total = steps_per_epoch * args.epochs
    schedule = WarmupSchedule(
        args.lr,
        warmup_steps=min(200, total // 10),
        decay_steps=max(total - min(200, total // 10), 1),
    )
    model.compile(keras.optimizers.Adam(schedule))
    timer = toy_flows.step_timer()
    t_fit = time.perf_counter()
    hist = model.fit(
        train, batch_size=args.batch, epochs=args.epochs, shuffle=True, verbose=0, callbacks=[timer]
    )
    fit_s = time.perf_counter() - t_fit
    x, log_p = eval_set(args.density, args.eval_samples, args.seed)
    t_eval = time.perf_counter()
    log_q = np.concatenate(
        [model.log_prob(tf.constant(c)).numpy() for c in np.array_split(x, 10)]
    ).astype(np.float64)
    eval_s = time.perf_counter() - t_eval
    diff = log_p - log_q
    params = toy_flows.count_params(model)
    return {
        "density": args.density,
        "flow": args.flow,
        "layers": args.layers,
        "hidden": args.hidden,
        "bins": args.bins if args.flow in ("spline", "nsf_ar") else None,
        "architecture": toy_flows.architecture(
            args.flow, args.layers, args.hidden, args.bins, args.unroll_loop
        ),
        "unroll_loop": args.unroll_loop if args.flow in ("maf", "iaf", "nsf_ar") else None,
        "params": params,
        "effective_params": params - masked,
        "epochs": args.epochs,
        "batch": args.batch,
        "lr": args.lr,
        "steps": total,
        "train_samples": args.train_samples,
        "eval_samples": args.eval_samples,
        "kl_nats": float(diff.mean()),
        "kl_standard_error": float(diff.std() / math.sqrt(len(diff))),
        "mean_log_p": float(log_p.mean()),
        "mean_log_q": float(log_q.mean()),
        "final_train_nll": float(hist.history["loss"][-1]),
        **timer.summary(),
        "fit_s": fit_s,
        "eval_log_prob_s": eval_s,
        **toy_flows.time_directions(model, x),
        "wall_s": time.perf_counter() - t0,
        "loadavg_start": list(load_start),
        "loadavg_end": list(os.getloadavg()),
    }


# --------------------------------------------------------------------- table

# `main`'s defaults: 20 epochs of 100,000 draws, batch 512 (3,900 steps), KL on
# 100,000 draws. `--table` changes them per flow as below; options given on
# the command line override both.
DEFAULTS = {
    "epochs": 20,
    "train_samples": 100_000,
    "batch": 512,
    "eval_samples": 100_000,
    "unroll_loop": False,
}
TABLE = {
    "realnvp": {},
    "spline": {},
    "glow": {},
    "maf": {},
    # The two costliest steps of the MADE family (IAF's density is TFP's
    # sequential `tf.while_loop`; NSF-AR's spline, and its trace of ~30-100 s):
    # half the steps, 1,950, so that the table fits ~30 minutes on 2 cores.
    "iaf": {"epochs": 10},
    "nsf_ar": {"epochs": 10},
    # ~250 ms a step at batch 256 once trained (TFP's Dormand-Prince, rtol 1e-3,
    # atol 1e-6: the field stiffens and the solver takes more steps), ~20x a
    # coupling flow's step at batch 512: 500 steps, KL on 50,000 draws.
    "ffjord": {"epochs": 2, "train_samples": 64_000, "batch": 256, "eval_samples": 50_000},
}
# Step medians (ms, 2 shared cores at load ~5, checkerboard, batch 512) behind
# these choices: realnvp 14, glow 16, maf 15, spline 35, iaf 40, nsf_ar 49;
# ffjord (batch 256) 250-330 after its first 100 steps.


def table_path(table_dir, flow, density):
    return os.path.join(table_dir, "table", f"{flow}_{density}.json")


def run_table(args, given):
    """Every flow x density in this process (one import of TensorFlow), each
    run's JSON written as it finishes; then table.md and table.json."""
    import gc

    import keras

    flows = args.flows.split(",") if args.flows else list(toy_flows.FLOWS)
    densities = args.densities.split(",") if args.densities else list(DENSITIES)
    t0, load_start = time.perf_counter(), os.getloadavg()
    for flow in flows:
        for density in densities:
            out = table_path(args.table_dir, flow, density)
            if args.report_only or (args.resume and os.path.exists(out)):
                continue
            settings = {**DEFAULTS, **TABLE[flow], **given}
            run_args = argparse.Namespace(
                **{**vars(args), **settings, "flow": flow, "density": density}
            )
            print(
                f"[{time.perf_counter() - t0:6.0f}s] {flow} x {density} {json.dumps(settings)}",
                flush=True,
            )
            keras.backend.clear_session()
            gc.collect()
            result = run(run_args)
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with open(out, "w") as f:
                json.dump(result, f, indent=1)
            print(
                f"    KL {result['kl_nats']:.4f} +- {result['kl_standard_error']:.4f}, "
                f"step {result['step_ms_median']:.1f} ms, {result['wall_s']:.0f} s",
                flush=True,
            )
    rows = {}
    for flow in toy_flows.FLOWS:
        for density in DENSITIES:
            path = table_path(args.table_dir, flow, density)
            if os.path.exists(path):
                with open(path) as f:
                    rows.setdefault(flow, {})[density] = json.load(f)
    text = table_markdown(rows) + (
        f"\nThis invocation: {time.perf_counter() - t0:.0f} s, load average "
        f"{load_start[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end "
        f"({os.cpu_count()} CPUs).\n"
    )
    with open(os.path.join(args.table_dir, "table.md"), "w") as f:
        f.write(text)
    print(text)
    with open(os.path.join(args.table_dir, "table.json"), "w") as f:
        json.dump(
            {
                "wall_s": time.perf_counter() - t0,
                "loadavg_start": list(load_start),
                "loadavg_end": list(os.getloadavg()),
                "defaults": DEFAULTS,
                "table_settings": TABLE,
                "command_line_settings": given,
                "runs": rows,
            },
            f,
            indent=1,
        )


def table_markdown(rows):
    head = (
        "| flow | architecture | params (effective) | steps x batch | "
        + " | ".join(f"KL {d} (nats)" for d in DENSITIES)
        + " | step ms (CPU ms) | sample 1k ms | log_prob 1k ms |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for flow, runs in rows.items():
        any_run = next(iter(runs.values()))
        kls = [
            f"{runs[d]['kl_nats']:.4f} +- {runs[d]['kl_standard_error']:.4f}" if d in runs else "-"
            for d in DENSITIES
        ]

        def med(key):
            vals = [r[key] for r in runs.values() if key in r]
            return f"{np.median(vals):.1f}" if vals else "-"

        params = f"{any_run['params']:,}"
        if any_run["effective_params"] != any_run["params"]:
            params += f" ({any_run['effective_params']:,})"
        lines.append(
            f"| {flow} | {any_run['architecture']} | {params} | "
            f"{any_run['steps']} x {any_run['batch']} | "
            + " | ".join(kls)
            + f" | {med('step_ms_median')} ({med('step_cpu_ms_median')}) | "
            f"{med('sample_1000_ms')} | "
            f"{med('log_prob_1000_ms')} |"
        )
    notes = (
        "\nKL(p || q) in nats on held-out draws of p (+- one standard error; "
        "N = eval_samples per run). step ms: median over the densities of each "
        "run's median training step (after warm-up, timed inside `fit`; in "
        "brackets this process's CPU time per step); sample / "
        "log_prob: 1,000 points, median of 3 calls after a tracing call. "
        "Effective params leave out MADE's masked weights.\n"
    )
    odd = [
        f"{flow}: {s['steps']} steps of batch {s['batch']} "
        f"({s['epochs']} epochs of {s['train_samples']:,}), KL on {s['eval_samples']:,} "
        "draws"
        for flow, runs in rows.items()
        for s in [next(iter(runs.values()))]
        if any(s[k] != v for k, v in DEFAULTS.items())
    ]
    return "\n".join(lines) + "\n" + notes + "".join(f"\n* {o}" for o in odd) + "\n"


def main(argv=None):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--density", choices=DENSITIES, default="8gaussians")
    p.add_argument("--flow", choices=toy_flows.FLOWS, default="realnvp")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--bins", type=int, default=8)
    p.add_argument("--tail-bound", type=float, default=3.0)
    p.add_argument("--epochs", type=int, default=None, help="default 20")
    p.add_argument("--batch", type=int, default=None, help="default 512")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--train-samples", type=int, default=None, help="default 100,000")
    p.add_argument("--eval-samples", type=int, default=None, help="default 100,000")
    p.add_argument(
        "--unroll-loop",
        action="store_const",
        const=True,
        default=None,
        help="maf/iaf/nsf_ar: TFP's unroll_loop=True (a Python loop over "
        "the D sequential passes, not a tf.while_loop)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--check-log-p",
        action="store_true",
        help="only check the exact densities (grid integral, support, histogram)",
    )
    p.add_argument(
        "--table",
        action="store_true",
        help="run every flow x density with TABLE's settings, write table.md",
    )
    p.add_argument("--flows", default=None, help="--table: comma-separated subset")
    p.add_argument("--densities", default=None, help="--table: comma-separated subset")
    p.add_argument(
        "--resume", action="store_true", help="--table: keep runs whose JSON already exists"
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="--table: run nothing, rebuild table.md/json from the runs' JSON",
    )
    p.add_argument(
        "--table-dir", default=TABLE_DIR, help="--table: where table/, table.md and table.json go"
    )
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if k in DEFAULTS and v is not None}
    if args.table:
        return run_table(args, given)
    for key, value in {**DEFAULTS, **given}.items():
        setattr(args, key, value)
    if args.check_log_p:
        result = {name: check_log_p(name) for name in DENSITIES}
    else:
        result = run(args)
    report.print_and_write(result, args.out)


if __name__ == "__main__":
    main()
