"""A PyTorch peer row of the family table: a zuko flow on the digits protocol.

The same measurements as benchmarks/family_run.py, for `zuko.flows.<flow>`
(zuko 1.6, PyTorch CPU, 2 threads) on the digits flattened to 64-D vectors:
the protocol's stream (`digits_stream.py`: batch 64, 23 steps per epoch, in
its order), Adam 1e-3 constant, the loss `-flow().log_prob(x).mean()`;

* test bits/dim `(NLL_nats + 64 ln 17) / (64 ln 2)`, the mean over the 4 fixed
  noise draws, after the last epoch and the best of the curve (epochs 1, 10,
  ..., last); train bits/dim on one draw of the train images;
* the train step (forward, backward, Adam update), wall time, median over the
  steps after the first epoch, and this process's CPU time per step;
* time to sample 64 (`flow().sample((64,))` under `no_grad`, median of 3
  after a first call);
* the 2-D KL to 8 Gaussians: the same flow class at 2-D (`features=2`, the
  registry's 2-D kwargs) fitted to the shared draws (`family_toy_data.npz`)
  with toy_kl.py's recipe (Adam, linear warm-up to 3e-3 over min(200, 10%)
  steps, then cosine decay to 0, batch 512).

Imports no TensorFlow.

    python benchmarks/family_zuko.py --spec '{"name": "zuko_maf", ...}' --out run.json
"""

import argparse
import math
import os
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import digits_stream as stream  # noqa: E402
from family_run import THREADS, loadavg, run_row, write_json  # noqa: E402  (no TF import)


def build(flow, features, kwargs, seed):
    import torch
    import zuko

    torch.manual_seed(seed)
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    return getattr(zuko.flows, flow)(features, **kwargs)


def count_params(flow):
    return int(sum(p.numel() for p in flow.parameters() if p.requires_grad))


def _log_prob(flow, x, chunk=300):
    import torch

    with torch.no_grad():
        return np.concatenate(
            [
                flow().log_prob(torch.from_numpy(np.ascontiguousarray(x[i : i + chunk]))).numpy()
                for i in range(0, len(x), chunk)
            ]
        )


def _step_summary(wall, cpu):
    wall, cpu = np.array(wall) * 1e3, np.array(cpu) * 1e3
    return {
        "train_step_ms_median": float(np.median(wall)),
        "train_step_ms_p10": float(np.percentile(wall, 10)),
        "train_step_ms_p90": float(np.percentile(wall, 90)),
        "train_step_cpu_ms_median": float(np.median(cpu)),
        "steps_timed": int(wall.size),
    }


def _train_step(flow, opt, x):
    loss = -flow().log_prob(x).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss


def digits(spec, partial_path=None):
    import torch

    t_start, load_start = time.perf_counter(), loadavg()
    levels = stream.load_levels()
    train, test = stream.split(levels, spec.get("split_seed", 0))
    flat = stream.NUM_DIMS
    flow = build(spec["flow"], flat, spec["kwargs"], spec["seed"])
    params = count_params(flow)
    opt = torch.optim.Adam(flow.parameters(), lr=spec["lr"])
    x_test = stream.test_draws(test).reshape(-1, flat)
    x_train_eval = stream.train_draw(train).reshape(-1, flat)

    def test_bpd():
        per = -_log_prob(flow, x_test).reshape(stream.TEST_DRAWS, -1).mean(axis=1)
        return float(np.mean([stream.bits_per_dim(v) for v in per]))

    epochs = spec["epochs"]
    curve_epochs = sorted({e for e in stream.CURVE_EPOCHS if e <= epochs} | {epochs})
    curve, wall, cpu = [], [], []

    def summary(complete, train_bpd=None):
        finite = [c for c in curve if math.isfinite(c["test_bpd"])]
        best = min(finite, key=lambda c: c["test_bpd"]) if finite else None
        skip = stream.STEPS_PER_EPOCH if epochs > 1 else 1
        return {
            "name": spec["name"],
            "spec": spec,
            "complete": complete,
            "input": str(flat),
            "params": params,
            "model": repr(flow),
            "optimizer": f"Adam {spec['lr']:g} (torch.optim.Adam defaults otherwise)",
            "epochs": epochs,
            "steps": len(wall),
            "test_bpd": curve[-1]["test_bpd"] if curve else None,
            "best_test_bpd": best["test_bpd"] if best else None,
            "best_epoch": best["epoch"] if best else None,
            "train_bpd": train_bpd,
            "curve": curve,
            **(_step_summary(wall[skip:], cpu[skip:]) if len(wall) > skip else {}),
            "first_step_s": wall[0] if wall else None,
            "digits_wall_s": time.perf_counter() - t_start,
            "loadavg_start": load_start,
            "loadavg_end": loadavg(),
        }

    for epoch in range(epochs):
        x = torch.from_numpy(stream.epoch_batches(train, epoch).reshape(-1, flat))
        fit_loss = []
        for b in range(stream.STEPS_PER_EPOCH):
            t0, c0 = time.perf_counter(), time.process_time()
            loss = _train_step(flow, opt, x[b * stream.BATCH : (b + 1) * stream.BATCH])
            fit_loss.append(float(loss.detach()))  # (inside the timed step, as a user logs it)
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        if epoch + 1 in curve_epochs:
            point = {
                "epoch": epoch + 1,
                "test_bpd": test_bpd(),
                "fit_train_bpd": stream.bits_per_dim(float(np.mean(fit_loss))),
            }
            curve.append(point)
            print(
                f"  {spec['name']} epoch {epoch + 1}: test {point['test_bpd']:.4f}"
                f" (fit-train {point['fit_train_bpd']:.4f})",
                flush=True,
            )
            if partial_path:
                write_json(partial_path, summary(complete=False))
    train_bpd = stream.bits_per_dim(float(-_log_prob(flow, x_train_eval).mean()))
    return {**summary(complete=True, train_bpd=train_bpd), **time_sample(flow)}


