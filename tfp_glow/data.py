"""Data pipelines: n_bits reduction, dequantization, built-in and tfds data sets.

Conventions follow openai/glow. An image is reduced to ``n_bins`` levels
``k in {0, ..., n_bins - 1}`` (``n_bins = 2**n_bits`` for 8-bit sources, 17
for the bundled 8x8 digits) and fed to a flow as

    x = (k + u) / n_bins - 0.5,   u ~ U(0, 1)   (uniform dequantization;
                                                 see `preprocess` for the edges)
    x = (k + 0.5) / n_bins - 0.5                 (bin centre, dequantize=False)

so ``x`` lies in ``[-0.5, 0.5]`` and ``floor((x + 0.5) * n_bins) == k``. A
continuous density ``p`` on ``x`` then bounds the discrete likelihood,
``log P(k) >= E_u[log p(x)] - D log(n_bins)`` (D = pixels x channels).

The noise of an evaluation pipeline (``shuffle=False``) is fixed per example,
so a test figure does not depend on the batch size; training pipelines draw
fresh noise every epoch (`tfp_glow.dequantization.finish_pipeline`).

Machines here are offline, so besides tensorflow-datasets pipelines this
module provides the scikit-learn 8x8 digits (bundled, 1,797 real images) and
2-D toy densities generated on the fly.

#### Examples

```python
from tfp_glow import data
ds = data.digits_dataset("train", batch_size=64)       # float32 [B, 8, 8, 1]
info = data.dataset_info("digits")                     # image_shape, num_bins, ...
ds = data.make_dataset("mnist", "train", 64, n_bits=5, data_dir="/data/tfds")
pts = data.toy_density("8gaussians", 1000)             # float32 [1000, 2]
```
"""

import functools
import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from tfp_glow import checks
from tfp_glow.dequantization import (
    SHUFFLE_BUFFER,
    check_n_bits,
    check_pipeline_args,
    finish_pipeline,
    low_resolution,
    preprocess,
    reduce_bits,
)

__all__ = [
    "DATASETS",
    "DIGITS_NUM_BINS",
    "DatasetNotAvailableError",
    "SHUFFLE_BUFFER",
    "TFDS_IMAGE_DATASETS",
    "TOY_DENSITIES",
    "dataset_info",
    "digits_dataset",
    "load_digits",
    "low_resolution",
    "make_dataset",
    "preprocess",
    "reduce_bits",
    "tfds_dataset",
    "toy_dataset",
    "toy_density",
]

DIGITS_NUM_BINS = 17  # scikit-learn digits hold integer levels 0..16
DIGITS_NUM_TRAIN = 1437  # of 1,797: a fixed 80/20 split
TFDS_IMAGE_DATASETS = ("mnist", "fashion_mnist", "cifar10", "svhn_cropped", "celeb_a")
TOY_DENSITIES = ("two_moons", "8gaussians", "checkerboard")
CELEB_A_CROP = 148  # openai/glow & RealNVP: central 148x148 crop, then resize


class DatasetNotAvailableError(FileNotFoundError):
    """A tensorflow-datasets data set is not prepared and may not be downloaded.

    Attributes: `name` (as given), `base_name` (without version or config),
    `data_dir` (the folder searched) and `path` (the folder that was missing).
    """

    def __init__(self, message: str, name: str | None = None, data_dir: str | None = None,
                 path: str | None = None) -> None:
        super().__init__(message)
        self.name, self.data_dir, self.path = name, data_dir, path
        self.base_name = None if name is None else _base_name(name)


# --------------------------------------------------------------------------
# Built-in digits (scikit-learn, bundled: no download).


@functools.lru_cache(maxsize=1)
def _digits_arrays():
    from sklearn import datasets as sk_datasets  # deferred: sklearn import is slow

    bunch = sk_datasets.load_digits()
    images = bunch.images.astype(np.uint8)[..., None]  # float 0..16 -> uint8
    labels = bunch.target.astype(np.int64)
    order = np.random.RandomState(0).permutation(len(images))
    return images[order], labels[order]


