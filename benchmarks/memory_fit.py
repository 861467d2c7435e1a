"""A user's training step for memory_depth.py: an eager custom loop (its
`loop:` variants) and `model.fit` (its `fit:standard`, `fit:checkpoint`,
`fit:reversible` variants, memory only).

The flow of memory_depth.py in a `FlowModel(backprop=mode)` compiled with
the default optimizer (`compile()`: Adam on the warmup schedule with an
exponential moving average of the weights), trained by `model.fit` on one
batch: one step per `fit` call, with the optimizer update, the NaN/inf guard
and the metrics, as a user trains. Measured with TensorFlow's BFC allocator
stats (`TF_CPU_ALLOCATOR_USE_BFC=true`, set by memory_depth.py's driver):

* `peak_bytes`: the peak tensor bytes of a `fit` call above those live just
  before it (after a first `fit` that traced the step and built the optimizer);
  the largest of `calls` calls. It holds the activations that backprop keeps,
  the gradients (the size of the weights), the optimizer update's temporaries
  and the CPU convolution-gradient workspace (below);
* `weight_bytes`, `optimizer_state_bytes`: live before the step and not in the
  peak; they grow with depth in every mode (Adam's two moments and the
  average: three times the weights);
* `conv_workspace_bytes`: the peak of one `Conv2DBackpropFilter` on a 1x4x4x1
  input in the same process. TensorFlow's CPU kernel takes a working buffer
  that does not depend on the input's size (32 MiB on a CPU with a 32 MiB L3
  cache, less on others); one or two of them (two inter-op threads) sit in
  every step's peak in every mode and at every depth, so they lift the floor
  of the K16/K2 ratios on such machines.
"""

import gc


def custom_loop_step(mode, flow, x, config):
    """`(step, parameter count)` for an eager custom loop: `FlowModel.log_prob`
    (a compiled function per backprop mode) under the user's GradientTape
    (memory_depth.py's `loop:` variants)."""
    import tensorflow as tf

    from tfp_glow import FlowModel

    model = FlowModel(flow, event_shape=config["image_shape"], num_bins=config["num_bins"])
    model.initialize(x)
    variables = list(model.trainable_variables)

    def step(x):
        with tf.GradientTape() as tape:
            loss = -tf.reduce_mean(model.log_prob(x, backprop=mode))
        return loss, tape.gradient(loss, variables)

    return step, int(sum(v.shape.num_elements() for v in variables))


def conv_workspace_bytes():
    """Peak tensor bytes of one tiny `Conv2DBackpropFilter` (its working buffer)."""
    import tensorflow as tf

    x, dy = tf.ones([1, 4, 4, 1]), tf.ones([1, 4, 4, 1])
    grad = tf.function(
        lambda x, dy: tf.compat.v1.nn.conv2d_backprop_filter(
            x, [3, 3, 1, 1], dy, [1, 1, 1, 1], "SAME"
        )
    )
    grad(x, dy).numpy()
    tf.config.experimental.reset_memory_stats("CPU:0")
    live = tf.config.experimental.get_memory_info("CPU:0")["current"]
    grad(x, dy).numpy()
    return tf.config.experimental.get_memory_info("CPU:0")["peak"] - live


def fit_memory_point(mode, build_flow, x, config, calls=2):
    """Peak tensor bytes of one `fit` step of `FlowModel(build_flow(), backprop=mode)`."""
    import numpy as np
    import tensorflow as tf

    from tfp_glow import FlowModel

    model = FlowModel(
        build_flow(), event_shape=config["image_shape"], num_bins=config["num_bins"], backprop=mode
    )
    model.compile()
    data = np.asarray(x)

    def fit():
        model.fit(data, batch_size=config["batch"], epochs=1, verbose=0, shuffle=False)

    fit()  # ActNorm init, the traced step, the optimizer's state
    peaks = []
    for _ in range(calls):
        gc.collect()
        tf.config.experimental.reset_memory_stats("CPU:0")
        live = tf.config.experimental.get_memory_info("CPU:0")["current"]
        fit()
        peaks.append(tf.config.experimental.get_memory_info("CPU:0")["peak"] - live)

    def nbytes(variables):
        return int(sum(v.shape.num_elements() * np.dtype(v.dtype).itemsize for v in variables))

    return {
        "peak_bytes": max(peaks),
        "parameters": int(sum(v.shape.num_elements() for v in model.trainable_variables)),
        "weight_bytes": nbytes(model.trainable_variables),
        "optimizer_state_bytes": nbytes(model.optimizer.variables),
        "conv_workspace_bytes": conv_workspace_bytes(),
    }
