"""How many samples of a trained digits Glow are not finite (inf / NaN)?

Sampling runs the flow in the inverse direction, where an affine coupling
divides by its scale `s`: with openai/glow's `s = sigmoid(r + 2)` (no lower
bound) a base draw that drives `r` very negative overflows. `AffineCoupling`
bounds `s` below by `min_scale`; this benchmark counts what still overflows.

It loads `model.keras` from a `tfp-glow train` run directory (`--run`,
default the default run of `tfp-glow train`, `runs/digits-glow`), training
one there first with `tfp-glow train --output RUN [--epochs N]` if the run
has no model, then draws `--num` samples at temperature `--temperature` in
batches of `--batch` (seeds `seed, seed + 1, ...`, so a count reproduces)
and prints one JSON object:

    nonfinite_values   elements that are inf or NaN, over num * 64 values
    nonfinite_samples  samples with at least one such element
    max_abs_finite     largest |x| among the finite samples
    samples_abs_gt_10  finite samples with some |x| > 10 (data lie in [-0.5, 0.5])

    nice -n 10 python benchmarks/nonfinite_samples.py --run runs/digits-glow
"""

import argparse
import os
import subprocess
import sys
import time

import numpy as np
import report  # benchmarks/, the script's own folder


def _train(run, epochs):
    cmd = [
        sys.executable,
        "-c",
        "from tfp_glow.cli import main; main()",
        "train",
        "--output",
        run,
        "--no-export",
        "--verbose",
        "2",
    ]
    if epochs is not None:
        cmd += ["--epochs", str(epochs)]
    print("training:", " ".join(cmd[3:]), file=sys.stderr)
    subprocess.run(cmd, check=True)


def _min_scales(model):
    """The `min_scale` of every affine coupling (None where the class has none)."""
    from tfp_glow.bijectors import AffineCoupling

    found = [m for m in model.bijector.submodules if isinstance(m, AffineCoupling)]
    return sorted({getattr(m, "min_scale", None) for m in found}, key=str), len(found)


def count_nonfinite(model, num, batch, temperature, seed):
    values = samples = big = 0
    max_abs = 0.0
    for i, start in enumerate(range(0, num, batch)):
        n = min(batch, num - start)
        x = np.asarray(model.sample(n, temperature=temperature, seed=seed + i))
        finite = np.isfinite(x)
        values += int(x.size - finite.sum())
        per_sample = finite.reshape(n, -1).all(axis=1)
        samples += int(n - per_sample.sum())
        good = np.abs(x.reshape(n, -1)[per_sample])
        if good.size:
            max_abs = max(max_abs, float(good.max()))
            big += int((good.max(axis=1) > 10.0).sum())
    return dict(
        nonfinite_values=values,
        nonfinite_samples=samples,
        max_abs_finite=max_abs,
        samples_abs_gt_10=big,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--run",
        default=os.path.join("runs", "digits-glow"),
        help="tfp-glow train run directory (default runs/digits-glow)",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="epochs if the run must be trained first (default: the CLI's)",
    )
    parser.add_argument("--num", type=int, default=1_000_000, help="samples (default 1e6)")
    parser.add_argument("--batch", type=int, default=10_000, help="samples per call")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    for name in ("num", "batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")

    import keras
    import tensorflow as tf

    import tfp_glow  # noqa: F401  (registers the classes load_model needs)

    path = os.path.join(args.run, "model.keras")
    if not os.path.exists(path):
        _train(args.run, args.epochs)
    model = keras.saving.load_model(path, compile=False)
    min_scales, couplings = _min_scales(model)
    t0 = time.perf_counter()
    result = count_nonfinite(model, args.num, args.batch, args.temperature, args.seed)
    result.update(
        run=os.path.abspath(args.run),
        num_samples=args.num,
        values_per_sample=int(np.prod(model.event_shape)),
        temperature=args.temperature,
        seed=args.seed,
        affine_couplings=couplings,
        min_scale=min_scales,
        seconds=round(time.perf_counter() - t0, 1),
        tensorflow=tf.__version__,
        cpu_count=os.cpu_count(),
        load_average=[round(x, 2) for x in os.getloadavg()],
    )
    report.print_and_write(result, args.out)


if __name__ == "__main__":
    main()
