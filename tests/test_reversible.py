"""`tfp_glow.training.reversible.forward_and_log_det`: checkpointed and reversible backprop.

What is checked, on small flows perturbed off their (identity) init:

* the outputs `(z, ldj)` of every mode equal `"standard"`'s;
* the gradients of `-mean(log N(z; 0, I) + ldj)` w.r.t. the input and every
  trainable variable equal `"standard"`'s (worst relative error <= 1e-9 in
  float64, <= 2e-4 in float32): Glow (affine and additive / shuffle), a
  class-conditional Glow, RealNVP, NICE, a plain `tfb.Chain` holding TFP
  bijectors and one without an inverse, spline and mixture-of-logistics
  couplings, a class-conditional multi-scale flow on vectors;
* the same inside `tf.function` (unknown batch; XLA), with bfloat16
  coupling networks, and under `MirroredStrategy` on 2 logical CPUs (in a
  subprocess: this file run as a script) against one device;
* a few SGD and Adam steps give the same weights in every mode, and so does
  `tfp_glow.Glow(backprop=...).fit` on the built-in digits;
* a flow that is not numerically invertible gives NaN gradients in
  "reversible" (its rebuild check), never silently wrong ones;
* what the backward pass keeps (weak references to a probe's tensors):
  "standard" keeps every step's input and activations, "checkpoint" the
  step inputs only, "reversible" none;
* a wrong `backprop` names the argument and the allowed values.

Run with `-s` to see the measured errors.
"""

import gc
import json
import os
import subprocess
import sys
import weakref

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

import tfp_glow
from tfp_glow import models, nets
from tfp_glow.bijectors import (
    ActNorm,
    AffineCoupling,
    FactorOut,
    FlowBijector,
    InvertibleConv1x1,
    LearnedPrior,
    MultiScaleFlow,
    Squeeze,
    data_dependent_init,
    forward_and_log_det,
)
from tfp_glow.bijectors._state import ParameterLayer
from tfp_glow.training import reversible

tfb, tfd = tfp.bijectors, tfp.distributions

MODES = ("checkpoint", "reversible")
TOLERANCE = {"float64": 1e-9, "float32": 2e-4}
BATCH = 4


class NoInverseScale(tfb.Bijector):
    """A TFP bijector with no `_inverse`: reversible backprop must keep its input."""

    def __init__(self, dtype):
        super().__init__(forward_min_event_ndims=0, dtype=dtype, name="no_inverse_scale")
        self._state = ParameterLayer(dtype=tf.as_dtype(dtype).name, name="no_inverse_p")
        self.log_scale = self._state.add("log_scale", [])

    @property
    def trainable_variables(self):
        return (self.log_scale.value,)

    def _forward(self, x):
        return x * tf.exp(tf.convert_to_tensor(self.log_scale))

    def _forward_log_det_jacobian(self, x):
        return tf.convert_to_tensor(self.log_scale) + tf.zeros_like(x)


def _vector_chain(dtype):
    """ActNorm, affine couplings, TFP bijectors and `NoInverseScale` on R^4."""
    parts = []
    for i in range(2):
        parts += [
            ActNorm(4, event_ndims=1, dtype=dtype),
            AffineCoupling(
                nets.MLPCouplingNet(8, 4, dtype=dtype), event_shape=(4,), parity=i, dtype=dtype
            ),
        ]
    parts += [
        tfb.Shift(tf.constant(0.3, dtype)),
        NoInverseScale(dtype),
        tfb.Invert(tfb.Scale(tf.constant(1.7, dtype))),
    ]
    return tfb.Chain(list(reversed(parts)))


def _spline_and_mixture_chain(dtype):
    """The couplings whose inverse is a spline root or a bisection + Newton step."""
    from tfp_glow.bijectors.logistic_mixture_coupling import LogisticMixtureCoupling
    from tfp_glow.bijectors.spline_coupling import RationalQuadraticSplineCoupling

    spline_units = RationalQuadraticSplineCoupling.outputs_per_channel(4) * 2
    mixture_units = LogisticMixtureCoupling.outputs_per_channel(3) * 2
    parts = [
        ActNorm(4, event_ndims=1, dtype=dtype),
        RationalQuadraticSplineCoupling(
            nets.MLPCouplingNet(8, spline_units, dtype=dtype),
            num_bins=4,
            event_shape=(4,),
            dtype=dtype,
        ),
        LogisticMixtureCoupling(
            nets.MLPCouplingNet(8, mixture_units, dtype=dtype),
            num_components=3,
            event_shape=(4,),
            parity=1,
            dtype=dtype,
        ),
    ]
    return tfb.Chain(list(reversed(parts)))


