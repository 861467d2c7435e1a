"""KL(p || q) of flows fitted to 2-D toy densities whose log p is known exactly.

Samples of `p` come from `tfp_glow.data.toy_density` (FFJORD's generators,
standardised); their exact log densities are written out below. A flow `q`
is fitted by maximum likelihood on fresh draws of `p`, then

    KL(p || q) = E_p[log p(x) - log q(x)]  ~  mean over N = 100,000 draws of p

(independent of the training draws), reported with its standard error
`std / sqrt(N)`. Flows: `realnvp` is `tfp_glow.RealNVP(input_shape=(2,))`
(affine couplings with MLPs, ActNorm between them); `spline` is the same
stack with `RationalQuadraticSplineCoupling` and a learned 2x2 LU linear map
after each coupling.

    nice -n 10 python benchmarks/toy_kl.py --density 8gaussians --flow realnvp
"""

import argparse
import math
import os
import time

import numpy as np

import report  # benchmarks/, the script's own folder

DENSITIES = ("8gaussians", "checkerboard")

# --------------------------------------------------------------- exact log p

# 8 Gaussians: x = (c_j + 0.5 eps) / (sqrt(2) sqrt(4.125)), c_j = 4 (cos a_j, sin a_j),
# a_j = j pi / 4, j uniform on 0..7, eps ~ N(0, I): an equal mixture of 8
# isotropic Gaussians with means c_j / (sqrt 2 sqrt 4.125) and std 0.5 / (sqrt 2 sqrt 4.125).
_G_SCALE = math.sqrt(2.0) * math.sqrt(4.125)
_G_SIGMA = 0.5 / _G_SCALE
_G_MEANS = 4.0 * np.stack([np.cos(np.arange(8) * np.pi / 4),
                           np.sin(np.arange(8) * np.pi / 4)], axis=1) / _G_SCALE

# Checkerboard: (x1, x2) raw uniform on the cells of [-2, 2)^2 where
# floor(x1) + floor(x2) is even (area 8, density 1/8), scaled by sqrt(3) / 2:
# density 1/8 / (3/4) = 1/6 on the scaled cells, 0 elsewhere.
_C_SCALE = 2.0 / (4.0 / math.sqrt(3.0))


def log_p_8gaussians(x):
    d2 = ((x[:, None, :] - _G_MEANS[None]) ** 2).sum(-1)
    log_comp = -d2 / (2 * _G_SIGMA ** 2) - math.log(2 * math.pi * _G_SIGMA ** 2) - math.log(8)
    m = log_comp.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(log_comp - m).sum(axis=1, keepdims=True)))[:, 0]


def log_p_checkerboard(x):
    raw = x / _C_SCALE
    inside = np.all((raw >= -2.0) & (raw < 2.0), axis=1)
    even = (np.floor(raw[:, 0]) + np.floor(raw[:, 1])) % 2 == 0
    return np.where(inside & even, -math.log(6.0), -np.inf)


LOG_P = {"8gaussians": log_p_8gaussians, "checkerboard": log_p_checkerboard}


def check_log_p(name, grid=1200, extent=3.0):
    """Integral of exp(log p) on a grid (should be 1) and log p finite on samples."""
    from tfp_glow.data import toy_density
    t = np.linspace(-extent, extent, grid)
    cell = (t[1] - t[0]) ** 2
    xx = np.stack(np.meshgrid(t, t), -1).reshape(-1, 2)
    integral = float(np.exp(LOG_P[name](xx)).sum() * cell)
    samples = toy_density(name, 20_000, seed=123).astype(np.float64)
    finite = float(np.isfinite(LOG_P[name](samples)).mean())
    return {"integral_on_grid": integral, "fraction_of_samples_in_support": finite}


# --------------------------------------------------------------------- flows

