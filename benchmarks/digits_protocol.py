"""The digits protocol (`/work/shared/digits-protocol.md`) for tfp_glow's Glow.

Glow, 2 levels x 8 steps, width 64 (~150k parameters), trained for
`--epochs` epochs on exactly the protocol's batches (`digits_stream.py`:
NumPy + scikit-learn, independent of `tfp_glow.data`) with
`FlowModel.fit`, one `fit` call per epoch on that epoch's 23 batches in
order (`shuffle=False`). Test bits/dim (mean over the 4 fixed noise draws of
the 300 held-out images) at epochs 1, 10, 20, ..., 100; train bits/dim (one
draw) at the end:

    bits/dim = (NLL_nats + 64 ln 17) / (64 ln 2)

The train step time is the wall time between Keras' `on_train_batch_begin`
and `on_train_batch_end` (one compiled `train_step`), averaged over every
step after the first epoch (which traces).

With no arguments it trains the library's default model, `tfp_glow.Glow`
with its defaults (dropout 0.2, variational dequantization; 163,468
parameters) compiled by `model.compile()` with no optimizer
(`recommended_optimizer()`: Adam, 100-step warmup to 3e-3, then constant, and
Polyak averaging with momentum 0.99, whose average is what is evaluated), for
init seeds 0 and 1, and prints both beside the protocol's anchors:

    python benchmarks/digits_protocol.py \\
        --out benchmarks/results/digits_protocol/default_s{seed}.json

Presets (`--preset`): `default` is that (and `tfp-glow train`'s schedule);
`anchor` is the anchors' optimizer (Adam 1e-3, constant, no averaging);
`cosine` is the default with a cosine decay to 0 at the last step. Every
feature has its own switch, for the ablations (`digits_ablation.py`):
`--ema 0`, `--dropout 0`, `--dequantization uniform`, `--weight-decay`,
`--coupling spline|mol`; `--dropout 0 --dequantization uniform --ema 0` is
the Glow of the paper with the default schedule. With variational
dequantization the test figure is the variational bound (its noise read off
the protocol's own draws) and `test_bpd_uniform` the same model's figure on
the uniform draws.

The library's `tfp_glow.Glow` (the default builder) takes one coupling, last
kernel and width for every level; `--builder bench` builds the same Glow from
the public bijectors (`digits_variants.py`), also with a choice per level (and
is what the earlier `spl6_*`, `mol5_*`, `mix_*` and `do2_*` runs used).
"""

import argparse
import contextlib
import json
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import digits_stream as stream  # noqa: E402

PRESETS = {
    "anchor": dict(lr=1e-3, warmup_steps=0, lr_decay="none", ema=0.0),
    # `recommended_optimizer(decay_steps=...)`: cosine decay to 0 at the last step
    # (the `cli` preset of the runs before 2026-12-06 is this with --ema 0).
    "cosine": dict(lr=3e-3, warmup_steps=100, lr_decay="cosine", ema=0.99),
    # `model.compile()` with no optimizer, and `tfp-glow train`:
    # `recommended_optimizer()`.
    "default": dict(lr=3e-3, warmup_steps=100, lr_decay="none", ema=0.99),
}
# The protocol's anchors (digits-protocol.md, split seed 0, init seeds 0 / 1):
# test bits/dim after 100 epochs, best on the curve, train step.
ANCHORS = {
    "TFP 0.25 tfb.Glow (Adam 1e-3)": dict(
        params=151_532, end=(2.612, 2.686), best=(2.474, 2.548), step="81-84 ms"
    ),
    "normflows 1.7.3 Glow (Adam 1e-3)": dict(
        params=152_320, end=(2.275, 2.329), best=(2.243, 2.286), step="51-60 ms"
    ),
}
TARGET_PARAMS = 150_000


