"""The family table: every flow family on the digits protocol, zuko beside it.

One command regenerates `benchmarks/results/family_table/` (table.md,
table.json and one JSON per row under rows/):

    python benchmarks/family_table.py                  # every family and peer
    python benchmarks/family_table.py --families glow,maf --peers none --epochs 1
    python benchmarks/family_table.py --report-only    # rebuild table.md from rows/

Each row runs in its own process, one after the other, with 2 threads:
`family_run.py` for tfp_glow's families (TensorFlow), `family_zuko.py` for the
PyTorch peers (zuko 1.6). Every row is trained on the digits protocol
(`/work/shared/digits-protocol.md`: split seed 0, 100 epochs of the
protocol's stream, batch 64) as images `[8, 8, 1]` or as the same images
flattened to 64-D vectors, at about 150k parameters where the family allows
(the actual count is reported), and reports test bits/dim (end, and best on
the curve), train bits/dim, the median train step, the time to sample 64 and
the 2-D KL to 8 Gaussians of the same family at 2-D (see family_run.py).

Optimizers: tfp_glow's rows use the library's defaults (`model.compile()`
with no optimizer: `recommended_optimizer(**model.recommended_optimizer_settings())`,
Adam with a 100-step warm-up to 3e-3 and Polyak averaging, MAF's at 1e-3 and the
vector RealNVP's at 5e-4 with weight decay of their networks, and each builder's
defaults such as Glow's dropout and variational dequantization) unless
`--optimizer adam` (Adam 1e-3, constant) or the row states its own
(`optimizer="recommended"` with its `optimizer_kwargs`: realnvp_vector_5e4 at 5e-4).
zuko's rows use Adam 1e-3, as the issue's peer figures did.

A family enters by one line of `FAMILIES`: its builder (a `tfp_glow`
attribute), the layout, the builder's keyword arguments at ~150k parameters,
and its 2-D flow for the KL column. Rows whose builder is not in the installed
tfp_glow yet are skipped with a note. The planar and radial flows have no
density-fitting row: their result is the VI benchmark (benchmarks/vi_energy.py),
whose results.json the table merges (ELBO and KL per energy density).
"""

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
OUT_DIR = os.path.join(HERE, "results", "family_table")
sys.path.insert(0, HERE)

EPOCHS = 100
TOY = dict(train_samples=100_000, epochs=2, batch=512, lr=3e-3)  # 390 steps, toy_kl's table
# toy_kl.py's 2-D flows: 8 layers, MLP hidden 64 x 2 (~35k parameters).
TOY_VECTOR = dict(input_shape=(2,), coupling_layers=8, hidden_channels=64)
TOY_AR = dict(input_shape=(2,), num_layers=8, hidden_units=(64, 64))
# The slow families run the protocol's 100 epochs too (first 10 only, to fit
# a ~45-minute table): ResidualFlow's Russian-roulette log-det ~560 ms a step
# (26 minutes), FFJORD's Hutchinson-trace ODE solve 250 ms at first and over
# a second by epoch 60 as the field stiffens (2 cores, 2026-12-07: it did not
# finish within 40 minutes), so the whole table takes 1.5-2 hours;
# `--families` reruns a subset. (IAF, 64 sequential passes per layer, ~220 ms
# a step, about 12 minutes.)
FFJORD_EPOCHS = 100
RESFLOW_EPOCHS = 100

