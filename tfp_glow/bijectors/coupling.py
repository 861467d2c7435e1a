"""Masks and the shared machinery of the coupling layers (NICE, RealNVP).

A coupling layer splits its input into a conditioning part `x_b`, copied
unchanged, and a transformed part `x_a` whose shift (and scale) come from a
network applied to `x_b`. Two masks (Dinh et al. 2017, section 3.4):

* `mask="channel"`: `x_b` is one half of the channels (last axis); `parity=0`
  conditions on the first half and transforms the second, `parity=1` swaps.
* `mask="checkerboard"`: `x_b` is the spatial checkerboard `b[h, w] =
  (h + w + parity) % 2 == 0` (all channels); for vectors, the even (parity 0)
  or odd features. The network sees `b * x`, and the transform applies where
  `b == 0`.

The network: a coupling knows its split, so it sizes its own network. Pass
either

* a factory `fn(output_units) -> keras.layers.Layer` (anything callable that
  is not a Keras layer), called once at construction with the number of
  output channels the coupling needs (`event_shape` is then required), e.g.
  `functools.partial(tfp_glow.nets.GlowCouplingNet, 64)`; as TFP's `RealNVP`
  hands `output_units` to its `shift_and_log_scale_fn`; or
* a ready network: a `keras.layers.Layer` instance, whose output size is
  checked at construction when it can tell its output shape, else on the
  first call (a `ValueError` naming the expected count).

`output_units_for(event_shape, mask)` (and the `output_units` property) give
that count: `k * C_a`, with `k` outputs per transformed channel (1 for
additive, 2 for affine, `3K - 1` for a K-bin spline and `3K + 2` for a
K-component mixture, whose `output_units_for` also take `num_bins` /
`num_components`) and `C_a = C / 2` (channel mask) or `C` (checkerboard).

Conditional couplings (`context_shape=`): the network also sees the context
`c` (`conditional_input`), concatenated onto its input as extra channels, so
`h = NN([x_b, f(c)])` and the map stays invertible in `x` for every `c`. `f`
lays the context out like the event (`tfp_glow.bijectors._context`): a
vector context is broadcast over every position of an image, an image
context is resized to the event's height and width, and for vector events
the context is flattened. The network is built for those extra channels at
construction.

Mixed precision: the network computes in its own dtype policy (e.g.
`"mixed_bfloat16"`); the conditioning part is cast to the network's compute
dtype and its output back to the flow's dtype (clipped to the finite range
first, see `_precision.to_flow_dtype`), so the flow math and log-dets keep the
bijector's dtype.
"""

from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf

from tfp_glow import checks
from tfp_glow.bijectors import _context, _precision, _shapes
from tfp_glow.bijectors.base import FlowBijector

__all__ = ["MASKS", "checkerboard_mask", "CouplingBase"]

MASKS = ("channel", "checkerboard")


def checkerboard_mask_np(event_shape, parity=0):
    """`checkerboard_mask` as a float64 NumPy array."""
    event_shape = tuple(event_shape)
    if len(event_shape) == 3:
        h, w = event_shape[0], event_shape[1]
        grid = np.add.outer(np.arange(h), np.arange(w)) + parity
        return (grid % 2 == 0).astype(np.float64)[..., None]
    return ((np.arange(event_shape[0]) + parity) % 2 == 0).astype(np.float64)


def checkerboard_mask(
    event_shape: Sequence[int], parity: int = 0, dtype: tf.DType | str = tf.float32
) -> tf.Tensor:
    """Binary mask `b` (1 = conditioning, copied), shaped to broadcast.

    Images `[H, W, C]`: `b[h, w, 0] = (h + w + parity) % 2 == 0`, shape
    `[H, W, 1]`. Vectors `[D]`: `b[i] = (i + parity) % 2 == 0`.
    """
    return tf.constant(checkerboard_mask_np(event_shape, parity), dtype=dtype)


