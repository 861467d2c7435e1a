"""Planar and radial flows on the 2-D energy densities of Rezende & Mohamed (2015).

The four unnormalised densities `p(z) = exp(-U(z)) / Z` of the paper's Table 1
(U1: a ring split in two modes; U2-U4: sine bands) are fitted by
`tfp.vi.fit_surrogate_posterior` with `tfp_glow.vi.flow_surrogate_posterior`:
`flow="planar"` (K = 2, 8, 32), `flow="radial"` (K = 2, 8, 32) and the
library's default (`flow="coupling"`, 6 layers). For each fit we report

    ELBO = E_q[-U(z) - log q(z)]              (N draws of q, with its standard error)
    KL(q || p) = E_q[log q + U] + log Z = log Z - ELBO

with `log Z` by quadrature (trapezoid rule on a 2001 x 2001 grid over
[-10, 10]^2; the same rule on a 1001 x 1001 grid is reported as a check).

U2-U4 do not decay in z1 (exp(-U) is not integrable on R^2: the paper shows
them on [-4, 4]^2), so they are multiplied here by the envelope
`exp(-(z1^4 + z2^4) / 512)` (= exp(-1/2) at |z1| = 4, exp(-8) at 8), which
makes `Z` finite and `KL(q || p)` defined. U1 is used as printed.

    python benchmarks/vi_energy.py --energies U1 U2 &          # two processes
    python benchmarks/vi_energy.py --energies U3 U4; wait
    python benchmarks/vi_energy.py --report-only                # results.json, table.md
    python benchmarks/vi_energy.py --steps 200 --energies U1 --out-dir /tmp/e   # a look

Every fit: Adam (`--lr`), `--steps` steps of `--sample-size` draws, XLA,
seed 0; the paper trained for 500,000 steps with an annealed target, so
these short fits rank the flows at equal (small) cost and do not reproduce
the paper's converged fits. Writes benchmarks/results/vi_energy/results.json
and table.md, with the command, the machine and its load.
"""

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
OUT_DIR = os.path.join(HERE, "results", "vi_energy")
ENERGIES = ("U1", "U2", "U3", "U4")
FLOWS = (
    ("planar", 2),
    ("planar", 8),
    ("planar", 32),
    ("radial", 2),
    ("radial", 8),
    ("radial", 32),
    ("coupling", 6),
)
GRID_HALF_WIDTH = 10.0


def energy(name, z, xp):
    """U(z) of the paper's Table 1 (plus the envelope for U2-U4), for NumPy
    (`xp=np`) or TensorFlow (`xp=tf`, via `_TF`)."""
    z1, z2 = z[..., 0], z[..., 1]
    w1 = xp.sin(2.0 * np.pi * z1 / 4.0)

    def neg_logaddexp(a, b):  # -log(exp(-a) + exp(-b)), stable
        return -xp.logaddexp(-a, -b)

    if name == "U1":
        ring = 0.5 * ((xp.sqrt(z1**2 + z2**2) - 2.0) / 0.4) ** 2
        return ring + neg_logaddexp(0.5 * ((z1 - 2.0) / 0.6) ** 2, 0.5 * ((z1 + 2.0) / 0.6) ** 2)
    envelope = (z1**4 + z2**4) / 512.0
    if name == "U2":
        return 0.5 * ((z2 - w1) / 0.4) ** 2 + envelope
    if name == "U3":
        w2 = 3.0 * xp.exp(-0.5 * ((z1 - 1.0) / 0.6) ** 2)
        return (
            neg_logaddexp(0.5 * ((z2 - w1) / 0.35) ** 2, 0.5 * ((z2 - w1 + w2) / 0.35) ** 2)
            + envelope
        )
    if name == "U4":
        w3 = 3.0 * xp.sigmoid((z1 - 1.0) / 0.3)
        return (
            neg_logaddexp(0.5 * ((z2 - w1) / 0.4) ** 2, 0.5 * ((z2 - w1 + w3) / 0.35) ** 2)
            + envelope
        )
    raise ValueError(f"`name` must be one of {ENERGIES}; received {name!r}.")


class _NumPy:
    """NumPy under the names `energy` uses."""

    sin, exp, sqrt, logaddexp = np.sin, np.exp, np.sqrt, np.logaddexp

    @staticmethod
    def sigmoid(x):
        return 0.5 * (1.0 + np.tanh(0.5 * x))


def log_normaliser(name, points):
    """log Z = log of the trapezoid rule for exp(-U) on a `points`^2 grid."""
    axis = np.linspace(-GRID_HALF_WIDTH, GRID_HALF_WIDTH, points)
    z = np.stack(np.meshgrid(axis, axis, indexing="ij"), axis=-1)
    log_p = -energy(name, z, _NumPy)
    weights = np.ones(points)
    weights[[0, -1]] = 0.5
    log_w = np.log(np.outer(weights, weights)) + 2.0 * np.log(axis[1] - axis[0])
    m = log_p.max()
    return float(m + np.log(np.sum(np.exp(log_p - m + log_w))))


