"""Training-step time of a MAF with `tfp_glow.nets.MADE` against the same MAF
with TFP's own (tf_keras) `tfb.AutoregressiveNetwork`.

Both flows are `tfb.Invert(Chain of `layers` x tfb.MaskedAutoregressiveFlow)`,
the input order reversed in every other layer, the conditioner
`[hidden, hidden]` ReLU with params=2 (shift, log-scale) and TFP's "equal"
hidden degrees, so both have the same masks and the same parameter count
(asserted). Each is trained by `tfp_glow.FlowModel` (`train_on_batch`, i.e.
the `fit` step: loss, gradient, Adam update) on the same batch of a
correlated Gaussian. After `--warmup` untimed steps each, rounds alternate
MADE, TFP, TFP, MADE, ... (the first of each round swaps), each round timing
`--steps` consecutive steps of one model; a round's figure is its mean step.
Reported: the median over rounds (ms) per model and the ratio MADE / TFP of
the medians, and the median of the per-round-pair ratios (goal: <= 1.0).

    nice -n 10 python benchmarks/made_step.py --rounds 10 \
        --out benchmarks/results/made_step.json

The two networks differ only in initialisation (MADE's last layer starts at
zero, an identity flow; TFP's is Glorot-uniform), which changes no cost.
"""

import argparse
import os
import statistics
import time

import numpy as np
import report  # benchmarks/, the script's own folder

CONFIGS = {"d8": dict(event_size=8, hidden=64), "d64": dict(event_size=64, hidden=256)}
ORDERS = ("left-to-right", "right-to-left")


def build(kind, event_size, hidden, layers):
    import tensorflow_probability as tfp

    import tfp_glow
    from tfp_glow import nets

    tfb = tfp.bijectors

    def flow():
        mafs = []
        for i in range(layers):
            order = ORDERS[i % 2]
            if kind == "made":
                net = nets.MADE(
                    params=2,
                    event_size=event_size,
                    hidden_units=[hidden, hidden],
                    input_order=order,
                    activation="relu",
                )
            else:
                net = tfb.AutoregressiveNetwork(
                    params=2,
                    event_shape=[event_size],
                    hidden_units=[hidden, hidden],
                    input_order=order,
                    activation="relu",
                )
            mafs.append(tfb.MaskedAutoregressiveFlow(shift_and_log_scale_fn=net))
        return tfb.Invert(tfb.Chain(list(reversed(mafs))))

    return tfp_glow.FlowModel(flow, event_shape=(event_size,), num_bins=None)


def data(event_size, batch, seed=0):
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((event_size, event_size)) / np.sqrt(event_size)
    return (rng.standard_normal((batch, event_size)) @ (np.eye(event_size) + mix)).astype(
        np.float32
    )


def count_params(model):
    return int(sum(int(np.prod(v.shape)) for v in model.trainable_variables))


def time_config(name, cfg, args):
    import keras

    x = data(cfg["event_size"], args.batch)
    models = {}
    for kind in ("made", "tfp"):
        keras.utils.set_random_seed(args.seed)
        model = build(kind, cfg["event_size"], cfg["hidden"], args.layers)
        model.log_prob(x[:2])  # builds TFP's lazily built network
        model.compile(keras.optimizers.Adam(1e-4))
        models[kind] = model
    params = {kind: count_params(m) for kind, m in models.items()}
    assert params["made"] == params["tfp"], f"parameter counts differ: {params}"
    first = {}
    for kind, model in models.items():
        t0 = time.perf_counter()
        model.train_on_batch(x)
        first[kind] = time.perf_counter() - t0
        for _ in range(args.warmup):
            model.train_on_batch(x)
    rounds = {kind: [] for kind in models}
    for r in range(args.rounds):
        order = ("made", "tfp") if r % 2 == 0 else ("tfp", "made")
        for kind in order:
            model = models[kind]
            t0 = time.perf_counter()
            for _ in range(args.steps):
                logs = model.train_on_batch(x, return_dict=True)
            rounds[kind].append(1e3 * (time.perf_counter() - t0) / args.steps)
    med = {kind: statistics.median(v) for kind, v in rounds.items()}
    pair = [a / b for a, b in zip(rounds["made"], rounds["tfp"])]
    return {
        "config": name,
        **cfg,
        "layers": args.layers,
        "batch": args.batch,
        "params": params["made"],
        "first_step_s": first,
        "step_ms_median": med,
        "step_ms_min": {k: min(v) for k, v in rounds.items()},
        "step_ms_rounds": rounds,
        "ratio_made_over_tfp": med["made"] / med["tfp"],
        "ratio_paired_median": statistics.median(pair),
        "final_loss": float(logs["loss"]),
    }


def main(argv=None):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="d8,d64", help="comma-separated: " + ",".join(CONFIGS))
    p.add_argument("--layers", type=int, default=5)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--steps", type=int, default=20, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    t0, load_start = time.perf_counter(), os.getloadavg()
    results = [time_config(name, CONFIGS[name], args) for name in args.configs.split(",")]
    lines = [
        "",
        f"{'config':8} {'params':>9} {'MADE ms':>9} {'TFP ms':>9} {'MADE/TFP':>9} {'paired':>7}",
    ]
    for r in results:
        lines.append(
            f"{r['config']:8} {r['params']:9,} {r['step_ms_median']['made']:9.2f} "
            f"{r['step_ms_median']['tfp']:9.2f} {r['ratio_made_over_tfp']:9.3f} "
            f"{r['ratio_paired_median']:7.3f}"
        )
    report.print_and_write(
        {
            "results": results,
            "wall_s": time.perf_counter() - t0,
            "loadavg_start": list(load_start),
            "loadavg_end": list(os.getloadavg()),
        },
        args.out,
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