def load_digits(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """The scikit-learn 8x8 digits with a fixed train/test split.

    All 1,797 images are permuted by ``np.random.RandomState(0)``; the first
    1,437 are "train", the last 360 "test", "all" is the whole permutation.

    Returns:
      ``(images, labels)``: uint8 ``[N, 8, 8, 1]`` with levels ``0..16``
      (`DIGITS_NUM_BINS` = 17) and int64 ``[N]`` classes ``0..9``.
    """
    checks.choice(split, ("train", "test", "all"), "split")
    images, labels = _digits_arrays()
    part = {"train": slice(0, DIGITS_NUM_TRAIN), "test": slice(DIGITS_NUM_TRAIN, None),
            "all": slice(None)}[split]
    return images[part].copy(), labels[part].copy()


def digits_dataset(split: str = "train", batch_size: int = 64, dequantize: bool = True,
                   shuffle: bool = True, with_labels: bool = False, seed: int | None = 0,
                   repeat: bool = False, drop_remainder: bool = False,
                   fresh_noise: bool | None = None) -> tf.data.Dataset:
    """`tf.data` pipeline over `load_digits`: float32 ``[B, 8, 8, 1]`` batches.

    Values are ``preprocess(k, 17, dequantize)``, i.e. ``(k + u)/17 - 0.5``;
    with `with_labels` the elements are ``(image, label)`` with int64 labels.
    `fresh_noise` (default: the value of `shuffle`) draws new dequantization
    noise at every pass (training); otherwise every example keeps the noise
    of its stateless seed ``[seed, index]`` (evaluation: the same figure at
    any batch size). A training pipeline shuffles itself (Keras `fit` never
    reorders a `tf.data.Dataset`).
    """
    fresh_noise = check_pipeline_args(batch_size, seed, fresh_noise, shuffle)
    images, labels = load_digits(split)
    ds = tf.data.Dataset.from_tensor_slices((images, labels))
    return finish_pipeline(ds, DIGITS_NUM_BINS, batch_size, dequantize, shuffle,
                            with_labels, seed, repeat, drop_remainder,
                            shuffle_buffer=len(images), fresh_noise=fresh_noise)


# --------------------------------------------------------------------------
# tensorflow-datasets.


def _image_size_pair(image_size):
    if image_size is None:
        return None
    if checks.is_int(image_size):
        pair = (image_size, image_size)
    elif isinstance(image_size, (tuple, list)) and len(image_size) == 2:
        pair = tuple(image_size)
    else:
        pair = None
    if pair is None or not all(checks.is_int(v) and v > 0 for v in pair):
        raise ValueError(
            f"`image_size` must be None, a positive int or a (height, width) pair; "
            f"received {image_size!r}.")
    return tuple(int(v) for v in pair)


def _tfds_builder(name, data_dir=None):
    if not isinstance(name, str) or not name:
        raise ValueError(f"`name` must be a tensorflow-datasets name, got {name!r}.")
    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(
            f"`name`={name!r} is not a tensorflow-datasets data set "
            f"(built in here: {sorted(DATASETS)}).") from e


def _image_spec(builder, name, image_size):
    """(image shape after crop/resize, num_classes or None) from tfds metadata."""
    features = builder.info.features
    if "image" not in features.keys():
        raise ValueError(f"`name`={name!r} has no 'image' feature; it is not an image data set.")
    height, width, channels = features["image"].shape
    size = _image_size_pair(image_size)
    if size is None and _base_name(name) == "celeb_a":
        size = (64, 64)
    if size is not None:
        height, width = size
    if height is None or width is None:
        raise ValueError(
            f"Images of {name!r} vary in size: pass `image_size` to resize them.")
    label = features["label"] if "label" in features.keys() else None
    num_classes = getattr(label, "num_classes", None)
    return (height, width, channels), num_classes, size


def _base_name(name):
    return name.split(":")[0].split("/")[0]


def _not_available(name, builder, data_dir):
    root = str(data_dir if data_dir is not None else os.environ.get(
        "TFDS_DATA_DIR", tfds.core.constants.DATA_DIR))
    return DatasetNotAvailableError(
        f"Data set {name!r} is not prepared in data_dir={root!r} "
        f"(looked for {builder.data_dir}) and download=False. This machine is "
        f"offline: run `tfds build {_base_name(name)} --data_dir {root}` on a machine "
        f"with internet and copy that folder here, or pass `data_dir=` pointing at a "
        f"prepared copy (download=True only works with internet).",
        name=name, data_dir=root, path=str(builder.data_dir))


def dataset_info(name: str, n_bits: int = 8,
                 image_size: int | tuple[int, int] | None = None) -> dict[str, Any]:
    """Static facts for a data set: ``dict(image_shape, num_bins, num_classes)``.

    "digits": ``(8, 8, 1)``, 17 bins, 10 classes (`n_bits` is ignored: the
    digits have 17 native levels). Toy densities: ``image_shape=(2,)`` and no
    bins or classes. tensorflow-datasets names: the image shape after the
    crop/resize that `tfds_dataset` applies, ``num_bins = 2**n_bits``. No data
    is read, so this works before the data set is prepared.
    """
    if name == "digits":
        return dict(image_shape=(8, 8, 1), num_bins=DIGITS_NUM_BINS, num_classes=10)
    if name in TOY_DENSITIES:
        return dict(image_shape=(2,), num_bins=None, num_classes=None)
    check_n_bits(n_bits)
    shape, num_classes, _ = _image_spec(_tfds_builder(name), name, image_size)
    return dict(image_shape=shape, num_bins=2 ** int(n_bits), num_classes=num_classes)


def tfds_dataset(name: str, split: str = "train", batch_size: int = 64, n_bits: int = 8,
                 image_size: int | tuple[int, int] | None = None, data_dir: str | None = None,
                 dequantize: bool = True, shuffle: bool = True, with_labels: bool = False,
                 seed: int | None = 0, repeat: bool = False, drop_remainder: bool = False,
                 download: bool = False, fresh_noise: bool | None = None) -> tf.data.Dataset:
    """`tf.data` pipeline over a tensorflow-datasets image data set.

    Per image: (celeb_a only) central 148x148 crop; optional area resize to
    `image_size` (celeb_a defaults to 64); ``k = floor(pixel / 2**(8-n_bits))``;
    then batches of ``x = (k + u) / 2**n_bits - 0.5`` (see `preprocess`).
    Works for "mnist", "fashion_mnist", "cifar10", "svhn_cropped", "celeb_a"
    and any tfds data set with an "image" feature.

    Args:
      name: tfds name, optionally with version (``"mnist:3.0.1"``).
      split: tfds split string (``"train"``, ``"test[:10%]"``, ...).
      with_labels: yield ``(image, label)``; needs a "label" feature.
      data_dir: where prepared tfds data lives (tfds default if None).
      download: call ``download_and_prepare`` first (needs internet).
      fresh_noise: new dequantization noise at every pass (default: the value
        of `shuffle`); if False, example ``i`` of the split always gets the
        noise of the stateless seed ``[seed, i]``, at any batch size.

    Raises:
      DatasetNotAvailableError: the data set is not prepared in `data_dir`
        and `download` is False.
      ValueError: an argument value is not allowed (the message names it).
    """
    fresh_noise = check_pipeline_args(batch_size, seed, fresh_noise, shuffle)
    if not isinstance(split, str) or not split:
        raise ValueError(f"`split` must be a tfds split string such as 'train', got {split!r}.")
    check_n_bits(n_bits)
    num_bins = 2 ** int(n_bits)
    builder = _tfds_builder(name, data_dir)
    _, num_classes, size = _image_spec(builder, name, image_size)
    if with_labels and num_classes is None:
        raise ValueError(
            f"`with_labels`=True but {name!r} has no class 'label' feature.")
    if download:
        builder.download_and_prepare()
    try:
        ds = builder.as_dataset(
            split=split, shuffle_files=shuffle,
            read_config=tfds.ReadConfig(shuffle_seed=seed))
    except AssertionError as e:  # tfds signals "not prepared" with an assert
        if builder.is_prepared():
            raise
        raise _not_available(name, builder, data_dir) from e

    crop = _base_name(name) == "celeb_a"

    def to_levels(example):
        image = example["image"]
        if crop:
            h, w = tf.shape(image)[0], tf.shape(image)[1]
            image = tf.image.crop_to_bounding_box(
                image, (h - CELEB_A_CROP) // 2, (w - CELEB_A_CROP) // 2,
                CELEB_A_CROP, CELEB_A_CROP)
        if size is not None:
            image = tf.image.resize(tf.cast(image, tf.float32), size, method="area")
            image = tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)
        label = tf.cast(example["label"], tf.int64) if with_labels else tf.constant(0, tf.int64)
        return reduce_bits(image, n_bits), label

    ds = ds.map(to_levels, num_parallel_calls=tf.data.AUTOTUNE)
    return finish_pipeline(ds, num_bins, batch_size, dequantize, shuffle, with_labels,
                            seed, repeat, drop_remainder, shuffle_buffer=SHUFFLE_BUFFER,
                            fresh_noise=fresh_noise)


