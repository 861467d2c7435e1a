"""Every tfp_glow bijector configuration the contract test checks.

One line per configuration: `name: Case(make, event_shape, ...)`. `make(dtype)`
returns a fresh bijector; a new bijector is tested by adding a line here.
Flags on `Case` say what the tests may expect of it (`volume_preserving`: the
log-det is 0 whatever the parameters) instead of tests matching names.
`conditional` makes every test pass a context as `conditional_input`: an int
K (class labels `[batch]` of K classes) or a shape (a float context
`[batch, *shape]`, standard normal).
"""

import dataclasses
import functools
from collections.abc import Callable

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
from helpers import perturb  # noqa: F401  (re-exported: tests and benchmarks import it here)

from tfp_glow import bijectors as B
from tfp_glow import nets
from tfp_glow.bijectors._context import feature_channels
from tfp_glow.bijectors.base import walk_bijectors
from tfp_glow.bijectors.coupling import CouplingBase
from tfp_glow.bijectors.standardize import StandardizeBase

tfb = tfp.bijectors
IMAGE = (4, 4, 4)
VECTOR = (6,)


@dataclasses.dataclass
class Case:
    make: Callable  # dtype -> bijector
    event_shape: tuple
    sample: Callable | None = None  # (rng, shape) -> x in the domain
    conditional: int | tuple | None = None  # num_classes (int labels) or a context shape
    codomain: Callable | None = None  # (rng, shape) -> y in the range of forward
    volume_preserving: bool = False  # log|det J| == 0 for any parameters
    elementwise: bool = False  # maps each element alone: any rank works, even unknown

    def draw(self, rng, batch, dtype):
        shape = (batch,) + self.event_shape
        x = self.sample(rng, shape) if self.sample else rng.standard_normal(shape)
        return tf.constant(x, dtype=dtype)

    def draw_codomain(self, rng, batch, dtype, bijector):
        """A `y` in the domain of `bijector.inverse` (default: standard normal)."""
        shape = (batch,) + tuple(bijector.forward_event_shape(self.event_shape))
        y = self.codomain(rng, shape) if self.codomain else rng.standard_normal(shape)
        return tf.constant(y, dtype=dtype)

    def kwargs(self, rng, batch, dtype=tf.float32):
        if self.conditional is None:
            return {}
        if isinstance(self.conditional, tuple):
            context = rng.standard_normal((batch,) + self.conditional)
            return {"conditional_input": tf.constant(context, dtype)}
        return {
            "conditional_input": tf.constant(
                rng.integers(0, self.conditional, size=batch), tf.int32
            )
        }


def context_weights(bijector):
    """`(variable, index)` of every weight that multiplies the context: the
    context's rows of a conditional coupling network's first kernel, a
    conditional prior's context map (or class table)."""
    found = []
    for b in walk_bijectors(bijector):
        if isinstance(b, CouplingBase) and b.context_shape is not None:
            k = feature_channels(b.context_shape, len(b._event_shape))
            first = b.net.conv_in if hasattr(b.net, "conv_in") else b.net.hidden[0]
            found.append((first.kernel, (..., slice(-k, None), slice(None))))
        elif isinstance(b, StandardizeBase) and b.context_shape is not None:
            table = b._class_table if b._class_table is not None else b._context_conv.kernel
            found.append((table, ...))
    return found


def _dt(dtype):
    return tf.as_dtype(dtype).name


def coupling_net(shape, dtype):
    """A network factory `fn(output_units)`: the coupling sizes its own net."""
    cls = nets.GlowCouplingNet if len(shape) == 3 else nets.MLPCouplingNet
    return functools.partial(cls, 8, dtype=_dt(dtype))


def affine(mask, parity, shape=IMAGE, context=None):
    def make(dtype):
        return B.AffineCoupling(
            coupling_net(shape, dtype),
            mask=mask,
            parity=parity,
            event_shape=shape,
            dtype=dtype,
            context_shape=context,
        )

    return Case(make, shape, conditional=context)


def additive(mask, parity, shape=IMAGE, context=None):
    def make(dtype):
        return B.AdditiveCoupling(
            coupling_net(shape, dtype),
            mask=mask,
            parity=parity,
            event_shape=shape,
            dtype=dtype,
            context_shape=context,
        )

    return Case(make, shape, conditional=context, volume_preserving=True)


