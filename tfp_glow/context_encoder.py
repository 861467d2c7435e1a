"""The optional context encoder of a conditional flow, shared by all its layers.

A conditional model `p(x | c)` may take `context_encoder=`, a Keras layer `e`
(a `keras.Sequential`, a small conv net, any `keras.layers.Layer`), trained
with the flow. The user's context `c` (`[N, *context_shape]`) is checked as
always, then every bijector and prior receives `e(c)` instead of `c`:

    log p(x | c) = log N(f(x; e(c))) + log |det df(x; e(c)) / dx|

so the layers share one learned summary of the context (sbi's and zuko's
`embedding_net`) instead of each reading the raw context. The flow is built
for the encoder's output shape `[*flow_context_shape]` (found by calling `e`
once on zeros), the model's public `context_shape` stays the raw one: `fit`,
`log_prob`, `sample`, `.keras` files and `export_saved_model` signatures all
take the raw context, and the encoder runs inside them.
"""

import keras
import tensorflow as tf

__all__ = ["condition", "context_encoder_of", "flow_context_shape"]


def context_encoder_of(value, context_shape=None, num_classes=None):
    """`value` as a Keras layer (a `.keras` config dict is deserialized), or None.

    Raises a `TypeError` for anything that is not a layer and a `ValueError` on a
    model without `context_shape` (there is nothing to encode; a class-conditional
    model passes `context_shape=(K,)` one-hot contexts instead of `num_classes`).
    """
    if value is None:
        return None
    if isinstance(value, dict):
        value = keras.saving.deserialize_keras_object(value)
    if not isinstance(value, keras.layers.Layer):
        raise TypeError(
            "`context_encoder` must be a Keras layer or model mapping contexts "
            "[batch, *context_shape] to features [batch, ...] (e.g. keras.Sequential"
            f"([keras.layers.Dense(32, activation='relu')])); got {type(value).__name__}."
        )
    if context_shape is None or num_classes is not None:
        raise ValueError(
            "`context_encoder` needs a conditional model built with `context_shape` (for "
            "class labels, `context_shape=(num_classes,)` with one-hot contexts); got "
            f"context_shape={context_shape!r}, num_classes={num_classes!r}."
        )
    return value


def flow_context_shape(encoder, context_shape, dtype="float32"):
    """The shape of one encoded context, `e(zeros([1, *context_shape]))[0]`, the
    context shape the flow's layers are built for (`context_shape` without an
    encoder). Calling the encoder once also creates its weights."""
    if encoder is None:
        return None if context_shape is None else tuple(context_shape)
    probe = tf.zeros([1, *context_shape], dtype)
    try:
        out = encoder(probe)
    except Exception as error:  # the user's layer: say which call failed
        raise ValueError(
            f"`context_encoder` {encoder.name!r} failed on a context of shape "
            f"[batch, {', '.join(map(str, context_shape))}] (context_shape="
            f"{tuple(context_shape)}): {error}"
        ) from error
    if not isinstance(out, tf.Tensor) or not out.dtype.is_floating or out.shape.rank < 2:
        raise ValueError(
            f"`context_encoder` {encoder.name!r} must return one float tensor [batch, ...] "
            f"per context batch; got {out!r}."
        )
    if out.shape[0] != 1 or not out.shape[1:].is_fully_defined():
        raise ValueError(
            f"`context_encoder` {encoder.name!r} must keep the batch axis and return a "
            f"static feature shape; [1, *context_shape] gave {out.shape}."
        )
    return tuple(int(d) for d in out.shape[1:])


def condition(encoder, context, dtype):
    """The bijectors' keywords for a canonical `context`: `{"conditional_input":
    e(context)}` in the flow's dtype (the encoder may compute in its own), or the
    context itself without an encoder."""
    if encoder is not None:
        context = tf.cast(encoder(context), dtype)
    return {"conditional_input": context}
