"""Model and training variants explored on the digits protocol.

Everything here is the benchmark's own code path (no library edits):

* `build_glow(...)`: Glow with 2 levels x 8 steps built from the public
  bijectors exactly as `tfp_glow.models.build_glow_flow` does (squeeze,
  K x (ActNorm, LU 1x1 conv, coupling), split with a learned prior, learned
  top prior), but with a choice of coupling (affine, rational-quadratic
  spline, mixture-of-logistics CDF) and of coupling network (Glow's
  3x3-1x1-3x3 net, optionally with dropout). With `coupling="affine"` and
  no dropout it builds the same model as `tfp_glow.Glow` (checked by
  `digits_protocol.py --check-builder`).
* `DropoutGlowNet`: Glow's coupling network with dropout after each ReLU,
  switched on only while `fit` runs (`Switch`): `FlowModel.train_step` calls
  the flow directly, not `model(x, training=True)`, so Keras' `training`
  flag never reaches the networks.
* `EMASwap`: evaluate with the optimizer's exponential moving average of
  the weights (Keras `use_ema=True`) and put the raw weights back.
"""

import contextlib

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
from keras import layers

from tfp_glow import FlowModel, nets
from tfp_glow.bijectors import (
    ActNorm,
    AffineCoupling,
    FactorOut,
    InvertibleConv1x1,
    LearnedPrior,
    MultiScaleFlow,
    Squeeze,
    keras_layers_of,
)

tfb = tfp.bijectors

COUPLINGS = ("affine", "spline", "mol")


class Switch:
    """A scalar 0/1 variable the dropout layers read (1 while training).

    Kept in a plain Python object so Keras does not track it as a weight.
    """

    def __init__(self):
        self.value = tf.Variable(0.0, trainable=False, dtype=tf.float32)

    @contextlib.contextmanager
    def on(self):
        self.value.assign(1.0)
        try:
            yield
        finally:
            self.value.assign(0.0)


class DropoutGlowNet(layers.Layer):
    """Glow's coupling network with dropout after each ReLU:

        3x3 conv -> ReLU -> dropout -> 1x1 conv -> ReLU -> dropout -> ZeroConv2D

    `h <- h * (1 + a (m / (1 - rate) - 1))`, `m ~ Bernoulli(1 - rate)`, with
    `a = switch.value` (1 while training, 0 when evaluating or sampling).
    `last_kernel` is the kernel size of the zero-initialised output conv.
    """

    def __init__(
        self, hidden_channels, out_channels, rate=0.0, switch=None, last_kernel=3, **kwargs
    ):
        super().__init__(**kwargs)
        if rate and switch is None:
            raise ValueError("`switch` is required when `rate` > 0.")
        self.hidden_channels = hidden_channels
        self.out_channels = out_channels
        self.rate = float(rate)
        self._switch = [switch]  # a list so Keras does not try to track it
        policy = self.dtype_policy
        self.conv_in = layers.Conv2D(
            hidden_channels, 3, padding="same", activation="relu", dtype=policy
        )
        self.conv_mid = layers.Conv2D(hidden_channels, 1, activation="relu", dtype=policy)
        self.conv_out = nets.ZeroConv2D(out_channels, last_kernel, dtype=policy)

    def build(self, input_shape):
        self.conv_in.build(input_shape)
        hidden_shape = tuple(input_shape[:-1]) + (self.hidden_channels,)
        self.conv_mid.build(hidden_shape)
        self.conv_out.build(hidden_shape)

    def _dropout(self, h):
        if not self.rate:
            return h
        active = tf.cast(self._switch[0].value, h.dtype)
        keep = tf.cast(tf.random.uniform(tf.shape(h)) >= self.rate, h.dtype)
        return h * (1.0 + active * (keep / (1.0 - self.rate) - 1.0))

    def call(self, x):
        h = self._dropout(self.conv_in(x))
        h = self._dropout(self.conv_mid(h))
        return self.conv_out(h)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.out_channels,)


def _coupling(
    kind, shape, width, dtype, dropout, switch, spline_bins, mol_components, last_kernel, tail_bound
):
    # Imported here so the affine path runs without the new modules.
    if kind == "spline":
        from tfp_glow.bijectors.spline_coupling import RationalQuadraticSplineCoupling
    elif kind == "mol":
        from tfp_glow.bijectors.logistic_mixture_coupling import LogisticMixtureCoupling
    c = shape[-1]
    c_a = c - c // 2
    if kind == "affine":
        per = AffineCoupling._outputs_per_channel
    elif kind == "spline":
        per = RationalQuadraticSplineCoupling.outputs_per_channel(spline_bins)
    else:
        per = LogisticMixtureCoupling.outputs_per_channel(mol_components)
    if dropout or last_kernel != 3:
        net = DropoutGlowNet(
            width, per * c_a, rate=dropout, switch=switch, last_kernel=last_kernel, dtype=dtype
        )
    else:
        net = nets.GlowCouplingNet(width, per * c_a, dtype=dtype)
    if kind == "affine":
        return AffineCoupling(net, event_shape=shape, dtype=dtype)
    if kind == "spline":
        return RationalQuadraticSplineCoupling(
            net, num_bins=spline_bins, tail_bound=tail_bound, event_shape=shape, dtype=dtype
        )
    return LogisticMixtureCoupling(
        net, num_components=mol_components, event_shape=shape, dtype=dtype
    )


