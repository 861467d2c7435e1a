"""NICE on the built-in 8x8 digits: additive couplings on the flattened image.

    python examples/nice_digits.py --output out/nice_digits
    python examples/nice_digits.py --smoke

NICE (Dinh et al. 2014) has a volume-preserving body (additive couplings,
log-det 0) and one learned diagonal scaling; it is a fully connected flow, so
it ignores the image structure that Glow's convolutions use. Compare the test
bits/dim it prints with `examples/digits_glow.py`. Writes `samples.png` and
`temperature_sweep.png`.
"""

import argparse
import os

import keras
import numpy as np

import tfp_glow
from tfp_glow import data
from tfp_glow.training import WarmupSchedule


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="out/nice_digits")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny, seconds-long run")
    args = parser.parse_args(argv)
    os.makedirs(args.output, exist_ok=True)
    keras.utils.set_random_seed(args.seed)
    bins = data.DIGITS_NUM_BINS

    model = tfp_glow.NICE(
        input_shape=(8, 8, 1),
        coupling_layers=4,
        hidden_units=32 if args.smoke else 256,
        num_hidden_layers=1 if args.smoke else 3,
        num_bins=bins,
    )
    train = data.digits_dataset("train", batch_size=64, seed=args.seed)
    test = data.digits_dataset("test", batch_size=360, shuffle=False)
    model.compile(keras.optimizers.Adam(WarmupSchedule(1e-3, warmup_steps=100)))
    if args.smoke:
        model.fit(train.repeat(), epochs=1, steps_per_epoch=3, verbose=2)
    else:
        model.fit(train, epochs=args.epochs, validation_data=test, verbose=2)
    bpd = model.evaluate(test, verbose=0, return_dict=True)["bits_per_dim"]
    print(f"NICE test bits/dim: {bpd:.3f} ({model.count_params():,} parameters)")

    caption = f"NICE on digits, test {bpd:.3f} bits/dim"
    x = model.sample(64, temperature=0.7, seed=args.seed)
    tfp_glow.save_image_grid(
        x,
        os.path.join(args.output, "samples.png"),
        num_bins=bins,
        rows=8,
        upscale=4,
        title=f"{caption}, T = 0.7",
    )
    temperatures = (0.0, 0.25, 0.5, 0.7, 0.85, 1.0)
    rows = [model.sample(10, temperature=t, seed=args.seed) for t in temperatures]
    tfp_glow.save_image_grid(
        np.concatenate(rows),
        os.path.join(args.output, "temperature_sweep.png"),
        num_bins=bins,
        rows=len(temperatures),
        upscale=4,
        title=caption,
        row_labels=[f"T = {t:g}" for t in temperatures],
    )
    print(f"wrote samples.png and temperature_sweep.png to {args.output}")


if __name__ == "__main__":
    main()
