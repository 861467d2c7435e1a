"""A short digits run of the default Glow under each Keras dtype policy.

For `float32`, `mixed_bfloat16` and `mixed_float16` (loss scaling by Keras's
`LossScaleOptimizer`, under the NaN/inf guard): the same model, data, seed and
optimizer for `--epochs` epochs of the built-in digits; reports the median
train-step time (ms, from a timing callback), the final test bits/dim and the
skipped (non-finite) steps. The networks compute in the policy's dtype, the
flow math in float32.

    python benchmarks/mixed_precision.py --epochs 10 --out results/mixed_precision.json

On CPUs without bfloat16/float16 arithmetic the low-precision networks are
emulated and slower; the point of the option is GPUs and TPUs.
"""

import argparse
import json
import os
import statistics
import sys
import time

import keras

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

POLICIES = ("float32", "mixed_bfloat16", "mixed_float16")


class _StepTimer(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.times = []

    def on_train_batch_begin(self, batch, logs=None):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter() - self._t0)


def run(policy, epochs, seed=0):
    import tfp_glow
    from tfp_glow import data

    keras.utils.set_random_seed(seed)
    model = tfp_glow.Glow(
        image_shape=(8, 8, 1),
        levels=2,
        steps_per_level=8,
        hidden_channels=64,
        num_bins=data.DIGITS_NUM_BINS,
        seed=seed,
        dtype=policy,
        **common.PAPER_GLOW,
    )
    train = data.digits_dataset("train", batch_size=64, seed=seed)
    test = data.digits_dataset("test", batch_size=360, shuffle=False, seed=seed)
    steps = epochs * 23
    schedule = tfp_glow.training.WarmupSchedule(3e-3, warmup_steps=100, decay_steps=steps)
    model.compile(keras.optimizers.Adam(schedule))
    timer = _StepTimer()
    model.fit(train, epochs=epochs, callbacks=[timer], verbose=0)
    result = model.evaluate(test, return_dict=True, verbose=0)
    return {
        "policy": policy,
        "epochs": epochs,
        "optimizer": type(model.optimizer).__name__,
        "median_step_ms": 1e3 * statistics.median(timer.times[5:] or timer.times),
        "test_bits_per_dim": float(result["bits_per_dim"]),
        "nonfinite_steps": model.nonfinite_steps,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    rows = [run(p, args.epochs) for p in args.policies]
    for r in rows:
        print(
            f"{r['policy']:15s} {r['optimizer']:20s} step {r['median_step_ms']:7.1f} ms   "
            f"test bits/dim {r['test_bits_per_dim']:.4f}   skipped {r['nonfinite_steps']}"
        )
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "machine": common.machine_info()}, f, indent=2)


if __name__ == "__main__":
    main()
