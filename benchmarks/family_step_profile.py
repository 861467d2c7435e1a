"""Where one train step of the family table's vector RealNVP goes: tfp_glow against zuko.

The family table's `realnvp_vector` row (tfp_glow `RealNVP(input_shape=(64,),
coupling_layers=4, hidden_channels=128)`, 116,480 parameters) and its peer
(zuko 1.6 `RealNVP(64, transforms=4, hidden_features=(128, 128))`, 115,968),
one batch of 64 digits vectors, each framework on 2 threads, its parts timed
apart (median of `--repeats` calls after 5 warm-up calls, the two frameworks
interleaved call by call so that the shared machine's load falls on both):

* `log_prob`: the density of the batch, no gradient;
* `loss + grad`: the loss and its gradients (tfp_glow: one `tf.function`
  around a `GradientTape`; zuko: `loss.backward()`);
* `optimizer`: applying the gradients (tfp_glow: the library's default
  optimizer, `WarmupAdam` with Polyak averaging, and the same with plain Adam;
  zuko: `torch.optim.Adam.step` + `zero_grad`);
* `bare step`: tfp_glow's loss, gradients and Adam in one `tf.function`;
* `fit step`: tfp_glow's whole Keras train step (`model.train_function` on
  one batch: the NaN guard, metrics), zuko's `_train_step` of family_zuko.py.

    python benchmarks/family_step_profile.py [--repeats 200] [--out results/...json]

Writes a JSON with the medians (ms), the machine and its load at the start
and the end.
"""

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import digits_stream as stream  # noqa: E402
from family_run import THREADS, loadavg, set_threads, write_json  # noqa: E402
from family_table import FAMILIES, PEERS, machine  # noqa: E402

OUT = os.path.join(HERE, "results", "family_table", "realnvp_vector_step_profile.json")


def tfp_glow_parts(x_np):
    """{part: zero-argument callable} for tfp_glow's vector RealNVP."""
    import keras
    import tensorflow as tf

    import tfp_glow

    keras.utils.set_random_seed(0)
    kwargs = FAMILIES["realnvp_vector"]["digits"]
    model = tfp_glow.RealNVP(**kwargs, num_bins=stream.NUM_BINS)
    x = tf.constant(x_np)
    model.initialize(x)
    model.compile()  # the library's default optimizer
    variables = model.trainable_variables
    adam = keras.optimizers.Adam(1e-3)
    adam.build(variables)

    log_prob = tf.function(lambda: model.log_prob(x))

    @tf.function
    def loss_and_grad():
        with tf.GradientTape() as tape:
            loss = -tf.reduce_mean(model.log_prob(x))
        return loss, tape.gradient(loss, variables)

    _, grads = loss_and_grad()
    grads = [tf.zeros_like(g) for g in grads]  # no drift of the weights while timing
    model.optimizer.build(variables)
    default_apply = tf.function(lambda: model.optimizer.apply_gradients(zip(grads, variables)))
    adam_apply = tf.function(lambda: adam.apply_gradients(zip(grads, variables)))
    bare_adam = keras.optimizers.Adam(1e-5)
    bare_adam.build(variables)

    @tf.function
    def bare_step():  # what fit's step is at its floor: loss, gradients, Adam
        with tf.GradientTape() as tape:
            loss = -tf.reduce_mean(model.log_prob(x))
        bare_adam.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss

    batch = tf.data.Dataset.from_tensors(x)
    iterator = iter(batch.repeat())
    model.make_train_function()

    def fit_step():
        model.train_function(iterator)

    params = int(sum(int(np.prod(v.shape)) for v in variables))
    return params, {
        "log_prob": lambda: log_prob().numpy(),
        "loss + grad": lambda: loss_and_grad()[0].numpy(),
        "optimizer (library default: WarmupAdam + averaging)": lambda: default_apply(),
        "optimizer (Adam)": lambda: adam_apply(),
        "bare step (tf.function: loss, gradients, Adam)": lambda: bare_step().numpy(),
        "fit step (Keras train_function)": fit_step,
    }


def zuko_parts(x_np):
    import torch
    import zuko

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    peer = PEERS["zuko_realnvp"]
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in peer["kwargs"].items()}
    flow = getattr(zuko.flows, peer["flow"])(stream.NUM_DIMS, **kwargs)
    opt = torch.optim.Adam(flow.parameters(), lr=1e-3)
    x = torch.from_numpy(x_np)

    def log_prob():
        with torch.no_grad():
            return flow().log_prob(x)

    def loss_and_grad():
        opt.zero_grad()
        loss = -flow().log_prob(x).mean()
        loss.backward()
        return loss

    loss_and_grad()

    def optimizer():  # gradients zeroed: Adam's arithmetic without moving the weights
        for p in flow.parameters():
            p.grad.zero_()
        opt.step()

    def fit_step():
        loss = -flow().log_prob(x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    params = int(sum(p.numel() for p in flow.parameters()))
    return params, {
        "log_prob": log_prob,
        "loss + grad": loss_and_grad,
        "optimizer (Adam)": optimizer,
        "fit step (family_zuko's step)": fit_step,
    }


def main(argv=None):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as family_table.py runs zuko
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--out", default=OUT)
    args = p.parse_args(argv)
    load_start = loadavg()
    set_threads()
    train, _ = stream.split(stream.load_levels(), 0)
    x = stream.epoch_batches(train, 0)[: stream.BATCH].reshape(stream.BATCH, -1)
    ours_params, ours = tfp_glow_parts(x)
    zuko_params, theirs = zuko_parts(x)
    parts = [("tfp_glow", k, f) for k, f in ours.items()] + [
        ("zuko", k, f) for k, f in theirs.items()
    ]
    for _, _, fn in parts:
        for _ in range(5):
            fn()
    times = {(lib, k): [] for lib, k, _ in parts}
    for _ in range(args.repeats):
        for lib, k, fn in parts:
            t0 = time.perf_counter()
            fn()
            times[(lib, k)].append(1e3 * (time.perf_counter() - t0))
    result = {
        "command": "python benchmarks/family_step_profile.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "threads": THREADS,
        "repeats": args.repeats,
        "params": {"tfp_glow": ours_params, "zuko": zuko_params},
        "median_ms": {
            lib: {k: statistics.median(times[(lib, k)]) for (lb, k) in times if lb == lib}
            for lib in ("tfp_glow", "zuko")
        },
        "loadavg_start": load_start,
        "loadavg_end": loadavg(),
    }
    write_json(args.out, result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
