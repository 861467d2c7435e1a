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

Presets (`--preset`): `anchor` is the anchors' optimizer (Adam 1e-3,
constant); `cli` is `tfp-glow train`'s default (Adam, peak 3e-3, 100-step
linear warmup, cosine decay to 0 at the last step). Every feature has its
own switch. The library's `tfp_glow.Glow` (the default builder) takes one
coupling, last kernel and width for every level; `--builder bench` builds the
same Glow from the public bijectors (`digits_variants.py`), also with a
choice per level (and is what the earlier `spl6_*`, `mol5_*`, `mix_*` and
`do2_*` runs used).

    nice -n 10 python benchmarks/digits_protocol.py --preset cli --seed 0 \\
        --out benchmarks/results/digits/cli_s0.json
"""

import argparse
import json
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import digits_stream as stream  # noqa: E402

PRESETS = {
    "anchor": dict(lr=1e-3, warmup_steps=0, lr_decay="none"),
    "cli": dict(lr=3e-3, warmup_steps=100, lr_decay="cosine"),
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
    p.add_argument("--seed", type=int, default=0, help="model initialisation seed")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cli",
                   help="optimizer defaults; --lr/--warmup-steps/--lr-decay override")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--warmup-steps", type=int, default=None)
    p.add_argument("--lr-decay", choices=("cosine", "none"), default=None)
    p.add_argument("--decay-alpha", type=float, default=0.0,
                   help="cosine decay ends at alpha * lr")
    p.add_argument("--ema", type=float, default=0.0,
                   help="EMA momentum of the weights used for evaluation (0 = off)")
    p.add_argument("--dropout", type=float, default=0.0,
                   help="dropout rate in the coupling networks (0 = off)")
    p.add_argument("--weight-decay", type=float, default=0.0,
                   help="AdamW decoupled weight decay on the coupling networks (0 = off)")
    p.add_argument("--coupling", type=_per_level(str, ("affine", "spline", "mol")),
                   default=("affine",),
                   help="affine | spline | mol, or one per level: spline,affine")
    p.add_argument("--spline-bins", type=int, default=4)
    p.add_argument("--tail-bound", type=float, default=4.0)
    p.add_argument("--mol-components", type=int, default=4)
    p.add_argument("--last-kernel", type=_per_level(int), default=(3,),
                   help="kernel of the zero-initialised last conv of each coupling net "
                        "(or one per level: 1,3)")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--dequantization", choices=("uniform", "variational"), default="uniform",
                   help="variational: Glow(dequantization='variational'); test bits/dim is "
                        "then the variational bound, with the uniform figure beside it")
    p.add_argument("--deq-width", type=int, default=16,
                   help="hidden channels of the variational dequantizer")
    p.add_argument("--deq-steps", type=int, default=3,
                   help="coupling steps of the variational dequantizer")
    p.add_argument("--builder", choices=("library", "bench"), default=None,
                   help="library: tfp_glow.Glow; bench: digits_variants.build_glow "
                        "(default: library unless a feature needs bench)")
    p.add_argument("--jit", action="store_true", help="compile the train step with XLA")
    p.add_argument("--check-builder", action="store_true",
                   help="only check that --builder bench reproduces tfp_glow.Glow")
    p.add_argument("--out", default=None, help="JSON output path")
    args = p.parse_args(argv)
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
    if args.builder == "bench" and args.dequantization != "uniform":
        p.error("--dequantization variational needs --builder library")
    return args


def build(args):
    """`(model, switch)`; `switch` turns dropout on while fitting (None without it)."""
    import keras
    import tfp_glow
    import digits_variants as variants
    keras.utils.set_random_seed(args.seed)
    if args.builder == "library":
        options = {"affine": None,
                   "spline": {"num_bins": args.spline_bins, "tail_bound": args.tail_bound},
                   "mol": {"num_components": args.mol_components}}[args.coupling]
        model = tfp_glow.Glow(image_shape=(8, 8, 1), levels=2, steps_per_level=8,
                              hidden_channels=args.width, num_bins=stream.NUM_BINS,
                              seed=args.seed, coupling=args.coupling,
                              coupling_kwargs=options, last_kernel=args.last_kernel,
                              dropout=args.dropout, dequantization=args.dequantization,
                              dequantizer_kwargs=None if args.dequantization == "uniform"
                              else {"hidden_channels": args.deq_width,
                                    "num_steps": args.deq_steps})
        return model, None
    return variants.build_model(
        num_bins=stream.NUM_BINS, coupling=args.coupling, width=args.width, seed=args.seed,
        dropout=args.dropout, spline_bins=args.spline_bins,
        mol_components=args.mol_components, last_kernel=args.last_kernel,
        tail_bound=args.tail_bound)


def make_optimizer(args, model, total_steps):
    import keras
    from tfp_glow.training import WarmupSchedule
    import digits_variants as variants
    decay_steps = None
    if args.lr_decay == "cosine":
        decay_steps = max(total_steps - args.warmup_steps, 1)
    lr = args.lr
    if args.warmup_steps or decay_steps:
        lr = WarmupSchedule(args.lr, warmup_steps=args.warmup_steps,
                            decay_steps=decay_steps, alpha=args.decay_alpha)
    if args.weight_decay and not args.ema and args.builder == "library":
        # The library's option: AdamW decaying every network, no bijector parameter.
        from tfp_glow.training import adamw
        return adamw(model, lr, args.weight_decay)
    ema = dict(use_ema=True, ema_momentum=args.ema) if args.ema else {}
    cls = keras.optimizers.AdamW if args.weight_decay else keras.optimizers.Adam
    if args.ema:
        # Keras' `fit` ends by `finalize_variable_values`, which overwrites the
        # weights with their EMA: with one `fit` per epoch that would restart
        # training from the average every epoch. Evaluation swaps the EMA in
        # itself (`EMASwap`), so the raw weights keep training.
        cls = type(cls.__name__ + "KeepRawWeights", (cls,),
                   {"finalize_variable_values": lambda self, var_list: None})
    if args.weight_decay:
        opt = cls(lr, weight_decay=args.weight_decay, **ema)
        decayed = {id(v) for v in variants.coupling_net_variables(model)}
        opt.exclude_from_weight_decay(
            var_list=[v for v in model.trainable_variables if id(v) not in decayed])
    else:
        opt = cls(lr, **ema)
    return opt


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
        a = argparse.Namespace(**{**vars(args), "builder": builder, "coupling": "affine",
                                  "dropout": 0.0, "last_kernel": 3, "width": 64})
        model, _ = build(a)
        model.initialize(x0)
        import digits_variants as variants
        out[builder] = dict(params=variants.count_params(model),
                            log_prob=model.log_prob(x0[:8]).numpy().tolist())
        weights[builder] = [v.numpy() for v in model.trainable_variables]
    diff = float(np.max(np.abs(np.subtract(out["library"]["log_prob"],
                                           out["bench"]["log_prob"]))))
    out["max_abs_log_prob_diff"] = diff
    # Equal initial weights, variable by variable (the conv kernels do not show
    # in log_prob at init: every last layer is zero).
    same = len(weights["library"]) == len(weights["bench"]) and all(
        a.shape == b.shape and np.array_equal(a, b)
        for a, b in zip(weights["library"], weights["bench"]))
    out["identical_initial_weights"] = bool(same)
    print(json.dumps(out, indent=1))
    return out


def run(args, partial_path=None):
    """Trains and evaluates; writes the result so far to `partial_path` at each curve point."""
    import tensorflow as tf
    import tfp_glow
    import digits_variants as variants
    t_start = time.perf_counter()
    load_start = _loadavg()
    levels = stream.load_levels()
    train, test = stream.split(levels, args.split_seed)
    x_init = tf.constant(stream.init_batch(train))
    x_test = tf.constant(stream.test_draws(test).reshape((-1, 8, 8, 1)))
    x_train_eval = tf.constant(stream.train_draw(train))

    model, switch = build(args)
    params = variants.count_params(model)
    if abs(params - TARGET_PARAMS) > 0.1 * TARGET_PARAMS:
        raise SystemExit(f"{params} trainable parameters: outside 150k +-10%")
    model.initialize(x_init)
    total_steps = stream.STEPS_PER_EPOCH * args.epochs
    opt = make_optimizer(args, model, total_steps)
    model.compile(opt, jit_compile=args.jit)

    # With variational dequantization the reported figure is the bound
    # `log p(x_q) - log q(u | k)`, its noise read off the protocol's own draws.
    variational = args.dequantization == "variational"
    log_prob = tf.function(lambda x: model.variational_log_prob(x) if variational
                           else model.log_prob(x))
    uniform_log_prob = tf.function(lambda x: model.log_prob(x))

    def test_bpd(fn=log_prob):
        per_draw = -tf.reshape(fn(x_test), [stream.TEST_DRAWS, -1])
        nll = tf.reduce_mean(per_draw, axis=1).numpy()
        return float(np.mean([stream.bits_per_dim(v) for v in nll])), \
            [stream.bits_per_dim(float(v)) for v in nll]

    def train_bpd():
        return stream.bits_per_dim(float(-tf.reduce_mean(log_prob(x_train_eval))))

    def evaluate():
        raw, _ = test_bpd()
        with variants.EMASwap(opt):
            bpd, draws = test_bpd()
        return bpd, draws, raw

    timer = StepTimer()
    curve, fit_bpd, draws = [], [], None
    curve_epochs = [e for e in stream.CURVE_EPOCHS if e <= args.epochs]
    if args.epochs not in curve_epochs:
        curve_epochs.append(args.epochs)

    def summary(train_final, complete):
        steps = np.array(timer.times[stream.STEPS_PER_EPOCH:]) * 1e3
        finite = [c for c in curve if math.isfinite(c["test_bpd"])]
        best = min(finite, key=lambda c: c["test_bpd"]) if finite else None
        result = {
            "protocol": "digits-protocol.md", "split_seed": args.split_seed,
            "seed": args.seed, "epochs": args.epochs, "steps": len(timer.times),
            "complete": complete,
            "config": {k: v for k, v in vars(args).items() if k not in ("out", "check_builder")},
            "training": "FlowModel.fit, one call per epoch on that epoch's 23 batches in order",
            "params": params,
            "library": {"file": tfp_glow.__file__,
                        "snapshot": os.environ.get("DIGITS_LIBRARY_SNAPSHOT")},
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
            "loadavg_start": load_start, "loadavg_end": _loadavg(),
        }
        if args.ema:
            result["test_bpd_raw_weights"] = curve[-1]["test_bpd_raw_weights"]
        if variational:
            # The same model's density of the uniformly dequantized test draws.
            result["test_bpd_uniform"] = curve[-1]["test_bpd_uniform"]
        return result

    for epoch in range(args.epochs):
        x_epoch = stream.epoch_batches(train, epoch)
        if switch is not None and args.dropout:
            with switch.on():
                hist = model.fit(x_epoch, batch_size=stream.BATCH, shuffle=False, epochs=1,
                                 verbose=0, callbacks=[timer])
        else:
            hist = model.fit(x_epoch, batch_size=stream.BATCH, shuffle=False, epochs=1,
                             verbose=0, callbacks=[timer])
        fit_bpd.append(float(hist.history["bits_per_dim"][-1]))
        if epoch + 1 in curve_epochs:
            bpd, draws, raw = evaluate()
            point = {"epoch": epoch + 1, "test_bpd": bpd}
            if variational:
                point["test_bpd_uniform"] = test_bpd(uniform_log_prob)[0]
            if args.ema:
                point["test_bpd_raw_weights"] = raw
            curve.append(point)
            print(f"epoch {epoch + 1}: test {bpd:.4f}"
                  + (f" (raw {raw:.4f})" if args.ema else "")
                  + (f" (uniform {point['test_bpd_uniform']:.4f})" if variational else "")
                  + f" fit-train {fit_bpd[-1]:.4f}", flush=True)
            if partial_path and epoch + 1 < args.epochs:
                _write(partial_path, summary(None, complete=False))
    with variants.EMASwap(opt):
        train_final = train_bpd()
    if partial_path and os.path.exists(partial_path):
        os.remove(partial_path)
    return summary(train_final, complete=True)


def _write(path, result):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(json.dumps(result, indent=1) + "\n")


def main(argv=None):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = parse_args(argv)
    if args.check_builder:
        check_builder(args)
        return
    partial = None if not args.out else os.path.splitext(args.out)[0] + ".partial.json"
    result = run(args, partial)
    if args.out:
        _write(args.out, result)
    print(json.dumps({k: result[k] for k in (
        "params", "test_bpd", "best_test_bpd", "best_epoch", "train_bpd",
        "train_step_ms_mean", "wall_s")}))


if __name__ == "__main__":
    main()
