"""Normalizing flows inside TFP inference: variational surrogates and NeuTra MCMC.

`flow_surrogate_posterior` builds a trainable `tfd.TransformedDistribution`
for `tfp.vi.fit_surrogate_posterior`; `neutra_kernel` runs HMC or NUTS in
that flow's latent space (NeuTra, Hoffman et al. 2019), where a well-fitted
surrogate leaves the sampler an almost standard-normal target.

#### Examples

```python
target = model.experimental_pin(y=observed)       # any tfd.JointDistribution
q = tfp_glow.vi.flow_surrogate_posterior(target, seed=0)
losses = tfp.vi.fit_surrogate_posterior(
    target.unnormalized_log_prob, q, keras.optimizers.Adam(1e-3), num_steps=2000,
    sample_size=16, jit_compile=True)
kernel = tfp_glow.vi.neutra_kernel(target.unnormalized_log_prob, q,
                                   num_adaptation_steps=400)
draws = tfp.mcmc.sample_chain(1000, tfp_glow.vi.neutra_initial_state(q, 4, seed=1),
                              kernel=kernel, num_burnin_steps=500, trace_fn=None)
```

#### References

[1] Matthew Hoffman, Pavel Sountsov, Joshua V. Dillon, Ian Langmore, Dustin
    Tran, Srinivas Vasudevan. NeuTra-lizing Bad Geometry in Hamiltonian Monte
    Carlo Using Neural Transport. 2019. https://arxiv.org/abs/1903.03704
[2] Danilo Rezende, Shakir Mohamed. Variational Inference with Normalizing
    Flows. ICML 2015. https://arxiv.org/abs/1505.05770
"""

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_glow import checks, nets
from tfp_glow.bijectors import (
    ActNorm,
    AdditiveCoupling,
    AffineCoupling,
    InvertibleConv1x1,
    PlanarFlow,
    RadialFlow,
)

tfb, tfd = tfp.bijectors, tfp.distributions

__all__ = ["COUPLINGS", "FLOWS", "KERNELS", "flow_surrogate_posterior", "neutra_initial_state",
           "neutra_kernel"]

COUPLINGS = ("affine", "additive")
FLOWS = ("coupling", "planar", "radial")
KERNELS = ("hmc", "nuts")

# The attribute under which a structured surrogate keeps its flat-to-structure
# bijector, so `neutra_kernel` can give the sampler a latent state of the
# model's structure (TFP's TransformedTransitionKernel wants the same
# structure on both sides).
_UNFLATTEN = "_tfp_glow_unflatten"

# `tfd.TransformedDistribution(...)` returns the private base class
# `_TransformedDistribution` when the bijector is not a CompositeTensor (every
# stateful tfp_glow bijector): match both, found by name in the MRO.
_TRANSFORMED_TYPES = tuple(c for c in tfd.TransformedDistribution.__mro__
                           if c.__name__ in ("TransformedDistribution",
                                             "_TransformedDistribution"))


# ----------------------------------------------------------------- the flow


def _glorot_uniform(rng, fan_in, fan_out, dtype):
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, (fan_in, fan_out)).astype(dtype)


def _coupling(kind, size, hidden_units, parity, dtype, rng):
    """A coupling on `[size]` vectors whose network is seeded from `rng`.

    The checkerboard mask (even / odd coordinates) works for any `size`,
    where halves need an even one. The network's last layer is zero, so the
    step is linear at init: `x_a -> sigmoid(2) * x_a` (affine) or the identity.
    """
    cls = AffineCoupling if kind == "affine" else AdditiveCoupling
    net = nets.MLPCouplingNet(hidden_units, cls.output_units_for((size,), "checkerboard"),
                              dtype=dtype)
    net.build((None, size))
    for layer in net.hidden:  # seeded Glorot init instead of Keras's global seed
        fan_in, fan_out = layer.kernel.shape
        layer.kernel.assign(_glorot_uniform(rng, fan_in, fan_out, dtype))
    return cls(net, mask="checkerboard", parity=parity, event_shape=(size,), dtype=dtype,
               name=f"{kind}_coupling_{parity}")


def _permutation(size, dtype, rng, name):
    """`InvertibleConv1x1` (LU) with `W = P`, a random permutation, at init."""
    linear = InvertibleConv1x1(size, event_ndims=1, seed=int(rng.integers(2**31)),
                               dtype=dtype, name=name)
    # W = P L (U + diag(sign * exp(log_s))) = P with L = I, U = 0, sign = 1, log_s = 0.
    linear.permutation.assign(np.eye(size)[rng.permutation(size)])
    linear.sign.assign(np.ones(size))
    linear.lower.assign(np.zeros((size, size)))
    linear.upper.assign(np.zeros((size, size)))
    linear.log_s.assign(np.zeros(size))
    return linear


