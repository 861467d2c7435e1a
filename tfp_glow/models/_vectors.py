"""What the vector families (MAF, IAF, NSF, FFJORD) share: the input shape
check, the fixed permutations between layers, and the flattening wrapper.

These families act on vectors: an image `(H, W, C)` is flattened to
`H W C` features first (a `tfb.Reshape`, log-det 0), so the same model
trains on 2-D toy points and on the 8x8 digits as 64-D vectors.
"""

from collections.abc import Sequence

import numpy as np
import tensorflow_probability as tfp

from tfp_glow import checks
from tfp_glow.bijectors import MultiScaleFlow, channel_permutation
from tfp_glow.models._common import _maybe_prior

tfb = tfp.bijectors

# Between two autoregressive or coupling layers: the order reversed (MAF's
# paper, Papamakarios et al. 2017) or a fixed random permutation drawn from
# the model's seed (what zuko and nflows do); both are volume preserving.
VECTOR_PERMUTATIONS = ("reverse", "shuffle")


def input_shape_of(input_shape):
    """`input_shape` as a tuple of positive ints, `(D,)` or `(H, W, C)`."""
    try:
        shape = checks.shape(input_shape, "input_shape", rank=(1, 3))
    except (TypeError, ValueError):
        raise ValueError(
            f"`input_shape` must be (D,) for vectors or (H, W, C) for images "
            f"(flattened to H*W*C features); got {input_shape!r}."
        ) from None
    return tuple(int(d) for d in shape)


def num_features(input_shape):
    """D: the length of the vector the flow acts on."""
    return int(np.prod(input_shape))


def seed_of(seed):
    """The permutation seed: a non-negative int, or None (then the
    `"shuffle"` permutations are drawn afresh and the config cannot rebuild
    them: the builders default to 0)."""
    return checks.positive_int(seed, "seed", minimum=0, allow_none=True)


def permutation(kind, dim, seed, layer):
    """The fixed permutation after layer `layer`: `"reverse"`, or a
    `"shuffle"` seeded by `(seed, layer)` so every layer mixes differently
    and a model rebuilt from its config gets the same ones."""
    layer_seed = None if seed is None else seed * 1009 + layer
    return channel_permutation(kind, dim, seed=layer_seed)


def interleave(layers, kind, dim, seed):
    """`[layer_0, perm_0, layer_1, ..., layer_{L-1}]` in the normalizing order."""
    steps = []
    for i, layer in enumerate(layers):
        if i:
            steps.append(permutation(kind, dim, seed, i - 1))
        steps.append(layer)
    return steps


def vector_flow(input_shape, steps, num_classes, dtype, name, context_shape=None):
    """The normalizing bijector: flatten (images), then `steps` in order (data
    to latent), under a `MultiScaleFlow` with one level (so a conditional
    model, `num_classes` or `context_shape`, gets its learned prior on the
    latent, as NICE does)."""
    dim = num_features(input_shape)
    steps = list(steps)
    if len(input_shape) > 1:
        steps.insert(0, tfb.Reshape(event_shape_out=[dim], event_shape_in=list(input_shape)))
    return MultiScaleFlow(
        input_shape,
        [(tfb.Chain(list(reversed(steps))), None)],
        top_prior=_maybe_prior((dim,), num_classes, dtype, context_shape),
        name=name,
    )


def hidden_units_of(value: Sequence[int], arg_name: str = "hidden_units") -> list[int]:
    """`value` as a list of positive ints (a network's hidden layer sizes)."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(
            f"`{arg_name}` must be a list of positive ints (hidden layer sizes); got {value!r}."
        )
    units = list(value)
    if not units or not all(checks.is_int(u) and u > 0 for u in units):
        raise ValueError(
            f"`{arg_name}` must be a non-empty list of positive ints (hidden "
            f"layer sizes); got {value!r}."
        )
    return [int(u) for u in units]