def _per_level(kind, allowed=None):
    def parse(text):
        values = tuple(kind(v) for v in text.split(","))
        if allowed is not None and any(v not in allowed for v in values):
            raise argparse.ArgumentTypeError(f"each entry must be one of {allowed}")
        return values

    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument(
        "--seed",
        type=int,
        nargs="+",
        default=[0, 1],
        help="model initialisation seeds, one run each (default: 0 1)",
    )
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="default",
        help="optimizer defaults; --lr/--warmup-steps/--lr-decay override",
    )
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--warmup-steps", type=int, default=None)
    p.add_argument("--lr-decay", choices=("cosine", "none"), default=None)
    p.add_argument("--decay-alpha", type=float, default=0.0, help="cosine decay ends at alpha * lr")
    p.add_argument(
        "--ema",
        type=float,
        default=None,
        help="Polyak averaging: momentum of the weights' moving average, "
        "used for evaluation (0 = off; default: the preset's)",
    )
    p.add_argument(
        "--dropout",
        type=float,
        default=None,
        help="dropout rate in the coupling networks (0 = off; default: tfp_glow.Glow's, 0.2)",
    )
    p.add_argument(
        "--weight-decay",
        type=float,
        default=0.0,
        help="AdamW decoupled weight decay on the coupling networks (0 = off)",
    )
    p.add_argument(
        "--coupling",
        type=_per_level(str, ("affine", "spline", "mol")),
        default=("affine",),
        help="affine | spline | mol, or one per level: spline,affine",
    )
    p.add_argument("--spline-bins", type=int, default=4)
    p.add_argument("--tail-bound", type=float, default=4.0)
    p.add_argument("--mol-components", type=int, default=4)
    p.add_argument(
        "--last-kernel",
        type=_per_level(int),
        default=(3,),
        help="kernel of the zero-initialised last conv of each coupling net "
        "(or one per level: 1,3)",
    )
    p.add_argument("--width", type=int, default=64)
    p.add_argument(
        "--context",
        choices=("none", "downsample"),
        default="none",
        help="downsample: a conditional Glow p(x_8x8 | x_4x4), the context the 2x2 means "
        "of the image's bin centres (no dequantization noise); library builder only",
    )
    p.add_argument(
        "--dequantization",
        choices=("uniform", "variational"),
        default=None,
        help="default: tfp_glow.Glow's, variational; test bits/dim is then the "
        "variational bound, with the uniform figure beside it",
    )
    p.add_argument(
        "--deq-width",
        type=int,
        default=None,
        help="hidden channels of the variational dequantizer (default: the library's, 16)",
    )
    p.add_argument(
        "--deq-steps",
        type=int,
        default=None,
        help="coupling steps of the variational dequantizer (default: the library's, 3)",
    )
    p.add_argument(
        "--builder",
        choices=("library", "bench"),
        default=None,
        help="library: tfp_glow.Glow; bench: digits_variants.build_glow "
        "(default: library unless a feature needs bench)",
    )
    p.add_argument("--jit", action="store_true", help="compile the train step with XLA")
    p.add_argument(
        "--check-builder",
        action="store_true",
        help="only check that --builder bench reproduces tfp_glow.Glow",
    )
    p.add_argument(
        "--out", default=None, help="JSON output path; with several seeds it must contain {seed}"
    )
    args = p.parse_args(argv)
    if args.out and len(args.seed) > 1 and "{seed}" not in args.out:
        p.error(f"--out must contain {{seed}} with several seeds (--seed {args.seed})")
    # The library's defaults, exactly: `model.compile()` with no optimizer.
    args.compile_default = (
        args.preset == "default"
        and all(getattr(args, key) is None for key in PRESETS["default"])
        and not args.weight_decay
    )
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("coupling", "last_kernel"):  # one value: every level
        value = getattr(args, key)
        setattr(args, key, value[0] if len(value) == 1 else value)
    # The library builds one coupling and one last kernel for every level.
    needs_bench = isinstance(args.coupling, tuple) or isinstance(args.last_kernel, tuple)
    if args.builder is None:
        args.builder = "bench" if needs_bench else "library"
    if args.builder == "library" and needs_bench:
        p.error("per-level --coupling/--last-kernel need --builder bench")
    if args.builder == "bench":  # digits_variants: no library defaults to inherit
        if args.dequantization == "variational":
            p.error("--dequantization variational needs --builder library")
        args.dequantization = "uniform"
        args.dropout = args.dropout or 0.0
    return args


