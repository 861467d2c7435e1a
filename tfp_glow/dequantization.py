"""n_bits reduction and uniform dequantization, and the `tf.data` tail that
batches and dequantizes (`tfp_glow.data` builds its pipelines on these).

An image reduced to ``n_bins`` levels ``k in {0, ..., n_bins - 1}`` is fed to
a flow as ``x = (k + u) / n_bins - 0.5`` with ``u ~ U(0, 1)`` (or the bin
centre ``u = 1/2``), so ``x`` lies in ``[-0.5, 0.5]`` and a continuous
density ``p`` on ``x`` bounds the discrete likelihood:
``log P(k) >= E_u[log p(x)] - D log(n_bins)`` (D = pixels x channels).
"""

import numpy as np
import tensorflow as tf

from tfp_glow import checks

__all__ = [
    "EDGE_MARGIN",
    "SHUFFLE_BUFFER",
    "check_n_bits",
    "check_pipeline_args",
    "check_seed",
    "finish_pipeline",
    "low_resolution",
    "preprocess",
    "reduce_bits",
]

# Fraction of a bin kept clear at each edge by the dequantization noise:
# float32 rounding of (k + u) / n_bins - 0.5 is below 1e-5 of a bin for
# n_bins <= 256, so this margin guarantees floor((x + 0.5) * n_bins) == k.
# It narrows U(0, 1) to U(eps, 1 - eps), costing < 3e-4 bits/dim in the bound.
EDGE_MARGIN = 1e-4
SHUFFLE_BUFFER = 10_000  # examples held by a tfds pipeline's shuffle buffer


def check_seed(seed):
    """`seed` as a Python int or None (NumPy ints accepted, bools and floats refused)."""
    if seed is not None and not checks.is_int(seed):
        raise TypeError(
            f"`seed` must be an int or None; received {seed!r} (type {type(seed).__name__})."
        )
    return None if seed is None else int(seed)


def check_n_bits(n_bits):
    """`n_bits` as a Python int in 1..8 (bits kept of an 8-bit pixel)."""
    n_bits = checks.positive_int(n_bits, "n_bits")
    if n_bits > 8:
        raise ValueError(f"`n_bits` must be an int in 1..8; received {n_bits!r}.")
    return n_bits


