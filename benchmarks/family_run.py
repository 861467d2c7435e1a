"""One row of the family table (benchmarks/family_table.py), in its own process.

A flow family, built by a `tfp_glow` builder from a registry entry, trained on
the digits protocol (`/work/shared/digits-protocol.md`, `digits_stream.py`):
images `[N, 8, 8, 1]` or the same images flattened to 64-D vectors, one
`FlowModel.fit` over the protocol's stream (23 batches of 64 per epoch, in its
order), then:

* test bits/dim, `(NLL_nats + 64 ln 17) / (64 ln 2)`, the mean over the 4
  fixed noise draws of the 300 held-out images, after the last epoch and the
  minimum over the curve (epochs 1, 10, 20, ..., and the last); with
  variational dequantization the figure is the variational bound and the
  uniform-noise figure is reported beside it; evaluated with the optimizer's
  Polyak average when it keeps one (the library's default optimizer does);
* train bits/dim (one draw over the train images);
* the train step: wall time from Keras' `on_train_batch_begin` to
  `on_train_batch_end`, median over the steps after the first epoch (which
  traces), and this process's CPU time per step over the same steps;
* time to sample 64: median of 3 calls after a first (tracing) call;
* the 2-D KL to the true density (8 Gaussians): a 2-D member of the same
  family fitted as in benchmarks/toy_kl.py (Adam, linear warm-up to 3e-3 then
  cosine decay, batch 512), `KL(p || q) = E_p[log p - log q]` on held-out
  draws with its standard error; draws and exact log p from
  `family_toy_data.npz` (written by `--write-toy-data`, shared with the
  PyTorch peers).

    python benchmarks/family_run.py --spec '{"name": "nice", ...}' --out run.json

The spec is what family_table.py puts together from its registry; 2 threads.
"""

import argparse
import json
import math
import os
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import digits_stream as stream  # noqa: E402

TOY_DENSITY = "8gaussians"
THREADS = 2


def loadavg():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def write_json(path, result):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(json.dumps(result, indent=1) + "\n")
    os.replace(path + ".tmp", path)


def write_toy_data(path, train_samples, eval_samples, seed=0):
    """toy_kl.py's draws of 8 Gaussians (train: seed (s, 1); held out: (s, 2))
    and the exact log p of the held-out draws, for every row of the table."""
    import toy_kl

    from tfp_glow.data import toy_density

    train = toy_density(TOY_DENSITY, train_samples, seed=(seed, 1))
    x, log_p = toy_kl.eval_set(TOY_DENSITY, eval_samples, seed)
    np.savez(path, train=train, eval=x, log_p=log_p, density=TOY_DENSITY)


def set_threads():
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(THREADS)
    tf.config.threading.set_inter_op_parallelism_threads(THREADS)


def build(builder, kwargs, num_bins, seed):
    """`builder` is a `tfp_glow` attribute (a FlowModel subclass) or
    `toy_flows:<kind>` (benchmarks/toy_flows.py's 2-D flows)."""
    import keras

    import tfp_glow

    keras.utils.set_random_seed(seed)
    if builder.startswith("toy_flows:"):
        import toy_flows

        return toy_flows.build_flow(builder.split(":", 1)[1], **kwargs)[0]
    cls = getattr(tfp_glow, builder)
    return cls(**kwargs, num_bins=num_bins)


def count_params(model):
    return int(sum(int(np.prod(v.shape)) for v in model.trainable_variables))


