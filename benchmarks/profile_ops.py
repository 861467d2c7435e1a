"""Where a training step spends its time, by TensorFlow op type.

Runs a few steps under `tf.profiler.experimental`, reads the XPlane trace it
writes (no TensorBoard needed) and sums the host-side durations of the op
events (`name:OpType`) per op type. The percentages are of the summed op
time, which on 2 cores can exceed wall time (ops run in parallel).

    python benchmarks/profile_ops.py --size small --lib ours [--jit]
"""

import argparse
import collections
import glob
import os
import sys
import tempfile

import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def op_time_by_type(logdir):
    """{op type: (total microseconds, count)} from the newest XPlane file."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    path = sorted(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True))[-1]
    space = xplane_pb2.XSpace()
    with open(path, "rb") as f:
        space.ParseFromString(f.read())
    totals = collections.defaultdict(lambda: [0.0, 0])
    for plane in space.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        meta = plane.event_metadata
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):
                continue  # executor threads; Eigen pool lines carry no ops
            for ev in line.events:
                md = meta[ev.metadata_id]
                # Op events are "node_name:OpType" with the type as display
                # name; "ExecutorState::Process" etc. are the executor's own.
                if "::" in md.name or ":" not in md.name:
                    continue
                op_type = md.display_name or md.name.rsplit(":", 1)[1]
                totals[op_type][0] += ev.duration_ps / 1e6
                totals[op_type][1] += 1
    return {k: tuple(v) for k, v in totals.items()}


def profile_step(step, args, steps=5):
    """Per-op-type time of `steps` calls of `step(*args)` (already traced)."""
    logdir = tempfile.mkdtemp(prefix="tfp_glow_prof_")
    tf.profiler.experimental.start(logdir)
    for _ in range(steps):
        common._block(step(*args))
    tf.profiler.experimental.stop()
    totals = op_time_by_type(logdir)
    return {k: (us / steps, n // steps) for k, (us, n) in totals.items()}


def format_breakdown(per_step, top=12):
    total = sum(us for us, _ in per_step.values()) or 1.0
    rows = sorted(per_step.items(), key=lambda kv: -kv[1][0])
    lines = [f"{'op type':<28}{'ms/step':>9}{'share':>8}{'ops/step':>10}"]
    for name, (us, n) in rows[:top]:
        lines.append(f"{name:<28}{us / 1000:>9.2f}{100 * us / total:>7.1f}%{n:>10}")
    rest = sum(us for _, (us, _) in rows[top:])
    lines.append(f"{'(other)':<28}{rest / 1000:>9.2f}{100 * rest / total:>7.1f}%")
    lines.append(
        f"{'total op time':<28}{total / 1000:>9.2f}{'':>8}{sum(n for _, (_, n) in rows):>10}"
    )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=sorted(common.SIZES))
    parser.add_argument("--lib", default="ours", choices=["ours", "tfp"])
    parser.add_argument("--jit", action="store_true", help="jit_compile=True (ours)")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    x = common.batch_of(args.size)
    step = common.make_train_step(args.lib, args.size, x, jit_compile=args.jit)
    for _ in range(3):
        common._block(step(x))
    print(format_breakdown(profile_step(step, (x,), args.steps)))


if __name__ == "__main__":
    main()