# --------------------------------------------------------------------------
# 2-D toy densities (FFJORD's generators, standardised).


def toy_density(name: str, num_samples: int,
                seed: int | tuple[int, int] | None = 0) -> np.ndarray:
    """Samples a 2-D toy density as float32 ``[num_samples, 2]``.

    The generators of FFJORD (Grathwohl et al., 2019, ``toy_data.py``), each
    divided by its analytic per-coordinate standard deviation so that the
    mean is 0 and the per-coordinate variance is about 1:

    - "two_moons": ``t ~ U(0, pi)``; upper moon ``(cos t, sin t)``, lower moon
      ``(1 - cos t, 1/2 - sin t)``, each with prob. 1/2, plus ``N(0, 0.1^2)``;
      then ``(p - (1/2, 1/4)) / (sqrt(0.76), sqrt(0.5725 - 1/pi))``.
    - "8gaussians": ``N(4 * (cos a, sin a) / sqrt(2), (0.5 / sqrt(2))^2)``
      with ``a = j pi / 4``, ``j ~ U{0..7}``; divided by ``sqrt(4.125)``.
    - "checkerboard": ``x1 ~ U(-4, 4)``, ``x2`` uniform on the cells of a
      2x2-unit checkerboard over ``[-4, 4)^2`` where ``floor(x1/2) +
      floor(x2/2)`` is even; divided by ``4 / sqrt(3)``.

    Args:
      name: one of `TOY_DENSITIES`.
      num_samples: positive int.
      seed: anything `np.random.default_rng` accepts (int or int sequence).
    """
    checks.choice(name, TOY_DENSITIES, "name")
    num_samples = checks.positive_int(num_samples, "num_samples")
    rng = np.random.default_rng(seed)
    n = int(num_samples)
    if name == "two_moons":
        t = rng.uniform(0.0, np.pi, n)
        lower = rng.integers(0, 2, n).astype(bool)
        x = np.where(lower, 1.0 - np.cos(t), np.cos(t))
        y = np.where(lower, 0.5 - np.sin(t), np.sin(t))
        points = np.stack([x, y], axis=1) + 0.1 * rng.standard_normal((n, 2))
        # E[x] = 1/2, Var x = 1 - 1/4 + 0.01; E[y] = 1/4,
        # Var y = 1/4 + (3/4 - 2/pi)/2 - 1/16 + 0.01 = 0.5725 - 1/pi.
        std = np.array([math.sqrt(0.76), math.sqrt(0.5725 - 1.0 / np.pi)])
        points = (points - np.array([0.5, 0.25])) / std
    elif name == "8gaussians":
        angle = rng.integers(0, 8, n) * (np.pi / 4)
        centers = 4.0 * np.stack([np.cos(angle), np.sin(angle)], axis=1)
        points = (centers + 0.5 * rng.standard_normal((n, 2))) / math.sqrt(2.0)
        # Per-coordinate variance: (16 / 2 + 0.25) / 2 = 4.125.
        points = points / math.sqrt(4.125)
    else:  # checkerboard
        x1 = rng.uniform(-2.0, 2.0, n)
        x2 = rng.uniform(0.0, 1.0, n) - 2.0 * rng.integers(0, 2, n) + np.floor(x1) % 2
        # Both coordinates are U(-4, 4) after the x2 scale: std 8 / sqrt(12).
        points = 2.0 * np.stack([x1, x2], axis=1) / (4.0 / math.sqrt(3.0))
    return points.astype(np.float32)