def _dequantizer_kwargs(args):
    given = {"hidden_channels": args.deq_width, "num_steps": args.deq_steps}
    return {k: v for k, v in given.items() if v is not None} or None


CONTEXT_SHAPE = (4, 4, 1)


def downsampled(levels):
    """The 4x4 context of 8x8 levels: the mean of each 2x2 block's bin centres,
    `(k + 1/2) / 17 - 1/2`. From the integer levels, never from the noisy `x`:
    a context computed from `x` itself would pin `x` to a 48-dimensional plane
    given the context, and its "density" would be unbounded."""
    centres = (levels + 0.5) / stream.NUM_BINS - 0.5
    n = centres.shape[0]
    return centres.reshape(n, 4, 2, 4, 2, 1).mean(axis=(2, 4)).astype(np.float32)


def epoch_contexts(train, epoch):
    """The contexts of `stream.epoch_batches(train, epoch)`, in its order (the
    epoch's `RandomState(1000 + epoch)` draws the permutation first)."""
    perm = np.random.RandomState(1000 + epoch).permutation(len(train))
    return downsampled(train)[perm[: stream.STEPS_PER_EPOCH * stream.BATCH]]


def build(args):
    """`(model, switch)`; `switch` turns dropout on while fitting (None without it)."""
    import digits_variants as variants
    import keras

    import tfp_glow

    keras.utils.set_random_seed(args.seed)
    if args.builder == "library":
        options = {
            "affine": None,
            "spline": {"num_bins": args.spline_bins, "tail_bound": args.tail_bound},
            "mol": {"num_components": args.mol_components},
        }[args.coupling]
        model = tfp_glow.Glow(
            image_shape=(8, 8, 1),
            levels=2,
            steps_per_level=8,
            hidden_channels=args.width,
            num_bins=stream.NUM_BINS,
            seed=args.seed,
            coupling=args.coupling,
            coupling_kwargs=options,
            last_kernel=args.last_kernel,
            dropout=args.dropout,
            dequantization=args.dequantization,
            dequantizer_kwargs=_dequantizer_kwargs(args),
            context_shape=CONTEXT_SHAPE if args.context == "downsample" else None,
        )
        return model, None
    if args.context != "none":
        raise SystemExit("--context needs the library builder")
    return variants.build_model(
        num_bins=stream.NUM_BINS,
        coupling=args.coupling,
        width=args.width,
        seed=args.seed,
        dropout=args.dropout,
        spline_bins=args.spline_bins,
        mol_components=args.mol_components,
        last_kernel=args.last_kernel,
        tail_bound=args.tail_bound,
    )


def make_optimizer(args, model, total_steps):
    """The run's optimizer; None for the library's `model.compile()` default."""
    import digits_variants as variants
    import keras

    from tfp_glow.training import WarmupSchedule, recommended_optimizer

    if args.compile_default and args.builder == "library":
        return None  # `model.compile()` picks `recommended_optimizer()`
    decay_steps = None
    if args.lr_decay == "cosine":
        decay_steps = max(total_steps - args.warmup_steps, 1)
    if args.builder == "library" and not args.decay_alpha:
        return recommended_optimizer(
            decay_steps,
            learning_rate=args.lr,
            warmup_steps=args.warmup_steps,
            ema_momentum=args.ema or None,
            weight_decay=args.weight_decay,
            model=model,
        )
    lr = WarmupSchedule(
        args.lr, warmup_steps=args.warmup_steps, decay_steps=decay_steps, alpha=args.decay_alpha
    )
    ema = dict(use_ema=True, ema_momentum=args.ema) if args.ema else {}
    if args.weight_decay:
        opt = keras.optimizers.AdamW(lr, weight_decay=args.weight_decay, **ema)
        decayed = {id(v) for v in variants.coupling_net_variables(model)}
        opt.exclude_from_weight_decay(
            var_list=[v for v in model.trainable_variables if id(v) not in decayed]
        )
        return opt
    return keras.optimizers.Adam(lr, **ema)