def reduce_bits(images_uint8: tf.Tensor | np.ndarray, n_bits: int) -> tf.Tensor:
    """Reduces 8-bit pixels to ``n_bits``: ``k = floor(pixel / 2**(8 - n_bits))``.

    Args:
      images_uint8: integer tensor or array with values in ``0..255``.
      n_bits: int in ``1..8``; the result has ``2**n_bits`` levels.

    Returns:
      A `tf.uint8` tensor of levels in ``0..2**n_bits - 1``, same shape.
    """
    n_bits = check_n_bits(n_bits)
    images = tf.convert_to_tensor(images_uint8)
    _check_levels(
        "images_uint8", images, 256, "8-bit pixels (floats in [0, 1] would all floor to level 0)"
    )
    images = tf.cast(images, tf.int32)
    return tf.cast(images // (2 ** (8 - n_bits)), tf.uint8)


def _check_levels(arg, images, num_bins, what):
    """Eagerly: `images` holds integer values in ``0..num_bins - 1``.

    Inside `tf.data` maps and `tf.function` (graph mode) nothing is checked:
    the pipelines here produce valid levels by construction.
    """
    if not (images.dtype.is_integer or images.dtype.is_floating):
        raise TypeError(f"`{arg}` must be integer levels; got dtype {images.dtype.name}.")
    if not tf.executing_eagerly() or tf.size(images) == 0:
        return
    values = tf.cast(images, tf.float64)
    lo, hi = float(tf.reduce_min(values)), float(tf.reduce_max(values))
    integral = bool(tf.reduce_all(tf.equal(values, tf.floor(values))))
    if not (integral and lo >= 0 and hi <= num_bins - 1):
        raise ValueError(
            f"`{arg}` must hold integer levels in 0..{num_bins - 1} ({what}); got values "
            f"in [{lo:g}, {hi:g}]{'' if integral else ', not all integers'}."
        )


def _as_stateless_seed(seed):
    """Python int -> [seed, 0]; a length-2 tensor passes through (tf.data seeds)."""
    if checks.is_int(seed):
        return tf.constant([int(seed), 0], tf.int64)
    if isinstance(seed, (bool, np.bool_)):
        raise TypeError(
            f"`seed` must be None, an int or a shape-[2] integer tensor; received {seed!r}."
        )
    return tf.cast(seed, tf.int64)


def preprocess(
    images: tf.Tensor | np.ndarray,
    num_bins: int,
    dequantize: bool = True,
    seed: int | tf.Tensor | None = None,
) -> tf.Tensor:
    """Maps integer levels ``k`` to float32 model inputs in ``[-0.5, 0.5]``.

        dequantize=True:   x = (k + u) / num_bins - 0.5,  u ~ U(eps, 1 - eps)
        dequantize=False:  x = (k + 0.5) / num_bins - 0.5

    with ``eps = 1e-4`` keeping every ``x`` strictly inside its bin despite
    float32 rounding, so ``floor((x + 0.5) * num_bins) == k`` always holds.

    Args:
      images: integer (or integer-valued) tensor of levels ``0..num_bins - 1``.
      num_bins: number of levels, e.g. ``2**n_bits`` or `DIGITS_NUM_BINS`.
      dequantize: add uniform noise (training) or take the bin centre.
      seed: `None` (stateful RNG), a Python int, or a shape-[2] integer tensor;
        a seed makes the noise reproducible (stateless RNG), also in `tf.data`.

    Returns:
      float32 tensor shaped like `images`.
    """
    num_bins = checks.positive_int(num_bins, "num_bins")
    images = tf.convert_to_tensor(images)
    _check_levels(
        "images", images, num_bins, "8-bit pixels need `reduce_bits` first unless num_bins=256"
    )
    k = tf.cast(images, tf.float32)
    if not dequantize:
        u = 0.5
    else:
        shape = tf.shape(k)
        if seed is None:
            u = tf.random.uniform(shape, EDGE_MARGIN, 1.0 - EDGE_MARGIN)
        else:
            u = tf.random.stateless_uniform(
                shape, _as_stateless_seed(seed), EDGE_MARGIN, 1.0 - EDGE_MARGIN
            )
    # k / n - 0.5 first, then u / n: rounding stays at the scale of x, not of k.
    return (k / num_bins - 0.5) + u / num_bins


def low_resolution(images: tf.Tensor | np.ndarray, num_bins: int, factor: int = 2) -> tf.Tensor:
    """The noise-free low-resolution copy of integer images, in model space:
    the context of a super-resolution flow `p(x | low_resolution(k))`.

        c[i, j] = mean over the factor x factor block (i, j) of (k + 0.5) / num_bins - 0.5

    (the bin centres' block means), float32 `[N, H / factor, W / factor, C]`.
    Computed from the levels `k`, never from the dequantized `x`: given a
    context that is an exact function of `x` (such as the block means of `x`
    itself), `x` lies on a lower-dimensional plane and its conditional
    density is unbounded, so a flow's bits/dim would mean nothing.
    """
    factor = checks.positive_int(factor, "factor")
    centres = preprocess(images, num_bins, dequantize=False)
    if centres.shape.rank != 4:
        raise ValueError(f"`images` must have shape [N, H, W, C]; got {centres.shape}.")
    height, width = centres.shape[1], centres.shape[2]
    if height is not None and width is not None and (height % factor or width % factor):
        raise ValueError(
            f"`factor` must divide the image's height and width; got {factor} for {height}x{width}."
        )
    return tf.nn.avg_pool2d(centres, factor, factor, "VALID")


def finish_pipeline(
    ds,
    num_bins,
    batch_size,
    dequantize,
    shuffle,
    with_labels,
    seed,
    repeat,
    drop_remainder,
    shuffle_buffer,
    fresh_noise,
):
    """(levels, label) elements -> shuffled, batched, dequantized, prefetched.

    Dequantization noise comes from stateless seeds, in one of two ways:

    - ``fresh_noise=True`` (training): one seed per batch, drawn from a
      `tf.data.Dataset.random(seed)` stream re-randomised at every pass:
      reproducible for a given seed and batch size, new noise every epoch.
    - ``fresh_noise=False`` (evaluation): example ``i`` of the split (its
      index before any shuffling) always gets the noise of seed
      ``[seed, i]``, at every pass, at any batch size, in any process and
      whatever the global TensorFlow seed: a test figure is one number.
      This costs one small random op per example (about 0.1-0.2 ms of CPU
      each, measured on 2 loaded cores), so training keeps per-batch seeds.
    """
    if dequantize and not fresh_noise:
        # seed=None: one random salt per pipeline, still fixed across passes.
        salt = int(np.random.default_rng().integers(2**62)) if seed is None else seed
        ds = ds.enumerate().map(
            lambda i, xy: (
                preprocess(xy[0], num_bins, True, tf.stack([tf.constant(salt, tf.int64), i])),
                xy[1],
            ),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    if shuffle:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    if dequantize and fresh_noise:
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        ds = tf.data.Dataset.zip((ds, seeds)).map(
            lambda xy, s: (preprocess(xy[0], num_bins, True, s), xy[1]),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    elif not dequantize:
        ds = ds.map(
            lambda x, y: (preprocess(x, num_bins, False), y), num_parallel_calls=tf.data.AUTOTUNE
        )
    if not with_labels:
        ds = ds.map(lambda x, y: x)
    return ds.prefetch(tf.data.AUTOTUNE)


def check_pipeline_args(batch_size, seed, fresh_noise, shuffle):
    """Checks the common pipeline arguments; returns `fresh_noise` resolved."""
    checks.positive_int(batch_size, "batch_size")
    check_seed(seed)
    shuffle = checks.boolean(shuffle, "shuffle")
    if fresh_noise is None:
        return shuffle
    return checks.boolean(fresh_noise, "fresh_noise")
