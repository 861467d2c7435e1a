"""Super-resolution on the built-in digits: a Glow for p(x_8x8 | x_4x4).

    python examples/conditional_glow_digits.py --output out/conditional_glow
    python examples/conditional_glow_digits.py --smoke

The context of each 8x8 digit is its 4x4 low-resolution copy
(`tfp_glow.data.low_resolution`: the 2x2 block means of the bin centres,
computed from the integer levels, not from the noisy `x`). `Glow(...,
context_shape=(4, 4, 1))` concatenates the context, resized to each level's
resolution, onto every coupling network's input and into its priors; `fit`
takes `(x, context)` pairs and `sample(n, context=...)` draws digits that
agree with the low-resolution image. An unconditional Glow of the same size
trains beside it on the same data, so the two test bits/dim printed are
comparable (the conditional one must be lower: it is told a quarter of the
picture). Writes `conditional_samples.png`: per row, the context (enlarged),
the true digit, then samples at T = 0.7.
"""

import argparse
import os

import keras
import numpy as np
import tensorflow as tf

import tfp_glow
from tfp_glow import data

ROWS, SAMPLES_PER_ROW, TEMPERATURE = 8, 6, 0.7


def pairs(images, bins, batch_size, seed):
    """Training `(x, context)` batches: fresh dequantization noise every epoch."""
    context = data.low_resolution(images, bins).numpy()
    ds = tf.data.Dataset.from_tensor_slices((images, context))
    ds = ds.shuffle(len(images), seed=seed, reshuffle_each_iteration=True).batch(batch_size)
    return ds.map(lambda k, c: (data.preprocess(k, bins), c))


def block_means(x):
    """The 4x4 block means of model-space images (what the context shows)."""
    return tf.nn.avg_pool2d(x, 2, 2, "VALID").numpy()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="out/conditional_glow")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny, seconds-long run")
    args = parser.parse_args(argv)
    os.makedirs(args.output, exist_ok=True)
    bins = data.DIGITS_NUM_BINS

    train_images, _ = data.load_digits("train")
    test_images, _ = data.load_digits("test")
    x_test = data.preprocess(test_images, bins, seed=args.seed).numpy()
    c_test = data.low_resolution(test_images, bins).numpy()
    size = dict(
        levels=2, steps_per_level=2 if args.smoke else 8, hidden_channels=16 if args.smoke else 64
    )
    fit = dict(epochs=1, steps_per_epoch=3) if args.smoke else dict(epochs=args.epochs)

    figures = {}
    for name, context_shape in (("conditional", (4, 4, 1)), ("unconditional", None)):
        keras.utils.set_random_seed(args.seed)
        model = tfp_glow.Glow((8, 8, 1), num_bins=bins, context_shape=context_shape, **size)
        model.compile()
        train = pairs(train_images, bins, 64, args.seed)
        if context_shape is None:
            train = train.map(lambda x, c: x)
        model.fit(train.repeat() if args.smoke else train, verbose=2, **fit)
        bpd = model.bits_per_dim(x_test, c_test if context_shape else None)
        figures[name] = float(np.mean(bpd))
        print(
            f"{name} Glow: test {figures[name]:.3f} bits/dim ({model.count_params():,} parameters)"
        )
        if context_shape is not None:
            conditional = model

    # Samples for the first ROWS test contexts, SAMPLES_PER_ROW each.
    context = np.repeat(c_test[:ROWS], SAMPLES_PER_ROW, axis=0)
    samples = conditional.sample(
        len(context), temperature=TEMPERATURE, seed=args.seed, context=context
    ).numpy()
    # How well the samples agree with their context: the mean |block mean -
    # context| against their own context and against a shuffled one.
    own = np.abs(block_means(samples) - context).mean()
    other = np.abs(block_means(samples) - np.roll(context, SAMPLES_PER_ROW, axis=0)).mean()
    print(
        f"samples' 4x4 block means vs their context: {own:.4f} "
        f"(vs another digit's context: {other:.4f})"
    )

    enlarged = np.repeat(np.repeat(c_test[:ROWS], 2, axis=1), 2, axis=2)
    grid = np.concatenate(
        [enlarged[:, None], x_test[:ROWS, None], samples.reshape(ROWS, SAMPLES_PER_ROW, 8, 8, 1)],
        axis=1,
    )
    tfp_glow.save_image_grid(
        grid.reshape(-1, 8, 8, 1),
        os.path.join(args.output, "conditional_samples.png"),
        num_bins=bins,
        rows=ROWS,
        upscale=4,
        title=(
            f"p(x | 4x4): context, true digit, {SAMPLES_PER_ROW} samples at "
            f"T = {TEMPERATURE}; test {figures['conditional']:.3f} bits/dim "
            f"(unconditional {figures['unconditional']:.3f})"
        ),
    )
    print(f"wrote conditional_samples.png to {args.output}")


if __name__ == "__main__":
    main()
