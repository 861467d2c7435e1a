"""Markdown table of `digits_protocol.py` results (one JSON per run).

Runs with EMA evaluation also report the same training evaluated with the raw
weights (EMA does not change training), as an extra row `... (raw weights)`.

    python benchmarks/digits_summary.py benchmarks/results/digits_protocol/*.json
"""

import json
import os
import sys


def rows(paths):
    out = []
    for path in sorted(paths):
        with open(path) as f:
            r = json.load(f)
        if "curve" not in r or r.get("complete") is False:  # a run still going
            continue
        name = os.path.splitext(os.path.basename(path))[0]
        base = dict(
            name=name,
            seed=r["seed"],
            params=r["params"],
            step=r["train_step_ms_mean"],
            load=r["loadavg_start"][0],
        )
        out.append(
            dict(
                base,
                eval="EMA" if r["config"]["ema"] else "weights",
                end=r["test_bpd"],
                best=r["best_test_bpd"],
                epoch=r["best_epoch"],
                train=r["train_bpd"],
            )
        )
        if r["config"]["ema"]:
            curve = [(c["test_bpd_raw_weights"], c["epoch"]) for c in r["curve"]]
            best = min(curve)
            out.append(
                dict(
                    base,
                    eval="raw weights",
                    end=curve[-1][0],
                    best=best[0],
                    epoch=best[1],
                    train=None,
                )
            )
    return out


def main(paths):
    print(
        "| run | seed | params | eval | test bpd end | best (epoch) | train bpd | step ms (load) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows(paths):
        train = "" if r["train"] is None else f"{r['train']:.3f}"
        print(
            f"| {r['name']} | {r['seed']} | {r['params']:,} | {r['eval']} | {r['end']:.3f} "
            f"| {r['best']:.3f} ({r['epoch']}) | {train} | {r['step']:.0f} ({r['load']:.0f}) |"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