def build_glow_flow(
    coupling="affine",
    width=64,
    levels=2,
    steps=8,
    seed=0,
    dropout=0.0,
    switch=None,
    spline_bins=4,
    mol_components=4,
    last_kernel=3,
    tail_bound=4.0,
    image_shape=(8, 8, 1),
    dtype="float32",
):
    """The normalizing bijector (see the module docstring).

    `coupling` and `last_kernel` may also be sequences with one entry per
    level (e.g. `("spline", "affine")`).
    """
    per_level = {}
    for name, value in (("coupling", coupling), ("last_kernel", last_kernel)):
        values = (value,) * levels if isinstance(value, (str, int)) else tuple(value)
        if len(values) != levels:
            raise ValueError(f"`{name}` needs one entry per level ({levels}); got {value!r}.")
        per_level[name] = values
    shape = tuple(image_shape)
    stages = []
    for level in range(levels):
        squeeze = Squeeze(event_shape=shape)
        shape = (shape[0] // 2, shape[1] // 2, shape[2] * 4)
        c = shape[-1]
        chain = [squeeze]
        for k in range(steps):
            # The seeds of tfp_glow.models.build_glow_flow, so the rotations match.
            step_seed = None if seed is None else seed * 100003 + level * 1000 + k
            chain += [
                ActNorm(c, dtype=dtype, name=f"act_norm_{level}_{k}"),
                InvertibleConv1x1(c, lu=True, seed=step_seed, dtype=dtype),
                _coupling(
                    per_level["coupling"][level],
                    shape,
                    width,
                    dtype,
                    dropout,
                    switch,
                    spline_bins,
                    mol_components,
                    per_level["last_kernel"][level],
                    tail_bound,
                ),
            ]
        fo = None
        if level < levels - 1:
            fo = FactorOut(c, 0.5, dtype=dtype, name=f"factor_out_{level}")
            shape = shape[:-1] + (c - fo.num_factored,)
        stages.append((tfb.Chain(list(reversed(chain)), name=f"level_{level}"), fo))
    top = LearnedPrior(shape, dtype=dtype)
    return MultiScaleFlow(image_shape, stages, top_prior=top, name="glow")


def build_model(num_bins=17, image_shape=(8, 8, 1), **kwargs):
    """`(FlowModel, Switch)` around `build_glow_flow(**kwargs)`."""
    switch = Switch()
    kwargs = dict(kwargs, switch=switch, image_shape=image_shape)
    model = FlowModel(
        flow=lambda: build_glow_flow(**kwargs), event_shape=image_shape, num_bins=num_bins
    )
    return model, switch


def coupling_net_variables(model):
    """The trainable variables of the coupling networks (weight decay targets)."""
    kinds = (nets.GlowCouplingNet, DropoutGlowNet)
    out = []
    for layer in keras_layers_of(model.flow):
        if isinstance(layer, kinds):
            out += list(layer.trainable_variables)
    return out


class EMASwap:
    """Evaluates with the optimizer's EMA weights (Keras `use_ema=True`).

    Keras keeps `average <- m * average + (1 - m) * w` after every applied
    step (the first step copies `w`); `with EMASwap(optimizer):` assigns the
    averages to the model weights and restores the raw weights on exit, so
    training continues from them. Uses the optimizer's private list of
    averages: Keras 3 only exposes the destructive `finalize_variable_values`.
    """

    def __init__(self, optimizer):
        self._optimizer = optimizer
        self._saved = None

    def __enter__(self):
        opt = self._optimizer
        if not getattr(opt, "use_ema", False):
            return self
        variables = opt._trainable_variables
        averages = opt._model_variables_moving_average
        self._saved = [np.array(v.numpy()) for v in variables]
        for v, a in zip(variables, averages):
            if a is not None:
                v.assign(a)
        return self

    def __exit__(self, *exc):
        if self._saved is not None:
            for v, value in zip(self._optimizer._trainable_variables, self._saved):
                v.assign(value)
            self._saved = None
        return False


def count_params(model):
    return int(sum(int(np.prod(v.shape)) for v in model.trainable_variables))