def fit_one(name, flow, k, args):
    import keras
    import tensorflow as tf
    import tensorflow_probability as tfp

    from tfp_glow import vi

    class _TF:
        sin, exp, sqrt = tf.sin, tf.exp, tf.sqrt
        sigmoid = tf.sigmoid

        @staticmethod
        def logaddexp(a, b):
            return tf.reduce_logsumexp(tf.stack([a, b]), axis=0)

    def target_log_prob(z):
        return -energy(name, z, _TF)

    q = vi.flow_surrogate_posterior([2], num_layers=k, flow=flow, seed=0)
    start = time.time()
    losses = tfp.vi.fit_surrogate_posterior(
        target_log_prob,
        q,
        keras.optimizers.Adam(args.lr),
        args.steps,
        sample_size=args.sample_size,
        jit_compile=True,
        seed=(0, 1),
    ).numpy()
    fit_seconds = time.time() - start
    z, log_q = q.experimental_sample_and_log_prob(args.eval_draws, seed=(2, 3))
    terms = (target_log_prob(z) - log_q).numpy().astype(np.float64)
    finite = np.isfinite(terms)
    return {
        "energy": name,
        "flow": flow,
        "K": k,
        "parameters": int(sum(np.prod(v.shape) for v in q.trainable_variables)),
        "elbo": float(np.mean(terms[finite])),
        "elbo_se": float(np.std(terms[finite]) / np.sqrt(finite.sum())),
        "nonfinite_draws": int((~finite).sum()),
        "final_loss_mean_last_100": float(np.mean(losses[-100:])),
        "fit_seconds": round(fit_seconds, 1),
    }


def markdown(results, log_z):
    lines = [
        "| energy | log Z | flow | K | params | ELBO (+- se) | KL(q \\|\\| p) | fit s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['energy']} | {log_z[r['energy']]['fine']:.4f} | {r['flow']} | {r['K']} "
            f"| {r['parameters']} | {r['elbo']:.3f} +- {r['elbo_se']:.3f} | {r['kl']:.3f} "
            f"| {r['fit_seconds']} |"
        )
    return "\n".join(lines) + "\n"


def machine(load_start):
    import tensorflow as tf

    return {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "tensorflow": tf.__version__,
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
    }


def write_report(out_dir):
    """results.json and table.md from every `<energy>.json` in `out_dir`."""
    runs = [
        json.load(open(os.path.join(out_dir, f"{e}.json")))
        for e in ENERGIES
        if os.path.exists(os.path.join(out_dir, f"{e}.json"))
    ]
    results = [r for run in runs for r in run["results"]]
    log_z = {run["energy"]: run["log_z"] for run in runs}
    report = {
        "runs": [
            {k: run[k] for k in ("energy", "command", "settings", "machine", "wall_seconds")}
            for run in runs
        ],
        "log_z": log_z,
        "results": results,
    }
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(report, f, indent=1)
    table = markdown(results, log_z)
    commands = sorted({run["command"] for run in runs})
    notes = "\n".join(
        f"- {run['energy']}: wall {run['wall_seconds']} s, load average "
        f"{run['machine']['loadavg_start'][0]:.1f} at the start, "
        f"{run['machine']['loadavg_end'][0]:.1f} at the end "
        f"({run['machine']['cpu_count']} CPUs, {run['machine']['platform']})"
        for run in runs
    )
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write("\n".join(f"`{c}`" for c in commands) + f"\n\n{table}\n{notes}\n")
    print(table)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--sample-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--eval-draws", type=int, default=100_000)
    parser.add_argument("--energies", nargs="+", default=list(ENERGIES), choices=ENERGIES)
    parser.add_argument("--out-dir", default=OUT_DIR)
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="only rebuild results.json and table.md from <energy>.json",
    )
    args = parser.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    if args.report_only:
        write_report(args.out_dir)
        return
    command = "python benchmarks/vi_energy.py " + " ".join(sys.argv[1:] if argv is None else argv)
    for name in args.energies:  # one file per energy, written as each finishes
        load_start, wall = os.getloadavg(), time.time()
        log_z = {"fine": log_normaliser(name, 2001), "coarse": log_normaliser(name, 1001)}
        results = []
        for flow, k in FLOWS:
            r = fit_one(name, flow, k, args)
            r["kl"] = log_z["fine"] - r["elbo"]
            results.append(r)
            print(json.dumps(r), flush=True)
        run = {
            "energy": name,
            "command": command,
            "settings": {
                k: v
                for k, v in vars(args).items()
                if k not in ("energies", "out_dir", "report_only")
            }
            | {"jit_compile": True, "optimizer": "Adam", "seed": 0},
            "machine": machine(load_start),
            "wall_seconds": round(time.time() - wall, 1),
            "log_z": log_z,
            "results": results,
        }
        with open(os.path.join(args.out_dir, f"{name}.json"), "w") as f:
            json.dump(run, f, indent=1)
    write_report(args.out_dir)


if __name__ == "__main__":
    main()
