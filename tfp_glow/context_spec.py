"""`ContextSpec`: the rules for the context of a conditional flow `p(x | context)`.

A conditional model is built with `context_shape=` (any shape: `(5,)` for a
vector, `(4, 4, 1)` for an image) or with `num_classes=K`, the shorthand for
`context_shape=(K,)` whose context may also be given as int class ids `[N]`
(turned into one-hot vectors). Whatever the user passes, only the *canonical*
context reaches the flow: a float tensor in the flow's dtype of shape
`[N, *context_shape]`, as the keyword `conditional_input=` of every bijector.

`canonical` raises a `ValueError`/`TypeError` naming the argument and the
expected shape when the context is missing on a conditional model, given to an
unconditional one, of the wrong shape, batch or dtype, or (eagerly) int class
ids outside `[0, num_classes)`. All checks but the last are static (free at run
time); `InputSpec.context` adds the finite-value check.
"""

import tensorflow as tf

from tfp_glow import checks

__all__ = ["ContextSpec", "context_argument"]


def _dims(shape):
    return ", ".join(map(str, shape))


class ContextSpec:
    """The context rules of one model: its shape, dtype and (optionally) classes.

    Args:
      context_shape: shape of one context, e.g. `(5,)`; an int `k` means `(k,)`.
        None (with `num_classes` None) for an unconditional model.
      num_classes: classes of a class-conditional model: `context_shape=(K,)`
        that also accepts int class ids. At most one of the two.
      dtype: the flow's float dtype (contexts are cast to it).
    """

    def __init__(self, context_shape=None, num_classes=None, dtype=tf.float32):
        num_classes = checks.positive_int(num_classes, "num_classes", allow_none=True)
        if context_shape is not None and num_classes is not None:
            raise ValueError(
                f"Pass `num_classes` or `context_shape`, not both; got num_classes={num_classes} "
                f"and context_shape={context_shape!r} (num_classes=K is the shorthand for "
                "context_shape=(K,) that also takes int class ids)."
            )
        if checks.is_int(context_shape):
            context_shape = (context_shape,)
        if context_shape is not None:
            context_shape = checks.shape(context_shape, "context_shape")
        elif num_classes is not None:
            context_shape = (num_classes,)
        self.num_classes = num_classes
        self.shape = context_shape
        self.dtype = tf.as_dtype(dtype)

    @property
    def conditional(self):
        """True for a model built with `context_shape` or `num_classes`."""
        return self.shape is not None

    def signature(self, name=None):
        """`tf.TensorSpec([None, *context_shape])` of canonical contexts, or None."""
        if self.shape is None:
            return None
        name = name or ("label" if self.num_classes is not None else "context")
        return tf.TensorSpec([None, *self.shape], self.dtype, name=name)

    def expected(self):
        """What a conditional model takes, in words (for messages)."""
        if self.num_classes is not None:
            return (
                f"int class ids [batch] or one-hot [batch, {self.num_classes}] "
                f"(the model's `context`, num_classes={self.num_classes})"
            )
        return f"a float tensor of shape [batch, {_dims(self.shape)}] (context_shape={self.shape})"

    # -- canonical context ---------------------------------------------------
    def canonical(
        self, context, batch_like=None, values=True, arg_name="context", num_samples=None
    ):
        """`(context, from_ids)`: float `[N, *context_shape]` (or None) and whether it
        came from int class ids (then its values are already known to be finite).

        `batch_like`: a tensor whose batch `N` the context must match.
        `num_samples`: for `sample`: one unbatched context (`[*context_shape]`, or
        one int class id) is broadcast to `[num_samples, *context_shape]`, and a
        batched one must have `num_samples` rows.
        """
        name = self.name_of(arg_name)
        if self.shape is None:
            if context is not None:
                raise ValueError(self._unconditional_message(context, arg_name))
            return None, False
        if context is None:
            raise ValueError(self._missing_message(name))
        if isinstance(context, (tf.RaggedTensor, tf.SparseTensor)):
            raise TypeError(
                f"`{name}` must be a dense tensor, {self.expected()}; got a "
                f"{type(context).__name__}."
            )
        try:
            t = tf.convert_to_tensor(context)
        except (TypeError, ValueError) as error:  # ragged nested lists, objects
            raise TypeError(
                f"`{name}` must be {self.expected()}; it does not convert to a tensor: {error}"
            ) from None
        from_ids = self.num_classes is not None and t.dtype.is_integer
        if from_ids:
            t = self._one_hot(t, name, values, num_samples)
        elif t.dtype.is_floating or (t.dtype.is_integer and self.num_classes is None):
            t = tf.cast(t, self.dtype)
        elif self.num_classes is not None:
            raise TypeError(
                f"`{name}` must be int class ids or float one-hot vectors [batch, "
                f"{self.num_classes}] (the model's `context`); got dtype {t.dtype.name}."
            )
        else:
            raise TypeError(f"`{name}` must be {self.expected()}; got dtype {t.dtype.name}.")
        if num_samples is not None and t.shape.rank == len(self.shape):
            # One context for every sample.
            num = tf.reshape(tf.cast(num_samples, tf.int32), [1])
            t = tf.broadcast_to(t[None], tf.concat([num, self.shape], 0))
        self._check_shape(t, name)
        self._check_batch(t, name, batch_like, num_samples)
        return t, from_ids

    def name_of(self, arg_name):
        """The name messages use: a class-conditional model's context is its `labels`."""
        return "labels" if self.num_classes is not None and arg_name == "context" else arg_name

    def _unconditional_message(self, context, arg_name):
        if arg_name == "labels" or _looks_like_ids(context):
            return (
                f"`{arg_name if arg_name != 'context' else 'labels'}` were given but this model "
                "is not class-conditional (num_classes=None) and takes no `context` "
                "(context_shape=None); build it with `num_classes` or `context_shape`, or "
                "drop the argument."
            )
        return (
            f"`{arg_name}` was given but this model is unconditional (context_shape=None); "
            f"build it with `context_shape` (or `num_classes`), or drop `{arg_name}`."
        )

    def _missing_message(self, name):
        if self.num_classes is not None:
            return (
                f"This model is class-conditional (num_classes={self.num_classes}): pass "
                f"`{name}` as the `context` ({self.expected()})."
            )
        return f"This model is conditional: pass `{name}`, {self.expected()}."

    def _one_hot(self, ids, name, values, num_samples):
        k = self.num_classes
        if ids.shape.rank == 0 and num_samples is not None:
            ids = tf.fill(tf.reshape(tf.cast(num_samples, tf.int32), [1]), ids)
        if ids.shape.rank != 1:
            raise ValueError(
                f"Integer `{name}` must have shape [batch] (class ids; or pass one-hot "
                f"[batch, {k}] floats as the `context`); got {ids.shape}."
            )
        if values and tf.executing_eagerly() and tf.size(ids):
            lo = int(tf.reduce_min(ids).numpy())
            hi = int(tf.reduce_max(ids).numpy())
            if lo < 0 or hi >= k:
                raise ValueError(
                    f"`{name}` must be class ids in [0, {k - 1}] (num_classes={k}, the "
                    f"model's `context`); got values in [{lo}, {hi}]."
                )
        return tf.one_hot(ids, k, dtype=self.dtype)

    def _check_shape(self, t, name):
        shape = self.shape
        if t.shape.rank == len(shape) + 1 and all(
            a is None or a == b for a, b in zip(t.shape[1:], shape)
        ):
            return
        if self.num_classes is not None:
            raise ValueError(
                f"Float (one-hot) `{name}` must have shape [batch, {self.num_classes}] (the "
                f"model's `context`; or int class ids [batch]); got {t.shape}."
            )
        hint = ""
        if t.shape.rank == len(shape) and all(a in (None, b) for a, b in zip(t.shape, shape)):
            hint = f" Add a batch axis, e.g. `{name}[None]`."
        raise ValueError(
            f"`{name}` must have shape [batch, {_dims(shape)}] (context_shape={shape}); "
            f"got {t.shape}.{hint}"
        )

    def _check_batch(self, t, name, batch_like, num_samples):
        n = t.shape[0]
        if batch_like is not None:
            m = batch_like.shape[0]
            if n is not None and m is not None and n != m:
                raise ValueError(
                    f"`{name}` has {n} entries but the batch has {m} examples (expected "
                    f"shape [{m}, {_dims(self.shape)}])."
                )
        if checks.is_int(num_samples) and n is not None and n != num_samples:
            raise ValueError(
                f"`{name}` has {n} entries but `num_samples` is {num_samples} (pass one "
                f"context of shape [{_dims(self.shape)}] for every sample, or "
                f"[{num_samples}, {_dims(self.shape)}])."
            )


def _looks_like_ids(value):
    """True for int class ids (a list or tensor of ints), the labels of old code."""
    try:
        t = tf.convert_to_tensor(value)
    except (TypeError, ValueError):
        return False
    return t.dtype.is_integer and t.shape.rank in (0, 1)


def context_argument(context, labels):
    """`(value, name)` of the condition passed as `context` or by its older name
    `labels` (a keyword alias kept for existing code); both at once is a TypeError."""
    if labels is None:
        return context, "context"
    if context is not None:
        raise TypeError(
            "Pass the condition once: as `context` or as `labels` (its older name), not both."
        )
    return labels, "labels"
