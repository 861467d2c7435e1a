"""Public methods called eagerly vs the same call wrapped in `tf.function`.

Users meet the library's speed through the README's calls made eagerly in a
notebook. Each public method of `FlowModel` (`sample`, `log_prob`,
`bits_per_dim`, `encode`, `decode`, `interpolate`) checks its inputs eagerly
and then runs a cached compiled function; this measures the eager call
against an explicit `tf.function` of the same call (traced once, outside the
timing), interleaved round by round, and `tfb.Glow`'s `sample` under
`tf.function` beside them.

    python benchmarks/eager_calls.py --size small --repeats 20 --out results/eager_small.json

Sizes: `small` (8x8x1, 2 levels x 4 steps, width 64, batch 64) and `cifar`
(32x32x3, `common.SIZES["cifar"]`).
"""

import argparse
import json
import os
import sys

import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

SIZES = {
    "small": dict(image_shape=(8, 8, 1), levels=2, steps=4, width=64, num_bins=17),
    "cifar": common.SIZES["cifar"],
}


def _calls(model, x):
    z = model.encode(x)
    half = x.shape[0] // 2
    return {
        "sample": (lambda: model.sample(64, temperature=0.7, seed=1), ()),
        "log_prob": (lambda a: model.log_prob(a), (x,)),
        "bits_per_dim": (lambda a: model.bits_per_dim(a), (x,)),
        "encode": (lambda a: model.encode(a), (x,)),
        "decode": (lambda a: model.decode(a), (z,)),
        "interpolate": (
            lambda a, b: model.interpolate(a, b, num_steps=4),
            (x[:half], x[half : 2 * half]),
        ),
    }


def run(size, repeats):
    import tfp_glow

    cfg = SIZES[size]
    common.SIZES["_eager"] = cfg
    model = tfp_glow.Glow(
        image_shape=cfg["image_shape"],
        levels=cfg["levels"],
        steps_per_level=cfg["steps"],
        hidden_channels=cfg["width"],
        num_bins=cfg["num_bins"],
        learn_top_prior=False,
        **common.PAPER_GLOW,
    )
    x = common.batch_of("_eager")
    model.initialize(x)
    calls = {}
    for name, (fn, args) in _calls(model, x).items():
        calls[f"{name}/eager"] = (fn, args)
        calls[f"{name}/tf.function"] = (tf.function(fn, autograph=False), args)
    glow = common.TFPGlow("_eager").initialize(x)
    calls["tfb.Glow sample/tf.function"] = (tf.function(lambda: glow.sample(64)), ())
    times = common.time_interleaved(calls, repeats)
    ratios = {
        name: times[f"{name}/eager"]["median_ms"] / times[f"{name}/tf.function"]["median_ms"]
        for name in _calls(model, x)
    }
    ratios["eager sample / tfb.Glow sample (tf.function)"] = (
        times["sample/eager"]["median_ms"] / times["tfb.Glow sample/tf.function"]["median_ms"]
    )
    return {
        "size": size,
        "config": cfg,
        "times": times,
        "eager_over_compiled": ratios,
        "machine": common.machine_info(),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    result = run(args.size, args.repeats)
    for name, ratio in result["eager_over_compiled"].items():
        print(f"{args.size:6s} {name:48s} {ratio:.3f}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2, default=str)


if __name__ == "__main__":
    main()