# name: builder (tfp_glow attribute), layout ("image" [8, 8, 1] or "vector" 64-D),
# digits kwargs (~150k parameters), 2-D flow for the KL (`builder`, `kwargs`),
# optional `epochs` (fewer than the protocol's 100: marked in the table) and
# `peer` (the zuko row it is compared with).
FAMILIES = {
    "glow": dict(
        builder="Glow",
        layout="image",
        digits=dict(image_shape=(8, 8, 1), levels=2, steps_per_level=8, hidden_channels=64),
        toy2d=dict(builder="toy_flows:glow", kwargs=dict(layers=8, hidden=64)),
    ),
    "realnvp": dict(
        builder="RealNVP",
        layout="image",
        digits=dict(input_shape=(8, 8, 1), levels=2, hidden_channels=20, num_blocks=2),
        toy2d=dict(builder="RealNVP", kwargs=TOY_VECTOR),
    ),
    # zuko's RealNVP like for like: the same digits as 64-D vectors, 4 affine
    # couplings with MLPs 32-128-128-64 (ActNorm between them: 116,480 parameters
    # against zuko's 115,968).
    "realnvp_vector": dict(
        builder="RealNVP",
        layout="vector",
        digits=dict(input_shape=(64,), coupling_layers=4, hidden_channels=128),
        toy2d=dict(builder="RealNVP", kwargs=TOY_VECTOR),
        peer="zuko_realnvp",
    ),
    # The same at 5e-4 without weight decay (at 3e-3 it overfit after epoch 30,
    # 2026-12-07; the vector RealNVP's default is now 5e-4 with weight decay 0.1).
    "realnvp_vector_5e4": dict(
        builder="RealNVP",
        layout="vector",
        digits=dict(input_shape=(64,), coupling_layers=4, hidden_channels=128),
        optimizer="recommended",
        optimizer_kwargs=dict(learning_rate=5e-4),
        toy2d=dict(builder="RealNVP", kwargs=TOY_VECTOR),
        peer="zuko_realnvp",
    ),
    "nice": dict(
        builder="NICE",
        layout="image",
        digits=dict(
            input_shape=(8, 8, 1), coupling_layers=4, hidden_units=108, num_hidden_layers=3
        ),
        toy2d=dict(
            builder="NICE",
            kwargs=dict(input_shape=(2,), coupling_layers=8, hidden_units=64, num_hidden_layers=2),
        ),
    ),
    # Images, about 150k parameters: 4 residual blocks of 120 channels per scale.
    "resflow": dict(
        builder="ResidualFlow",
        layout="image",
        digits=dict(input_shape=(8, 8, 1), levels=2, blocks=4, hidden_channels=120),
        epochs=RESFLOW_EPOCHS,
        toy2d=dict(
            builder="ResidualFlow", kwargs=dict(input_shape=(2,), blocks=8, hidden_units=64)
        ),
    ),
    # The vector families at their defaults (~150k parameters on 64 features).
    # MAF at the library's defaults: its compile() uses MAF's own
    # recommended_optimizer_settings() (1e-3, weight decay 0.3 of the MADEs),
    # chosen from the settings in benchmarks/results/family_table/maf_settings.json
    # (at 3e-3 without decay it overfit after epoch 40: 2.709 at the end).
    "maf": dict(
        builder="MAF",
        layout="vector",
        digits=dict(input_shape=(64,)),
        toy2d=dict(builder="MAF", kwargs=TOY_AR),
        peer="zuko_maf",
    ),
    # IAF: 100 epochs since its log-scale is bounded (no NaN at the default optimizer).
    "iaf": dict(
        builder="IAF",
        layout="vector",
        digits=dict(input_shape=(64,)),
        toy2d=dict(builder="IAF", kwargs=TOY_AR),
    ),
    "nsf_ar": dict(
        builder="NeuralSplineFlow",
        layout="vector",
        digits=dict(input_shape=(64,), variant="autoregressive"),
        toy2d=dict(builder="NeuralSplineFlow", kwargs=dict(TOY_AR, variant="autoregressive")),
        peer="zuko_nsf",
    ),
    "nsf_coupling": dict(
        builder="NeuralSplineFlow",
        layout="vector",
        digits=dict(input_shape=(64,), variant="coupling"),
        toy2d=dict(builder="NeuralSplineFlow", kwargs=dict(TOY_AR, variant="coupling")),
    ),
    # toy_kl's FFJORD budget: 100 steps of batch 256 (its steps cost ~20x).
    "ffjord": dict(
        builder="FFJORD",
        layout="vector",
        digits=dict(input_shape=(64,)),
        epochs=FFJORD_EPOCHS,
        toy2d=dict(
            builder="FFJORD",
            train_samples=25_600,
            epochs=1,
            batch=256,
            kwargs=dict(input_shape=(2,), hidden_units=(64, 64, 64)),
        ),
    ),
}