def toy_dataset(name: str, num_samples: int, batch_size: int, seed: int | None = 0,
                shuffle: bool = True) -> tf.data.Dataset:
    """`tf.data` pipeline of float32 ``[B, 2]`` batches of `toy_density` points."""
    check_pipeline_args(batch_size, seed, None, shuffle)
    return _points_dataset(toy_density(name, num_samples, seed), batch_size, seed, shuffle)


def _points_dataset(points, batch_size, seed, shuffle):
    ds = tf.data.Dataset.from_tensor_slices(points)
    if shuffle:
        ds = ds.shuffle(len(points), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def _toy_split_dataset(name, split="train", batch_size=64, num_samples=None, seed=0,
                       shuffle=True):
    """Train/test draws of a toy density from independent seeds ``(seed, split)``."""
    checks.choice(split, ("train", "test"), "split")
    check_pipeline_args(batch_size, seed, None, shuffle)
    if num_samples is None:
        num_samples = 10_000 if split == "train" else 2_000
    index = 0 if split == "train" else 1
    points = toy_density(name, num_samples, seed=None if seed is None else (seed, index))
    return _points_dataset(points, batch_size, seed, shuffle)


# --------------------------------------------------------------------------
# Registry.

DATASETS: dict[str, Callable[..., tf.data.Dataset]] = {
    "digits": digits_dataset,
    **{name: functools.partial(tfds_dataset, name) for name in TFDS_IMAGE_DATASETS},
    **{name: functools.partial(_toy_split_dataset, name) for name in TOY_DENSITIES},
}


def make_dataset(name: str, split: str = "train", batch_size: int = 64,
                 **kwargs: Any) -> tf.data.Dataset:
    """Builds the pipeline for `name`: a key of `DATASETS`, else any tfds name.

    ``kwargs`` go to the loader (`digits_dataset`, `tfds_dataset`, or for toy
    names ``num_samples``, ``seed``, ``shuffle``).
    """
    loader = DATASETS.get(name)
    if loader is None:
        loader = functools.partial(tfds_dataset, name)
    return loader(split=split, batch_size=batch_size, **kwargs)
