"""Two probes behind BENCHMARKS.md's "Where fit's time goes" (one run each):

    python benchmarks/fit_overhead_probes.py save            # cost of one weights file
    python benchmarks/fit_overhead_probes.py xla bare|cond|where

`save`: `model.save_weights` (HDF5) and `tf.train.Checkpoint.write` of the
default digits Glow and its Adam state, 5 writes each, in ms.
`xla`: the first call (trace + XLA compile) of the training step compiled with
`jit_compile=True`, optimizer built beforehand: `bare` (forward, gradient,
Adam), `cond` (the NaN guard's `tf.cond` around `optimizer.apply`, as
`FlowModel.train_step` does) or `where` (the guard as a `tf.where` on every
gradient instead).
"""

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fit_overhead import BATCH, _data, _model  # noqa: E402


def save():
    import tensorflow as tf

    x = _data()
    model = _model()
    model.initialize(x[:BATCH])
    model.fit(x[:128], batch_size=BATCH, epochs=1, verbose=0)
    folder = tempfile.mkdtemp()
    path = os.path.join(folder, "w.weights.h5")
    model.save_weights(path)
    t0 = time.perf_counter()
    for _ in range(5):
        model.save_weights(path)
    print(f"save_weights: {(time.perf_counter() - t0) / 5 * 1e3:.0f} ms")
    checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
    t0 = time.perf_counter()
    for _ in range(5):
        checkpoint.write(os.path.join(folder, "ckpt"))
    print(f"tf.train.Checkpoint.write: {(time.perf_counter() - t0) / 5 * 1e3:.0f} ms")


def xla(which):
    import tensorflow as tf

    from tfp_glow.training.guard import all_finite, apply_if

    x = _data()
    model = _model()
    model.initialize(x[:BATCH])
    model.optimizer.build(model.trainable_variables)
    density, variables, optimizer = model._density, model.trainable_variables, model.optimizer

    @tf.function(jit_compile=True)
    def step(batch):
        with tf.GradientTape() as tape:
            loss = -tf.reduce_mean(density.log_prob_of(batch, None))
        grads = tape.gradient(loss, variables)
        if which == "bare":
            optimizer.apply(grads, variables)
            return loss
        ok = tf.logical_and(tf.math.is_finite(loss), all_finite(grads))
        if which == "cond":
            return apply_if(optimizer, ok, grads, variables)
        optimizer.apply([tf.where(ok, g, tf.zeros_like(g)) for g in grads], variables)
        return loss

    t0 = time.perf_counter()
    step(tf.constant(x[:BATCH]))
    t1 = time.perf_counter()
    step(tf.constant(x[BATCH : 2 * BATCH]))
    t2 = time.perf_counter()
    print(f"{which}: first call {t1 - t0:.1f} s, second {1e3 * (t2 - t1):.0f} ms")


if __name__ == "__main__":
    if sys.argv[1:2] == ["save"]:
        save()
    elif sys.argv[1:2] == ["xla"] and sys.argv[2:3] and sys.argv[2] in ("bare", "cond", "where"):
        xla(sys.argv[2])
    else:
        sys.exit(__doc__)
