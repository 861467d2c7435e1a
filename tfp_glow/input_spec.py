"""`InputSpec`: the one place that checks what users feed a flow.

A flow's density is defined on all of R^D, so scoring, encoding and decoding
accept any *finite* input of the right shape (a model scores its own samples
at any temperature). The one mistake worth catching by value is feeding raw
pixels, in [0, 255] or [0, 1], where preprocessed data in [-0.5, 0.5] belongs:
that check (`training_data`) runs where data enter training and evaluation
(`fit`, `evaluate`, the data pipelines, the CLI), not in `log_prob`.

Static checks (dtype, rank, shape) run everywhere and cost nothing at run
time. Value checks (finite, in range) need the data: they run eagerly in
the public methods, and inside graphs only as `tf.debugging` assertions when
`validate_args=True`, so a compiled training step does not pay for them.
"""

import numpy as np
import tensorflow as tf

from tfp_glow import checks
from tfp_glow.context_spec import ContextSpec

__all__ = ["InputSpec", "DATA_RANGE", "RANGE_SLACK"]

# Data scaled by `tfp_glow.data.preprocess` lies in [-0.5, 0.5] (dequantized
# openai/glow style); float32 rounding stays far below this slack, raw pixels
# ([0, 1] or [0, 255]) far above it.
DATA_RANGE = (-0.5, 0.5)
RANGE_SLACK = 1e-3


def _dims(shape):
    return ", ".join(map(str, shape))


