"""The flows of benchmarks/toy_kl.py (2-D), their parameter counts and timers.

Every flow is a `tfp_glow.FlowModel` around a normalizing bijector (data to
latent), trained by `fit`. `FLOWS` names them:

* `realnvp`: `tfp_glow.RealNVP(input_shape=(2,))`, `layers` affine couplings
  (MLP 1 -> hidden -> hidden -> 2), ActNorm after each.
* `spline`: the same stack with `RationalQuadraticSplineCoupling` (`bins`
  bins, linear tails outside `tail_bound`), a learned 2x2 LU linear map and
  ActNorm after each coupling.
* `glow`: `layers` Glow steps for vectors: ActNorm, `InvertibleConv1x1(2,
  event_ndims=1)` (a learned LU 2x2 linear map), `AffineCoupling` with the
  same MLP as `realnvp` (`tfp_glow.Glow` needs images).
* `maf`: `tfb.Invert(Chain of layers x tfb.MaskedAutoregressiveFlow(MADE))`,
  MADE `[hidden, hidden]`, the input order reversed in every other layer;
  density in one pass per layer, sampling D passes.
* `iaf`: the same `Chain` of MAF bijectors as the normalizing flow itself:
  sampling in one pass per layer, density D passes.
* `nsf_ar`: `maf` with `nets.AutoregressiveSplineFn` (`bins` bins on
  `[-tail_bound, tail_bound]`, identity outside) in place of the affine map.
* `ffjord`: `tfb.Invert(tfb.FFJORD(nets.ODENet(2, [hidden] * 3)))`, exact
  trace, TFP's default solver (Dormand-Prince, rtol 1e-3, atol 1e-6).

At D = 2 a MADE's first output in the order sees no input: its weights (and
those of the input no hidden unit may read) are masked to zero but are still
variables. `params` counts every variable; `effective_params` leaves the
masked entries out (what the realnvp/spline couplings are to be compared with).
"""

import statistics
import time

import numpy as np

FLOWS = ("realnvp", "spline", "glow", "maf", "iaf", "nsf_ar", "ffjord")
ODE_HIDDEN_LAYERS = 3


def _orders(layers):
    return ["left-to-right" if i % 2 == 0 else "right-to-left" for i in range(layers)]


def _coupling_stack(kind, layers, hidden, bins, tail_bound):
    """`spline` and `glow`: tfp_glow bijectors in one `MultiScaleFlow` stage."""
    import functools

    import tensorflow_probability as tfp

    from tfp_glow import nets
    from tfp_glow.bijectors import ActNorm, AffineCoupling, InvertibleConv1x1, MultiScaleFlow
    from tfp_glow.bijectors.spline_coupling import RationalQuadraticSplineCoupling

    steps = []
    for i in range(layers):
        if kind == "spline":
            per = RationalQuadraticSplineCoupling.outputs_per_channel(bins)
            steps += [
                RationalQuadraticSplineCoupling(
                    nets.MLPCouplingNet(hidden, per, num_hidden_layers=2),
                    num_bins=bins,
                    tail_bound=tail_bound,
                    parity=i % 2,
                    event_shape=(2,),
                ),
                InvertibleConv1x1(2, event_ndims=1, seed=i),
                ActNorm(2, event_ndims=1),
            ]
        else:  # glow: ActNorm -> 1x1 "conv" (LU 2x2 map) -> affine coupling
            steps += [
                ActNorm(2, event_ndims=1),
                InvertibleConv1x1(2, lu=True, event_ndims=1, seed=i),
                AffineCoupling(
                    functools.partial(nets.MLPCouplingNet, hidden, num_hidden_layers=2),
                    mask="channel",
                    parity=i % 2,
                    event_shape=(2,),
                ),
            ]
    chain = tfp.bijectors.Chain(list(reversed(steps)))  # steps[0] is applied first
    return MultiScaleFlow((2,), [(chain, None)])