class StepTimer:
    """Keras callback: wall and CPU time of each train step (batch begin to end)."""

    def __new__(cls):
        import keras

        class _Timer(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.wall, self.cpu, self._t0 = [], [], None

            def on_train_batch_begin(self, batch, logs=None):
                self._t0 = (time.perf_counter(), time.process_time())

            def on_train_batch_end(self, batch, logs=None):
                self.wall.append(time.perf_counter() - self._t0[0])
                self.cpu.append(time.process_time() - self._t0[1])

            def summary(self, skip):
                wall, cpu = np.array(self.wall[skip:]) * 1e3, np.array(self.cpu[skip:]) * 1e3
                if not wall.size:
                    return {"train_step_ms_median": None, "train_step_cpu_ms_median": None}
                return {
                    "train_step_ms_median": float(np.median(wall)),
                    "train_step_ms_p10": float(np.percentile(wall, 10)),
                    "train_step_ms_p90": float(np.percentile(wall, 90)),
                    "train_step_cpu_ms_median": float(np.median(cpu)),
                    "first_step_s": float(self.wall[0]),
                    "steps_timed": int(wall.size),
                }

        return _Timer()


def time_sample(model, n=64, repeats=3, seed=1):
    t0 = time.perf_counter()
    np.asarray(model.sample(n, seed=seed))
    first = time.perf_counter() - t0
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        np.asarray(model.sample(n, seed=seed + 1 + i))
        times.append(time.perf_counter() - t0)
    return {"sample_64_ms": 1e3 * statistics.median(times), "sample_64_first_call_s": first}


def digits(spec, partial_path=None):
    """Trains `spec`'s family on the protocol's stream; the digits half of a row."""
    import keras
    import tensorflow as tf
    from digits_variants import EMASwap

    t_start, load_start = time.perf_counter(), loadavg()
    shape = (8, 8, 1) if spec["layout"] == "image" else (stream.NUM_DIMS,)

    def lay_out(x):
        return x.reshape((-1,) + shape)

    levels = stream.load_levels()
    train, test = stream.split(levels, spec.get("split_seed", 0))
    model = build(spec["builder"], spec["digits"], stream.NUM_BINS, spec["seed"])
    params = count_params(model)
    model.initialize(tf.constant(lay_out(stream.init_batch(train))))
    if spec["optimizer"] == "default":
        model.compile()  # the library's default (the model's `compile()` with no optimizer)
    elif spec["optimizer"] == "recommended":  # recommended_optimizer with the row's kwargs
        from tfp_glow.training import recommended_optimizer

        model.compile(recommended_optimizer(model=model, **spec["optimizer_kwargs"]))
    else:
        model.compile(keras.optimizers.Adam(spec["lr"]))
    opt = model.optimizer
    variational = getattr(model, "dequantizer", None) is not None
    x_test = lay_out(stream.test_draws(test))
    x_train_eval = lay_out(stream.train_draw(train))
    bound_fn = tf.function(
        lambda x: model.variational_log_prob(x) if variational else model.log_prob(x)
    )
    uniform_fn = tf.function(lambda x: model.log_prob(x))

    def mean_log_prob(fn, x, chunk=300):
        return np.concatenate(
            [fn(tf.constant(x[i : i + chunk])).numpy() for i in range(0, len(x), chunk)]
        )

    def test_bpd(fn):
        per = -mean_log_prob(fn, x_test).reshape(stream.TEST_DRAWS, -1).mean(axis=1)
        return float(np.mean([stream.bits_per_dim(v) for v in per]))

    epochs = spec["epochs"]
    curve_epochs = sorted({e for e in stream.CURVE_EPOCHS if e <= epochs} | {epochs})
    curve, timer = [], StepTimer()

    def summary(complete, train_bpd=None):
        finite = [c for c in curve if math.isfinite(c["test_bpd"])]
        best = min(finite, key=lambda c: c["test_bpd"]) if finite else None
        out = {
            "name": spec["name"],
            "spec": spec,
            "complete": complete,
            "input": "x".join(map(str, shape)),
            "params": params,
            "model_config": json.loads(json.dumps(model.get_config(), default=str)),
            "optimizer": (
                "library default: model.compile() with no optimizer"
                if spec["optimizer"] == "default"
                else f"recommended_optimizer(**{spec['optimizer_kwargs']})"
                if spec["optimizer"] == "recommended"
                else f"Adam {spec['lr']:g}"
            ),
            "variational_dequantization": variational,
            "epochs": epochs,
            "steps": len(timer.wall),
            "test_bpd": curve[-1]["test_bpd"] if curve else None,
            "best_test_bpd": best["test_bpd"] if best else None,
            "best_epoch": best["epoch"] if best else None,
            "train_bpd": train_bpd,
            "curve": curve,
            **timer.summary(stream.STEPS_PER_EPOCH if epochs > 1 else 1),
            "nonfinite_steps": int(model.nonfinite_steps),
            "digits_wall_s": time.perf_counter() - t_start,
            "loadavg_start": load_start,
            "loadavg_end": loadavg(),
        }
        if variational:
            out["test_bpd_uniform"] = curve[-1]["test_bpd_uniform"] if curve else None
        return out

    class Curve(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch + 1 not in curve_epochs:
                return
            with EMASwap(opt):
                point = {"epoch": epoch + 1, "test_bpd": test_bpd(bound_fn)}
                if variational:
                    point["test_bpd_uniform"] = test_bpd(uniform_fn)
            point["fit_train_bpd"] = float(logs.get("bits_per_dim", float("nan")))
            curve.append(point)
            print(
                f"  {spec['name']} epoch {epoch + 1}: test {point['test_bpd']:.4f}"
                f" (fit-train {point['fit_train_bpd']:.4f})",
                flush=True,
            )
            if partial_path:
                write_json(partial_path, summary(complete=False))

    stream_x = np.concatenate([lay_out(stream.epoch_batches(train, e)) for e in range(epochs)])
    batches = tf.data.Dataset.from_tensor_slices(stream_x).batch(stream.BATCH)
    model.fit(
        batches,
        epochs=epochs,
        steps_per_epoch=stream.STEPS_PER_EPOCH,
        shuffle=False,
        verbose=0,
        callbacks=[timer, Curve()],
    )
    with EMASwap(opt):
        train_bpd = stream.bits_per_dim(float(-mean_log_prob(bound_fn, x_train_eval).mean()))
        timing = time_sample(model)
    return {**summary(complete=True, train_bpd=train_bpd), **timing}


def toy_kl(spec, toy_data):
    """KL(p || q) of the family's 2-D member fitted to 8 Gaussians (toy_kl.py's recipe)."""
    import keras
    import tensorflow as tf

    from tfp_glow.training import WarmupSchedule

    t_start = time.perf_counter()
    toy = spec["toy2d"]
    data = np.load(toy_data)
    train, x_eval, log_p = data["train"], data["eval"], data["log_p"]
    train = train[: toy["train_samples"]]
    keras.backend.clear_session()
    model = build(toy["builder"], toy["kwargs"], None, spec["seed"])
    model.initialize(tf.constant(train[:4096]))
    steps = (len(train) // toy["batch"]) * toy["epochs"]
    warmup = min(200, steps // 10)
    model.compile(
        keras.optimizers.Adam(
            WarmupSchedule(toy["lr"], warmup_steps=warmup, decay_steps=max(steps - warmup, 1))
        )
    )
    timer = StepTimer()
    model.fit(
        train,
        batch_size=toy["batch"],
        epochs=toy["epochs"],
        shuffle=True,
        verbose=0,
        callbacks=[timer],
    )
    log_q = np.concatenate(
        [model.log_prob(tf.constant(c)).numpy() for c in np.array_split(x_eval, 10)]
    ).astype(np.float64)
    diff = log_p - log_q
    return {
        "density": str(data["density"]),
        "builder": toy["builder"],
        "kwargs": toy["kwargs"],
        "params": count_params(model),
        "steps": steps,
        "batch": toy["batch"],
        "lr": toy["lr"],
        "eval_samples": int(len(x_eval)),
        "kl_nats": float(diff.mean()),
        "kl_standard_error": float(diff.std() / math.sqrt(len(diff))),
        "step_ms_median": timer.summary(min(5, steps - 1))["train_step_ms_median"],
        "wall_s": time.perf_counter() - t_start,
    }


def main(argv=None):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", help="the registry entry, as JSON (family_table.py)")
    p.add_argument("--out")
    p.add_argument("--toy-data", help="family_toy_data.npz (for the 2-D KL)")
    p.add_argument("--write-toy-data", help="only write the 2-D draws to this .npz")
    p.add_argument("--toy-train", type=int, default=100_000)
    p.add_argument("--toy-eval", type=int, default=20_000)
    args = p.parse_args(argv)
    if args.write_toy_data:
        return write_toy_data(args.write_toy_data, args.toy_train, args.toy_eval)
    set_threads()
    import keras
    import tensorflow as tf
    import tensorflow_probability as tfp

    versions = {"tensorflow": tf.__version__, "tfp": tfp.__version__, "keras": keras.__version__}
    run_row(args, digits, toy_kl, versions)


def run_row(args, digits, toy_kl, versions):
    """One table row: the digits protocol (its partial curve kept in
    `<out>.partial.json` while it runs), then the 2-D KL; writes `args.out` and
    prints the headline figures. Shared by this script and family_zuko.py."""
    spec = json.loads(args.spec)
    partial = os.path.splitext(args.out)[0] + ".partial.json"
    result = {"name": spec["name"], "spec": spec}
    if spec.get("epochs"):
        result = digits(spec, partial)
        write_json(partial, result)
    if spec.get("toy2d") and args.toy_data:
        result["kl_2d"] = toy_kl(spec, args.toy_data)
    result["versions"] = {**versions, "python": sys.version.split()[0]}
    write_json(args.out, result)
    if os.path.exists(partial):
        os.remove(partial)
    headline = (
        "name",
        "params",
        "test_bpd",
        "best_test_bpd",
        "train_step_ms_median",
        "sample_64_ms",
    )
    figures = {k: result.get(k) for k in headline}
    figures["kl"] = (result.get("kl_2d") or {}).get("kl_nats")
    print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