def build_flow(kind, layers, hidden, bins, tail_bound):
    import tfp_glow
    import tensorflow_probability as tfp
    from tfp_glow import FlowModel, nets
    from tfp_glow.bijectors import ActNorm, InvertibleConv1x1, MultiScaleFlow
    from tfp_glow.bijectors.spline_coupling import RationalQuadraticSplineCoupling
    if kind == "realnvp":
        return tfp_glow.RealNVP(input_shape=(2,), coupling_layers=layers,
                                hidden_channels=hidden, num_bins=None)
    steps = []
    per = RationalQuadraticSplineCoupling.outputs_per_channel(bins)
    for i in range(layers):
        steps += [RationalQuadraticSplineCoupling(
                      nets.MLPCouplingNet(hidden, per, num_hidden_layers=2), num_bins=bins,
                      tail_bound=tail_bound, parity=i % 2, event_shape=(2,)),
                  InvertibleConv1x1(2, event_ndims=1, seed=i),
                  ActNorm(2, event_ndims=1)]
    chain = tfp.bijectors.Chain(list(reversed(steps)))
    return FlowModel(MultiScaleFlow((2,), [(chain, None)]), event_shape=(2,), num_bins=None)


def run(args):
    import keras
    import tensorflow as tf
    from tfp_glow.data import toy_density
    from tfp_glow.training import WarmupSchedule
    t0 = time.perf_counter()
    load_start = os.getloadavg()
    keras.utils.set_random_seed(args.seed)
    model = build_flow(args.flow, args.layers, args.hidden, args.bins, args.tail_bound)
    train = toy_density(args.density, args.train_samples, seed=(args.seed, 1))
    model.initialize(train[:4096])
    steps_per_epoch = args.train_samples // args.batch
    total = steps_per_epoch * args.epochs
    schedule = WarmupSchedule(args.lr, warmup_steps=min(200, total // 10),
                              decay_steps=max(total - min(200, total // 10), 1))
    model.compile(keras.optimizers.Adam(schedule))
    hist = model.fit(train, batch_size=args.batch, epochs=args.epochs, shuffle=True,
                     verbose=0)
    x = toy_density(args.density, args.eval_samples, seed=(args.seed, 2))
    log_q = np.concatenate([model.log_prob(tf.constant(c)).numpy()
                            for c in np.array_split(x, 10)]).astype(np.float64)
    log_p = LOG_P[args.density](x.astype(np.float64))
    if not np.all(np.isfinite(log_p)):
        raise SystemExit("a draw of p has log p = -inf: the exact density is wrong")
    diff = log_p - log_q
    return {
        "density": args.density, "flow": args.flow, "layers": args.layers,
        "hidden": args.hidden, "bins": args.bins if args.flow == "spline" else None,
        "params": int(sum(int(np.prod(v.shape)) for v in model.trainable_variables)),
        "epochs": args.epochs, "batch": args.batch, "lr": args.lr, "steps": total,
        "train_samples": args.train_samples, "eval_samples": args.eval_samples,
        "kl_nats": float(diff.mean()), "kl_standard_error": float(diff.std() / math.sqrt(
            len(diff))),
        "mean_log_p": float(log_p.mean()), "mean_log_q": float(log_q.mean()),
        "final_train_nll": float(hist.history["loss"][-1]),
        "wall_s": time.perf_counter() - t0, "loadavg_start": list(load_start),
        "loadavg_end": list(os.getloadavg()),
    }


def main(argv=None):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--density", choices=DENSITIES, default="8gaussians")
    p.add_argument("--flow", choices=("realnvp", "spline"), default="realnvp")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--bins", type=int, default=8)
    p.add_argument("--tail-bound", type=float, default=3.0)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--train-samples", type=int, default=100_000)
    p.add_argument("--eval-samples", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check-log-p", action="store_true",
                   help="only check the exact densities (grid integral, support)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.check_log_p:
        result = {name: check_log_p(name) for name in DENSITIES}
    else:
        result = run(args)
    report.print_and_write(result, args.out)


if __name__ == "__main__":
    main()
