"""RealNVP on the two-moons density: the learned density as a heat map, and samples.

    python examples/two_moons_realnvp.py --output out/two_moons
    python examples/two_moons_realnvp.py --smoke     # seconds, used by the tests

Writes `density.png` (the data's histogram next to the learned density
`p(x) = N(f(x); 0, I) |det df/dx|` on a grid) and `samples.png` (data next to
samples). Plots use matplotlib when installed (`pip install -e ".[examples]"`),
Pillow otherwise.
"""

import argparse
import os

import _plots
import keras
import numpy as np

import tfp_glow
from tfp_glow import data
from tfp_glow.training import WarmupSchedule

EXTENT = 3.0  # the toy densities are standardised: most mass is in [-3, 3]^2


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="out/two_moons_realnvp")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny, seconds-long run")
    args = parser.parse_args(argv)
    os.makedirs(args.output, exist_ok=True)
    keras.utils.set_random_seed(args.seed)

    # A vector RealNVP: 8 affine couplings on alternating coordinates, ActNorm
    # between them. num_bins=None: continuous data, bits/dim is plain NLL in bits.
    model = tfp_glow.RealNVP(
        input_shape=(2,),
        coupling_layers=4 if args.smoke else 8,
        hidden_channels=16 if args.smoke else 64,
        num_bins=None,
    )
    train = data.make_dataset("two_moons", "train", batch_size=256, seed=args.seed)
    test = data.make_dataset("two_moons", "test", batch_size=1000, seed=args.seed, shuffle=False)
    epochs = 1 if args.smoke else args.epochs
    steps = 5 if args.smoke else int(train.cardinality())
    # Linear warmup, then cosine decay to 0 over the rest of the run.
    schedule = WarmupSchedule(2e-3, warmup_steps=100, decay_steps=max(epochs * steps - 100, 1))
    model.compile(keras.optimizers.Adam(schedule))
    model.fit(train, epochs=epochs, steps_per_epoch=steps, verbose=2)
    nll = model.evaluate(test, verbose=0, return_dict=True)["loss"]
    print(f"test NLL: {nll:.3f} nats per point")

    # Learned density on a grid (row 0 at the top, as an image).
    n = 64 if args.smoke else 200
    xs = np.linspace(-EXTENT, EXTENT, n, dtype=np.float32)
    gx, gy = np.meshgrid(xs, xs[::-1])
    grid = np.stack([gx.ravel(), gy.ravel()], axis=1)
    density = np.exp(model.log_prob(grid).numpy()).reshape(n, n)

    points = data.toy_density("two_moons", 20_000, seed=1)
    hist, _, _ = np.histogram2d(
        points[:, 1], points[:, 0], bins=n, range=[[-EXTENT, EXTENT], [-EXTENT, EXTENT]]
    )
    density_png = _plots.density_panels_png(
        [hist[::-1], density],
        ["data (histogram)", "RealNVP density"],
        os.path.join(args.output, "density.png"),
        EXTENT,
    )
    samples = model.sample(5000 if not args.smoke else 500, seed=args.seed).numpy()
    samples_png = _plots.scatter_png(
        [points[:5000], samples],
        ["data", "RealNVP samples"],
        os.path.join(args.output, "samples.png"),
        EXTENT,
    )
    print(f"wrote {density_png} and {samples_png}")


if __name__ == "__main__":
    main()
