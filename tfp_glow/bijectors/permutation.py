"""Fixed channel permutations (RealNVP's reverse, a seeded shuffle)."""

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_glow.bijectors import _shapes

tfb = tfp.bijectors

__all__ = ["channel_permutation"]

PERMUTATIONS = ("reverse", "shuffle")


def channel_permutation(
    kind: str, channels: int, seed: int | None = None
) -> tfp.bijectors.Bijector:
    """`tfb.Permute` of the last axis: `"reverse"` or a seeded `"shuffle"`.

    A permutation is volume preserving (log-det 0) and has no variables; the
    shuffle is drawn from `seed`, so a model rebuilt from its config (which
    stores the seed) gets the same permutation back.
    """
    _shapes.validate_positive_int(channels, "channels")
    if kind == "reverse":
        perm = np.arange(channels)[::-1]
    elif kind == "shuffle":
        perm = np.random.default_rng(seed).permutation(channels)
    else:
        raise ValueError(f"`kind` must be one of {PERMUTATIONS}; got {kind!r}.")
    return tfb.Permute(permutation=tf.constant(perm, tf.int32), axis=-1, name=f"{kind}_permutation")