class InputSpec:
    """Shapes, dtype and context rules of one flow model.

    Args:
      event_shape: shape of one data point, e.g. `(8, 8, 1)`.
      latent_shape: shape of one latent `z = f(x)`.
      dtype: the flow's float dtype (inputs are cast to it).
      num_bins: discrete levels of the data, or None for continuous data.
      num_classes: classes of a class-conditional flow, or None: the shorthand
        for `context_shape=(num_classes,)` that also takes int class ids.
      validate_args: also assert values inside graphs.
      context_shape: shape of one context of a conditional flow `p(x | context)`,
        or None (see `tfp_glow.context_spec`). At most one of it and `num_classes`.
    """

    def __init__(
        self,
        event_shape,
        latent_shape,
        dtype=tf.float32,
        num_bins=None,
        num_classes=None,
        validate_args=False,
        context_shape=None,
    ):
        self.event_shape = tuple(int(d) for d in event_shape)
        self.latent_shape = tuple(int(d) for d in latent_shape)
        self.dtype = tf.as_dtype(dtype)
        self.num_bins = checks.positive_int(num_bins, "num_bins", minimum=2, allow_none=True)
        self.context_rules = ContextSpec(context_shape, num_classes, self.dtype)
        self.num_classes = self.context_rules.num_classes
        self.validate_args = checks.boolean(validate_args, "validate_args")

    # -- derived facts ---------------------------------------------------------
    @property
    def data_range(self):
        """`(-0.5, 0.5)` for discretised image data (num_bins set), else None."""
        if self.num_bins is not None and len(self.event_shape) == 3:
            return DATA_RANGE
        return None

    @property
    def num_dims(self):
        """`D = prod(event_shape)`, the bits/dim denominator."""
        return int(np.prod(self.event_shape))

    def signature(self, kind="data"):
        """`tf.TensorSpec` with a dynamic batch for `"data"` or `"latent"` inputs."""
        shape = self.event_shape if kind == "data" else self.latent_shape
        return tf.TensorSpec([None, *shape], self.dtype, name="x" if kind == "data" else "z")

    @property
    def context_shape(self):
        """Shape of one context (a tuple; `(num_classes,)` for class labels), or None."""
        return self.context_rules.shape

    def context_signature(self):
        """Canonical contexts: float `[batch, *context_shape]` (None if unconditional)."""
        return self.context_rules.signature()

    label_signature = context_signature  # the name before `context_shape` existed

    # -- data and latents ------------------------------------------------------
    def data(self, x, arg_name="x", values=True):
        """`x` cast to the flow's dtype; raises on a bad dtype, shape or non-finite value."""
        return self._tensor(x, arg_name, self.event_shape, "data", values)

    def latent(self, z, arg_name="z", values=True):
        """`z` cast to the flow's dtype; raises on a bad dtype, shape or non-finite value."""
        return self._tensor(z, arg_name, self.latent_shape, "latent", values)

    def training_data(self, x, arg_name="x", values=True):
        """`data(x)` plus the data-range check for discretised images.

        Catches raw pixels ([0, 255] or [0, 1]) and integer levels passed where
        `tfp_glow.data.preprocess`ed data in [-0.5, 0.5] belongs.
        """
        x = self.data(x, arg_name, values=False)
        if values:
            x = self.finite(x, arg_name, self.data_range)
        return x

    def _tensor(self, x, arg_name, shape, kind, values):
        if x is None:
            raise TypeError(f"`{arg_name}` must be a float tensor of {kind}; got None.")
        if isinstance(x, (tf.RaggedTensor, tf.SparseTensor)):
            raise TypeError(f"`{arg_name}` must be a dense float tensor; got a {type(x).__name__}.")
        x = tf.convert_to_tensor(x)
        if not x.dtype.is_floating:
            raise TypeError(
                f"`{arg_name}` must be a floating tensor ({kind}); got dtype "
                f"{x.dtype.name}.{self._dtype_hint(kind)}"
            )
        x = tf.cast(x, self.dtype)
        if x.shape.rank is None:
            raise ValueError(
                f"`{arg_name}` must have a known rank: shape [batch, {_dims(shape)}]; got a "
                "tensor of unknown rank."
            )
        if x.shape.rank != len(shape) + 1 or any(
            a is not None and a != b for a, b in zip(x.shape[1:], shape)
        ):
            hint = ""
            if tuple(x.shape) == shape:
                hint = f" Add a batch axis, e.g. `{arg_name}[None]`."
            raise ValueError(
                f"`{arg_name}` must have shape [batch, {_dims(shape)}]; got {x.shape}.{hint}"
            )
        if values:
            x = self.finite(x, arg_name)
        return x

    def _dtype_hint(self, kind):
        if kind != "data":
            return " Latents come from `encode` or N(0, I)."
        if self.num_bins is None:
            return " Cast it to a float dtype first."
        return (
            f" Map integer levels to [-0.5, 0.5] first with "
            f"`tfp_glow.data.preprocess(images, num_bins={self.num_bins})` "
            "(8-bit pixels: `tfp_glow.data.reduce_bits` first)."
        )

    def finite(self, x, arg_name, data_range=None):
        """`x` after checking it is finite (and within `data_range` + slack).

        Eagerly: one host read of (count of non-finite, min, max) and a
        ValueError naming the argument. In a graph: `tf.debugging.Assert`s,
        only when `validate_args` is set.
        """
        if tf.executing_eagerly():
            if tf.size(x) == 0:
                return x
            num_bad, lo, hi = _bad_count_and_range(x)
            if num_bad:
                raise ValueError(
                    f"`{arg_name}` contains {int(num_bad)} non-finite values (NaN or "
                    "inf); a flow cannot score or invert them."
                )
            if data_range is not None and (
                lo < data_range[0] - RANGE_SLACK or hi > data_range[1] + RANGE_SLACK
            ):
                raise ValueError(self._range_message(arg_name, data_range, lo, hi))
            return x
        if not self.validate_args:
            return x
        asserts = [
            tf.debugging.Assert(
                tf.reduce_all(tf.math.is_finite(x)),
                [f"`{arg_name}` contains non-finite values (NaN or inf)."],
            )
        ]
        if data_range is not None:
            asserts.append(
                tf.debugging.Assert(
                    tf.reduce_all(
                        (x >= data_range[0] - RANGE_SLACK) & (x <= data_range[1] + RANGE_SLACK)
                    ),
                    [
                        f"`{arg_name}` must lie in the data range [{data_range[0]}, "
                        f"{data_range[1]}]; got min and max:",
                        tf.reduce_min(x),
                        tf.reduce_max(x),
                    ],
                )
            )
        with tf.control_dependencies(asserts):
            return tf.identity(x)

    def _range_message(self, arg_name, data_range, lo, hi):
        return (
            f"`{arg_name}` must lie in the data range [{data_range[0]}, {data_range[1]}] "
            f"of this model (num_bins={self.num_bins}) to be trained or evaluated on; got "
            f"values in [{lo:.4g}, {hi:.4g}]. Scale images with "
            "`tfp_glow.data.preprocess` (raw pixels in [0, 255] or [0, 1] are outside "
            "the data range). Scoring any finite input, e.g. the model's own samples, "
            "is `model.log_prob(x)`."
        )

    # -- context -----------------------------------------------------------------
    def context(self, context, batch_like=None, values=True, arg_name="context", num_samples=None):
        """Canonical context: float `[batch, *context_shape]` in the flow's dtype, or None.

        Takes float (or int) tensors `[batch, *context_shape]`; class-conditional
        models also int class ids `[batch]` (made one-hot). With `num_samples`
        (for `sample`) one unbatched context `[*context_shape]` (or one class id)
        is broadcast to every sample. Raises, naming `arg_name` and the expected
        shape, when the context is given to an unconditional model, missing for
        a conditional one, of the wrong dtype, shape or batch (`batch_like`'s),
        non-finite or (int ids) outside `[0, num_classes)` (value checks eagerly,
        or in graphs with `validate_args`, when `values`).
        """
        t, from_ids = self.context_rules.canonical(
            context, batch_like, values, arg_name, num_samples
        )
        if t is not None and values and not from_ids:
            t = self.finite(t, self.context_rules.name_of(arg_name))
        return t

    def labels(self, labels, batch_like=None, values=True, arg_name="labels"):
        """`context(labels, ...)`: the name from before `context_shape` existed."""
        return self.context(labels, batch_like, values, arg_name)

    # -- sampling arguments ----------------------------------------------------
    @staticmethod
    def num_samples(num_samples):
        """A Python int >= 1, or an int tensor inside a graph (checked eagerly)."""
        if isinstance(num_samples, (tf.Tensor, tf.Variable)):
            if not num_samples.dtype.is_integer:
                raise TypeError(
                    f"`num_samples` must be an int; got a {num_samples.dtype.name} tensor."
                )
            if not tf.executing_eagerly():
                return num_samples
            num_samples = int(num_samples.numpy())
        return checks.positive_int(num_samples, "num_samples")

    @staticmethod
    def temperature(temperature):
        """A finite number >= 0 (or a float tensor inside a graph)."""
        if isinstance(temperature, (tf.Tensor, tf.Variable)):
            if not tf.executing_eagerly():
                return temperature
            temperature = float(temperature.numpy())
        return checks.number(temperature, "temperature", minimum=0.0)


def _bad_count_and_range(x):
    """(number of non-finite values, min, max of the finite ones) of an eager tensor.

    On the CPU in NumPy, on the tensor's own buffer (a dozen TF op dispatches
    cost about 1 ms, a third of a small model's whole eager call); elsewhere
    in TF ops with one host read of three scalars.
    """
    if x.device.endswith("CPU:0") or not x.device:
        v = x.numpy()
        finite = np.isfinite(v)
        if finite.all():
            return 0, float(v.min()), float(v.max())
        safe = v[finite]
        lo, hi = (float(safe.min()), float(safe.max())) if safe.size else (0.0, 0.0)
        return int(v.size - np.count_nonzero(finite)), lo, hi
    finite = tf.math.is_finite(x)
    safe = tf.where(finite, x, tf.zeros_like(x))
    return tuple(
        tf.stack(
            [
                tf.reduce_sum(tf.cast(tf.logical_not(finite), x.dtype)),
                tf.reduce_min(safe),
                tf.reduce_max(safe),
            ]
        )
        .numpy()
        .tolist()
    )
