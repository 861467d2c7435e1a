"""What `FlowModel.fit`, `evaluate` and `call` take as a batch: data and its context.

A batch of a conditional flow `p(x | context)` is any of

    (x, context)                                  a tuple: arrays, tensors, a tf.data element
    {"x" or "image": x, "context" or "label": context}
    fit(x, context)                               Keras's `y`

and of an unconditional flow `x` alone. An unconditional model ignores a
context that comes with its data (a tfds pipeline yields `(image, label)`
pairs whichever model trains on it); its `log_prob(x, context)` refuses one.
The context is checked and made canonical by `InputSpec.context`.
"""

import keras
import numpy as np
import tensorflow as tf

from tfp_glow.training.distributed import first_step_batch

__all__ = ["first_batch", "split_inputs", "unpack"]

_DATA_KEYS = ("x", "image")
_CONTEXT_KEYS = ("context", "label")


def split_inputs(inputs, y=None):
    """`(x, context)` of a model input: a dict, an `(x, context)` pair or `x` (then `y`)."""
    if isinstance(inputs, dict):
        data = [k for k in _DATA_KEYS if k in inputs]
        if not data:
            raise ValueError(
                "A dict batch must hold the data under 'x' or 'image' (and a conditional "
                f"model's context under 'context' or 'label'); got keys {sorted(inputs)}."
            )
        given = [k for k in _CONTEXT_KEYS if k in inputs]
        return inputs[data[0]], inputs[given[0]] if given else y
    if isinstance(inputs, (tuple, list)) and len(inputs) == 2:
        return inputs[0], inputs[1]
    return inputs, y


def unpack(data, conditional):
    """`(x, context)` of a Keras batch (`(x, y, sample_weight)` conventions);
    the context is None for an unconditional model."""
    x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
    x, context = split_inputs(x, y)
    return x, (context if conditional else None)


def first_batch(model, x, y, batch_size):
    """`(x, context)` of the first batch `fit` will train on, or None for sources
    that cannot be peeked at (generators, `PyDataset`s)."""
    conditional = model.context_shape is not None
    if isinstance(x, (tf.data.Dataset, tf.distribute.DistributedDataset)):
        return unpack(first_step_batch(x, model.distribute_strategy), conditional)
    if isinstance(x, (np.ndarray, tf.Tensor, tuple, list, dict)):
        x_all, context = unpack(x if y is None else (x, y), conditional)
        n = batch_size or 256
        return x_all[:n], (None if context is None else context[:n])
    return None
