"""Mixed precision at the boundary between a bijector and its network.

A coupling or prior network may compute in a lower precision than the flow
(a Keras `"mixed_bfloat16"` / `"mixed_float16"` policy: float32 variables,
bfloat16/float16 arithmetic); the flow math and every log-det stay in the
bijector's dtype. These helpers cast at the two crossings.
"""

import keras
import tensorflow as tf

__all__ = ["NET_DTYPES", "net_policy", "to_net_dtype", "to_flow_dtype"]

# The Keras dtype policies a bijector may give the network it builds itself.
NET_DTYPES = ("float16", "bfloat16", "float32", "float64", "mixed_float16", "mixed_bfloat16")


def net_policy(net_dtype, flow_dtype, arg_name="net_dtype"):
    """The Keras dtype policy name for a network a bijector builds.

    `None` means the bijector's own dtype (`flow_dtype`); otherwise one of
    `NET_DTYPES` (a `keras.DTypePolicy` is accepted too and kept as is).
    """
    if net_dtype is None:
        return tf.as_dtype(flow_dtype).name
    if isinstance(net_dtype, keras.DTypePolicy):
        return net_dtype
    if not isinstance(net_dtype, str) or net_dtype not in NET_DTYPES:
        raise ValueError(
            f"`{arg_name}` must be None (the bijector's dtype), one of "
            f"{NET_DTYPES} or a keras.DTypePolicy; received {net_dtype!r}."
        )
    return net_dtype


def to_net_dtype(net, x):
    """`x` cast to the compute dtype of `net` (a Keras layer), if it has one.

    Keras would autocast floating inputs anyway; casting here first means the
    batch-folding reshapes around the call already move the narrow tensor.
    """
    dtype = getattr(net, "compute_dtype", None)
    if dtype is None or not x.dtype.is_floating:
        return x
    return tf.cast(x, dtype)


def to_flow_dtype(h, dtype):
    """Network output `h` in the flow's `dtype`, never infinite from a cast.

    A float16 network overflows to +-inf past 65504; an infinite shift would
    make the coupling non-invertible (`inf - inf = NaN` on the way back). So
    an output narrower than the flow is first clipped to its own finite range:
    `h` becomes a finite deterministic function of the conditioning input, and
    the coupling stays an exact bijection with an exact log-det (the affine
    scale is bounded whatever its raw value). NaNs pass through unchanged, for
    the non-finite guard of training to see. Same-dtype outputs are returned
    as they are.
    """
    dtype = tf.as_dtype(dtype)
    if h.dtype == dtype:
        return h
    if h.dtype.is_floating:
        # The narrower range of the two (a float64 net feeding a float32 flow
        # must not overflow in the cast either).
        limit = min(float(h.dtype.max), float(dtype.max))
        h = tf.clip_by_value(h, tf.constant(-limit, h.dtype), tf.constant(limit, h.dtype))
    return tf.cast(h, dtype)
