"""`FlowDensity`: a normalizing flow as a density, with no training plumbing.

For a normalizing bijector `f` (data to latent) and a standard normal base,

    log p(x) = log N(f(x); 0, I) + log|det df/dx|,
    bits/dim = (-log p(x) + D log(num_bins)) / (D ln 2)      (openai/glow),

`sample` draws `x = f^-1(T * eps)`, `eps ~ N(0, I)`, and `interpolate`
decodes straight lines between latents. A conditional flow `p(x | c)` (built
with `context_shape`, or `num_classes` for class labels) takes the context `c`
as every method's second argument; its canonical form (`InputSpec.context`,
float `[N, *context_shape]`) reaches every bijector as `conditional_input=c`.

`f` may be any `tfb.Bijector` built from tfp_glow and TFP bijectors (a
`MultiScaleFlow`, a plain `tfb.Chain`, a `tfb.Invert` ...): the one-pass
walkers of `tfp_glow.bijectors` run it.

Called eagerly, every public method checks its inputs (`InputSpec`) and then
runs a compiled `tf.function` traced once per input signature with a dynamic
batch, so a notebook call runs at graph speed and never retraces; called
inside a `tf.function` (a user's graph, an export signature) it runs the
flow ops directly.
"""

import math

import tensorflow as tf
import tensorflow_probability as tfp

from tfp_glow import checks
from tfp_glow.bijectors import forward_and_log_det, inverse_and_log_det
from tfp_glow.context_encoder import condition, context_encoder_of, flow_context_shape
from tfp_glow.context_spec import context_argument
from tfp_glow.input_spec import InputSpec

tfb = tfp.bijectors
tfd = tfp.distributions

__all__ = ["FlowDensity", "BACKPROP_MODES"]

BACKPROP_MODES = ("standard", "checkpoint", "reversible")


def _no_autograph(fn, signature):
    # The flow's Python branches only on static facts: nothing to convert.
    # Traced once for the signature (dynamic batch); calling the concrete
    # function skips tf.function's per-call signature hashing and cache lookup.
    return tf.function(fn, input_signature=signature, autograph=False).get_concrete_function()


def _context(spec, context, labels, batch_like=None, num_samples=None):
    """The canonical context of a public call (`context`, or `labels=` by its older name)."""
    value, name = context_argument(context, labels)
    return spec.context(value, batch_like, arg_name=name, num_samples=num_samples)