def spline(mask, parity, shape=IMAGE, context=None):
    def make(dtype):
        return B.RationalQuadraticSplineCoupling(
            coupling_net(shape, dtype),
            num_bins=5,
            tail_bound=3.0,
            mask=mask,
            parity=parity,
            event_shape=shape,
            dtype=dtype,
            context_shape=context,
        )

    return Case(make, shape, conditional=context)


def mol(mask, parity, shape=IMAGE, context=None):
    def make(dtype):
        return B.LogisticMixtureCoupling(
            coupling_net(shape, dtype),
            num_components=3,
            mask=mask,
            parity=parity,
            event_shape=shape,
            dtype=dtype,
            context_shape=context,
        )

    return Case(make, shape, conditional=context)


def small_multi_scale(dtype, num_classes=None, context=None):
    """Two levels of squeeze + (ActNorm, LU conv, affine coupling), a split;
    with `context` (a shape) the couplings and the priors are conditional."""

    def level(shape, seed):
        c = shape[-1] * 4
        squeezed = (shape[0] // 2, shape[1] // 2, c)
        steps = tfb.Chain(
            [
                B.AffineCoupling(
                    coupling_net(squeezed, dtype),
                    event_shape=squeezed,
                    dtype=dtype,
                    context_shape=context,
                ),
                B.InvertibleConv1x1(c, seed=seed, dtype=dtype),
                B.ActNorm(c, dtype=dtype),
                B.Squeeze(event_shape=shape),
            ]
        )
        return steps, squeezed

    steps1, s1 = level((4, 4, 2), 1)
    fo = B.FactorOut(s1[-1], num_classes=num_classes, dtype=dtype, context_shape=context)
    steps2, s2 = level(s1[:2] + (s1[-1] - fo.num_factored,), 2)
    return B.MultiScaleFlow(
        (4, 4, 2),
        [(steps1, fo), (steps2, None)],
        top_prior=B.LearnedPrior(s2, num_classes=num_classes, dtype=dtype, context_shape=context),
    )


def _unit_interval(rng, shape):
    """Uniform on [0, 1], with both edges of the domain included."""
    x = rng.uniform(0.0, 1.0, size=shape)
    x.flat[:2] = [0.0, 1.0]
    return x


def _logit_range(alpha):
    """Uniform on the range of LogitPreprocess(alpha), edges included."""
    edge = float(np.log((1.0 - alpha) / alpha))

    def sample(rng, shape):
        y = rng.uniform(-edge, edge, size=shape)
        y.flat[:2] = [-edge, edge]
        return y

    return sample


def planar(raw_wu=None):
    """PlanarFlow on VECTOR; `raw_wu` sets `w . u` (e.g. -5: w . u_hat = -0.993,
    close to the invertibility limit -1)."""

    def make(dtype):
        b = B.PlanarFlow(VECTOR[0], seed=3, dtype=dtype)
        if raw_wu is not None:
            w = b.w.numpy()
            b.u.assign(raw_wu * w / np.dot(w, w))
        return b

    return Case(make, VECTOR)


def radial(beta_raw=None):
    """RadialFlow on VECTOR; `beta_raw` -3 gives beta = -alpha + 0.049 (a strong
    contraction towards z0, close to the invertibility limit)."""

    def make(dtype):
        b = B.RadialFlow(VECTOR[0], seed=3, dtype=dtype)
        if beta_raw is not None:
            b.beta_raw.assign(beta_raw)
        return b

    return Case(make, VECTOR)


def residual(shape):
    """ResidualBlock with the exact log-det (the contract checks it exactly)."""

    def make(dtype):
        net = (
            nets.ResidualCNN(shape, 8, seed=1, dtype=_dt(dtype))
            if len(shape) == 3
            else nets.ResidualMLP(shape[0], 8, seed=1, dtype=_dt(dtype))
        )
        return B.ResidualBlock(net, log_det="exact", dtype=dtype)

    return Case(make, shape)


REGISTRY = {
    "actnorm_image": Case(lambda d: B.ActNorm(4, dtype=d), IMAGE),
    "actnorm_vector": Case(lambda d: B.ActNorm(6, event_ndims=1, dtype=d), VECTOR),
    "conv1x1_lu": Case(lambda d: B.InvertibleConv1x1(4, seed=0, dtype=d), IMAGE),
    "conv1x1_full": Case(lambda d: B.InvertibleConv1x1(4, lu=False, seed=0, dtype=d), IMAGE),
    "linear_lu_vector": Case(
        lambda d: B.InvertibleConv1x1(6, event_ndims=1, seed=0, dtype=d), VECTOR
    ),
    "linear_full_vector": Case(
        lambda d: B.InvertibleConv1x1(6, lu=False, event_ndims=1, seed=0, dtype=d), VECTOR
    ),
    "affine_channel_p0": affine("channel", 0),
    "affine_channel_p1": affine("channel", 1),
    "affine_checkerboard_p0": affine("checkerboard", 0),
    "affine_checkerboard_p1": affine("checkerboard", 1),
    "affine_vector_channel": affine("channel", 1, VECTOR),
    "affine_vector_checkerboard": affine("checkerboard", 0, VECTOR),
    "additive_channel_p0": additive("channel", 0),
    "additive_channel_p1": additive("channel", 1),
    "additive_checkerboard_p0": additive("checkerboard", 0),
    "additive_checkerboard_p1": additive("checkerboard", 1),
    "additive_vector_channel": additive("channel", 0, VECTOR),
    "spline_channel_p0": spline("channel", 0),
    "spline_checkerboard_p1": spline("checkerboard", 1),
    "spline_vector_channel": spline("channel", 1, VECTOR),
    "mol_channel_p1": mol("channel", 1),
    "mol_vector_checkerboard": mol("checkerboard", 0, VECTOR),
    "squeeze": Case(lambda d: B.Squeeze(event_shape=IMAGE), IMAGE, volume_preserving=True),
    "logit_preprocess": Case(
        lambda d: B.LogitPreprocess(0.05),
        IMAGE,
        _unit_interval,
        codomain=_logit_range(0.05),
        elementwise=True,
    ),
    "factor_out_half": Case(lambda d: B.FactorOut(4, dtype=d), IMAGE),
    "factor_out_quarter": Case(lambda d: B.FactorOut(4, 0.25, dtype=d), IMAGE),
    "factor_out_vector": Case(lambda d: B.FactorOut(6, event_ndims=1, dtype=d), VECTOR),
    "factor_out_class_conditional": Case(
        lambda d: B.FactorOut(4, num_classes=3, dtype=d), IMAGE, conditional=3
    ),
    "learned_prior": Case(lambda d: B.LearnedPrior(IMAGE, dtype=d), IMAGE),
    "learned_prior_class_conditional": Case(
        lambda d: B.LearnedPrior(IMAGE, num_classes=3, dtype=d), IMAGE, conditional=3
    ),
    "planar_near_limit": planar(raw_wu=-5.0),
    "radial_near_limit": radial(beta_raw=-3.0),
    "residual_vector": residual(VECTOR),
    "residual_image": residual(IMAGE),
    "multi_scale": Case(small_multi_scale, (4, 4, 2)),
    "multi_scale_class_conditional": Case(
        lambda d: small_multi_scale(d, num_classes=3), (4, 4, 2), conditional=3
    ),
    # Conditional on a float context: a vector broadcast over an image, an
    # image resized (up: bilinear) into a prior's conv.
    "affine_checkerboard_vector_context": affine("checkerboard", 1, context=(3,)),
    "factor_out_image_context": Case(
        lambda d: B.FactorOut(4, dtype=d, context_shape=(3, 3, 2)), IMAGE, conditional=(3, 3, 2)
    ),
}

# Run by the contract test in CI's slow step only (each ~5-45 s on 2 loaded
# cores): a vector context's linear map, an image context resized down
# (area) and flattened for a vector event, a whole conditional multi-scale flow.
SLOW_REGISTRY = {
    "learned_prior_vector_context": Case(
        lambda d: B.LearnedPrior(IMAGE, dtype=d, context_shape=(5,)), IMAGE, conditional=(5,)
    ),
    "spline_vector_image_context": spline("channel", 0, VECTOR, context=(2, 2, 1)),
    "additive_image_context": additive("channel", 1, context=(8, 8, 1)),
    "multi_scale_context": Case(
        lambda d: small_multi_scale(d, context=(2, 2, 1)), (4, 4, 2), conditional=(2, 2, 1)
    ),
}