def _vector_flow(size, num_layers, hidden_units, coupling, dtype, rng):
    """The generative bijector `g: z -> x` on `[size]` vectors, a standard normal at init.

        g = A o (C_K o W_K) o ... o (C_1 o W_1)

    `W_k`: `InvertibleConv1x1` (LU), started at a random permutation
    (`L = U = 0`, `log_s = 0`); `C_k`: a coupling with alternating parity,
    used in its forward direction, whose scale lies in `(min_scale, 1)`: on
    the sampling path a coupling can only contract, so `|g(z)|` grows at
    most linearly in `|z|` (through the shifts and the learned linear maps,
    never by a per-step `1 / min_scale`); `A`: `ActNorm`, a per-coordinate
    scale and shift (mean-field is the special case of identity couplings).

    At init every step is linear (zero last layers): `g(z) = M z` with `M` a
    permuted diagonal (permutations, and the couplings' `sigmoid(2)` factor on
    the transformed coordinates). `A`'s scale is set to `1 / sqrt(diag(M M^T))`,
    which makes `g(z) ~ N(0, I)` exactly, with no data. `A` is marked
    initialised, so `data_dependent_init` never touches it. Measured on the
    funnel, starting the linear maps at permutations beat random rotations
    (ELBO -0.95 vs -1.14, 2 seeds each).
    """
    steps = []  # in the order they act on z
    for i in range(num_layers):
        steps.append(_permutation(size, dtype, rng, name=f"linear_{i}"))
        steps.append(_coupling(coupling, size, hidden_units, i % 2, dtype, rng))
    act = ActNorm(size, event_ndims=1, dtype=dtype, name="act_norm")
    act.initialized.assign(tf.ones([], dtype))
    flow = tfb.Chain(list(reversed(steps + [act])), name="flow")  # Chain applies last first
    columns = flow.forward(tf.eye(size, dtype=dtype)).numpy()    # rows: M e_i, A = identity
    act.log_scale.assign(-0.5 * np.log(np.sum(columns ** 2, axis=0)))
    return flow


def _residual_flow(kind, size, num_layers, dtype, rng):
    """`g = F_K o ... o F_1 o A` on `[size]` vectors, a standard normal at init.

    `A`: `ActNorm` (a learned diagonal Gaussian `q0 = N(mu, diag sigma^2)`, the
    paper's initial density); `F_k`: `PlanarFlow` or `RadialFlow` (forward is
    their generative map), each the identity at init.
    """
    cls = PlanarFlow if kind == "planar" else RadialFlow
    act = ActNorm(size, event_ndims=1, dtype=dtype, name="act_norm")
    act.initialized.assign(tf.ones([], dtype))  # identity; data_dependent_init skips it
    steps = [act] + [cls(size, seed=int(rng.integers(2**31)), dtype=dtype,
                         name=f"{kind}_{i}") for i in range(num_layers)]
    return tfb.Chain(list(reversed(steps)), name="flow")  # Chain applies last first


# ----------------------------------------------------------- the structure


def _is_model(value):
    return callable(getattr(value, "experimental_default_event_space_bijector", None))


def _model_dtype(model, dtype):
    dtypes = {tf.as_dtype(d) for d in tf.nest.flatten(model.dtype)}
    if len(dtypes) != 1 or not next(iter(dtypes)).is_floating:
        raise ValueError(
            f"`event_shape_or_model` must have continuous (floating) parts of one dtype; "
            f"received a model of dtype {model.dtype}.")
    model_dtype = dtypes.pop()
    if dtype is not None and dtype != model_dtype:
        raise ValueError(f"`dtype` must match the model's dtype {model_dtype.name}; "
                         f"received {dtype.name}.")
    return model_dtype


def _unflatten(shapes):
    """Bijector `[D]` -> the structure of `shapes` (split, reshape, restructure)."""
    flat = tf.nest.flatten(shapes)
    sizes = [max(1, int(np.prod(s))) for s in flat]
    if not tf.nest.is_nested(shapes):
        return tfb.Reshape(flat[0], event_shape_in=[sizes[0]])
    reshape = tfb.JointMap(tf.nest.pack_sequence_as(
        shapes, [tfb.Reshape(s, event_shape_in=[n]) for s, n in zip(flat, sizes)]))
    restructure = tfb.Restructure(tf.nest.pack_sequence_as(shapes, list(range(len(flat)))))
    return tfb.Chain([reshape, restructure, tfb.Split(sizes, axis=-1)], name="unflatten")


