"""Tests for tfp_glow.data: numbers, not just "it runs"."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from scipy.sparse import csgraph
from scipy.spatial import cKDTree

from tfp_glow import data


def _collect(ds):
    """Concatenates a finite dataset of arrays or (array, label) tuples."""
    batches = list(ds.as_numpy_iterator())
    if isinstance(batches[0], tuple):
        return tuple(np.concatenate(parts) for parts in zip(*batches))
    return np.concatenate(batches)


def _bins(x, num_bins):
    return np.floor((x.astype(np.float64) + 0.5) * num_bins).astype(np.int64)


# ----------------------------------------------------------------- digits


def test_digits_split_sizes_disjoint_and_deterministic():
    from sklearn.datasets import load_digits as sk_load_digits

    train_x, train_y = data.load_digits("train")
    test_x, test_y = data.load_digits("test")
    all_x, all_y = data.load_digits("all")
    assert train_x.shape == (1437, 8, 8, 1) and test_x.shape == (360, 8, 8, 1)
    assert all_x.shape == (1797, 8, 8, 1)
    assert train_x.dtype == np.uint8 and train_y.dtype == np.int64
    assert train_x.min() == 0 and train_x.max() == 16 and test_x.max() == 16
    assert set(np.unique(all_y)) == set(range(10))
    # train and test are the two ends of one permutation of all 1797 images.
    np.testing.assert_array_equal(np.concatenate([train_x, test_x]), all_x)
    np.testing.assert_array_equal(np.concatenate([train_y, test_y]), all_y)
    sk = sk_load_digits()
    order = np.random.RandomState(0).permutation(1797)
    np.testing.assert_array_equal(all_x[..., 0], sk.images[order].astype(np.uint8))
    again_x, again_y = data.load_digits("train")
    np.testing.assert_array_equal(again_x, train_x)
    np.testing.assert_array_equal(again_y, train_y)
    again_x[0] = 99  # returned arrays are copies: the cache stays intact
    assert data.load_digits("train")[0].max() == 16


def test_digits_dataset_shapes_bins_and_labels():
    ds = data.digits_dataset("test", batch_size=64, shuffle=False, with_labels=True, seed=1)
    images, labels = _collect(ds)
    assert images.shape == (360, 8, 8, 1) and images.dtype == np.float32
    assert labels.dtype == np.int64
    levels, expected_labels = data.load_digits("test")
    np.testing.assert_array_equal(labels, expected_labels)
    np.testing.assert_array_equal(_bins(images, 17), levels)
    assert images.min() > -0.5 and images.max() < 0.5

    centres = _collect(data.digits_dataset("test", 100, dequantize=False, shuffle=False))
    np.testing.assert_allclose(centres, (levels + 0.5) / 17 - 0.5, atol=1e-6)

    shapes = [b.shape[0] for b in data.digits_dataset("train", 100, drop_remainder=True)]
    assert shapes == [100] * 14


def test_digits_dataset_seeded_noise_is_reproducible_and_fresh_each_epoch():
    first = _collect(data.digits_dataset("train", 128, seed=7))
    ds = data.digits_dataset("train", 128, seed=7)
    epoch1, epoch2 = _collect(ds), _collect(ds)
    np.testing.assert_array_equal(first, epoch1)
    assert not np.array_equal(epoch1, epoch2)
    other = _collect(data.digits_dataset("train", 128, seed=8))
    assert not np.array_equal(first, other)
    # Shuffling permutes the images but keeps the same multiset of levels.
    levels = data.load_digits("train")[0]
    np.testing.assert_array_equal(np.sort(_bins(first, 17).ravel()), np.sort(levels.ravel()))

    repeated = data.digits_dataset("test", 100, repeat=True)
    assert [b.shape[0] for b in repeated.take(5)] == [100] * 5


def test_evaluation_noise_is_per_example_whatever_the_batching():
    """shuffle=False: example i always gets the noise of the stateless seed
    [seed, i], at any batch size, at every pass and whatever the global seed."""
    reference = _collect(data.digits_dataset("test", 360, shuffle=False, seed=3))
    for batch in (1, 7, 64):
        np.testing.assert_array_equal(
            _collect(data.digits_dataset("test", batch, shuffle=False, seed=3)), reference
        )
    ds = data.digits_dataset("test", 64, shuffle=False, seed=3)
    np.testing.assert_array_equal(_collect(ds), _collect(ds))  # two passes
    tf.random.set_seed(12345)  # what keras.utils.set_random_seed does in `train`
    np.testing.assert_array_equal(
        _collect(data.digits_dataset("test", 64, shuffle=False, seed=3)), reference
    )
    levels = data.load_digits("test")[0]
    for i in (0, 1, 359):
        expected = data.preprocess(levels[i], 17, seed=tf.constant([3, i], tf.int64))
        np.testing.assert_array_equal(reference[i], expected.numpy())
    assert not np.array_equal(
        reference, _collect(data.digits_dataset("test", 360, shuffle=False, seed=4))
    )
    # Training noise (fresh_noise, the default with shuffle=True) changes every
    # pass; asked for without shuffling it is still fresh, in the same order.
    fresh = data.digits_dataset("test", 360, shuffle=False, fresh_noise=True, seed=3)
    first, second = _collect(fresh), _collect(fresh)
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(_bins(first, 17), _bins(second, 17))
    unseeded = data.digits_dataset("test", 90, shuffle=False, seed=None)
    np.testing.assert_array_equal(_collect(unseeded), _collect(unseeded))


# ----------------------------------------------------- preprocess & bits


@pytest.mark.parametrize("num_bins", [2, 17, 32, 256])
def test_preprocess_range_and_bin_membership(num_bins):
    k = np.tile(np.arange(num_bins, dtype=np.uint8), 4000 // num_bins + 1)
    x = data.preprocess(tf.constant(k), num_bins, dequantize=True, seed=3).numpy()
    assert x.dtype == np.float32
    assert x.min() > -0.5 and x.max() < 0.5
    np.testing.assert_array_equal(_bins(x, num_bins), k)
    # The noise inside a bin is uniform: mean 1/2, std sqrt(1/12).
    u = (x.astype(np.float64) + 0.5) * num_bins - k
    assert abs(u.mean() - 0.5) < 0.02 and abs(u.std() - np.sqrt(1 / 12)) < 0.01

    centre = data.preprocess(tf.constant(k), num_bins, dequantize=False).numpy()
    np.testing.assert_allclose(centre, (k + 0.5) / num_bins - 0.5, atol=1e-7)


def test_preprocess_worst_case_rounding_stays_in_bin():
    # The highest level with noise next to 1 is where float32 rounding bites:
    # without the in-bin margin about 15 of these 2M values land on 0.5.
    k = tf.fill([2_000_000], tf.constant(255, tf.uint8))
    x = data.preprocess(k, 256, seed=0).numpy()
    assert x.max() < 0.5 and np.all(_bins(x, 256) == 255)
    x = data.preprocess(tf.zeros([2_000_000], tf.uint8), 256, seed=0).numpy()
    assert x.min() > -0.5 and np.all(_bins(x, 256) == 0)


def test_preprocess_seed_reproducible():
    k = tf.constant(np.arange(17, dtype=np.int32).reshape(1, 17, 1, 1))
    a = data.preprocess(k, 17, seed=5).numpy()
    b = data.preprocess(k, 17, seed=5).numpy()
    c = data.preprocess(k, 17, seed=6).numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # A tensor seed (the tf.data form) equals the int seed [5, 0], also in a graph.
    fn = tf.function(lambda t, s: data.preprocess(t, 17, seed=s))
    np.testing.assert_array_equal(fn(k, tf.constant([5, 0], tf.int64)).numpy(), a)
    unseeded = data.preprocess(k, 17).numpy()  # stateful RNG still lands in the bin
    np.testing.assert_array_equal(_bins(unseeded, 17), k.numpy())


def test_reduce_bits():
    pixels = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(data.reduce_bits(pixels, 8).numpy(), pixels)
    np.testing.assert_array_equal(data.reduce_bits(pixels, 5).numpy(), pixels // 8)
    np.testing.assert_array_equal(data.reduce_bits(pixels, 1).numpy(), pixels >= 128)
    out = data.reduce_bits(tf.constant(pixels.reshape(4, 8, 8, 1)), 3)
    assert out.dtype == tf.uint8 and out.shape == (4, 8, 8, 1)
    assert int(tf.reduce_max(out)) == 7 and int(tf.reduce_min(out)) == 0


# ------------------------------------------------------- tensorflow-datasets


def _mock_raw_images(name, num_examples):
    with tfds.testing.mock_data(num_examples=num_examples):
        ds = tfds.load(name, split="train")
        return np.stack([ex["image"] for ex in ds.as_numpy_iterator()])


def test_tfds_mnist_pipeline_n_bits_and_labels():
    raw = _mock_raw_images("mnist", 10)
    with tfds.testing.mock_data(num_examples=10):
        images, labels = _collect(
            data.tfds_dataset(
                "mnist", batch_size=4, n_bits=5, shuffle=False, with_labels=True, seed=2
            )
        )
        centres = _collect(
            data.tfds_dataset("mnist", batch_size=4, n_bits=5, shuffle=False, dequantize=False)
        )
        shuffled = _collect(data.tfds_dataset("mnist", batch_size=3, n_bits=5, seed=2))
    assert images.shape == (10, 28, 28, 1) and images.dtype == np.float32
    assert labels.shape == (10,) and labels.dtype == np.int64
    assert labels.min() >= 0 and labels.max() <= 9
    assert images.min() > -0.5 and images.max() < 0.5
    np.testing.assert_array_equal(_bins(images, 32), raw // 8)
    np.testing.assert_allclose(centres, (raw // 8 + 0.5) / 32 - 0.5, atol=1e-6)
    np.testing.assert_array_equal(np.sort(_bins(shuffled, 32).ravel()), np.sort((raw // 8).ravel()))


def test_tfds_cifar10_pipeline_and_resize():
    with tfds.testing.mock_data(num_examples=6):
        images, labels = _collect(
            data.tfds_dataset("cifar10", batch_size=4, with_labels=True, shuffle=False)
        )
        small = _collect(data.tfds_dataset("cifar10", batch_size=4, image_size=16, n_bits=4))
        first = next(iter(data.make_dataset("cifar10", "train", 6, drop_remainder=True)))
    assert images.shape == (6, 32, 32, 3) and labels.dtype == np.int64
    assert set(labels) <= set(range(10))
    assert np.all(_bins(images, 256) >= 0) and np.all(_bins(images, 256) <= 255)
    assert small.shape == (6, 16, 16, 3)
    assert small.min() > -0.5 and small.max() < 0.5
    assert first.shape == (6, 32, 32, 3)


def test_tfds_celeb_a_crop_resize_and_no_labels():
    with tfds.testing.mock_data(num_examples=3):
        default = _collect(data.tfds_dataset("celeb_a", batch_size=2, n_bits=5))
        small = _collect(data.tfds_dataset("celeb_a", batch_size=2, image_size=32))
        with pytest.raises(ValueError, match="with_labels"):
            data.tfds_dataset("celeb_a", with_labels=True)
    assert default.shape == (3, 64, 64, 3) and default.dtype == np.float32
    assert default.min() > -0.5 and default.max() < 0.5
    assert small.shape == (3, 32, 32, 3)
    assert data.dataset_info("celeb_a", n_bits=5) == dict(
        image_shape=(64, 64, 3), num_bins=32, num_classes=None
    )


def test_tfds_not_available_error_names_dataset_and_data_dir(tmp_path):
    with pytest.raises(data.DatasetNotAvailableError) as info:
        data.tfds_dataset("fashion_mnist", data_dir=str(tmp_path))
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert info.value.name == info.value.base_name == "fashion_mnist"
    assert info.value.data_dir == str(tmp_path)
    assert info.value.path.startswith(str(tmp_path / "fashion_mnist"))
    assert "fashion_mnist" in message and str(tmp_path) in message
    assert "tfds build fashion_mnist" in message and "data_dir=" in message


def test_dataset_info():
    assert data.dataset_info("digits") == dict(image_shape=(8, 8, 1), num_bins=17, num_classes=10)
    assert data.dataset_info("mnist", n_bits=5) == dict(
        image_shape=(28, 28, 1), num_bins=32, num_classes=10
    )
    assert data.dataset_info("cifar10", image_size=(16, 8))["image_shape"] == (16, 8, 3)
    assert data.dataset_info("svhn_cropped")["num_classes"] == 10
    assert data.dataset_info("two_moons")["image_shape"] == (2,)


# ----------------------------------------------------------- toy densities


@pytest.mark.parametrize("name", data.TOY_DENSITIES)
def test_toy_density_standardised_and_seeded(name):
    points = data.toy_density(name, 20_000, seed=1)
    assert points.shape == (20_000, 2) and points.dtype == np.float32
    np.testing.assert_allclose(points.mean(0), 0.0, atol=0.05)
    np.testing.assert_allclose(points.std(0), 1.0, atol=0.05)
    np.testing.assert_array_equal(points, data.toy_density(name, 20_000, seed=1))
    assert not np.array_equal(points, data.toy_density(name, 20_000, seed=2))


def test_two_moons_has_two_clusters_and_a_hole_at_the_mean():
    points = data.toy_density("two_moons", 2000, seed=0)
    # Neighbours within 0.12 (about one noise std) link each moon into one
    # component; the 3.5-std gap between the moons is never bridged.
    pairs = cKDTree(points).query_pairs(0.12, output_type="ndarray")
    graph = np.zeros((len(points), len(points)), bool)
    graph[pairs[:, 0], pairs[:, 1]] = True
    _, component = csgraph.connected_components(graph, directed=False)
    sizes = np.sort(np.bincount(component))[::-1]
    assert sizes[0] > 0.4 * len(points) and sizes[1] > 0.4 * len(points)
    assert sizes[0] + sizes[1] > 0.97 * len(points)
    # The mean lies between the moons, where there is almost no mass.
    assert np.mean(np.linalg.norm(points, axis=1) < 0.3) < 0.005


def test_8gaussians_has_8_equal_modes_on_a_circle():
    points = data.toy_density("8gaussians", 16_000, seed=0).astype(np.float64)
    angle = np.arctan2(points[:, 1], points[:, 0])
    mode = np.round(angle / (np.pi / 4)).astype(int) % 8
    counts = np.bincount(mode, minlength=8)
    assert counts.shape == (8,) and np.all(np.abs(counts - 2000) < 4 * np.sqrt(2000))
    centres = np.array([points[mode == j].mean(0) for j in range(8)])
    radius = np.linalg.norm(centres, axis=1)
    np.testing.assert_allclose(radius, 4 / np.sqrt(2) / np.sqrt(4.125), rtol=0.03)
    spread = np.array([points[mode == j].std(0) for j in range(8)])
    np.testing.assert_allclose(spread, 0.5 / np.sqrt(2) / np.sqrt(4.125), rtol=0.1)


def test_checkerboard_occupies_even_cells_only():
    points = data.toy_density("checkerboard", 10_000, seed=0).astype(np.float64)
    cell = np.floor(points / (np.sqrt(3) / 2))  # a 2-unit cell after standardising
    assert np.all((cell.sum(1) % 2) == 0)
    assert set(np.unique(cell)) == {-2, -1, 0, 1}


def test_toy_dataset_and_make_dataset():
    batches = list(data.toy_dataset("8gaussians", 1000, 256, seed=0).as_numpy_iterator())
    assert [b.shape for b in batches] == [(256, 2)] * 3 + [(232, 2)]
    assert batches[0].dtype == np.float32
    train = _collect(data.make_dataset("two_moons", "train", 500, num_samples=1000))
    test = _collect(data.make_dataset("two_moons", "test", 500, num_samples=1000))
    assert train.shape == test.shape == (1000, 2) and not np.allclose(
        np.sort(train, 0), np.sort(test, 0)
    )
    digits_test = _collect(data.make_dataset("digits", "test", 64, dequantize=False))
    assert digits_test.shape == (360, 8, 8, 1)
    assert set(data.DATASETS) >= {
        "digits",
        "mnist",
        "fashion_mnist",
        "cifar10",
        "svhn_cropped",
        "celeb_a",
        *data.TOY_DENSITIES,
    }


# ------------------------------------------------------------ bad arguments


@pytest.mark.parametrize(
    "call, error, message",
    [
        (
            lambda: data.load_digits("validation"),
            ValueError,
            r"`split` must be one of \('train', 'test', 'all'\); received 'validation'",
        ),
        (lambda: data.digits_dataset("val"), ValueError, r"`split` must be one of"),
        (
            lambda: data.digits_dataset(batch_size=0),
            ValueError,
            r"`batch_size` must be an int >= 1; received 0",
        ),
        (
            lambda: data.digits_dataset(batch_size=True),
            TypeError,
            r"`batch_size` must be an int >= 1; received True",
        ),
        (lambda: data.digits_dataset(batch_size=np.int64(0)), ValueError, r"`batch_size`"),
        (lambda: data.digits_dataset(seed=1.5), TypeError, r"`seed` must be an int or None"),
        (lambda: data.digits_dataset(fresh_noise=1), TypeError, r"`fresh_noise` must be a bool"),
        (lambda: data.digits_dataset(shuffle="yes"), TypeError, r"`shuffle` must be a bool"),
        (lambda: data.preprocess(tf.zeros([2]), 0), ValueError, r"`num_bins` must be an int >= 1"),
        (lambda: data.preprocess(tf.zeros([2], tf.int32), 17, seed=True), TypeError, r"`seed`"),
        (
            lambda: data.reduce_bits(np.zeros(3, np.uint8), 0),
            ValueError,
            r"`n_bits` must be an int >= 1; received 0",
        ),
        (
            lambda: data.reduce_bits(np.zeros(3, np.uint8), 9),
            ValueError,
            r"`n_bits` must be an int in 1\.\.8; received 9",
        ),
        (
            lambda: data.reduce_bits(np.zeros(3, np.uint8), 5.0),
            TypeError,
            r"`n_bits` must be an int",
        ),
        (lambda: data.tfds_dataset("mnist", n_bits=9), ValueError, r"`n_bits`"),
        (lambda: data.tfds_dataset("mnist", image_size=-3), ValueError, r"`image_size`"),
        (lambda: data.tfds_dataset("mnist", image_size=(8, True)), ValueError, r"`image_size`"),
        (lambda: data.tfds_dataset("mnist", split=3), ValueError, r"`split`"),
        (lambda: data.tfds_dataset("no_such_dataset_xyz"), ValueError, r"`name`"),
        (lambda: data.tfds_dataset("imdb_reviews"), ValueError, r"`name`"),
        (lambda: data.make_dataset("no_such_dataset_xyz"), ValueError, r"`name`"),
        (lambda: data.dataset_info("mnist", n_bits=0), ValueError, r"`n_bits`"),
        (lambda: data.toy_density("spiral", 10), ValueError, r"`name` must be one of"),
        (
            lambda: data.toy_density("two_moons", 0),
            ValueError,
            r"`num_samples` must be an int >= 1",
        ),
        (lambda: data.toy_density("two_moons", 10.5), TypeError, r"`num_samples` must be an int"),
        (lambda: data.toy_dataset("two_moons", 10, batch_size=-1), ValueError, r"`batch_size`"),
        (lambda: data.make_dataset("two_moons", "validation"), ValueError, r"`split`"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(call, error, message):
    with pytest.raises(error, match=message):
        call()
