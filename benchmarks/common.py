"""Shared builders and timers for the tfp_glow vs `tfb.Glow` benchmarks.

Both libraries get the same architecture: Glow with `levels` scales of
squeeze + `steps` x (ActNorm, LU 1x1 conv, affine coupling) + a split that
factors out half of the channels (a 3x3 zero conv gives the split prior),
coupling networks 3x3 conv (width) -> ReLU -> 1x1 conv (width) -> ReLU ->
3x3 zero conv. tfp_glow's learned top prior is off, as `tfb.Glow` has none.
"""

import gc
import os
import resource
import statistics
import threading
import time

import numpy as np
import tensorflow as tf

SIZES = {
    "small": dict(image_shape=(8, 8, 1), levels=2, steps=8, width=64, num_bins=17),
    "cifar": dict(image_shape=(32, 32, 3), levels=3, steps=8, width=128, num_bins=256),
    # Only for the capability checks, which do not depend on depth or width.
    "tiny": dict(image_shape=(8, 8, 1), levels=2, steps=1, width=16, num_bins=17),
}
BATCH = 64
# The Glow of the paper and of `tfb.Glow`: no dropout, uniform dequantization
# (`tfp_glow.Glow`'s defaults add both; the comparisons here are architecture
# for architecture).
PAPER_GLOW = dict(dropout=0.0, dequantization="uniform")


# -- models ------------------------------------------------------------------
def build_ours(size, seed=0):
    """tfp_glow's Glow at the matched architecture (a `FlowModel`)."""
    import tfp_glow

    cfg = SIZES[size]
    return tfp_glow.Glow(
        image_shape=cfg["image_shape"],
        levels=cfg["levels"],
        steps_per_level=cfg["steps"],
        hidden_channels=cfg["width"],
        coupling="affine",
        permutation="conv_lu",
        learn_top_prior=False,
        num_bins=cfg["num_bins"],
        seed=seed,
        **PAPER_GLOW,
    )