def _static_shapes(model):
    constrain = model.experimental_default_event_space_bijector()
    if constrain is None:  # TFP's answer for discrete distributions
        raise ValueError(f"`event_shape_or_model` must be a continuous model (one with an "
                         f"event-space bijector); received {model!r}.")
    shapes = constrain.inverse_event_shape(model.event_shape)
    for shape in tf.nest.flatten(shapes):
        if not tf.TensorShape(shape).is_fully_defined():
            raise ValueError(f"`event_shape_or_model` must have static event shapes; "
                             f"received a model with unconstrained shapes {shapes}.")
    return constrain, shapes


def flow_surrogate_posterior(
        event_shape_or_model: Sequence[int] | tfp.distributions.Distribution,
        num_layers: int = 6, hidden_units: int = 32, coupling: str = "affine",
        dtype: tf.DType | None = None, seed: int | None = None, name: str | None = None,
        flow: str = "coupling") -> tfp.distributions.TransformedDistribution:
    """A normalizing-flow surrogate posterior for `tfp.vi.fit_surrogate_posterior`.

        q(x) = N(z; 0, I_D) |det dg/dz|^-1,   x = c(u(g(z)))

    `g` is a flow on the flat vector `z` (see below), `u` splits and reshapes
    it into the model's structure of unconstrained parts, and `c` is the
    model's `experimental_default_event_space_bijector()` (e.g. softplus for a
    scale), as `tfp.experimental.vi.build_factored_surrogate_posterior` does
    for its mean-field surrogate. For an event shape, `u` is a reshape and
    `c` the identity.

    `g` is `num_layers` x [learned invertible linear map (`InvertibleConv1x1`,
    LU), coupling (`AffineCoupling` or `AdditiveCoupling`, checkerboard mask,
    `MLPCouplingNet` of `hidden_units`)] followed by a per-coordinate affine
    map (`ActNorm`). It starts as a standard normal, exactly, without data:
    zero last layers make every step linear at init (the linear maps start as
    permutations), and the final scale undoes the couplings' `sigmoid(2)`
    contraction. The affine scale lies in
    `(min_scale, 1)` on the sampling path, so neither `g` nor its inverse
    can overflow from one step.

    Defaults (6 layers of width 32, affine; train with Adam 1e-3) were chosen
    by measurement on a 10-D Neal funnel and the centred Eight Schools (2,000
    steps of 16 draws, 2 seeds): depth helps most (funnel ELBO -1.29 / -0.95 /
    -0.70 / -0.69 at 2 / 4 / 6 / 8 layers; Eight Schools -33.07 / -32.43 /
    -32.27 / -32.08), width little (64 units: -0.93 and -32.25 at 4 layers),
    additive couplings are worse (-1.56, -32.77 at 4 layers). Adam 3e-3 gains
    on Eight Schools (-31.98 at 6 layers) but not on the funnel (-0.77); 3e-4
    is too slow for 2,000 steps.

    `flow="planar"` or `"radial"` builds instead `num_layers` (K) planar or
    radial flows (Rezende & Mohamed 2015; `PlanarFlow`, `RadialFlow`) after a
    learned diagonal Gaussian (`ActNorm`), also a standard normal at init.
    They have `2D + 1` (planar) or `D + 2` (radial) parameters per layer and
    need many layers. On the paper's 2-D energy densities (800 steps,
    `benchmarks/vi_energy.py`, BENCHMARKS.md) planar beat radial at K = 8 and
    32, and the coupling default fit two of the four best but covered one of
    U1's two modes (KL 0.74 against 0.09 for 8 planar layers).

    Args:
      event_shape_or_model: an event shape such as `[10]` (a flow on R^10), or
        a model: a `tfd.JointDistribution` (pinned or not, e.g.
        `jd.experimental_pin(y=...)`) or any distribution with
        `experimental_default_event_space_bijector()`; samples then have its
        structure and lie in its support.
      num_layers: int >= 1, (linear map, coupling) pairs, or K planar / radial layers.
      hidden_units: int >= 1, width of the two hidden layers of each coupling net
        (`flow="coupling"` only).
      coupling: `"affine"` (RealNVP) or `"additive"` (NICE, volume preserving
        apart from the linear maps) (`flow="coupling"` only).
      dtype: float dtype; `None`: the model's dtype, or float32 for a shape.
      seed: int >= 0 or None, for the nets' init and the permutations.
      name: the distribution's name.
      flow: the flow family: `"coupling"` (the default described above),
        `"planar"` or `"radial"`.

    Returns:
      A `tfd.TransformedDistribution` whose `trainable_variables` are every
      variable of the flow (`tfp.vi.fit_surrogate_posterior` and Keras
      optimizers train them).
    """
    num_layers = checks.positive_int(num_layers, "num_layers")
    hidden_units = checks.positive_int(hidden_units, "hidden_units")
    coupling = checks.choice(coupling, COUPLINGS, "coupling")
    flow_kind = checks.choice(flow, FLOWS, "flow")
    if dtype is not None:
        try:
            dtype = tf.as_dtype(dtype)
        except TypeError:
            raise TypeError(f"`dtype` must be a float dtype such as tf.float32; "
                            f"received {dtype!r}.") from None
        if not dtype.is_floating:
            raise ValueError(f"`dtype` must be a float dtype; received {dtype.name}.")
    seed = checks.positive_int(seed, "seed", minimum=0, allow_none=True)
    if name is not None and not isinstance(name, str):
        raise TypeError(f"`name` must be a str or None; received {name!r}.")
    name = name or "flow_surrogate_posterior"

    unflatten, shape = None, None
    if _is_model(event_shape_or_model):
        model = event_shape_or_model
        dtype = _model_dtype(model, dtype)
        constrain, shapes = _static_shapes(model)
        unflatten = _unflatten(shapes)
        size = sum(max(1, int(np.prod(s))) for s in tf.nest.flatten(shapes))
    elif isinstance(event_shape_or_model, tfd.Distribution):
        raise TypeError("`event_shape_or_model` must be an event shape or a model with "
                        "`experimental_default_event_space_bijector()`; received "
                        f"{event_shape_or_model!r}.")
    else:
        shape = _event_shape(event_shape_or_model)
        dtype = dtype or tf.float32
        size = max(1, int(np.prod(shape)))
    dtype = dtype.name
    rng = np.random.default_rng(seed)
    if flow_kind == "coupling":
        flow = _vector_flow(size, num_layers, hidden_units, coupling, dtype, rng)
    else:
        flow = _residual_flow(flow_kind, size, num_layers, dtype, rng)
    if unflatten is not None:
        bijector = tfb.Chain([constrain, unflatten, flow])
    elif shape == (size,):
        bijector = flow
    else:
        unflatten = tfb.Reshape(shape, event_shape_in=[size])
        bijector = tfb.Chain([unflatten, flow])
    base = tfd.Sample(tfd.Normal(tf.zeros([], dtype), tf.ones([], dtype)), [size])
    surrogate = tfd.TransformedDistribution(base, bijector, name=name)
    setattr(surrogate, _UNFLATTEN, unflatten)
    return surrogate


