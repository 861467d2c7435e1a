"""TFP's own flows, as a TFP user on Keras 3 builds them: one registry line each.

`FLOWS[name]` is a `FlowCase`: a zero-argument builder of the *normalizing*
bijector (data to latent), registered with Keras so a `.keras` file can
rebuild it in a fresh process (tests/test_tfp_flows.py imports this module
there), the event shape, the data it trains on, and which dtypes it takes.

`tests/test_tfp_flows.py` runs every check on every case: the density equals
`tfd.TransformedDistribution(base, tfb.Invert(flow))`, every variable is a
model weight and moves in `fit`, the loss falls, `save_weights` restores into
a fresh flow, `.keras` and `export_saved_model` round trip in fresh processes,
and a 2-device `MirroredStrategy` fit equals one device's.
"""

import dataclasses
import functools
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
from helpers import perturb

import tfp_glow
from tfp_glow import nets

tfb = tfp.bijectors
tfd = tfp.distributions

PACKAGE = "tfp_flows_test"


def _register(fn):
    return keras.saving.register_keras_serializable(package=PACKAGE)(fn)


def eight_gaussians(n, seed=0):
    return tfp_glow.data.toy_density("8gaussians", n, seed=seed).astype(np.float32) / 2.0


def correlated_images(n, seed=0):
    """[n, 4, 4, 2] images of a correlated Gaussian (neighbouring pixels alike)."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n, 2, 2, 2))
    return (
        np.repeat(np.repeat(base, 2, axis=1), 2, axis=2) * 0.5
        + 0.1 * rng.standard_normal((n, 4, 4, 2))
    ).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class FlowCase:
    build: Callable  # build(dtype="float32") -> normalizing bijector
    event_shape: tuple
    data: Callable = eight_gaussians
    dtypes: tuple = ("float32", "float64")


# -- the flows -------------------------------------------------------------------
@_register
def maf_made(dtype="float32"):
    """MAF (Papamakarios 2017) with tfp_glow's Keras 3 MADE: two layers, reversed."""
    made = [
        nets.MADE(params=2, event_size=2, hidden_units=[16, 16], dtype=dtype, input_order=order)
        for order in ("left-to-right", "right-to-left")
    ]
    return tfb.Invert(tfb.Chain([tfb.MaskedAutoregressiveFlow(m) for m in made]))


@_register
def maf_tfp_network(dtype="float32"):
    """MAF with TFP's own tf_keras `AutoregressiveNetwork` (built lazily)."""
    made = tfb.AutoregressiveNetwork(
        params=2, hidden_units=[16, 16], activation="relu", dtype=dtype
    )
    return tfb.Invert(tfb.MaskedAutoregressiveFlow(made))


@_register
def iaf_made(dtype="float32"):
    """IAF (Kingma 2016): the MAF bijector itself normalizes; sampling is one pass."""
    return tfb.MaskedAutoregressiveFlow(
        nets.MADE(params=2, event_size=2, hidden_units=[16, 16], dtype=dtype)
    )


@_register
def nsf_autoregressive(dtype="float32"):
    """NSF-AR (Durkan 2019): an autoregressive rational-quadratic spline from MADE."""
    spline = nets.AutoregressiveSplineFn.build(
        event_size=2, hidden_units=[16, 16], num_bins=4, bound=4.0, dtype=dtype
    )
    return tfb.Invert(tfb.MaskedAutoregressiveFlow(bijector_fn=spline))


@_register
def realnvp_keras_net(dtype="float32"):
    """TFP's RealNVP with tfp_glow's Keras 3 coupling network, halves swapped between."""
    layers = []
    for _ in range(2):
        layers += [
            tfb.RealNVP(
                num_masked=1,
                shift_and_log_scale_fn=nets.RealNVPNet(
                    hidden_units=[16, 16], output_units=1, input_units=1, dtype=dtype
                ),
            ),
            tfb.Permute([1, 0]),
        ]
    return tfb.Invert(tfb.Chain(layers[:-1]))


@_register
def realnvp_tfp_template(dtype="float32"):
    """TFP's RealNVP with its TF1 template network (`real_nvp_default_template`)."""
    del dtype  # the template's variables take the input's dtype
    return tfb.Invert(
        tfb.RealNVP(
            num_masked=1,
            shift_and_log_scale_fn=tfb.real_nvp_default_template(
                hidden_layers=[16], activation=tf.nn.tanh
            ),
        )
    )


