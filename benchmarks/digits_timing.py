"""Train-step time of digits-protocol variants, interleaved in one process.

On a shared machine the load drifts over minutes, so comparing the step
times of separate 100-epoch runs mixes the variant with the load. Here each
variant (a `digits_protocol.py` argument string) is built, initialised and
compiled once; then `--rounds` rounds each fit one protocol epoch (23
steps) of every variant in turn. Round 0 (tracing, XLA compilation) is
dropped (its wall time is reported); the median step time (Keras batch
begin to batch end, as in `digits_protocol.py`) per variant and its ratio to
the first variant are reported.

    python benchmarks/digits_timing.py --rounds 8 \\
        "--dropout 0 --dequantization uniform" "" "--coupling spline"
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


def main(argv=None):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("variants", nargs="+", help="digits_protocol.py argument strings")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import tensorflow as tf

    train, _ = stream.split(stream.load_levels(), 0)
    x_init = tf.constant(stream.init_batch(train))
    runs = []
    for text in args.variants:
        cfg = protocol.parse_args(text.split())
        cfg.seed = cfg.seed[0]  # one model per variant
        model, switch = protocol.build(cfg)
        model.initialize(x_init)
        model.compile(protocol.make_optimizer(cfg, model, 2300), jit_compile=cfg.jit)
        runs.append(
            dict(
                text=text, cfg=cfg, model=model, switch=switch, timer=protocol.StepTimer(), times=[]
            )
        )
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    for r in range(args.rounds + 1):
        x_epoch = stream.epoch_batches(train, r)
        for run in runs:
            timer = run["timer"]
            timer.times = []
            kwargs = dict(
                batch_size=stream.BATCH, shuffle=False, epochs=1, verbose=0, callbacks=[timer]
            )
            t_fit = time.perf_counter()
            if run["switch"] is not None and run["cfg"].dropout:
                with run["switch"].on():
                    run["model"].fit(x_epoch, **kwargs)
            else:
                run["model"].fit(x_epoch, **kwargs)
            if r > 0:
                run["times"] += timer.times
            else:  # tracing (and XLA compilation with --jit) happens here
                run["first_epoch_s"] = time.perf_counter() - t_fit
    base = float(np.median(runs[0]["times"])) * 1e3
    result = {
        "rounds": args.rounds,
        "steps_per_variant": len(runs[0]["times"]),
        "loadavg_start": list(load_start),
        "loadavg_end": list(os.getloadavg()),
        "wall_s": time.perf_counter() - t0,
        "variants": [],
    }
    for run in runs:
        ms = np.array(run["times"]) * 1e3
        result["variants"].append(
            {
                "args": run["text"],
                "median_ms": float(np.median(ms)),
                "mean_ms": float(ms.mean()),
                "p10_ms": float(np.percentile(ms, 10)),
                "ratio_to_first": float(np.median(ms)) / base,
                "first_epoch_s": run["first_epoch_s"],
            }
        )
    report.print_and_write(result, args.out)


if __name__ == "__main__":
    main()