def _event_shape(value):
    if isinstance(value, tf.TensorShape):
        value = value.as_list() if value.rank is not None else value
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError("`event_shape_or_model` must be an event shape (e.g. [10]) or a "
                        "model with `experimental_default_event_space_bijector()` (e.g. a "
                        f"tfd.JointDistribution); received {value!r}.")
    dims = tuple(value)
    if not dims:
        return ()
    return checks.shape(dims, "event_shape_or_model")


# ------------------------------------------------------------------ NeuTra


def _latent_bijector(surrogate):
    """`z -> x` with z in the structure of x: the surrogate's bijector after the
    inverse of its split/reshape, so the latent state has the model's structure."""
    unflatten = getattr(surrogate, _UNFLATTEN, None)
    if unflatten is None:
        return surrogate.bijector
    return tfb.Chain([surrogate.bijector, tfb.Invert(unflatten)])


def neutra_kernel(target_log_prob_fn: Callable[..., tf.Tensor],
                  surrogate: tfp.distributions.Distribution, kernel: str = "hmc",
                  step_size: float = 0.5, num_leapfrog_steps: int = 2,
                  num_adaptation_steps: int = 0,
                  target_accept_prob: float | None = None) -> tfp.mcmc.TransitionKernel:
    """HMC or NUTS in the latent space of a fitted flow surrogate (NeuTra).

    With `x = g(z)` the surrogate's bijector, the sampler runs on

        log p~(z) = log p(g(z)) + log|det dg/dz|

    through `tfp.mcmc.TransformedTransitionKernel`, and `sample_chain`
    returns states `x` in the target's space and structure. If the surrogate
    fits, `p~` is close to a standard normal, whatever the geometry of `p`.

    Args:
      target_log_prob_fn: the unnormalised log density of the target, called as
        TFP's MCMC calls it: `fn(x)` for a tensor state, `fn(*parts)` for a
        structured one (e.g. `pinned.unnormalized_log_prob`).
      surrogate: a `tfd.TransformedDistribution`, e.g. from
        `flow_surrogate_posterior` (structured surrogates keep the structure).
      kernel: `"hmc"` (fixed `num_leapfrog_steps`) or `"nuts"`.
      step_size: float > 0, the initial leapfrog step in latent space.
      num_leapfrog_steps: int >= 1 (HMC only). In a well-fitted latent (close
        to N(0, I)) the adapted step is about 0.65, and short trajectories give
        the most effective samples per gradient: on the 10-D funnel (128
        chains, 3 chain seeds; `python benchmarks/vi_defaults.py leapfrog`)
        the ESS of `v` per 1000 gradients was 3.7-4.6 at 2 steps, 2.7-3.3 at
        3, 2.3-5.0 at 4, 2.0-3.3 at 6, 1.6-2.8 at 8 and 0.7-2.4 at 12 (plain
        HMC: 1.1-1.2 at 2 steps, less with more): hence the default 2.
      num_adaptation_steps: int >= 0; if > 0, the step size is tuned by dual
        averaging during the first `num_adaptation_steps` steps (keep them
        inside `sample_chain`'s `num_burnin_steps`).
      target_accept_prob: float in (0, 1) for the adaptation; None: 0.75
        (HMC) or 0.8 (NUTS).

    Returns:
      A `tfp.mcmc.TransitionKernel` for `tfp.mcmc.sample_chain`; start it from
      `neutra_initial_state(surrogate, num_chains)`.
    """
    if not callable(target_log_prob_fn):
        raise TypeError(f"`target_log_prob_fn` must be callable; received "
                        f"{target_log_prob_fn!r}.")
    if not isinstance(surrogate, _TRANSFORMED_TYPES):
        raise TypeError("`surrogate` must be a tfd.TransformedDistribution (e.g. from "
                        f"flow_surrogate_posterior); received {surrogate!r}.")
    if isinstance(surrogate.dtype, dict):
        raise TypeError("`surrogate` must have tensor or list/tuple-structured samples "
                        "(TFP's TransformedTransitionKernel takes no dict state); use "
                        "a JointDistributionCoroutine or Sequential model.")
    kernel = checks.choice(kernel, KERNELS, "kernel")
    step_size = checks.number(step_size, "step_size", minimum=0.0, exclusive_minimum=True)
    num_leapfrog_steps = checks.positive_int(num_leapfrog_steps, "num_leapfrog_steps")
    num_adaptation_steps = checks.positive_int(num_adaptation_steps, "num_adaptation_steps",
                                               minimum=0)
    if target_accept_prob is None:
        target_accept_prob = 0.75 if kernel == "hmc" else 0.8
    target_accept_prob = checks.number(target_accept_prob, "target_accept_prob",
                                       minimum=0.0, maximum=1.0, exclusive_minimum=True,
                                       exclusive_maximum=True)
    # The step size in the latent dtype (a float64 surrogate would otherwise
    # get a float32 step from the Python float).
    dtype = tf.nest.flatten(surrogate.dtype)[0]
    step = tf.constant(step_size, dtype)
    if kernel == "hmc":
        inner = tfp.mcmc.HamiltonianMonteCarlo(target_log_prob_fn, step_size=step,
                                               num_leapfrog_steps=num_leapfrog_steps)
    else:
        inner = tfp.mcmc.NoUTurnSampler(target_log_prob_fn, step_size=step)
    transformed = tfp.mcmc.TransformedTransitionKernel(inner, _latent_bijector(surrogate))
    if num_adaptation_steps == 0:
        return transformed
    return tfp.mcmc.DualAveragingStepSizeAdaptation(
        transformed, num_adaptation_steps=num_adaptation_steps,
        target_accept_prob=tf.constant(target_accept_prob, dtype))


def neutra_initial_state(surrogate: tfp.distributions.Distribution, num_chains: int | None = None,
                         seed: int | tf.Tensor | None = None) -> Any:
    """Draws from the surrogate to start `num_chains` chains of `neutra_kernel`.

    Returns `surrogate.sample(num_chains)` (one unbatched state for None), in
    the target's space and structure: `sample_chain`'s `current_state`.
    """
    if not isinstance(surrogate, tfd.Distribution):
        raise TypeError(f"`surrogate` must be a tfd.Distribution; received {surrogate!r}.")
    num_chains = checks.positive_int(num_chains, "num_chains", allow_none=True)
    return surrogate.sample(() if num_chains is None else num_chains, seed=seed)
