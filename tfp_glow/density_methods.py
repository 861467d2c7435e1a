"""`DensityMethods`: the density API of a model that holds a `FlowDensity`.

`FlowModel` mixes this in: every method and property here forwards to the
model's `FlowDensity` (`self._density`), so the Keras class itself holds only
the Keras plumbing (training and evaluation steps, `fit`, `compile`, config).

A conditional model's methods take the context as their second argument
(`labels=` is its older name, kept as a keyword alias).
"""

from tfp_glow.context_spec import context_argument

__all__ = ["DensityMethods"]


class DensityMethods:
    """Forwards the density API to `self._density` (a `FlowDensity`)."""

    # -- structure (all from the density) --------------------------------------
    @property
    def density(self):
        """The `FlowDensity` (flow, base, shapes, log_prob, sample ...)."""
        return self._density

    @property
    def data_spec(self):
        """The `InputSpec` that checks data, latents and contexts."""
        return self._density.spec

    @property
    def flow(self):
        """The normalizing bijector `f` (data to latent)."""
        return self._density.flow

    @property
    def bijector(self):
        """The generative bijector `Invert(f)` (latent to data)."""
        return self._density.distribution.bijector

    @property
    def distribution(self):
        """`tfd.TransformedDistribution(N(0, I), Invert(f))`."""
        return self._density.distribution

    @property
    def event_shape(self):
        """Shape of one data point, e.g. `(8, 8, 1)`."""
        return self._density.event_shape

    @property
    def latent_shape(self):
        """Shape of one latent `z = encode(x)` (the base distribution's event)."""
        return self._density.latent_shape

    @property
    def num_dims(self):
        """Number of data dimensions `D` (the bits/dim denominator)."""
        return self._density.num_dims

    @property
    def num_bins(self):
        """Discrete levels of the data, or None for continuous data."""
        return self._density.num_bins

    @property
    def num_classes(self):
        """Classes of a class-conditional model, or None."""
        return self._density.num_classes

    @property
    def context_shape(self):
        """Shape of one context of a conditional model (a tuple; `(num_classes,)` for a
        class-conditional one), or None for an unconditional model."""
        return self._density.context_shape

    @property
    def flow_context_shape(self):
        """Shape of the context the flow's layers receive: `context_shape`, or the
        output shape of the model's `context_encoder`."""
        return self._density.flow_context_shape

    @property
    def data_range(self):
        """`(-0.5, 0.5)` for discretised image models (`num_bins` set), else None.

        Only training and evaluation data must lie in it; any finite input
        can be scored."""
        return self._density.spec.data_range

    @property
    def validate_args(self):
        """Whether input values are also asserted inside graphs."""
        return self._density.spec.validate_args

    # -- the density API -------------------------------------------------------
    def log_prob(self, x, context=None, backprop=None, *, labels=None):
        """`log p(x | context)` per example, for any finite `x` of the event shape.

        `backprop` is what a `tf.GradientTape` around this call keeps for the
        gradient, as the model's `backprop` option is for `fit`: None (the
        model's setting), `"standard"`, `"checkpoint"` or `"reversible"`. A
        custom training loop gets the memory of `fit`:

            with tf.GradientTape() as tape:
                loss = -tf.reduce_mean(model.log_prob(x, backprop="reversible"))
            grads = tape.gradient(loss, model.trainable_variables)
        """
        mode = getattr(self, "backprop", "standard") if backprop is None else backprop
        return self._density.log_prob(x, context, mode, labels=labels)

    def bits_per_dim(self, x, context=None, *, labels=None):
        """openai/glow's bits/dim: `(-log p(x) + D log(num_bins)) / (D ln 2)`."""
        return self._density.bits_per_dim(x, context, labels=labels)

    def encode(self, x, context=None, *, labels=None):
        """`z = f(x)`, the standard-normal latent."""
        return self._density.encode(x, context, labels=labels)

    def decode(self, z, context=None, *, labels=None):
        """`x = f^-1(z)`."""
        return self._density.decode(z, context, labels=labels)

    def sample(self, num_samples, temperature=1.0, seed=None, context=None, *, labels=None):
        """Draws `x = f^-1(T * eps)`, `eps ~ N(0, I)` (see `FlowDensity.sample`): one
        `context` `[*context_shape]` for every sample, or `[num_samples, *context_shape]`."""
        return self._density.sample(num_samples, temperature, seed, context, labels=labels)

    def interpolate(self, x_start, x_end, num_steps=8, context=None, *, labels=None):
        """Decodes `(1 - t) f(x_start) + t f(x_end)`: `[num_steps, batch, *event]`."""
        return self._density.interpolate(x_start, x_end, num_steps, context, labels=labels)

    # -- variational dequantization (with a `self.dequantizer`) -----------------
    def _bound_of(self, x, context=None, backprop="standard"):
        """Per example, `log p(x_q) - log q(u | k)` with the dequantizer, else `log p(x)`."""
        if self.dequantizer is None:
            return self._density.log_prob_of(x, context, backprop)
        x_q, log_q = self.dequantizer(x)
        return self._density.log_prob_of(x_q, context, backprop) - log_q

    def variational_log_prob(self, x, context=None, *, labels=None):
        """The variational bound per example: `log p(x_q) - log q(u | k)`.

        `x` is dequantized data in [-0.5, 0.5] (its levels `k` and noise are
        read off it; see `VariationalDequantizer`). Then
        `log P(k) >= variational_log_prob(x) - D log(num_bins)`. Without a
        dequantizer it is `log_prob(x)`, the uniform bound.
        """
        spec = self._density.spec
        x = spec.training_data(x, "x")
        value, name = context_argument(context, labels)
        context = spec.context(value, x, arg_name=name)
        signature = self._density._signature("data")
        return self._density._call(
            "variational_log_prob", self._bound_of, signature, *self._density._args(context, x)
        )

    def variational_bits_per_dim(self, x, context=None, *, labels=None):
        """`variational_log_prob` in bits/dim, `(-bound + D log(num_bins)) / (D ln 2)`:
        the figure `fit` and `evaluate` report as `bits_per_dim`."""
        return self._density.bits_per_dim_of(self.variational_log_prob(x, context, labels=labels))