def build_flow(kind, layers=8, hidden=64, bins=8, tail_bound=3.0, unroll_loop=False):
    """`(FlowModel, masked)`: the model and the number of its masked weights.
    `unroll_loop`: TFP's option of `MaskedAutoregressiveFlow` (a Python loop of
    D passes in its sequential direction, in place of a `tf.while_loop`)."""
    import tensorflow_probability as tfp

    import tfp_glow
    from tfp_glow import FlowModel, nets

    tfb = tfp.bijectors
    if kind == "realnvp":
        return tfp_glow.RealNVP(
            input_shape=(2,), coupling_layers=layers, hidden_channels=hidden, num_bins=None
        ), 0
    if kind in ("spline", "glow"):
        return FlowModel(
            lambda: _coupling_stack(kind, layers, hidden, bins, tail_bound),
            event_shape=(2,),
            num_bins=None,
        ), 0
    if kind == "ffjord":

        def flow():
            return tfb.Invert(
                tfb.FFJORD(
                    state_time_derivative_fn=nets.ODENet(2, [hidden] * ODE_HIDDEN_LAYERS),
                    trace_augmentation_fn=nets.ffjord_trace(exact=True),
                )
            )

        return FlowModel(flow, event_shape=(2,), num_bins=None), 0
    if kind not in ("maf", "iaf", "nsf_ar"):
        raise ValueError(f"unknown flow {kind!r}; one of {FLOWS}")
    mades = []

    def flow():
        mafs = []
        for order in _orders(layers):
            if kind == "nsf_ar":
                fn = nets.AutoregressiveSplineFn.build(
                    2, [hidden, hidden], num_bins=bins, bound=tail_bound, input_order=order
                )
                mades.append(fn.made)
                mafs.append(tfb.MaskedAutoregressiveFlow(bijector_fn=fn, unroll_loop=unroll_loop))
            else:
                made = nets.MADE(
                    params=2, event_size=2, hidden_units=[hidden, hidden], input_order=order
                )
                mades.append(made)
                mafs.append(
                    tfb.MaskedAutoregressiveFlow(
                        shift_and_log_scale_fn=made, unroll_loop=unroll_loop
                    )
                )
        chain = tfb.Chain(list(reversed(mafs)))  # mafs[0] nearest the data
        # MAF: the MAF bijector maps noise to data (sequential), so the
        # normalizing flow is its inverse; IAF: the bijector itself normalizes.
        return chain if kind == "iaf" else tfb.Invert(chain)

    model = FlowModel(flow, event_shape=(2,), num_bins=None)
    masked = sum(int((~m).sum()) for made in mades for m in made.masks)
    return model, masked


def count_params(model):
    return int(sum(int(np.prod(v.shape)) for v in model.trainable_variables))


def architecture(kind, layers, hidden, bins, unroll_loop=False):
    """A short description of the flow at these settings, for the table."""
    if kind == "ffjord":
        return f"1 ODE, MLP {'-'.join([str(hidden)] * ODE_HIDDEN_LAYERS)} tanh, exact trace"
    extra = f", {bins} bins" if kind in ("spline", "nsf_ar") else ""
    if unroll_loop and kind in ("maf", "iaf", "nsf_ar"):
        extra += ", unroll_loop"
    return f"{layers} layers, hidden {hidden}x2{extra}"


def step_timer():
    """A Keras callback recording the wall time between successive
    `on_train_batch_begin` calls (one training step each, in steady state)."""
    import keras

    class StepTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.starts, self.cpu = [], []

        def on_train_batch_begin(self, batch, logs=None):
            self.starts.append(time.perf_counter())
            self.cpu.append(time.process_time())

        def on_train_end(self, logs=None):
            self.on_train_batch_begin(None)

        def summary(self, skip=None):
            """Median ms per step after warm-up (the first `skip`, by default
            max(5, 10%) of the steps: tracing and the first slow calls)."""
            gaps, cpu = np.diff(self.starts) * 1e3, np.diff(self.cpu) * 1e3
            skip = max(5, len(gaps) // 10) if skip is None else skip
            kept = gaps[skip:] if len(gaps) > skip else gaps[-1:]
            kept_cpu = cpu[skip:] if len(cpu) > skip else cpu[-1:]
            return {
                "step_ms_median": float(np.median(kept)),
                # this process's CPU time (all threads) per step: less
                # sensitive to other load on the machine than wall time
                "step_cpu_ms_median": float(np.median(kept_cpu)),
                "step_ms_p10": float(np.percentile(kept, 10)),
                "step_ms_p90": float(np.percentile(kept, 90)),
                "first_step_s": float(gaps[0] / 1e3) if len(gaps) else None,
                "steps_timed": int(len(kept)),
            }

    return StepTimer()


def time_directions(model, x, n=1000, repeats=3, seed=7):
    """Medians (ms) of `model.sample(n)` and `model.log_prob(x[:n])`, each
    after one untimed call (tracing); results forced to NumPy."""
    import tensorflow as tf

    x = tf.constant(x[:n])
    out = {}
    for name, fn in (
        ("sample", lambda: model.sample(n, seed=seed)),
        ("log_prob", lambda: model.log_prob(x)),
    ):
        t0 = time.perf_counter()
        np.asarray(fn())
        first = time.perf_counter() - t0
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            np.asarray(fn())
            times.append(time.perf_counter() - t0)
        out[f"{name}_{n}_ms"] = 1e3 * statistics.median(times)
        out[f"{name}_{n}_first_call_s"] = first
    return out
