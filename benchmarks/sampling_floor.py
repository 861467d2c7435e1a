"""Sampling against its floor (the coupling networks run forward), and its levers.

`common.Bench` times `sample` (64 images) and `nets_forward` (the same
coupling networks alone, forward, one after another: what sampling cannot
avoid). This runs them interleaved with the levers that keep sampling exact:

* `sample/cached_inverse`: every 1x1 conv's `W^-1` precomputed once, as a
  constant of the graph (the ceiling of caching `W^-1` at sampling time:
  forming it then costs nothing);
* `decode`: the same flow on a fixed latent (no random draw);
* `sample/xla`: the sampling function under `jit_compile=True`;

and breaks one sampling call down by op type (graph mode) into the
networks' convolutions, the random draw, forming `W^-1` and everything else.

    python benchmarks/sampling_floor.py --size small --repeats 30 \
        --out results/sampling_floor_small.json
"""

import argparse
import contextlib
import json
import os
import re
import sys

import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import profile_ops  # noqa: E402

# Op types of forming W^-1 from the LU factors (InvertibleConv1x1.inverse_weight).
INVERSE_OPS = (
    "MatrixTriangularSolve",
    "MatrixBandPart",
    "MatrixSetDiagV3",
    "MatrixSetDiag",
    "Exp",
    "Transpose",
)


def _op_type(name):
    """`_MklNativeFusedConv2D` -> `FusedConv2D`: oneDNN builds rename ops."""
    return re.sub(r"^_(MklNative|Mkl)?", "", name)


def _convs(flow):
    from tfp_glow.bijectors import InvertibleConv1x1
    from tfp_glow.bijectors.base import walk_bijectors

    return [b for b in walk_bijectors(flow) if isinstance(b, InvertibleConv1x1)]


def constant_inverses(convs):
    """Every conv's `(W^-1, log|det W|)` now, as NumPy arrays: the inverses
    become constants of the graph a `tf.function` traces with them."""
    return {
        id(conv): tuple(t.numpy() for t in conv._matrix_and_log_det(inverse=True)) for conv in convs
    }


@contextlib.contextmanager
def inverses_from(flow, table_fn):
    """Inside the block every 1x1 conv's inverse is `table_fn(convs)[id(conv)]`
    (the table is made on entry); outside, the class's own method again."""
    convs = _convs(flow)
    table = table_fn(convs)
    for conv in convs:
        original = conv._matrix_and_log_det

        # Defaults bind this conv's table entry and method now (not the loop's last).
        def patched(inverse, _entry=table[id(conv)], _orig=original):  # noqa: B008
            if inverse:
                return tuple(tf.convert_to_tensor(t) for t in _entry)
            return _orig(inverse)

        conv._matrix_and_log_det = patched
    try:
        yield
    finally:
        for conv in convs:
            del conv._matrix_and_log_det  # back to the class's method


def batched_inverses(convs):
    """Every conv's `(W^-1, log|det W|)`, from one batched solve per channel count.

    Stacks the LU factors of the convs that share a channel count (a Glow
    level) and runs the same math as `InvertibleConv1x1._matrix_and_log_det`
    once on the batch: a few ops per level instead of about eight per conv.
    """
    groups = {}
    for conv in convs:
        groups.setdefault(conv.channels, []).append(conv)
    out = {}
    for c, group in groups.items():

        def stack(name):
            return tf.stack([tf.convert_to_tensor(getattr(g, name)) for g in group])

        log_s = stack("log_s")
        lower = tf.linalg.set_diag(
            tf.linalg.band_part(stack("lower"), -1, 0), tf.ones([len(group), c], log_s.dtype)
        )
        upper = tf.linalg.set_diag(
            tf.linalg.band_part(stack("upper"), 0, -1), stack("sign") * tf.exp(log_s)
        )
        p_t = tf.linalg.matrix_transpose(stack("permutation"))
        w_inv = tf.linalg.triangular_solve(
            upper, tf.linalg.triangular_solve(lower, p_t, lower=True), lower=False
        )
        log_det = tf.reduce_sum(log_s, axis=-1)
        for g, m, ld in zip(group, tf.unstack(w_inv), tf.unstack(log_det)):
            out[id(g)] = (m, ld)
    return out


def grouped(per_op):
    """Op time per call (ms) in four groups, from `profile_ops.profile_step`."""
    groups = {
        "networks' convolutions": 0.0,
        "random draw": 0.0,
        "forming W^-1": 0.0,
        "everything else": 0.0,
    }
    ops = {k: 0 for k in groups}
    for name, (us, n) in per_op.items():
        op = _op_type(name)
        key = (
            "networks' convolutions"
            if "Conv2D" in op
            else "random draw"
            if "Random" in op
            else "forming W^-1"
            if op in INVERSE_OPS
            else "everything else"
        )
        groups[key] += us / 1000
        ops[key] += n
    return {k: {"ms": groups[k], "ops": ops[k]} for k in groups}


def run(size, repeats):
    x = common.batch_of(size)
    bench = common.Bench("ours", size, x)
    model = bench.model
    z = tf.random.stateless_normal((common.BATCH,) + tuple(model.latent_shape), seed=(1, 2))

    # The seed is an input, as in the eager `model.sample(64, seed=...)`:
    # a constant seed would let grappler fold the whole random draw away.
    seed = tf.constant(3)

    def sample(seed):
        return model.sample(common.BATCH, seed=seed)

    def decode(latent):
        return model.decode(latent)

    plain = tf.function(sample)
    with inverses_from(model.flow, constant_inverses):
        cached = tf.function(sample)
        cached(seed)  # trace now, with the constants baked in

    @tf.function
    def batched(seed):
        with inverses_from(model.flow, batched_inverses):
            return sample(seed)

    xla = tf.function(sample, jit_compile=True)
    calls = {
        "sample": (plain, (seed,)),
        "sample/cached_inverse": (cached, (seed,)),
        "sample/batched_inverse": (batched, (seed,)),
        "sample/xla": (xla, (seed,)),
        "decode": (tf.function(decode), (z,)),
        "nets_forward": (bench.nets_forward, (x,)),
        "nets_forward/xla": (
            tf.function(bench.nets_forward.python_function, jit_compile=True),
            (x,),
        ),
    }
    timed = common.time_interleaved(calls, repeats, warmup=3)
    floor = timed["nets_forward"]["median_ms"]
    out = {
        "size": size,
        "config": common.SIZES[size],
        "batch": common.BATCH,
        "machine": common.machine_info(),
        "repeats": repeats,
        "timings": timed,
        "vs_nets_forward": {k: v["median_ms"] / floor for k, v in timed.items()},
        "profile": {},
    }
    for name in ("sample", "sample/cached_inverse", "sample/batched_inverse", "nets_forward"):
        fn, args = calls[name]
        out["profile"][name] = grouped(profile_ops.profile_step(fn, args, steps=10))
    return out


def report(out):
    lines = [f"{out['size']}: median ms (x nets forward)"]
    for name, t in out["timings"].items():
        lines.append(f"  {name:<24}{t['median_ms']:>9.2f}  ({out['vs_nets_forward'][name]:.3f}x)")
    for name, groups in out["profile"].items():
        total = sum(g["ms"] for g in groups.values())
        lines.append(f"  op time of {name}: {total:.2f} ms")
        for k, g in groups.items():
            lines.append(f"    {k:<24}{g['ms']:>8.2f} ms {g['ops']:>5} ops")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=["small", "cifar"])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out = run(args.size, args.repeats)
    print(report(out))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