class StepTimer:
    """Keras callback: wall time of each train step (batch begin to batch end)."""

    def __new__(cls):
        import keras

        class _Timer(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.times, self._t0 = [], None

            def on_train_batch_begin(self, batch, logs=None):
                self._t0 = time.perf_counter()

            def on_train_batch_end(self, batch, logs=None):
                self.times.append(time.perf_counter() - self._t0)

        return _Timer()


def _loadavg():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def check_builder(args):
    """`--builder bench` with affine, no dropout == tfp_glow.Glow, same seeds."""
    import tensorflow as tf

    levels = stream.load_levels()
    train, _ = stream.split(levels, args.split_seed)
    x0 = tf.constant(stream.init_batch(train))
    out, weights = {}, {}
    for builder in ("library", "bench"):
        a = argparse.Namespace(
            **{
                **vars(args),
                "builder": builder,
                "coupling": "affine",
                "dropout": 0.0,
                "dequantization": "uniform",
                "last_kernel": 3,
                "width": 64,
            }
        )
        model, _ = build(a)
        model.initialize(x0)
        import digits_variants as variants

        out[builder] = dict(
            params=variants.count_params(model), log_prob=model.log_prob(x0[:8]).numpy().tolist()
        )
        weights[builder] = [v.numpy() for v in model.trainable_variables]
    diff = float(np.max(np.abs(np.subtract(out["library"]["log_prob"], out["bench"]["log_prob"]))))
    out["max_abs_log_prob_diff"] = diff
    # Equal initial weights, variable by variable (the conv kernels do not show
    # in log_prob at init: every last layer is zero).
    same = len(weights["library"]) == len(weights["bench"]) and all(
        a.shape == b.shape and np.array_equal(a, b)
        for a, b in zip(weights["library"], weights["bench"])
    )
    out["identical_initial_weights"] = bool(same)
    print(json.dumps(out, indent=1))
    return out


def run(args, partial_path=None):
    """Trains and evaluates; writes the result so far to `partial_path` at each curve point."""
    import digits_variants as variants
    import keras
    import tensorflow as tf

    import tfp_glow

    t_start = time.perf_counter()
    load_start = _loadavg()
    levels = stream.load_levels()
    train, test = stream.split(levels, args.split_seed)
    x_init = tf.constant(stream.init_batch(train))
    x_test = tf.constant(stream.test_draws(test).reshape((-1, 8, 8, 1)))
    x_train_eval = tf.constant(stream.train_draw(train))
    conditional = args.context == "downsample"
    if conditional:  # the init batch's images: RandomState(999)'s first permutation
        c_init = downsampled(train[np.random.RandomState(999).permutation(len(train))[:256]])
        c_test = tf.constant(np.tile(downsampled(test), (stream.TEST_DRAWS, 1, 1, 1)))
        c_train_eval = tf.constant(downsampled(train))
    else:
        c_init = c_test = c_train_eval = None

    model, switch = build(args)
    params = variants.count_params(model)
    # What the library's defaults resolved to (dropout, dequantization, ...).
    model_config = (
        json.loads(json.dumps(model.get_config(), default=str))
        if args.builder == "library"
        else None
    )
    if abs(params - TARGET_PARAMS) > 0.1 * TARGET_PARAMS:
        raise SystemExit(f"{params} trainable parameters: outside 150k +-10%")
    model.initialize(x_init, c_init)
    total_steps = stream.STEPS_PER_EPOCH * args.epochs
    model.compile(make_optimizer(args, model, total_steps), jit_compile=args.jit)
    opt = model.optimizer

    # With variational dequantization the reported figure is the bound
    # `log p(x_q) - log q(u | k)`, its noise read off the protocol's own draws.
    variational = getattr(model, "dequantizer", None) is not None
    log_prob = tf.function(
        lambda x, c: model.variational_log_prob(x, c) if variational else model.log_prob(x, c)
    )
    uniform_log_prob = tf.function(lambda x, c: model.log_prob(x, c))

    def test_bpd(fn=log_prob):
        per_draw = -tf.reshape(fn(x_test, c_test), [stream.TEST_DRAWS, -1])
        nll = tf.reduce_mean(per_draw, axis=1).numpy()
        return float(np.mean([stream.bits_per_dim(v) for v in nll])), [
            stream.bits_per_dim(float(v)) for v in nll
        ]

    def train_bpd():
        return stream.bits_per_dim(float(-tf.reduce_mean(log_prob(x_train_eval, c_train_eval))))

    def evaluate(epoch):
        """The curve point: the averaged weights' figures (the raw ones beside)."""
        point = {"epoch": epoch}
        raw = test_bpd()[0]
        with variants.EMASwap(opt):
            point["test_bpd"], draws = test_bpd()
            if variational:
                point["test_bpd_uniform"] = test_bpd(uniform_log_prob)[0]
        if args.ema:
            point["test_bpd_raw_weights"] = raw
        return point, draws

    timer = StepTimer()
    curve, fit_bpd, draws = [], [], None
    curve_epochs = [e for e in stream.CURVE_EPOCHS if e <= args.epochs]
    if args.epochs not in curve_epochs:
        curve_epochs.append(args.epochs)

    def summary(train_final, complete):
        steps = np.array(timer.times[stream.STEPS_PER_EPOCH :]) * 1e3
        finite = [c for c in curve if math.isfinite(c["test_bpd"])]
        best = min(finite, key=lambda c: c["test_bpd"]) if finite else None
        result = {
            "protocol": "digits-protocol.md",
            "split_seed": args.split_seed,
            "seed": args.seed,
            "epochs": args.epochs,
            "steps": len(timer.times),
            "complete": complete,
            "config": {k: v for k, v in vars(args).items() if k not in ("out", "check_builder")},
            "training": "one FlowModel.fit call, 23 batches per epoch in the stream's order",
            "params": params,
            "model_config": model_config,
            "library": {
                "file": tfp_glow.__file__,
                "snapshot": os.environ.get("DIGITS_LIBRARY_SNAPSHOT"),
            },
            "test_bpd": curve[-1]["test_bpd"],
            "test_bpd_draws": draws,
            "best_test_bpd": best["test_bpd"] if best else None,
            "best_epoch": best["epoch"] if best else None,
            "train_bpd": train_final,
            "train_step_ms_mean": float(steps.mean()) if steps.size else None,
            "train_step_ms_median": float(np.median(steps)) if steps.size else None,
            "curve": curve,
            "fit_train_bpd_per_epoch": fit_bpd,
            "nonfinite_steps": model.nonfinite_steps,
            "wall_s": time.perf_counter() - t_start,
            "loadavg_start": load_start,
            "loadavg_end": _loadavg(),
        }
        if args.ema:
            result["test_bpd_raw_weights"] = curve[-1]["test_bpd_raw_weights"]
        if variational:
            # The same model's density of the uniformly dequantized test draws.
            result["test_bpd_uniform"] = curve[-1]["test_bpd_uniform"]
        return result

    class Curve(keras.callbacks.Callback):
        """Test bits/dim at the curve's epochs, inside the one `fit` call."""

        def on_epoch_end(self, epoch, logs=None):
            nonlocal draws
            fit_bpd.append(float(logs["bits_per_dim"]))
            if epoch + 1 not in curve_epochs:
                return
            point, draws = evaluate(epoch + 1)
            curve.append(point)
            print(
                f"epoch {epoch + 1}: test {point['test_bpd']:.4f}"
                + (f" (raw {point['test_bpd_raw_weights']:.4f})" if args.ema else "")
                + (f" (uniform {point['test_bpd_uniform']:.4f})" if variational else "")
                + f" fit-train {fit_bpd[-1]:.4f}",
                flush=True,
            )
            if partial_path and epoch + 1 < args.epochs:
                _write(partial_path, summary(None, complete=False))

    # One `fit` over the protocol's stream, epoch after epoch, as a user calls
    # it (Keras' Polyak averaging copies the average into the weights when
    # `fit` ends, so a `fit` per epoch would restart each epoch from it).
    stream_x = np.concatenate([stream.epoch_batches(train, e) for e in range(args.epochs)])
    pairs = stream_x.astype(np.float32)
    if conditional:
        pairs = (pairs, np.concatenate([epoch_contexts(train, e) for e in range(args.epochs)]))
    batches = tf.data.Dataset.from_tensor_slices(pairs).batch(stream.BATCH)
    with switch.on() if switch is not None and args.dropout else contextlib.nullcontext():
        model.fit(
            batches,
            epochs=args.epochs,
            steps_per_epoch=stream.STEPS_PER_EPOCH,
            shuffle=False,
            verbose=0,
            callbacks=[timer, Curve()],
        )
    with variants.EMASwap(opt):
        train_final = train_bpd()
    if partial_path and os.path.exists(partial_path):
        os.remove(partial_path)
    return summary(train_final, complete=True)


def _write(path, result):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(json.dumps(result, indent=1) + "\n")


def _mean(values):
    return sum(values) / len(values)


def print_summary(results):
    """Ours beside the protocol's anchors: end and best test bits/dim per seed."""
    seeds = [r["seed"] for r in results]
    print(
        f"\nDigits protocol, split seed {results[0]['split_seed']}, "
        f"{results[0]['epochs']} epochs; init seeds {' / '.join(map(str, seeds))}"
    )
    print("| model | params | test bpd at the end | mean | best on the curve | mean | train step |")
    print("|---|---|---|---|---|---|---|")
    for name, anchor in ANCHORS.items():
        print(
            f"| {name} (protocol anchor) | {anchor['params']:,} | "
            f"{' / '.join(f'{v:.3f}' for v in anchor['end'])} | {_mean(anchor['end']):.3f} "
            f"| {' / '.join(f'{v:.3f}' for v in anchor['best'])} "
            f"| {_mean(anchor['best']):.3f} | {anchor['step']} |"
        )
    end = [r["test_bpd"] for r in results]
    best = [r["best_test_bpd"] for r in results]
    # (1-epoch runs have no step time: the first epoch traces.)
    steps = " / ".join(
        "-" if r["train_step_ms_mean"] is None else f"{r['train_step_ms_mean']:.0f}"
        for r in results
    )
    ends = " / ".join(f"{v:.3f}" for v in end)
    bests = " / ".join(f"{v:.3f} ({r['best_epoch']})" for v, r in zip(best, results))
    print(
        f"| tfp_glow ({results[0]['config']['preset']} preset) | {results[0]['params']:,} "
        f"| {ends} | {_mean(end):.3f} | {bests} | {_mean(best):.3f} | {steps} ms |"
    )


def main(argv=None):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = parse_args(argv)
    if args.check_builder:
        check_builder(argparse.Namespace(**{**vars(args), "seed": args.seed[0]}))
        return
    results = []
    for seed in args.seed:
        one = argparse.Namespace(**{**vars(args), "seed": seed})
        out = args.out.format(seed=seed) if args.out else None
        partial = None if not out else os.path.splitext(out)[0] + ".partial.json"
        result = run(one, partial)
        if out:
            _write(out, result)
        print(
            json.dumps(
                {
                    k: result[k]
                    for k in (
                        "seed",
                        "params",
                        "test_bpd",
                        "best_test_bpd",
                        "best_epoch",
                        "train_bpd",
                        "train_step_ms_mean",
                        "wall_s",
                    )
                }
            ),
            flush=True,
        )
        results.append(result)
    print_summary(results)


if __name__ == "__main__":
    main()