def build_ours_mixed(size, seed=0, policy="mixed_bfloat16"):
    """`build_ours` with the coupling networks in a Keras mixed-precision policy.

    Built from the public bijectors (as `tfp_glow.models.build_glow_flow`
    does): only the coupling networks compute in bfloat16 (their variables
    stay float32); ActNorm, the 1x1 convs, the split priors, every log-det
    and the flow's outputs stay float32, so the flow is still exactly
    invertible (the same network output is used both ways).
    """
    import functools

    import tensorflow_probability as tfp

    from tfp_glow import FlowModel, nets
    from tfp_glow.bijectors import (
        ActNorm,
        AffineCoupling,
        FactorOut,
        InvertibleConv1x1,
        MultiScaleFlow,
        Squeeze,
    )

    cfg = SIZES[size]
    shape, stages = tuple(cfg["image_shape"]), []
    for level in range(cfg["levels"]):
        steps = [Squeeze(event_shape=shape)]
        shape = (shape[0] // 2, shape[1] // 2, shape[2] * 4)
        c = shape[-1]
        # A factory: the coupling tells the network how many outputs it needs.
        net = functools.partial(nets.GlowCouplingNet, cfg["width"], dtype=policy)
        for k in range(cfg["steps"]):
            steps += [
                ActNorm(c),
                InvertibleConv1x1(c, seed=seed * 100003 + level * 1000 + k),
                AffineCoupling(net, event_shape=shape),
            ]
        factor_out = None
        if level < cfg["levels"] - 1:
            factor_out = FactorOut(c, 0.5)
            shape = shape[:-1] + (c - factor_out.num_factored,)
        stages.append((tfp.bijectors.Chain(list(reversed(steps))), factor_out))
    flow = MultiScaleFlow(cfg["image_shape"], stages)
    return FlowModel(flow, event_shape=cfg["image_shape"], num_bins=cfg["num_bins"])


class TFPGlow:
    """`tfb.Glow` (TFP 0.25, tf_keras networks) as a distribution over images.

    `log_prob(x)` goes image -> latent through `glow.inverse`; `sample(n)`
    pushes `N(0, I)` draws through `glow.forward`, as TFP's docstring shows.
    """

    def __init__(self, size, seed=0):
        import tensorflow_probability as tfp
        import tf_keras  # noqa: F401  (TFP's Glow networks are tf_keras layers)

        tfb, tfd = tfp.bijectors, tfp.distributions
        cfg = SIZES[size]
        width = cfg["width"]
        self.cfg = cfg
        self.glow = tfb.Glow(
            output_shape=cfg["image_shape"],
            num_glow_blocks=cfg["levels"],
            num_steps_per_block=cfg["steps"],
            coupling_bijector_fn=lambda shape: tfb.GlowDefaultNetwork(shape, num_hidden=width),
            exit_bijector_fn=tfb.GlowDefaultExitNetwork,
            grab_after_block=tuple([0.5] * (cfg["levels"] - 1) + [0.0]),
            seed=seed,
        )
        z_shape = self.glow.inverse_event_shape(cfg["image_shape"])
        self.distribution = tfd.TransformedDistribution(
            tfd.Sample(tfd.Normal(0.0, 1.0), z_shape), self.glow
        )
        self.nets = [layer for layer in _tfp_coupling_layers(self.glow)]

    @property
    def trainable_variables(self):
        return self.glow.trainable_variables

    def initialize(self, x):
        """Runs ActNorm's data-dependent init (a `tf.cond` on first use)."""
        self.distribution.log_prob(x)
        return self

    def log_prob(self, x):
        return self.distribution.log_prob(x)

    def sample(self, n):
        return self.distribution.sample(n)


def _tfp_coupling_layers(glow):
    """The coupling networks inside a `tfb.Glow`, in no particular order."""
    found, seen = [], set()

    def visit(b):
        if id(b) in seen:
            return
        seen.add(id(b))
        layer = getattr(b, "coupling_bijector_layer", None)
        if layer is not None:
            found.append(layer)
        for child in getattr(b, "bijectors", None) or []:
            visit(child)
        inner = getattr(b, "bijector", None) or getattr(b, "_bijector", None)
        if inner is not None and inner is not b:
            visit(inner)

    visit(glow)
    return found


# -- data ---------------------------------------------------------------------
def batch_of(size, batch=BATCH, seed=0):
    """A dequantized batch in [-0.5, 0.5]: digits for "small", noise images else."""
    from tfp_glow import data

    cfg = SIZES[size]
    if cfg["image_shape"] == (8, 8, 1):
        images, _ = data.load_digits("train")
        images = images[:batch]
    else:
        rng = np.random.default_rng(seed)
        # Uniform random levels: the step cost does not depend on the content.
        raw = rng.integers(0, cfg["num_bins"], (batch,) + cfg["image_shape"])
        images = raw.astype(np.float32)
    return data.preprocess(tf.constant(images), cfg["num_bins"], True, seed)


# -- timing -------------------------------------------------------------------
def _block(result):
    for t in tf.nest.flatten(result):
        if hasattr(t, "numpy"):
            t.numpy()
            break


def time_calls(fn, args, warmup=2, repeats=10, min_seconds=0.0):
    """(median seconds, first-call seconds, all seconds) of `fn(*args)`.

    The first call (tracing, compilation) is timed on its own; then `warmup`
    untimed calls and `repeats` timed ones, each synchronised on its output.
    """
    t0 = time.perf_counter()
    _block(fn(*args))
    first = time.perf_counter() - t0
    for _ in range(warmup):
        _block(fn(*args))
    times = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        _block(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), first, times


def time_interleaved(calls, repeats, warmup=2, min_seconds=0.0):
    """Times several functions in rounds, so load drift hits them alike.

    `calls` maps a name to `(fn, args)`. Each first call (tracing and
    compilation) is timed alone; after `warmup` untimed rounds, each round
    calls every function once, in an order rotated by one per round.
    Returns `{name: {"median_ms", "min_ms", "cpu_median_ms", "first_call_s",
    "repeats"}}`; `cpu` is this process's CPU time (all threads) per call.
    """
    names = list(calls)
    first = {}
    for name in names:
        fn, args = calls[name]
        t0 = time.perf_counter()
        _block(fn(*args))
        first[name] = time.perf_counter() - t0
    for _ in range(warmup):
        for name in names:
            fn, args = calls[name]
            _block(fn(*args))
    wall = {n: [] for n in names}
    cpu = {n: [] for n in names}
    start, r = time.perf_counter(), 0
    while r < repeats or time.perf_counter() - start < min_seconds:
        for i in range(len(names)):
            name = names[(i + r) % len(names)]
            fn, args = calls[name]
            w0, c0 = time.perf_counter(), time.process_time()
            _block(fn(*args))
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
        r += 1
    return {
        n: {
            "median_ms": 1e3 * statistics.median(wall[n]),
            "min_ms": 1e3 * min(wall[n]),
            "cpu_median_ms": 1e3 * statistics.median(cpu[n]),
            "first_call_s": first[n],
            "repeats": len(wall[n]),
        }
        for n in names
    }


def rss_bytes():
    """Current resident set size of this process (from /proc, Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples the process RSS every millisecond in a thread; `peak` bytes."""

    def __init__(self, interval=0.001):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        gc.collect()
        self.start = rss_bytes()
        self.peak = self.start
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        return False


def _malloc_trim():
    """Returns freed heap memory to the OS (glibc), so RSS drops to what is live."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def step_memory(fn, args, calls=2):
    """Peak RSS growth while `fn(*args)` runs, over the RSS just before.

    `fn` must already be traced and run once. Freed heap memory is handed
    back to the OS first (`malloc_trim`), so the growth is what one call
    allocates at its peak (activations, gradients, temporaries) rather than
    whatever the allocator happens to keep. Returns bytes (max over `calls`).
    """
    peaks = []
    for _ in range(calls):
        gc.collect()
        _malloc_trim()
        with PeakRSS() as sampler:
            _block(fn(*args))
        peaks.append(sampler.peak - sampler.start)
    return max(peaks)


def max_rss_bytes():
    """Peak RSS of this process so far (`getrusage`, kilobytes on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def machine_info():
    import platform

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import keras
    import tensorflow_probability as tfp

    try:
        import tf_keras

        tfk = tf_keras.__version__
    except ImportError:
        tfk = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "tensorflow_probability": tfp.__version__,
        "keras": keras.__version__,
        "tf_keras": tfk,
        "load_average_at_start": list(os.getloadavg()),
    }


# -- the measured functions ------------------------------------------------------
class Bench:
    """One library at one size: the model, its optimizer and the functions
    the benchmarks time, each a `tf.function` (XLA when `jit_compile`).

    `train_step(x)`: `-mean log p(x)`, its gradient and one Adam(1e-3) update
    (Keras 3 Adam for tfp_glow, tf_keras Adam for `tfb.Glow`).
    `model_train_step(x)` (tfp_glow only): `FlowModel.train_step`, the step
    `fit` runs (NaN/inf guard, metrics) on its own compiled Adam.
    `log_prob(x)`, `sample()` (a batch of `BATCH`), and `nets_step(x)`: the
    model's coupling networks alone, forward and backward, on inputs of the
    shapes they see inside the flow (see `flow_overhead`); `nets_forward(x)`:
    the same, forward only (the floor of sampling).
    """

    def __init__(self, lib, size, x, jit_compile=False, seed=0):
        self.lib, self.size, self.jit = lib, size, jit_compile
        if lib in ("ours", "ours_bf16"):
            import keras

            self.model = build_ours(size, seed) if lib == "ours" else build_ours_mixed(size, seed)
            self.model.initialize(x)
            self.optimizer = keras.optimizers.Adam(1e-3)
            self.optimizer.build(self.model.trainable_variables)
            apply = self.optimizer.apply
            couplings = _our_couplings(self.model.flow)
            self.nets = [b.net for b in couplings]
            self.net_shapes = [b._conditioning_shape(b._event_shape) for b in couplings]
        elif lib == "tfp":
            import tf_keras

            self.model = TFPGlow(size, seed).initialize(x)
            self.optimizer = tf_keras.optimizers.Adam(1e-3)
            self.optimizer.build(self.model.trainable_variables)

            def apply(grads, variables):
                self.optimizer.apply_gradients(zip(grads, variables))

            self.nets = self.model.nets
            self.net_shapes = [tuple(net.input_shape[1:]) for net in self.nets]
        else:
            raise ValueError(f"`lib` must be 'ours', 'ours_bf16' or 'tfp'; got {lib!r}.")
        model, variables = self.model, self.model.trainable_variables
        self.variables = variables

        def train_step(x):
            with tf.GradientTape() as tape:
                loss = -tf.reduce_mean(model.log_prob(x))
            grads = tape.gradient(loss, variables)
            apply(grads, variables)
            return loss

        def log_prob(x):
            return model.log_prob(x)

        def sample():
            return model.sample(BATCH)

        net_inputs = self.net_inputs(x)
        net_vars = [v for net in self.nets for v in net.trainable_variables]

        def nets_step(x):
            del x
            with tf.GradientTape() as tape:
                tape.watch(net_inputs)
                losses, carry = [], tf.zeros([], tf.float32)
                for net, h in zip(self.nets, net_inputs):
                    # Inside the flow each net's input depends on the previous
                    # net's output, so the nets run one after another, forward
                    # and backward. A zero-valued scalar dependency reproduces
                    # that order here (independent nets would run two at a
                    # time on 2 cores and flatter the flow).
                    loss = tf.reduce_sum(tf.square(tf.cast(net(h + carry), tf.float32)))
                    carry = 0.0 * loss
                    losses.append(loss)
                total = tf.add_n(losses)
            # The inputs' gradient is computed too, as inside the flow.
            return tape.gradient(total, net_vars + net_inputs)

        def nets_forward(x):
            del x  # the same chain as nets_step, forward only (what sampling runs)
            carry = tf.zeros([], tf.float32)
            for net, h in zip(self.nets, net_inputs):
                carry = 0.0 * tf.reduce_sum(tf.cast(net(h + carry), tf.float32))
            return carry

        def fn(f):
            return tf.function(f, jit_compile=jit_compile)

        self.train_step, self.log_prob, self.sample = fn(train_step), fn(log_prob), fn(sample)
        self.nets_step, self.nets_forward = fn(nets_step), fn(nets_forward)
        self.model_train_step = None
        if lib != "tfp":
            # The step `fit` runs: FlowModel.train_step, with its NaN/inf
            # guard and metrics, on a model compiled as a user would.
            import keras

            model.compile(keras.optimizers.Adam(1e-3), jit_compile=jit_compile)
            model.optimizer.build(variables)
            self.model_train_step = fn(model.train_step)

    def net_inputs(self, x):
        """One input per coupling network, shaped as inside the flow."""
        del x
        rng = np.random.default_rng(1)
        return [
            tf.constant(rng.standard_normal((BATCH,) + shape), tf.float32)
            for shape in self.net_shapes
        ]


def _our_couplings(flow):
    from tfp_glow.bijectors import AdditiveCoupling, AffineCoupling
    from tfp_glow.bijectors.base import sub_bijectors

    found = []

    def visit(b):
        if isinstance(b, (AffineCoupling, AdditiveCoupling)):
            found.append(b)
        for child in sub_bijectors(b):
            visit(child)

    visit(flow)
    return found


def make_train_step(lib, size, x, jit_compile=False):
    return Bench(lib, size, x, jit_compile).train_step
