"""Shape helpers shared by the bijectors (static where possible)."""

import tensorflow as tf

from tfp_glow import checks


def event_size(x, axes):
    """Product of `x`'s sizes along `axes` (negative indices), as x's dtype.

    Static when the shape is known, a tensor otherwise, so log-dets like
    `H * W * sum(log s)` work with an unknown batch dimension.
    """
    static = [x.shape[a] for a in axes]
    if all(d is not None for d in static):
        n = 1
        for d in static:
            n *= d
        return tf.constant(n, dtype=x.dtype)
    shape = tf.shape(x)
    return tf.cast(tf.reduce_prod(tf.stack([shape[a] for a in axes])), x.dtype)


def check_event_rank(x, event_ndims, arg_name="x"):
    """Raises ValueError when `x` has fewer dims than its event needs."""
    rank = x.shape.rank
    if rank is not None and rank < event_ndims:
        raise ValueError(
            f"`{arg_name}` must have at least {event_ndims} dimensions "
            f"(event) plus batch dimensions; got shape {x.shape}."
        )


def check_channels(x, channels, arg_name="x"):
    """Raises ValueError when the static channel count differs."""
    c = x.shape[-1] if x.shape.rank else None
    if c is not None and channels is not None and c != channels:
        raise ValueError(
            f"`{arg_name}` must have {channels} channels in its last axis; got shape {x.shape}."
        )


def validate_event_ndims(event_ndims):
    if not checks.is_int(event_ndims) or event_ndims not in (1, 3):
        raise ValueError(
            f"`event_ndims` must be 3 (images [H, W, C]) or 1 (vectors [D]); got {event_ndims!r}."
        )
    return int(event_ndims)


def validate_positive_int(value, arg_name):
    """`value` as a Python int > 0, by `checks.is_int`'s rule (NumPy ints
    accepted, bools and floats refused).

    Always a ValueError: the bijectors' messages and error types predate
    `checks.positive_int` (TypeError for a non-int) and tests pin them.
    """
    if not checks.is_int(value) or value <= 0:
        raise ValueError(f"`{arg_name}` must be a positive int; got {value!r}.")
    return int(value)


def channels_and_event_ndims(channels, event_ndims):
    """The checked `(channels, event_ndims)` of a channel-wise bijector."""
    return validate_positive_int(channels, "channels"), validate_event_ndims(event_ndims)


def event_shape_parts(shape, event_ndims, arg_name):
    """`(batch prefix, event)` of a static shape, or `None` for unknown rank.

    TFP's shape-changing bijectors (`tfb.Reshape`, `tfb.Split`) keep whatever
    batch prefix `forward_event_shape` is given; so do ours.
    """
    shape = tf.TensorShape(shape)
    if shape.rank is None:
        return None
    if shape.rank < event_ndims:
        raise ValueError(
            f"`{arg_name}` must have at least {event_ndims} dims (the event); got {shape}."
        )
    return shape[: shape.rank - event_ndims], shape[shape.rank - event_ndims :]


def call_with_one_batch_axis(layer, x, event_ndims):
    """`layer(x)` for any batch shape of `x`, none included.

    Keras layers want exactly one batch axis (Conv2D rank 4, Dense rank >= 2),
    but a bijector must serve `dist.sample()` (no batch axis) and
    `dist.sample([2, 3])` alike: fold the batch shape into one axis and back.
    """
    if x.shape.rank == event_ndims + 1:
        return layer(x)
    event = x.shape[-event_ndims:]
    event = event.as_list() if event.is_fully_defined() else tf.shape(x)[-event_ndims:]
    batch = tf.shape(x)[:-event_ndims]
    out = layer(tf.reshape(x, tf.concat([[-1], event], 0)))

    def unfold(t):
        folded = tf.reshape(t, tf.concat([batch, tf.shape(t)[1:]], 0))
        if x.shape.rank is not None:
            folded.set_shape(x.shape[:-event_ndims].concatenate(t.shape[1:]))
        return folded

    return tf.nest.map_structure(unfold, out)