class FlowDensity:
    """The density `p(x)` (or `p(x | context)`) of a normalizing flow over a standard normal.

    Args:
      flow: the normalizing `tfb.Bijector` `f` (data to latent).
      event_shape: shape of one data point.
      num_bins: discrete levels of the data (bits/dim adds `D log(num_bins)`),
        or None for continuous data.
      num_classes: classes of a class-conditional flow (one-hot labels reach
        it as `conditional_input`), or None: shorthand for `context_shape=(K,)`.
      dtype: float dtype of the base distribution and the inputs.
      validate_args: assert input values inside graphs too.
      context_shape: shape of one context of a conditional flow, or None.
      context_encoder: a Keras layer between the context and the flow, or None.
    """

    def __init__(
        self,
        flow,
        event_shape,
        num_bins=None,
        num_classes=None,
        dtype=tf.float32,
        validate_args=False,
        context_shape=None,
        context_encoder=None,
    ):
        if not isinstance(flow, tfb.Bijector):
            raise TypeError(f"`flow` must be a tfp bijector (data to latent); got {flow!r}.")
        event_shape = checks.shape(event_shape, "event_shape")
        latent_shape = tf.TensorShape(flow.forward_event_shape(event_shape))
        if not latent_shape.is_fully_defined():
            raise ValueError(
                f"`flow` must map event shape {event_shape} to a known latent shape; "
                f"got {latent_shape}."
            )
        self._flow = flow
        self.spec = InputSpec(
            event_shape,
            latent_shape.as_list(),
            dtype,
            num_bins,
            num_classes,
            validate_args,
            context_shape,
        )
        dtype = self.spec.dtype
        self._encoder = context_encoder_of(context_encoder, context_shape, num_classes)
        self.flow_context_shape = flow_context_shape(self._encoder, self.spec.context_shape)
        self._base = tfd.Sample(
            tfd.Normal(tf.constant(0.0, dtype), tf.constant(1.0, dtype)), self.spec.latent_shape
        )
        self._distribution = tfd.TransformedDistribution(
            self._base, tfb.Invert(flow), name="flow_distribution"
        )
        self._compiled = {}

    # -- structure -------------------------------------------------------------
    @property
    def flow(self):
        """The normalizing bijector `f` (data to latent)."""
        return self._flow

    @property
    def base(self):
        """The standard normal over the latent shape."""
        return self._base

    @property
    def distribution(self):
        """`tfd.TransformedDistribution(N(0, I), Invert(f))`."""
        return self._distribution

    @property
    def event_shape(self):
        return self.spec.event_shape

    @property
    def latent_shape(self):
        return self.spec.latent_shape

    @property
    def num_bins(self):
        return self.spec.num_bins

    @property
    def num_classes(self):
        return self.spec.num_classes

    @property
    def context_shape(self):
        """Shape of one context (`(num_classes,)` for labels), or None if unconditional."""
        return self.spec.context_shape

    @property
    def dtype(self):
        return self.spec.dtype

    @property
    def num_dims(self):
        """`D`, the number of data dimensions."""
        return self.spec.num_dims

    # -- compiled dispatch -----------------------------------------------------
    def _call(self, name, fn, signature, *args):
        """`fn(*args)`: through a cached `tf.function` when eager, directly in a graph."""
        if not tf.executing_eagerly():
            return fn(*args)
        compiled = self._compiled.get(name)
        if compiled is None:
            compiled = self._compiled[name] = _no_autograph(fn, signature)
        return compiled(*args)

    def _signature(self, *kinds):
        specs = [self.spec.signature(k) for k in kinds]
        context = self.spec.context_signature()
        return specs + ([context] if context is not None else [])

    def _args(self, context, *tensors):
        return tensors + ((context,) if self.context_shape is not None else ())

    def _condition(self, context):
        return {} if self.context_shape is None else condition(self._encoder, context, self.dtype)

    # -- math (already validated inputs; graph or eager) -------------------------
    def forward_and_log_det(self, x, context=None, backprop="standard"):
        """`(z, log|det df/dx|)` of validated inputs, with the chosen backprop."""
        # The event rank tells TFP how far to reduce an elementwise bijector's
        # log-det (Scale, Exp, SinhArcsinh ...): over the whole event.
        ndims = len(self.event_shape)
        if backprop == "standard":
            z, ldj = forward_and_log_det(self._flow, x, ndims, **self._condition(context))
        else:
            from tfp_glow.training import reversible  # only models that ask for it pay the import

            z, ldj = reversible.forward_and_log_det(
                self._flow, x, backprop=backprop, event_ndims=ndims, **self._condition(context)
            )
        z = (
            tf.ensure_shape(z, [None, *self.latent_shape])
            if z.shape.rank == 1 + len(self.latent_shape)
            else z
        )
        return z, ldj

    def log_prob_of(self, x, context=None, backprop="standard"):
        """`log p(x)` per example of validated inputs (the training hot path)."""
        z, ldj = self.forward_and_log_det(x, context, backprop)
        return self._base.log_prob(z) + ldj

    def bits_per_dim_of(self, log_prob):
        """openai/glow's bits/dim from `log p(x)`: `(-log p + D log(bins)) / (D ln 2)`."""
        d = float(self.num_dims)
        discretisation = 0.0 if self.num_bins is None else d * math.log(self.num_bins)
        return (-log_prob + tf.constant(discretisation, log_prob.dtype)) / (d * math.log(2.0))

    def _encode(self, x, context=None):
        return self.forward_and_log_det(x, context)[0]

    def _decode(self, z, context=None):
        condition = self._condition(context)
        x = inverse_and_log_det(self._flow, z, len(self.latent_shape), **condition)[0]
        return tf.ensure_shape(x, [None, *self.event_shape])

    def _log_prob(self, x, context=None):
        return self.log_prob_of(x, context)

    def _bits_per_dim(self, x, context=None):
        return self.bits_per_dim_of(self.log_prob_of(x, context))

    # -- public API (`labels=`: the older name of `context`) --------------------
    def log_prob(self, x, context=None, backprop="standard", *, labels=None):
        """`log p(x | context)` per example, for any finite `x` of the event shape;
        `backprop` (`"standard"`, `"checkpoint"`, `"reversible"`): what a tape keeps
        for the gradient (`tfp_glow.training.reversible`), the value the same."""
        checks.choice(backprop, BACKPROP_MODES, "backprop")
        x = self.spec.data(x)
        context = _context(self.spec, context, labels, x)
        if backprop == "standard":
            name, fn = "log_prob", self._log_prob
        else:  # one compiled function per mode: the mode is baked into its graph

            def fn(x, context=None):
                return self.log_prob_of(x, context, backprop)

            name = f"log_prob_{backprop}"
        return self._call(name, fn, self._signature("data"), *self._args(context, x))

    def bits_per_dim(self, x, context=None, *, labels=None):
        """openai/glow's bits/dim: `(-log p(x) + D log(num_bins)) / (D ln 2)`."""
        x = self.spec.data(x)
        context = _context(self.spec, context, labels, x)
        return self._call(
            "bits_per_dim", self._bits_per_dim, self._signature("data"), *self._args(context, x)
        )

    def encode(self, x, context=None, *, labels=None):
        """`z = f(x)` (given the context), the standard-normal latent."""
        x = self.spec.data(x)
        context = _context(self.spec, context, labels, x)
        return self._call("encode", self._encode, self._signature("data"), *self._args(context, x))

    def decode(self, z, context=None, *, labels=None):
        """`x = f^-1(z)` (given the context)."""
        z = self.spec.latent(z)
        context = _context(self.spec, context, labels, z)
        return self._call(
            "decode", self._decode, self._signature("latent"), *self._args(context, z)
        )

    def _sample(self, num, temperature, seed, context=None):
        shape = tf.concat([[num], self.latent_shape], 0)
        eps = tf.random.stateless_normal(shape, seed=seed, dtype=self.dtype)
        return self._decode(eps * tf.cast(temperature, self.dtype), context)

    def _sample_unseeded(self, num, temperature, context=None):
        shape = tf.concat([[num], self.latent_shape], 0)
        eps = tf.random.normal(shape, dtype=self.dtype)
        return self._decode(eps * tf.cast(temperature, self.dtype), context)

    def sample(self, num_samples, temperature=1.0, seed=None, context=None, *, labels=None):
        """Draws `x = f^-1(T * eps)`, `eps ~ N(0, I)` (given the context).

        Scaling the standard-normal latent by the temperature `T` scales the
        standard deviation of the base *and of every learned prior* by `T`
        (the priors are standardisations inside `f`): openai/glow's
        temperature. `T = 0` gives the mode of every prior. With an int `seed`
        the draw is stateless and reproducible. Conditional flows take
        `context`: one `[*context_shape]` for every sample, or
        `[num_samples, *context_shape]`, one per sample; class-conditional
        ones also one int class, or `[num_samples]` ids.
        """
        num = self.spec.num_samples(num_samples)
        temperature = self.spec.temperature(temperature)
        context = _context(self.spec, context, labels, num_samples=num)
        num = tf.cast(num, tf.int32)
        temperature = tf.cast(temperature, self.dtype)
        scalar = [tf.TensorSpec([], tf.int32), tf.TensorSpec([], self.dtype)]
        context_sig = self._signature()
        if seed is None:
            return self._call(
                "sample_unseeded",
                self._sample_unseeded,
                scalar + context_sig,
                *self._args(context, num, temperature),
            )
        if not isinstance(seed, (tf.Tensor, tf.Variable)) and not checks.is_int(seed):
            raise TypeError(f"`seed` must be an int or None; received {seed!r}.")
        seed = tf.stack([tf.cast(seed, tf.int64), tf.constant(0, tf.int64)])
        return self._call(
            "sample",
            self._sample,
            scalar + [tf.TensorSpec([2], tf.int64)] + context_sig,
            *self._args(context, num, temperature, seed),
        )

    def _interpolate(self, x0, x1, num_steps, context=None):
        # One compiled call: both ends encoded in one pass of the flow.
        z = self._encode(
            tf.concat([x0, x1], 0), None if context is None else tf.concat([context, context], 0)
        )
        z0, z1 = tf.split(z, 2, axis=0)
        # t: [num_steps, 1 (batch), 1, ...] against z: [batch, *latent_shape].
        t = tf.reshape(tf.linspace(0.0, 1.0, num_steps), [-1] + [1] * (1 + len(self.latent_shape)))
        t = tf.cast(t, z0.dtype)
        z = (1.0 - t) * z0[None] + t * z1[None]
        flat = tf.reshape(z, [-1, *self.latent_shape])
        flat_context = None
        if context is not None:
            # Step-major like `flat`: the batch's contexts repeat once per step.
            flat_context = tf.tile(context, [num_steps] + [1] * len(self.context_shape))
        x = self._decode(flat, flat_context)
        return tf.reshape(x, [num_steps, -1, *self.event_shape])

    def interpolate(self, x_start, x_end, num_steps=8, context=None, *, labels=None):
        """Decodes `(1 - t) f(x_start) + t f(x_end)` for `t` in [0, 1] (both ends
        and the path under the same context, `[batch, *context_shape]`).

        Returns `[num_steps, batch, *event_shape]`; the first and last steps
        reconstruct the inputs.
        """
        num_steps = checks.positive_int(num_steps, "num_steps", minimum=2)
        x0 = self.spec.data(x_start, "x_start")
        x1 = self.spec.data(x_end, "x_end")
        if x0.shape[0] is not None and x1.shape[0] is not None and x0.shape[0] != x1.shape[0]:
            raise ValueError(
                f"`x_start` and `x_end` must have the same batch size; got "
                f"{x0.shape[0]} and {x1.shape[0]}."
            )
        context = _context(self.spec, context, labels, x0)
        signature = self._signature("data")
        signature = [signature[0], signature[0], tf.TensorSpec([], tf.int32)] + signature[1:]
        return self._call(
            "interpolate",
            self._interpolate,
            signature,
            *self._args(context, x0, x1, tf.constant(num_steps, tf.int32)),
        )
