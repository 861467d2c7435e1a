"""The digits protocol's fixed data stream, in NumPy + scikit-learn only.

Implements `/work/shared/digits-protocol.md` without the library under test:

* data: `sklearn.datasets.load_digits()`, 1,797 images of 8x8 integer levels
  `k` in 0..16 (`num_bins = 17`, `D = 64`), laid out `[N, 8, 8, 1]`;
* split: `perm = RandomState(S).permutation(1797)`, train `perm[:1497]`,
  test `perm[1497:]` (300 images);
* dequantization (openai/glow): `x = k / 17 - 0.5 + u`, `u ~ U(0, 1/17)`;
* training stream: epoch `e` uses `rng = RandomState(1000 + e)`: first
  `perm_e = rng.permutation(1497)`, then `rng.uniform(0, 1/17, train.shape)`;
  batch `b` is `x[perm_e[64 b: 64 (b + 1)]]` (23 full batches of 64);
* ActNorm init batch: `rng = RandomState(999)`, `idx =
  rng.permutation(1497)[:256]`, then the noise of those 256 images from the
  same `rng` (`rng.uniform(0, 1/17, (256, 8, 8, 1))`);
* test: 4 noise draws, draw `j` with `RandomState(2024 + j)` over the 300
  test images; train bits/dim: one draw over the train images with
  `RandomState(2124)`;
* metric: `bits/dim = (NLL_nats + 64 ln 17) / (64 ln 2)`.
"""

import math

import numpy as np

NUM_BINS = 17
NUM_DIMS = 64
NUM_IMAGES = 1797
NUM_TRAIN = 1497
BATCH = 64
STEPS_PER_EPOCH = NUM_TRAIN // BATCH  # 23; the last partial batch is dropped
INIT_SIZE = 256
TEST_DRAWS = 4
CURVE_EPOCHS = (1, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100)


def load_levels():
    """The 1,797 digits as float64 levels `[N, 8, 8, 1]` in 0..16."""
    from sklearn.datasets import load_digits

    images = load_digits().images  # float64, integer valued 0..16
    assert images.shape == (NUM_IMAGES, 8, 8) and images.max() == NUM_BINS - 1
    return images[..., None]


def split(levels, split_seed=0):
    """`(train, test)` levels: `perm[:1497]` and `perm[1497:]` of `RandomState(S)`."""
    perm = np.random.RandomState(split_seed).permutation(NUM_IMAGES)
    return levels[perm[:NUM_TRAIN]], levels[perm[NUM_TRAIN:]]


def dequantize(levels, noise):
    """`x = k / 17 - 0.5 + u` with `u = noise` drawn from `U(0, 1/17)`."""
    return levels / NUM_BINS - 0.5 + noise


def _noise(rng, shape):
    return rng.uniform(0.0, 1.0 / NUM_BINS, size=shape)


def epoch_batches(train, epoch, dtype=np.float32):
    """The 23 batches of 0-based `epoch`, as one `[23 * 64, 8, 8, 1]` array in order."""
    rng = np.random.RandomState(1000 + epoch)
    perm = rng.permutation(len(train))
    x = dequantize(train, _noise(rng, train.shape))
    return x[perm[: STEPS_PER_EPOCH * BATCH]].astype(dtype)


def init_batch(train, dtype=np.float32):
    """The 256 images of the data-dependent ActNorm init, dequantized."""
    rng = np.random.RandomState(999)
    idx = rng.permutation(len(train))[:INIT_SIZE]
    chosen = train[idx]
    return dequantize(chosen, _noise(rng, chosen.shape)).astype(dtype)


def test_draws(test, dtype=np.float32):
    """The 4 fixed dequantizations of the test images, `[4, 300, 8, 8, 1]`."""
    return np.stack(
        [
            dequantize(test, _noise(np.random.RandomState(2024 + j), test.shape))
            for j in range(TEST_DRAWS)
        ]
    ).astype(dtype)


def train_draw(train, dtype=np.float32):
    """One dequantization of all train images with `RandomState(2124)`."""
    return dequantize(train, _noise(np.random.RandomState(2124), train.shape)).astype(dtype)


def bits_per_dim(nll_nats):
    """`(NLL + 64 ln 17) / (64 ln 2)` for a mean NLL in nats of the dequantized `x`."""
    return (nll_nats + NUM_DIMS * math.log(NUM_BINS)) / (NUM_DIMS * math.log(2.0))
