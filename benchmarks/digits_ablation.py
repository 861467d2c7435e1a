"""The digits protocol's ablation: the default model with each feature off or on.

Runs `digits_protocol.py` once per (configuration, init seed), one at a time,
each writing `<out-dir>/<name>_s<seed>.json`; runs whose JSON exists are
skipped (re-run the command after an interruption). Then

    python benchmarks/digits_summary.py benchmarks/results/digits_protocol/ablation/*.json

prints the table (BENCHMARKS.md, "Held-out likelihood by default").

    python benchmarks/digits_ablation.py                    # all, seeds 0 and 1
    python benchmarks/digits_ablation.py default no_dropout --seeds 0

About 3.5 minutes per affine run and 7 per spline or mixture-of-logistics run
on a 2-core CPU (about 75 minutes for all). `before_polyak_default/` holds
the same ablation around the default before Polyak averaging joined it.
"""

import argparse
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
OUT_DIR = os.path.join(HERE, "results", "digits_protocol", "ablation")

# name -> digits_protocol.py arguments on top of its defaults: the library's
# default Glow (dropout 0.2, variational dequantization) compiled by
# `model.compile()` (Adam, warmup, constant rate, Polyak averaging 0.99).
ABLATIONS = {
    "default": [],
    "no_averaging": ["--ema", "0"],
    "no_dropout": ["--dropout", "0"],
    "uniform_dequantization": ["--dequantization", "uniform"],
    "paper_glow": ["--dropout", "0", "--dequantization", "uniform", "--ema", "0"],
    "cosine_schedule": ["--preset", "cosine"],
    "weight_decay": ["--weight-decay", "0.05"],
    "spline": ["--coupling", "spline", "--spline-bins", "6", "--last-kernel", "1"],
    "mol": ["--coupling", "mol", "--mol-components", "5", "--last-kernel", "1"],
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", default=list(ABLATIONS), help="configurations")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--out-dir", default=OUT_DIR)
    args = p.parse_args(argv)
    unknown = [n for n in args.names if n not in ABLATIONS]
    if unknown:
        p.error(f"unknown configuration(s) {unknown}; choose from {list(ABLATIONS)}")
    for name in args.names:
        for seed in args.seeds:
            out = os.path.join(args.out_dir, f"{name}_s{seed}.json")
            if os.path.exists(out):
                print(f"{out}: exists, skipped", flush=True)
                continue
            command = [
                sys.executable,
                os.path.join(HERE, "digits_protocol.py"),
                *ABLATIONS[name],
                "--seed",
                str(seed),
                "--out",
                out,
            ]
            print(" ".join(command), flush=True)
            subprocess.run(command, check=True)


if __name__ == "__main__":
    main()
