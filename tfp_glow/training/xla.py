"""XLA and the shape of the last batch.

XLA compiles one program per input shape. `fit(jit_compile=True)` on an
array whose length is not a multiple of `batch_size` ends every epoch with a
smaller batch, and XLA compiles the whole training step again for it: on the
digits Glow (2 x 8, width 64) the first compile took 61 s and the partial
batch of 29 another 150 s (`benchmarks/fit_overhead.py --jit`). Keras' array
adapter has no `drop_remainder`, so `FlowModel.fit` warns; `tfp-glow train
--jit` drops the partial batch of its training pipeline.
"""

import warnings

__all__ = ["warn_if_partial_last_batch"]


def warn_if_partial_last_batch(model, x, batch_size):
    """Warns when an XLA-compiled `fit` on arrays will meet a smaller last batch."""
    shape = getattr(x, "shape", None)  # arrays and tensors; a Dataset has none
    if not getattr(model, "jit_compile", False) or not shape or shape[0] is None:
        return
    batch = 32 if batch_size is None else int(batch_size)  # Keras' default
    n = int(shape[0])
    if n % batch:
        warnings.warn(
            f"fit(jit_compile=True) on {n} examples with batch_size={batch}: the last "
            f"batch of each epoch has {n % batch} examples and XLA compiles the training "
            f"step again for that shape (minutes for a deep flow). Pass "
            f"x[:{n - n % batch}], or a tf.data pipeline batched with "
            f"drop_remainder=True, to train on full batches only.",
            stacklevel=3,
        )