# zuko 1.6 at its defaults but for `transforms` and `hidden_features` of MAF and
# RealNVP: (4, (128, 128)) give the issue's parameter counts (165,376 and
# 115,968); NSF at its defaults has the issue's 312,000. 2-D: 8 transforms of
# (64, 64), toy_kl's size.
PEERS = {
    "zuko_maf": dict(
        flow="MAF",
        kwargs=dict(transforms=4, hidden_features=(128, 128)),
        issue=dict(bpd=2.49, params="165k", step_ms=3.8),
    ),
    "zuko_nsf": dict(flow="NSF", kwargs={}, issue=dict(bpd=2.17, params="312k", step_ms=17.7)),
    "zuko_realnvp": dict(
        flow="RealNVP",
        kwargs=dict(transforms=4, hidden_features=(128, 128)),
        issue=dict(bpd=2.63, params="116k", step_ms=5.0),
    ),
}
PEER_TOY_KWARGS = dict(transforms=8, hidden_features=(64, 64))
VI_RESULTS = os.path.join(HERE, "results", "vi_energy")


def available(builders):
    """The `builders` the installed tfp_glow has (one import, in a subprocess:
    this process stays free of TensorFlow)."""
    code = (
        "import json, sys, tfp_glow; print(json.dumps([b for b in sys.argv[1:] "
        "if hasattr(tfp_glow, b)]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, *builders],
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    return set(json.loads(out.stdout.strip().splitlines()[-1])) if out.returncode == 0 else set()


def _toy(entry, args):
    toy = {**TOY, **entry}
    if args.kl_train_samples:
        toy["train_samples"] = min(toy["train_samples"], args.kl_train_samples)
    return toy


def family_spec(name, args):
    entry = FAMILIES[name]
    return {
        "name": name,
        "builder": entry["builder"],
        "layout": entry["layout"],
        "digits": entry["digits"],
        "epochs": args.epochs if args.epochs is not None else entry.get("epochs", EPOCHS),
        "optimizer": entry.get("optimizer", args.optimizer),
        "optimizer_kwargs": entry.get("optimizer_kwargs", {}),
        "lr": 1e-3,
        "seed": args.seed,
        "split_seed": 0,
        "toy2d": None if args.no_kl else _toy(entry["toy2d"], args),
    }


def peer_spec(name, args):
    entry = PEERS[name]
    return {
        "name": name,
        "flow": entry["flow"],
        "kwargs": entry["kwargs"],
        "epochs": args.epochs if args.epochs is not None else EPOCHS,
        "lr": 1e-3,
        "seed": args.seed,
        "split_seed": 0,
        "toy2d": None if args.no_kl else _toy({"kwargs": PEER_TOY_KWARGS}, args),
    }


def run_row(script, spec, out, toy_data, timeout_s, env=None):
    """One row in its own process; a row past `timeout_s` keeps its partial result."""
    cmd = [sys.executable, os.path.join(HERE, script), "--spec", json.dumps(spec), "--out", out] + (
        ["--toy-data", toy_data] if toy_data else []
    )
    t0 = time.perf_counter()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    try:
        rc = subprocess.run(
            cmd, timeout=timeout_s, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
        ).returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    partial = os.path.splitext(out)[0] + ".partial.json"
    source = out if rc == 0 else partial
    if os.path.exists(source):
        with open(source) as f:
            result = json.load(f)
        result.update(
            date_utc=started,
            row_wall_s=time.perf_counter() - t0,
            env=env or {},
            command=shlex.join(
                ["python", os.path.relpath(cmd[1])]
                + [os.path.relpath(c) if os.path.isabs(c) else c for c in cmd[2:]]
            ),
        )
        if rc != 0:
            result["stopped"] = f"exit {rc} after {time.perf_counter() - t0:.0f} s"
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
        if source == partial:
            os.remove(partial)
    print(f"    {spec['name']}: exit {rc}, {time.perf_counter() - t0:.0f} s", flush=True)
    return rc


def machine():
    model = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(
                line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}"


def _names(text, known, what):
    if text in ("all", None):
        return list(known)
    if text == "none":
        return []
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown {what} {unknown}; known: {', '.join(known)}")
    return names


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--families",
        default="all",
        help=f"comma-separated subset of {', '.join(FAMILIES)}, all or none",
    )
    p.add_argument(
        "--peers", default="all", help=f"comma-separated subset of {', '.join(PEERS)}, all or none"
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="epochs for every row (default: the protocol's 100, or the "
        "registry's budget for the slow families); e.g. 1 for a smoke run",
    )
    p.add_argument(
        "--optimizer",
        choices=("default", "adam"),
        default="default",
        help="tfp_glow rows: the library's default (model.compile()) or Adam 1e-3",
    )
    p.add_argument("--seed", type=int, default=0, help="model initialisation seed")
    p.add_argument(
        "--omp-wait-policy",
        default="PASSIVE",
        help="OMP_WAIT_POLICY of the PyTorch rows ('unset': PyTorch's own, "
        "spinning). Spinning OpenMP threads on a shared, loaded 2-core "
        "machine made zuko's MAF step 2,063 ms against 9.2 ms passive "
        "(load 17): PASSIVE is the peer's fair setting here",
    )
    p.add_argument("--no-kl", action="store_true", help="skip the 2-D KL column")
    p.add_argument(
        "--kl-train-samples",
        type=int,
        default=None,
        help="2-D training draws per epoch (default 100,000: 390 steps of 512 "
        "in 2 epochs); e.g. 10240 for a smoke run",
    )
    p.add_argument(
        "--timeout-min",
        type=float,
        default=10.0,
        help="per row; a row past it keeps its partial curve (marked)",
    )
    p.add_argument("--resume", action="store_true", help="keep rows already in rows/")
    p.add_argument("--report-only", action="store_true", help="only rebuild table.md/json")
    p.add_argument("--out-dir", default=OUT_DIR)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    families = _names(args.families, FAMILIES, "families")
    peers = _names(args.peers, PEERS, "peers")
    runs_dir = os.path.join(args.out_dir, "rows")
    os.makedirs(runs_dir, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    t0, load_start = time.perf_counter(), list(os.getloadavg())
    skipped = {}
    scratch = tempfile.TemporaryDirectory(prefix="family_table_")
    toy_data = None if args.no_kl else os.path.join(scratch.name, "toy_data.npz")
    if not args.report_only:
        if toy_data:  # the same 2-D draws for every row (regenerated: ~15 s)
            subprocess.run(
                [sys.executable, os.path.join(HERE, "family_run.py"), "--write-toy-data", toy_data],
                check=True,
            )
        # The peers first: they are quick, and every comparison needs them.
        rows = [("family_zuko.py", n, peer_spec(n, args)) for n in peers] + [
            ("family_run.py", n, family_spec(n, args)) for n in families
        ]
        have = available({FAMILIES[n]["builder"] for n in families})
        for script, name, spec in rows:
            out = os.path.join(runs_dir, f"{name}.json")
            if args.resume and os.path.exists(out):
                continue
            if script == "family_run.py" and spec["builder"] not in have:
                skipped[name] = f"tfp_glow.{spec['builder']} is not in this tfp_glow yet"
                print(f"[skip] {name}: {skipped[name]}", flush=True)
                continue
            print(
                f"[{time.perf_counter() - t0:6.0f}s] {name} ({spec['epochs']} epochs, "
                f"load {os.getloadavg()[0]:.1f})",
                flush=True,
            )
            env = (
                {}
                if script == "family_run.py" or args.omp_wait_policy == "unset"
                else {"OMP_WAIT_POLICY": args.omp_wait_policy}
            )
            run_row(script, spec, out, toy_data, args.timeout_min * 60, env)
    scratch.cleanup()
    invocation = {
        "command": "python benchmarks/family_table.py "
        + shlex.join(sys.argv[1:] if argv is None else argv),
        "date_utc": started,
        "machine": machine(),
        "wall_s": time.perf_counter() - t0,
        "loadavg_start": load_start,
        "loadavg_end": list(os.getloadavg()),
        "skipped": skipped,
    }
    previous = os.path.join(args.out_dir, "table.json")
    earlier = []
    if (args.report_only or args.resume) and os.path.exists(previous):
        with open(previous) as f:  # the runs' own records (rows added by --resume)
            table = json.load(f)
        earlier = table.get("invocations") or [table["invocation"]]
    invocation = earlier if args.report_only else earlier + [invocation]
    import family_report

    family_report.write(args.out_dir, invocation, FAMILIES, PEERS, VI_RESULTS)


if __name__ == "__main__":
    main()