class CouplingBase(FlowBijector):
    """Validates arguments, sizes the network, splits and recombines;
    subclasses give the math.

    Subclasses implement `_transform(x_a, h)` and `_untransform(y_a, h)`
    returning `(out, elementwise_log_det)`, where `h` is the network output
    for the conditioning part, and set `_outputs_per_channel` (1 for NICE, 2
    for affine). `net_arg` is the subclass's name for the network argument,
    used in error messages.
    """

    _outputs_per_channel = 1

    def __init__(
        self,
        net,
        mask="channel",
        parity=0,
        event_shape=None,
        event_ndims=3,
        dtype=tf.float32,
        validate_args=False,
        parameters=None,
        name=None,
        net_arg="net",
        context_shape=None,
    ):
        if not callable(net):
            raise TypeError(
                f"The coupling network must be a callable: a Keras layer, or a factory "
                f"`fn(output_units) -> keras.layers.Layer` (`{net_arg}`); got {net!r}."
            )
        if mask not in MASKS:
            raise ValueError(f"`mask` must be one of {MASKS}; got {mask!r}.")
        # A bool or float would compare equal to 0/1 and silently pass.
        if isinstance(parity, bool) or not isinstance(parity, (int, np.integer)):
            raise TypeError(f"`parity` must be the int 0 or 1; got {parity!r}.")
        if parity not in (0, 1):
            raise ValueError(f"`parity` must be 0 or 1; got {parity!r}.")
        parity = int(parity)
        if event_shape is not None:
            event_shape = tuple(int(d) for d in event_shape)
            event_ndims = len(event_shape)
        _shapes.validate_event_ndims(event_ndims)
        self._mask = mask
        self._parity = parity
        self._event_ndims = event_ndims
        self._event_shape = event_shape
        self._context_shape = _context.context_shape_of(context_shape)
        if self._context_shape is not None and event_shape is None:
            raise ValueError(
                f"A conditional coupling (context_shape={self._context_shape}) needs "
                "`event_shape`, so its network is built for the context's channels."
            )
        if event_shape is not None:
            self._validate_event_shape(event_shape, "event_shape")
        self._net = self._network_from(net, net_arg)
        dtype = tf.as_dtype(dtype)
        super().__init__(
            forward_min_event_ndims=event_ndims,
            validate_args=validate_args,
            dtype=dtype,
            parameters=parameters,
            name=name,
        )
        if event_shape is not None:
            if not getattr(self._net, "built", True):
                self._net.build((None,) + self._net_input_shape(event_shape))
            self._check_static_output_units(net_arg)
        if isinstance(self._net, keras.layers.Layer):
            self._track_layers(self._net)

    @classmethod
    def output_units_for(cls, event_shape, mask="channel"):
        """Output channels the network needs for inputs of `event_shape`:

            output_units = k * C_a,   C_a = C // 2 (mask="channel") or C ("checkerboard")

        with `k = 1` (additive: the shift) or `k = 2` (affine: shift and scale).
        """
        return cls._outputs_per_channel * cls._transformed_channels(event_shape, mask)

    @staticmethod
    def _transformed_channels(event_shape, mask):
        """`C_a`: channels of the transformed part (all of them for checkerboard)."""
        event_shape = checks.shape(event_shape, "event_shape", rank=(1, 3))
        checks.choice(mask, MASKS, "mask")
        channels = event_shape[-1]
        if mask == "checkerboard":
            return channels
        if channels % 2:
            raise ValueError(
                f"mask='channel' needs an even number of channels (last axis of "
                f"`event_shape`); received {event_shape}."
            )
        return channels // 2

    @property
    def output_units(self):
        """Output channels the network must return (None without `event_shape`)."""
        if self._event_shape is None:
            return None
        # The instance's count: a subclass may set it per instance (e.g. from num_bins).
        return self._outputs_per_channel * self._transformed_channels(self._event_shape, self._mask)

    def _network_from(self, net, net_arg):
        """The network: `net` itself if it is a Keras layer, else `net(output_units)`."""
        if isinstance(net, keras.layers.Layer):
            return net
        if self._event_shape is None:
            raise ValueError(
                f"`{net_arg}` is a network factory ({net!r}, not a keras.layers.Layer): "
                f"pass `event_shape` so the coupling can tell it how many outputs "
                f"it needs, or pass a ready Keras layer."
            )
        units = self.output_units
        layer = net(units)
        if not isinstance(layer, keras.layers.Layer):
            raise TypeError(
                f"The network factory `{net_arg}` must return a keras.layers.Layer; "
                f"{net!r}({units}) returned {layer!r}."
            )
        return layer

    def _check_static_output_units(self, net_arg):
        """Fails at construction when a ready network's output shape is known wrong."""
        try:
            shape = self._net.compute_output_shape(
                (None,) + self._net_input_shape(self._event_shape)
            )
        except NotImplementedError:  # checked on the first call instead
            return
        # A network returning several tensors has them concatenated on channels.
        shapes = (
            [tuple(s) for s in shape]
            if shape and isinstance(shape[0], (tuple, list))
            else [tuple(shape)]
        )
        if not all(s and s[-1] is not None for s in shapes):
            return
        channels = sum(s[-1] for s in shapes)
        if channels != self.output_units:
            raise ValueError(
                f"The coupling network (`{net_arg}`) of {self.name} must return "
                f"{self.output_units} channels ({self._outputs_per_channel} per "
                f"transformed channel); its output shape is {shape}. Pass a "
                f"factory `fn(output_units)` to have it sized for you."
            )

    @property
    def net(self):
        return self._net

    @property
    def context_shape(self):
        """The shape of one context (`conditional_input[i]`), or None."""
        return self._context_shape

    @property
    def mask(self):
        return self._mask

    @property
    def parity(self):
        return self._parity

    def _validate_event_shape(self, shape, arg_name):
        if len(shape) != self._event_ndims:
            raise ValueError(f"`{arg_name}` must have {self._event_ndims} dims; got {shape}.")
        channels = shape[-1]
        if self._mask == "channel" and channels is not None and channels % 2:
            raise ValueError(
                f"mask='channel' needs an even number of channels (last axis of "
                f"`{arg_name}`); got {channels}. Use mask='checkerboard' or "
                f"squeeze first."
            )

    def _conditioning_shape(self, event_shape):
        if self._mask == "channel":
            return tuple(event_shape[:-1]) + (event_shape[-1] // 2,)
        return tuple(event_shape)

    def _net_input_shape(self, event_shape):
        """The conditioning part's shape with the context's channels added."""
        shape = self._conditioning_shape(event_shape)
        extra = _context.feature_channels(self._context_shape, len(event_shape))
        return shape[:-1] + (shape[-1] + extra,)

    def _net_input(self, x_b, conditional_input):
        """`x_b`, or `[x_b, f(context)]` for a conditional coupling (the network's input)."""
        if self._context_shape is None:  # a context for other bijectors is not ours
            return x_b
        context = _context.check_context(
            conditional_input,
            self._context_shape,
            f"{type(self).__name__} ({self.name!r})",
            x_b.dtype,
        )
        return _context.concat_features(x_b, context, self._context_shape, self._event_ndims)

    def _check(self, x):
        _shapes.check_event_rank(x, self._event_ndims)
        if self._event_shape is not None:
            # Otherwise the mismatch surfaces as an opaque error inside the net.
            _shapes.check_channels(x, self._event_shape[-1])
        self._validate_event_shape(tuple(x.shape[-self._event_ndims :]), "x")

    def _run_net(self, x_b, units, conditional_input=None):
        """Network output for the conditioning part, in the flow's dtype.

        The network may compute in lower precision (mixed precision): its
        input is cast to its compute dtype, its output back (safely) to the
        input's dtype, in which the flow math and log-dets stay.
        """
        net_input = self._net_input(x_b, conditional_input)
        h = _shapes.call_with_one_batch_axis(
            self._net, _precision.to_net_dtype(self._net, net_input), self._event_ndims
        )
        if isinstance(h, (tuple, list)):
            h = tf.concat(h, axis=-1)
        h = _precision.to_flow_dtype(h, x_b.dtype)
        if h.shape[-1] is not None and h.shape[-1] != units:
            raise ValueError(
                f"The coupling network of {self.name} must return "
                f"{units} channels ({self._outputs_per_channel} per transformed "
                f"channel); got shape {h.shape}."
            )
        return h

    def _reduce_event(self, ldj):
        return tf.reduce_sum(ldj, axis=list(range(-self._event_ndims, 0)))

    def _split(self, x):
        # One Split op: its gradient is a concat, where two strided slices
        # would each scatter into a zero tensor of the full size.
        half = x.shape[-1] // 2
        first, second = tf.split(x, [half, x.shape[-1] - half], axis=-1)
        if self._parity == 0:
            return second, first  # (x_a, x_b)
        return first, second

    def _recombine(self, y_a, x_b):
        return tf.concat([x_b, y_a] if self._parity == 0 else [y_a, x_b], axis=-1)

    def _apply(self, x, direction, conditional_input=None):
        self._check(x)
        fn = self._transform if direction == "forward" else self._untransform
        if self._mask == "channel":
            x_a, x_b = self._split(x)
            h = self._run_net(x_b, self._outputs_per_channel * x_a.shape[-1], conditional_input)
            y_a, ldj = fn(x_a, h)
            return self._recombine(y_a, x_b), self._reduce_event(ldj)
        mask = checkerboard_mask_np(x.shape[-self._event_ndims :], self._parity)
        h = self._run_net(
            x * tf.constant(mask, x.dtype),
            self._outputs_per_channel * x.shape[-1],
            conditional_input,
        )
        y, ldj = fn(x, h)
        # Copy the conditioning positions; only b == 0 is transformed. `where`
        # (not b * x + (1 - b) * y) so the unused values can never leak a NaN;
        # the mask is a boolean constant that `where` broadcasts.
        keep = tf.constant(mask > 0.5)
        return (tf.where(keep, x, y), self._reduce_event(tf.where(keep, tf.zeros_like(ldj), ldj)))

    def _forward_and_log_det(self, x, conditional_input=None, **kwargs):
        return self._apply(x, "forward", conditional_input)

    def _inverse_and_log_det(self, y, conditional_input=None, **kwargs):
        return self._apply(y, "inverse", conditional_input)