@_register
def tfp_glow_bijector(dtype="float32"):
    """TFP's own `tfb.Glow` (tf_keras networks, its ActNorm initialised by the first batch)."""
    del dtype  # its networks are float32 tf_keras layers
    return tfb.Invert(
        tfb.Glow(
            output_shape=(4, 4, 2),
            num_glow_blocks=1,
            num_steps_per_block=1,
            coupling_bijector_fn=functools.partial(tfb.GlowDefaultNetwork, num_hidden=16),
            exit_bijector_fn=tfb.GlowDefaultExitNetwork,
        )
    )


@_register
def ffjord_exact_trace(dtype="float32"):
    """FFJORD (Grathwohl 2019) with tfp_glow's time-conditioned ODE network, exact trace."""
    return tfb.Invert(
        tfb.FFJORD(
            state_time_derivative_fn=nets.ODENet(event_size=2, hidden_units=[16], dtype=dtype),
            trace_augmentation_fn=nets.ffjord_trace(exact=True),
            dtype=dtype,
        )
    )


@_register
def elementwise_with_variables(dtype="float32"):
    """Elementwise and matrix bijectors whose parameters are `tf.Variable`s,
    `TransformedVariable`s and `DeferredTensor`s."""
    dt = tf.as_dtype(dtype)
    tril = tfp.util.TransformedVariable(
        tf.constant([[1.0, 0.0], [0.3, 1.2]], dt),
        tfb.FillScaleTriL(diag_shift=None),
        name="scale_tril",
    )
    return tfb.Chain(
        [
            tfb.ScaleMatvecTriL(tril),
            tfb.SinhArcsinh(
                skewness=tf.Variable(tf.constant([0.1, -0.2], dt), name="skewness"),
                tailweight=tfp.util.TransformedVariable(
                    tf.constant([1.1, 0.9], dt), tfb.Softplus(), name="tailweight"
                ),
            ),
            tfb.Scale(
                tfp.util.DeferredTensor(
                    tf.Variable(tf.constant([0.0, 0.1], dt), name="log_scale"), tf.math.exp
                )
            ),
            tfb.Shift(tf.Variable(tf.constant([0.2, -0.1], dt), name="shift")),
        ]
    )


FLOWS = {
    "maf_made": FlowCase(maf_made, (2,)),
    "maf_tfp_network": FlowCase(maf_tfp_network, (2,)),
    "iaf_made": FlowCase(iaf_made, (2,)),
    "nsf_autoregressive": FlowCase(nsf_autoregressive, (2,)),
    "realnvp_keras_net": FlowCase(realnvp_keras_net, (2,)),
    "realnvp_tfp_template": FlowCase(realnvp_tfp_template, (2,)),
    "tfp_glow_bijector": FlowCase(
        tfp_glow_bijector, (4, 4, 2), data=correlated_images, dtypes=("float32",)
    ),
    "ffjord_exact_trace": FlowCase(ffjord_exact_trace, (2,)),
    "elementwise_with_variables": FlowCase(elementwise_with_variables, (2,)),
}


def build_model(name, dtype="float32", seed=0, from_builder=False):
    """A `FlowModel` around `FLOWS[name]` (the builder itself when `from_builder`,
    so that it has a `.keras` config), with the Keras seed fixed."""
    case = FLOWS[name]
    keras.utils.set_random_seed(seed)
    flow = case.build if from_builder else case.build(dtype)
    return tfp_glow.FlowModel(flow, event_shape=case.event_shape, num_bins=None, dtype=dtype)


def perturb_all(model, seed=0, scale=0.2):
    """Moves every trainable weight off its (often identity) starting value."""
    return perturb(model, seed, scale)


def reference_log_prob(model, x):
    """`log p(x)` by TFP alone: `TransformedDistribution(N(0, I), Invert(flow))`."""
    dtype = tf.as_dtype(model.density.dtype)
    base = tfd.Sample(
        tfd.Normal(tf.constant(0.0, dtype), tf.constant(1.0, dtype)), model.latent_shape
    )
    return tfd.TransformedDistribution(base, tfb.Invert(model.flow)).log_prob(x).numpy()