def _vector_multi_scale(dtype):
    """A class-conditional two-level `MultiScaleFlow` on R^4 (split prior, top
    prior): every stage of a Glow at the cost of a few dense layers."""

    def steps(dim, count):
        parts = []
        for i in range(count):
            parts += [
                ActNorm(dim, event_ndims=1, dtype=dtype),
                AffineCoupling(
                    nets.MLPCouplingNet(8, dim, dtype=dtype),
                    event_shape=(dim,),
                    parity=i % 2,
                    dtype=dtype,
                ),
            ]
        return tfb.Chain(list(reversed(parts)))

    factor_out = FactorOut(4, 0.5, num_classes=3, event_ndims=1, dtype=dtype)
    return MultiScaleFlow(
        (4,),
        [(steps(4, 2), factor_out), (steps(2, 2), None)],
        top_prior=LearnedPrior((2,), num_classes=3, dtype=dtype),
    )


def _mixed_glow():
    """A 2-level Glow whose coupling networks compute in bfloat16."""
    shape, stages = (8, 8, 1), []
    for level in range(2):
        steps = [Squeeze(event_shape=shape)]
        shape = (shape[0] // 2, shape[1] // 2, shape[2] * 4)
        c = shape[-1]
        for k in range(2):
            net = nets.GlowCouplingNet(8, 2 * (c - c // 2), dtype="mixed_bfloat16")
            steps += [
                ActNorm(c),
                InvertibleConv1x1(c, seed=10 * level + k),
                AffineCoupling(net, event_shape=shape),
            ]
        fo = None
        if level == 0:
            fo = FactorOut(c, 0.5)
            shape = shape[:-1] + (c - fo.num_factored,)
        stages.append((tfb.Chain(list(reversed(steps))), fo))
    return MultiScaleFlow((8, 8, 1), stages)


FLOWS = {
    "glow": lambda dtype: models.build_glow_flow(
        image_shape=(8, 8, 1), levels=2, steps_per_level=2, hidden_channels=8, dtype=dtype
    ),
    "glow_additive_shuffle": lambda dtype: models.build_glow_flow(
        image_shape=(8, 8, 1),
        levels=2,
        steps_per_level=2,
        hidden_channels=8,
        coupling="additive",
        permutation="shuffle",
        dtype=dtype,
    ),
    "glow_conditional": lambda dtype: models.build_glow_flow(
        image_shape=(8, 8, 1),
        levels=2,
        steps_per_level=2,
        hidden_channels=8,
        num_classes=3,
        dtype=dtype,
    ),
    # The smallest Glow with every stage (squeeze, step, split prior, top
    # prior): for the checks that trace or take many steps.
    "tiny_glow_conditional": lambda dtype: models.build_glow_flow(
        image_shape=(4, 4, 1),
        levels=2,
        steps_per_level=1,
        hidden_channels=4,
        num_classes=3,
        dtype=dtype,
    ),
    # One scale: the logit preprocessing (tfb.Shift, LogitPreprocess) and
    # checkerboard couplings; the split prior is covered by the Glows.
    "realnvp": lambda dtype: models.build_realnvp_flow(
        (8, 8, 1), levels=1, hidden_channels=8, num_blocks=1, dtype=dtype
    ),
    "nice": lambda dtype: models.build_nice_flow(
        (8, 8, 1), coupling_layers=4, hidden_units=16, num_hidden_layers=1, dtype=dtype
    ),
    "chain": _vector_chain,
    "spline_and_mixture_chain": _spline_and_mixture_chain,
    "vector_multi_scale_conditional": _vector_multi_scale,
    "glow_mixed_bf16": lambda dtype: _mixed_glow(),
}


def _event_shape(name):
    return {
        "chain": (4,),
        "spline_and_mixture_chain": (4,),
        "vector_multi_scale_conditional": (4,),
        "tiny_glow_conditional": (4, 4, 1),
    }.get(name, (8, 8, 1))


def perturbed(name, dtype="float64", seed=0, scale=0.05):
    """`(flow, x, kwargs)`: ActNorm initialised on `x`, then every trainable
    variable moved by `scale * N(0, 1)` so no coupling is the identity."""
    rng = np.random.default_rng(seed)
    keras.utils.set_random_seed(seed)  # the networks' initial weights
    flow = FLOWS[name](dtype)
    # In (-0.45, 0.45): RealNVP's logit preprocessing expects [-0.5, 0.5].
    x = tf.constant(rng.uniform(-0.45, 0.45, (BATCH,) + _event_shape(name)), dtype)
    kwargs = {"conditional_input": tf.constant([0, 2, 1, 2])} if "conditional" in name else {}
    with data_dependent_init():
        forward_and_log_det(flow, x, **kwargs)
    for v in _variables(flow):
        v.assign(v + scale * rng.standard_normal(v.shape).astype(v.dtype.as_numpy_dtype))
    return flow, x, kwargs


def _variables(flow):
    found = list(flow.trainable_variables)
    if isinstance(flow, tfb.Chain):  # NoInverseScale's variable, if TFP's walk missed it
        found += [
            v
            for b in flow.bijectors
            if isinstance(b, NoInverseScale)
            for v in b.trainable_variables
        ]
    return list({v.ref(): v for v in found}.values())


def nll(z, ldj):
    base = tfd.Normal(tf.constant(0.0, z.dtype), 1.0)
    return -tf.reduce_mean(tf.reduce_sum(base.log_prob(z), axis=-1) + ldj)


def gradients(flow, x, kwargs, backprop, variables=None):
    variables = _variables(flow) if variables is None else variables
    with tf.GradientTape() as tape:
        tape.watch(x)
        z, ldj = reversible.forward_and_log_det(flow, x, backprop=backprop, **kwargs)
        loss = nll(z, ldj)
    return (z, ldj, loss), tape.gradient(loss, [x] + variables)


def worst_relative_error(grads, reference):
    """max over tensors of ||g - g_ref|| / ||g_ref|| (absolute where g_ref = 0)."""
    assert len(grads) == len(reference) and all(g is not None for g in grads)
    errors = []
    for g, r in zip(grads, reference):
        g, r = np.asarray(g, np.float64), np.asarray(r, np.float64)
        norm = np.linalg.norm(r)
        errors.append(float(np.linalg.norm(g - r) / (norm if norm > 0 else 1.0)))
    assert not np.isnan(errors).any(), errors
    return max(errors)


def test_wrong_backprop_names_the_argument_and_the_choices():
    flow, x, _ = perturbed("chain")
    with pytest.raises(
        ValueError,
        match=r"`backprop` must be one of \('standard', "
        r"'checkpoint', 'reversible'\); received 'revers'",
    ):
        reversible.forward_and_log_det(flow, x, backprop="revers")
    with pytest.raises(ValueError, match="`backprop`"):
        reversible.forward_and_log_det(flow, x, backprop=None)


def test_standard_is_the_bijectors_forward_and_log_det():
    flow, x, _ = perturbed("glow")
    z, ldj = reversible.forward_and_log_det(flow, x)
    z_ref, ldj_ref = forward_and_log_det(flow, x)
    np.testing.assert_array_equal(z, z_ref)
    np.testing.assert_array_equal(ldj, ldj_ref)


# The plain affine Glow is the conditional one without its class table.
@pytest.mark.parametrize(
    "name",
    [
        "glow_additive_shuffle",
        "glow_conditional",
        "realnvp",
        "nice",
        "chain",
        "spline_and_mixture_chain",
        "vector_multi_scale_conditional",
    ],
)
def test_gradients_equal_standard_float64(name):
    flow, x, kwargs = perturbed(name, "float64")
    (z_ref, ldj_ref, _), reference = gradients(flow, x, kwargs, "standard")
    # Not the identity: the latent is far from the (flattened) input.
    flat = tf.reshape(x, [BATCH, -1])
    assert float(tf.norm(z_ref - flat) / tf.norm(flat)) > 0.1
    assert float(tf.reduce_max(tf.abs(ldj_ref))) > 0.1
    for mode in MODES:
        (z, ldj, _), grads = gradients(flow, x, kwargs, mode)
        np.testing.assert_allclose(z, z_ref, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(ldj, ldj_ref, rtol=1e-12, atol=1e-12)
        err = worst_relative_error(grads, reference)
        print(f"\n[reversible] {name} float64 {mode}: worst relative gradient error {err:.2e}")
        assert err <= TOLERANCE["float64"]


def test_a_lost_input_gives_nan_gradients_not_wrong_ones():
    # x + 1e8 - 1e8 in float32 rounds x away: the map is the identity on paper
    # (gradient 1) but cannot be inverted numerically.
    act = ActNorm(4, event_ndims=1)
    act.bias.assign([1.0, 2.0, 3.0, 4.0])
    act.initialized.assign(1.0)
    flow = tfb.Chain([act, tfb.Shift(-1e8), tfb.Shift(1e8)])
    x = tf.constant(np.random.default_rng(0).uniform(-1, 1, (BATCH, 4)), tf.float32)
    rebuilt = reversible.reconstruction_errors(flow, x)
    assert len(rebuilt) == 1 and rebuilt[0]["rel_max"] > 0.5
    _, reference = gradients(flow, x, {}, "standard")
    assert all(np.all(np.isfinite(g)) for g in reference)
    assert worst_relative_error(gradients(flow, x, {}, "checkpoint")[1], reference) == 0.0
    grads = gradients(flow, x, {}, "reversible")[1]
    assert all(np.all(np.isnan(g)) for g in grads)


def test_no_inverse_bijector_keeps_its_input():
    steps = reversible.flow_units(_vector_chain("float64"), 1)
    stored = [type(s.bijector).__name__ for s in steps if s.stored]
    assert stored == ["NoInverseScale"] and len(steps) == 7


@pytest.mark.parametrize("name", ["glow_conditional"])
def test_gradients_equal_standard_float32(name):
    flow, x, kwargs = perturbed(name, "float32")
    _, reference = gradients(flow, x, kwargs, "standard")
    for mode in MODES:
        err = worst_relative_error(gradients(flow, x, kwargs, mode)[1], reference)
        print(f"\n[reversible] {name} float32 {mode}: worst relative gradient error {err:.2e}")
        assert err <= TOLERANCE["float32"]


def test_mixed_precision_networks():
    flow, x, kwargs = perturbed("glow_mixed_bf16", "float32")
    _, reference = gradients(flow, x, kwargs, "standard")
    for mode in MODES:
        err = worst_relative_error(gradients(flow, x, kwargs, mode)[1], reference)
        print(f"\n[reversible] bf16 nets {mode}: worst relative gradient error {err:.2e}")
        assert err <= TOLERANCE["float32"]


def test_tf_function_with_unknown_batch():
    flow, x, kwargs = perturbed("tiny_glow_conditional", "float32")
    variables = _variables(flow)
    _, reference = gradients(flow, x, kwargs, "standard")
    for mode in MODES:
        step = tf.function(
            lambda x, labels, mode=mode: gradients(
                flow, x, {"conditional_input": labels}, mode, variables
            )[1]
        )
        # The batch reaches the custom gradients as None.
        step = step.get_concrete_function(
            tf.TensorSpec([None, 4, 4, 1], tf.float32), tf.TensorSpec([None], tf.int32)
        )
        err = worst_relative_error(step(x, kwargs["conditional_input"]), reference)
        print(f"\n[reversible] tf.function {mode}: worst relative gradient error {err:.2e}")
        assert err <= TOLERANCE["float32"]


def test_xla():
    # The vector chain: couplings, ActNorm, TFP bijectors and a kept input,
    # at a fraction of a Glow's compile time (the custom gradient is the same).
    flow, x, kwargs = perturbed("chain", "float32")
    variables = _variables(flow)
    _, reference = gradients(flow, x, kwargs, "standard")
    for mode in MODES:
        step = tf.function(
            lambda x, mode=mode: gradients(flow, x, kwargs, mode, variables)[1], jit_compile=True
        )
        err = worst_relative_error(step(x), reference)
        print(f"\n[reversible] tf.function(jit_compile=True) {mode}: {err:.2e}")
        assert err <= TOLERANCE["float32"]


def test_training_steps_give_the_same_weights():
    finals = {}
    for mode in ("standard",) + MODES:
        flow, x, kwargs = perturbed("tiny_glow_conditional", "float64")
        variables = _variables(flow)
        losses = []
        # SGD's update is proportional to the gradient; Adam's is not (a
        # scaled gradient would hide), so both.
        sgd, adam = keras.optimizers.SGD(0.01), keras.optimizers.Adam(0.01)
        for opt in (sgd, adam, adam):
            (_, _, loss), grads = gradients(flow, x, kwargs, mode, variables)
            opt.apply(grads[1:], variables)
            losses.append(float(loss))
        assert losses[-1] < losses[0]  # the steps train
        finals[mode] = [v.numpy() for v in variables]
    start = [v.numpy() for v in _variables(perturbed("tiny_glow_conditional", "float64")[0])]
    moved = worst_relative_error(finals["standard"], start)
    assert moved > 1e-3
    for mode in MODES:
        err = worst_relative_error(finals[mode], finals["standard"])
        print(
            f"\n[reversible] 1 SGD + 2 Adam steps, {mode}: weights differ by {err:.2e} "
            f"from standard's (which moved by {moved:.2e})"
        )
        assert err <= TOLERANCE["float64"]


@pytest.mark.slow  # over ~15 s on 2 cores: CI's second step
def test_glow_fit_gives_the_same_weights_in_every_mode():
    from tfp_glow.data import DIGITS_NUM_BINS, load_digits, preprocess

    images, _ = load_digits("train")
    x = np.asarray(preprocess(images[:32], DIGITS_NUM_BINS, seed=0), np.float64)
    weights, losses = {}, {}
    # Eager and compiled train steps alike (compiled: the reversible one).
    for mode, eager in (("standard", True), ("checkpoint", True), ("reversible", False)):
        keras.utils.set_random_seed(0)
        model = tfp_glow.Glow(
            image_shape=(8, 8, 1),
            levels=2,
            steps_per_level=1,
            hidden_channels=8,
            num_bins=DIGITS_NUM_BINS,
            backprop=mode,
            dtype="float64",
        )
        assert model.backprop == mode
        model.compile(keras.optimizers.Adam(1e-2), run_eagerly=eager, jit_compile=False)
        if not weights:
            start = [w.copy() for w in model.get_weights()]
        history = model.fit(x, batch_size=16, epochs=1, shuffle=False, verbose=0)
        weights[mode], losses[mode] = model.get_weights(), history.history["loss"][-1]
    assert worst_relative_error(weights["standard"], start) > 1e-3  # two Adam steps moved them
    for mode in MODES:
        err = worst_relative_error(weights[mode], weights["standard"])
        print(
            f"\n[reversible] Glow.fit, 2 steps, backprop={mode!r}: weights differ by "
            f"{err:.2e}; loss {losses[mode]:.6f} vs {losses['standard']:.6f}"
        )
        assert err <= TOLERANCE["float64"]
        assert losses[mode] == pytest.approx(losses["standard"], rel=1e-9)


@pytest.mark.slow
def test_conditional_glow_under_xla_fit_and_keras_file(tmp_path):
    """Class-conditional Glow, `fit(jit_compile=True)` with the NaN guard's
    log: reversible ends at standard's weights; the `.keras` file keeps the mode.
    One step per level: XLA's compile time grows with the depth, the check does not."""
    from tfp_glow.data import DIGITS_NUM_BINS, load_digits, preprocess

    images, labels = load_digits("train")
    x = np.asarray(preprocess(images[:32], DIGITS_NUM_BINS, seed=0), np.float32)
    y = labels[:32]
    weights = {}
    for mode in ("standard", "reversible"):
        keras.utils.set_random_seed(0)
        model = tfp_glow.Glow(
            image_shape=(8, 8, 1),
            levels=2,
            steps_per_level=1,
            hidden_channels=8,
            num_bins=DIGITS_NUM_BINS,
            num_classes=10,
            backprop=mode,
        )
        model.compile(keras.optimizers.SGD(1e-2), jit_compile=True)
        history = model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        assert history.history["nonfinite_steps"][-1] == 0
        weights[mode] = model.get_weights()
    err = worst_relative_error(weights["reversible"], weights["standard"])
    print(
        f"\n[reversible] conditional Glow (dropout, variational dequantization), "
        f"4 XLA SGD steps: weights differ by {err:.2e}"
    )
    assert err <= TOLERANCE["float32"]
    path = str(tmp_path / "reversible.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.backprop == "reversible"
    np.testing.assert_allclose(
        loaded.log_prob(x[:8], y[:8]), model.log_prob(x[:8], y[:8]), rtol=1e-6
    )


class Probe(FlowBijector):
    """`y = (x * exp(a)) * exp(c)` on vectors; keeps weak references to its
    input `x` and its inner activation `x * exp(a)` (both needed by autodiff)."""

    def __init__(self, name):
        super().__init__(forward_min_event_ndims=1, name=name)
        state = ParameterLayer(name=f"{name}_params")
        self.a, self.c = state.add("a", [4]), state.add("c", [4])
        self._track_layers(state)
        self.seen = []

    def _forward_and_log_det(self, x, **kwargs):
        inner = x * tf.exp(tf.convert_to_tensor(self.a))
        self.seen.append((weakref.ref(x), weakref.ref(inner)))
        return inner * tf.exp(tf.convert_to_tensor(self.c)), tf.reduce_sum(self.a + self.c)

    def _inverse_and_log_det(self, y, **kwargs):
        log_s = tf.convert_to_tensor(self.a) + tf.convert_to_tensor(self.c)
        return y * tf.exp(-log_s), -tf.reduce_sum(log_s)


def test_what_the_backward_pass_keeps():
    probes = [Probe(f"probe_{i}") for i in range(3)]
    parts = []
    for i, probe in enumerate(probes):
        parts += [probe, AffineCoupling(nets.MLPCouplingNet(8, 4), event_shape=(4,), parity=i % 2)]
    flow = tfb.Chain(list(reversed(parts)))
    x = tf.constant(np.random.default_rng(0).standard_normal((5, 4)), tf.float32)
    kept = {}
    for mode in ("standard",) + MODES:
        for probe in probes:
            probe.seen.clear()
        with tf.GradientTape() as tape:
            z, ldj = reversible.forward_and_log_det(flow, x, backprop=mode)
            loss = tf.reduce_sum(z**2) - tf.reduce_sum(ldj)
            gc.collect()
            # Inputs of probes 1 and 2 (probe 0's input is `x`, held here).
            inputs = sum(p.seen[0][0]() is not None for p in probes[1:])
            inner = sum(p.seen[0][1]() is not None for p in probes)
        tape.gradient(loss, flow.trainable_variables)
        recomputed = len(probes[0].seen) - 1
        kept[mode] = (inputs, inner, recomputed)
    # (step inputs kept, inner activations kept, recomputations in the backward)
    assert kept == {"standard": (2, 3, 0), "checkpoint": (2, 0, 1), "reversible": (0, 0, 1)}


# -- MirroredStrategy (a subprocess: logical devices must be set before TF starts) --
def _distributed_worker():
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        flow, x, kwargs = perturbed("vector_multi_scale_conditional", "float64")
    variables = _variables(flow)
    labels = kwargs["conditional_input"]
    _, reference = gradients(flow, x, kwargs, "standard")
    half = BATCH // 2

    def part(tensor):
        return strategy.experimental_distribute_values_from_function(
            lambda ctx: tensor[ctx.replica_id_in_sync_group * half :][:half]
        )

    out = {"replicas": strategy.num_replicas_in_sync}
    for mode in MODES:

        def replica_step(x, labels, mode=mode):
            with tf.GradientTape() as tape:
                tape.watch(x)
                z, ldj = reversible.forward_and_log_det(
                    flow, x, backprop=mode, conditional_input=labels
                )
                base = tfd.Normal(tf.constant(0.0, z.dtype), 1.0)
                # Summed over the replica's examples, divided by the global batch.
                loss = -tf.reduce_sum(tf.reduce_sum(base.log_prob(z), -1) + ldj) / BATCH
            grads = tape.gradient(loss, [x] + variables)
            return grads

        @tf.function
        def step(x, labels):
            per_replica = strategy.run(replica_step, args=(x, labels))
            x_grads = strategy.experimental_local_results(per_replica[0])
            var_grads = [strategy.reduce("SUM", g, axis=None) for g in per_replica[1:]]
            return [tf.concat(x_grads, 0)] + var_grads

        grads = step(part(x), part(labels))
        out[mode] = worst_relative_error(grads, reference)
    print(json.dumps(out))


@pytest.mark.slow  # a fresh process with two replicas, ~16 s on 2 cores: CI's second step
def test_mirrored_strategy_two_replicas():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, __file__, "--distributed"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"\n[reversible] MirroredStrategy: {result}")
    assert result["replicas"] == 2
    for mode in MODES:
        assert result[mode] <= TOLERANCE["float64"], (mode, result)


if __name__ == "__main__" and "--distributed" in sys.argv:
    _distributed_worker()
