"""Glow on the built-in 8x8 digits: samples, a temperature sweep, interpolations.

    python examples/digits_glow.py --output out/digits_glow      # a few minutes
    python examples/digits_glow.py --smoke                       # seconds (tests)

The same model as `tfp-glow train`, written against the library API:
`tfp_glow.Glow` trained with Keras `fit`, `sample(temperature=...)`,
`interpolate` in latent space, `bits_per_dim` on the test split, and
`save_image_grid` for the PNGs. (`tfp_glow.recipe.train` is the whole
recipe of `tfp-glow train` - checkpoints, resuming, history, metrics.json,
export - as one call.)
"""

import argparse
import os

import keras
import numpy as np

import tfp_glow
from tfp_glow import data

TEMPERATURES = (0.0, 0.25, 0.5, 0.7, 0.85, 1.0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="out/digits_glow")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny, seconds-long run")
    args = parser.parse_args(argv)
    os.makedirs(args.output, exist_ok=True)
    keras.utils.set_random_seed(args.seed)
    bins = data.DIGITS_NUM_BINS  # the digits have 17 grey levels

    # 2 levels x 8 steps of (ActNorm, LU 1x1 conv, affine coupling), width 64;
    # Glow's defaults add dropout 0.2 and variational dequantization.
    model = tfp_glow.Glow(
        image_shape=(8, 8, 1),
        levels=2,
        steps_per_level=2 if args.smoke else 8,
        hidden_channels=16 if args.smoke else 64,
        num_bins=bins,
    )
    train = data.digits_dataset("train", batch_size=64, seed=args.seed)
    test = data.digits_dataset("test", batch_size=360, shuffle=False)
    epochs = 1 if args.smoke else args.epochs
    steps = 3 if args.smoke else None
    # The recommended optimizer (`tfp-glow train`'s): Adam, warmup to 3e-3, then
    # constant, with Polyak averaging; `fit` ends with the averaged weights.
    model.compile()
    # fit initialises every ActNorm from the first batch, then trains on the
    # variational bound of -log P(x); validation sees the averaged weights.
    model.fit(
        train.repeat() if steps else train,
        epochs=epochs,
        steps_per_epoch=steps,
        validation_data=test,
        callbacks=[tfp_glow.WithAveragedWeights()],
        verbose=2,
    )
    result = model.evaluate(test, verbose=0, return_dict=True)
    print(
        f"test bits/dim: {result['bits_per_dim']:.3f} (variational bound; uniform "
        f"dequantization {result['uniform_bits_per_dim']:.3f})"
    )
    caption = f"Glow on digits, test {result['bits_per_dim']:.3f} bits/dim"

    # 1. Samples at openai/glow's picture temperature.
    x = model.sample(64, temperature=0.7, seed=args.seed)
    tfp_glow.save_image_grid(
        x,
        os.path.join(args.output, "samples.png"),
        num_bins=bins,
        rows=8,
        upscale=4,
        title=f"{caption}, T = 0.7",
    )

    # 2. Temperature sweep: one row per T, the same latents scaled by T.
    rows = [model.sample(10, temperature=t, seed=args.seed) for t in TEMPERATURES]
    tfp_glow.save_image_grid(
        np.concatenate(rows),
        os.path.join(args.output, "temperature_sweep.png"),
        num_bins=bins,
        rows=len(TEMPERATURES),
        upscale=4,
        title=caption,
        row_labels=[f"T = {t:g}" for t in TEMPERATURES],
    )

    # 3. Interpolation: decode (1 - t) f(a) + t f(b) between pairs of test digits.
    images = np.asarray(
        next(iter(data.digits_dataset("test", 360, dequantize=False, shuffle=False)))
    )
    rng = np.random.default_rng(args.seed)
    a, b = rng.choice(360, size=(2, 6), replace=False)
    path = model.interpolate(images[a], images[b], num_steps=8)
    # [steps, pairs, 8, 8, 1] -> one row per pair
    path = np.transpose(np.asarray(path), (1, 0, 2, 3, 4)).reshape(-1, 8, 8, 1)
    tfp_glow.save_image_grid(
        path,
        os.path.join(args.output, "interpolation.png"),
        num_bins=bins,
        rows=6,
        upscale=4,
        title="Glow: latent interpolation, t = 0 ... 1",
        row_labels=[f"pair {i + 1}" for i in range(6)],
    )
    print(f"wrote samples.png, temperature_sweep.png, interpolation.png to {args.output}")


if __name__ == "__main__":
    main()