def time_sample(flow, n=64, repeats=3):
    import torch

    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            flow().sample((n,)).numpy()
            times.append(time.perf_counter() - t0)
    return {"sample_64_ms": 1e3 * statistics.median(times[1:]), "sample_64_first_call_s": times[0]}


def toy_kl(spec, toy_data):
    import torch

    t_start = time.perf_counter()
    toy = spec["toy2d"]
    data = np.load(toy_data)
    train = torch.from_numpy(data["train"][: toy["train_samples"]].astype(np.float32))
    x_eval, log_p = data["eval"].astype(np.float32), data["log_p"]
    flow = build(spec["flow"], 2, toy["kwargs"], spec["seed"])
    per_epoch = len(train) // toy["batch"]
    steps = per_epoch * toy["epochs"]
    warmup = min(200, steps // 10)
    opt = torch.optim.Adam(flow.parameters(), lr=toy["lr"])

    def rate(step):  # toy_kl.py's WarmupSchedule: linear warm-up, then cosine to 0
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (
            1 + math.cos(math.pi * min(step - warmup, steps - warmup) / max(steps - warmup, 1))
        )

    sched = torch.optim.lr_scheduler.LambdaLR(opt, rate)
    gen = torch.Generator().manual_seed(spec["seed"])
    wall = []
    for _ in range(toy["epochs"]):
        perm = torch.randperm(len(train), generator=gen)
        for b in range(per_epoch):
            t0 = time.perf_counter()
            _train_step(flow, opt, train[perm[b * toy["batch"] : (b + 1) * toy["batch"]]])
            sched.step()
            wall.append(time.perf_counter() - t0)
    diff = log_p - _log_prob(flow, x_eval, chunk=2000).astype(np.float64)
    return {
        "density": str(data["density"]),
        "builder": f"zuko.flows.{spec['flow']}",
        "kwargs": toy["kwargs"],
        "params": count_params(flow),
        "steps": steps,
        "batch": toy["batch"],
        "lr": toy["lr"],
        "eval_samples": int(len(x_eval)),
        "kl_nats": float(diff.mean()),
        "kl_standard_error": float(diff.std() / math.sqrt(len(diff))),
        "step_ms_median": float(np.median(wall[5:]) * 1e3),
        "wall_s": time.perf_counter() - t_start,
    }


def main(argv=None):
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", required=True, help="the registry entry, as JSON")
    p.add_argument("--out", required=True)
    p.add_argument("--toy-data", help="family_toy_data.npz (for the 2-D KL)")
    args = p.parse_args(argv)
    torch.set_num_threads(THREADS)
    torch.set_num_interop_threads(THREADS)
    import zuko

    run_row(args, digits, toy_kl, {"torch": torch.__version__, "zuko": zuko.__version__})


if __name__ == "__main__":
    main()
