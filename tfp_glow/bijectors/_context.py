"""The context of a conditional bijector: its checks and its features.

A conditional flow `p(x | c)` hands every bijector the same context `c`
(`conditional_input`, `[batch, *context_shape]`, the flow's float dtype). A
bijector built with `context_shape=` turns it into features laid out like
its event, so that a network can take them as extra input channels:

* a vector event `[D]`: the context flattened, `[batch, prod(context_shape)]`;
* an image event `[H, W, C]` and a vector context `[k]` (or any context that
  is not an image): the flattened context broadcast over every position,
  `[batch, H, W, k]`;
* an image event and an image context `[h, w, c]`: the context resized to
  `H x W`, `[batch, H, W, c]`: area averaging (exact average pooling) when
  `h, w` are multiples of `H, W`, bilinear interpolation otherwise
  (`tf.image.resize`, which computes in float32).

The features' batch shape broadcasts against the input's, so a sample axis
in front of `x` (`dist.sample([2])` with a `[batch]` context) is served too.
"""

import numpy as np
import tensorflow as tf

from tfp_glow import checks

__all__ = [
    "check_context",
    "concat_features",
    "context_shape_of",
    "feature_channels",
    "features",
    "is_image",
    "resize",
]


def context_shape_of(value, arg_name="context_shape"):
    """`value` (a shape, or an int: a vector's length) as a tuple of positive
    ints, or None (unconditional)."""
    if value is None:
        return None
    if checks.is_int(value):  # a vector's length
        value = (value,)
    shape = checks.shape(value, arg_name)
    if not shape or not all(d > 0 for d in shape):
        raise ValueError(
            f"`{arg_name}` must be a non-empty shape of positive ints, e.g. (5,) "
            f"for a vector or (4, 4, 1) for an image; got {value!r}."
        )
    return tuple(int(d) for d in shape)


def is_image(context_shape, event_ndims):
    """An image context of an image event: resized, not flattened."""
    return event_ndims == 3 and len(context_shape) == 3


def feature_channels(context_shape, event_ndims):
    """Channels the features add to a network's input (0 without a context)."""
    if context_shape is None:
        return 0
    if is_image(context_shape, event_ndims):
        return context_shape[-1]
    return int(np.prod(context_shape))


def check_context(conditional_input, context_shape, owner, dtype):
    """The context as a float tensor of `dtype`, `[batch..., *context_shape]`.

    Raises a ValueError naming `conditional_input` and the expected shape when
    it is missing or misshaped, a TypeError when it is not floating.
    """
    expected = f"[batch, {', '.join(str(d) for d in context_shape)}]"
    if conditional_input is None:
        raise ValueError(
            f"{owner} is conditional (context_shape={context_shape}): pass the "
            f"context as `conditional_input` of shape {expected}."
        )
    context = tf.convert_to_tensor(conditional_input, dtype_hint=dtype)
    if not context.dtype.is_floating:
        raise TypeError(
            f"{owner}: `conditional_input` must be a float tensor of shape {expected}; "
            f"got dtype {context.dtype.name}."
        )
    n = len(context_shape)
    rank = context.shape.rank
    if rank is not None and (
        rank < n + 1
        or not all(a is None or a == b for a, b in zip(context.shape[rank - n :], context_shape))
    ):
        raise ValueError(
            f"{owner}: `conditional_input` must have shape {expected} "
            f"(context_shape={context_shape}); got shape {context.shape}."
        )
    return tf.cast(context, dtype)


def resize(context, size):
    """Image context `[batch..., h, w, c]` resized to `size = (H, W)`."""
    h, w = context.shape[-3], context.shape[-2]
    height, width = size
    if (h, w) == (height, width):
        return context
    batch = tf.shape(context)[:-3]
    flat = tf.reshape(context, tf.concat([[-1], context.shape[-3:]], 0))
    if h % height == 0 and w % width == 0:
        # Area averaging over whole blocks is exactly average pooling, which
        # keeps the dtype (tf.image.resize computes in float32).
        window = (h // height, w // width)
        out = tf.nn.avg_pool2d(flat, window, window, "VALID")
    else:
        out = tf.cast(tf.image.resize(flat, (height, width), method="bilinear"), context.dtype)
    out = tf.reshape(out, tf.concat([batch, [height, width, context.shape[-1]]], 0))
    out.set_shape(context.shape[:-3].concatenate([height, width, context.shape[-1]]))
    return out


def features(context, context_shape, event_shape):
    """The context laid out like an event of static `event_shape` (see the
    module docstring): `[batch..., H, W, k]` or `[batch..., k]`."""
    n = len(context_shape)
    if len(event_shape) == 3 and n == 3:
        return resize(context, event_shape[:2])
    k = int(np.prod(context_shape))
    flat = tf.reshape(context, tf.concat([tf.shape(context)[: context.shape.rank - n], [k]], 0))
    flat.set_shape(context.shape[: context.shape.rank - n].concatenate([k]))
    for _ in range(len(event_shape) - 1):  # one position of every spatial axis
        flat = tf.expand_dims(flat, -2)
    return flat


def concat_features(t, context, context_shape, event_ndims):
    """`[t, features]` on the last axis, the features broadcast to `t`'s
    batch and spatial shape (`t` is a network's input, `[batch..., *event]`)."""
    event_shape = tuple(t.shape[-event_ndims:])
    f = features(tf.cast(context, t.dtype), context_shape, event_shape)
    k = f.shape[-1]
    f = tf.broadcast_to(f, tf.concat([tf.shape(t)[:-1], [k]], 0))
    f.set_shape(t.shape[:-1].concatenate([k]))
    return tf.concat([t, f], axis=-1)
