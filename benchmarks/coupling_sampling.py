"""Sampling time and round-trip error of the coupling transforms, on the digits protocol.

The affine coupling inverts in closed form; the rational-quadratic spline too
(a quadratic per value); the mixture-of-logistics CDF has no closed-form
inverse, so `decode` and `sample` find it by bisection. This measures what
that costs a user who samples or serves: each variant (a `digits_protocol.py`
argument string) is built, trained `--epochs` protocol epochs (so the
couplings are no longer the identity they start as), then `--rounds`
interleaved rounds time one `model.sample(64)` call of every variant in turn
(after one warm-up call each, which traces the function). Reported per
variant: the median sampling time, its ratio to the first variant, and the
largest `|decode(encode(x)) - x|` over one uniform draw of the test split.

    python benchmarks/coupling_sampling.py --out \\
        benchmarks/results/digits_protocol/ablation/sampling.json
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import digits_protocol as protocol  # noqa: E402
import digits_stream as stream  # noqa: E402
import report  # noqa: E402

VARIANTS = (
    "",
    "--coupling spline --spline-bins 6 --last-kernel 1",
    "--coupling mol --mol-components 5 --last-kernel 1",
)
NUM_SAMPLES = 64


def main(argv=None):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "variants",
        nargs="*",
        default=list(VARIANTS),
        help="digits_protocol.py argument strings (default: affine, spline, mol)",
    )
    p.add_argument("--epochs", type=int, default=5, help="protocol epochs before timing")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import tensorflow as tf

    train, test = stream.split(stream.load_levels(), 0)
    x_init = tf.constant(stream.init_batch(train))
    x_test = tf.constant(stream.test_draws(test)[0])
    runs = []
    for text in args.variants:
        cfg = protocol.parse_args(text.split())
        cfg.seed = cfg.seed[0]
        model, switch = protocol.build(cfg)
        model.initialize(x_init)
        model.compile(protocol.make_optimizer(cfg, model, args.epochs * stream.STEPS_PER_EPOCH))
        for epoch in range(args.epochs):
            kwargs = dict(batch_size=stream.BATCH, shuffle=False, epochs=1, verbose=0)
            if switch is not None and cfg.dropout:
                with switch.on():
                    model.fit(stream.epoch_batches(train, epoch), **kwargs)
            else:
                model.fit(stream.epoch_batches(train, epoch), **kwargs)
        round_trip = model.decode(model.encode(x_test))
        model.sample(NUM_SAMPLES, seed=0)  # warm-up: traces the sampling function
        runs.append(
            dict(
                text=text,
                model=model,
                times=[],
                round_trip=float(tf.reduce_max(tf.abs(round_trip - x_test))),
            )
        )
    load_start = os.getloadavg()
    for r in range(args.rounds):
        for run in runs:
            t = time.perf_counter()
            np.asarray(run["model"].sample(NUM_SAMPLES, seed=r + 1))
            run["times"].append(time.perf_counter() - t)
    base = float(np.median(runs[0]["times"]))
    result = {
        "epochs": args.epochs,
        "rounds": args.rounds,
        "num_samples": NUM_SAMPLES,
        "loadavg_start": list(load_start),
        "loadavg_end": list(os.getloadavg()),
        "variants": [
            {
                "args": run["text"],
                "sample_median_ms": float(np.median(run["times"])) * 1e3,
                "ratio_to_first": float(np.median(run["times"])) / base,
                "max_round_trip_error": run["round_trip"],
            }
            for run in runs
        ],
    }
    report.print_and_write(result, args.out)


if __name__ == "__main__":
    main()
