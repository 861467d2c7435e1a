"""`network_variables` and `adamw` on the vector families, whose networks TFP's
own bijectors hold (a `MADE` inside `tfb.MaskedAutoregressiveFlow`, bare or
wrapped by MAF's log-scale bound; `AutoregressiveSplineFn`'s MADE; the coupling
MLPs of NSF-C and the vector RealNVP): every network weight is decayed, no
ActNorm or prior parameter is.

Before the fix `network_variables` walked tfp_glow's bijectors only and found
none of these networks: `recommended_optimizer(weight_decay=...)` decayed
nothing on MAF, IAF or NSF-AR.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import perturb

import tfp_glow
from tfp_glow.training import adamw, network_variables

D = 6  # features
H = 8  # hidden units, two hidden layers everywhere
SPLINE_BINS = 4  # 3K - 1 = 11 spline parameters per feature


def _made(out_per_feature, context=0):
    # A conditional MADE feeds its context into every layer (extra kernel rows).
    out = D * out_per_feature
    return [(D + context, H), (H,), (H + context, H), (H,), (H + context, out), (out,)]


def _mlp(outputs):
    return [(D // 2, H), (H,), (H, H), (H,), (H, outputs), (outputs,)]


# name: (model, the shapes of its networks' variables (kernel, bias per dense
# layer, for each of the 2 layers), how many other trainable variables).
CASES = {
    "maf_actnorm": (
        lambda: tfp_glow.MAF(
            input_shape=(D,), num_layers=2, hidden_units=[H, H], actnorm=True, num_bins=None
        ),
        2 * _made(2),
        4,  # two ActNorms' log-scale and bias
    ),
    "maf_unbounded": (
        lambda: tfp_glow.MAF(
            input_shape=(D,), num_layers=2, hidden_units=[H, H], log_scale_bound=None, num_bins=None
        ),
        2 * _made(2),
        0,
    ),
    "iaf": (
        lambda: tfp_glow.IAF(input_shape=(D,), num_layers=2, hidden_units=[H, H], num_bins=None),
        2 * _made(2),
        0,
    ),
    "maf_context": (
        lambda: tfp_glow.MAF(
            input_shape=(D,), num_layers=2, hidden_units=[H, H], context_shape=(3,), num_bins=None
        ),
        2 * _made(2, context=3),
        3,  # the learned prior's mean, log-scale and context map
    ),
    "nsf_autoregressive": (
        lambda: tfp_glow.NeuralSplineFlow(
            input_shape=(D,),
            variant="autoregressive",
            num_layers=2,
            hidden_units=[H, H],
            spline_bins=SPLINE_BINS,
            num_bins=None,
        ),
        2 * _made(3 * SPLINE_BINS - 1),
        0,
    ),
    "nsf_coupling": (
        lambda: tfp_glow.NeuralSplineFlow(
            input_shape=(D,),
            variant="coupling",
            num_layers=2,
            hidden_units=[H, H],
            spline_bins=SPLINE_BINS,
            num_bins=None,
        ),
        2 * _mlp((D // 2) * (3 * SPLINE_BINS - 1)),
        0,
    ),
    "realnvp_vector": (
        lambda: tfp_glow.RealNVP(
            input_shape=(D,), coupling_layers=2, hidden_channels=H, num_bins=None
        ),
        2 * _mlp(2 * (D // 2)),
        4,  # two ActNorms' log-scale and bias
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_adamw_decays_exactly_the_networks_of_the_vector_families(name):
    build, shapes, num_parameters = CASES[name]
    keras.utils.set_random_seed(0)
    model = perturb(build(), rng=1)  # no zero weight: a decay must show
    networks = network_variables(model)
    assert sorted(tuple(v.shape) for v in networks) == sorted(shapes)
    assert sum(int(np.prod(v.shape)) for v in networks) == sum(int(np.prod(s)) for s in shapes)
    decayed = {id(v) for v in networks}
    others = [v for v in model.trainable_variables if id(v) not in decayed]
    assert len(others) == num_parameters
    assert len(networks) + len(others) == len(model.trainable_variables)

    lr, weight_decay = 1e-2, 0.5
    optimizer = adamw(model, lr, weight_decay)
    variables = model.trainable_variables
    before = [v.numpy() for v in variables]
    # Zero gradients: Adam's step is 0, only the decay moves a weight,
    # w <- w (1 - lr * weight_decay) = 0.995 w.
    optimizer.apply([tf.zeros_like(v) for v in variables], variables)
    for v, w in zip(variables, before):
        if id(v) in decayed:
            np.testing.assert_allclose(v.numpy(), w * (1 - lr * weight_decay), rtol=1e-6)
            assert np.abs(v.numpy()).sum() < np.abs(w).sum()
        else:
            np.testing.assert_array_equal(v.numpy(), w)


@pytest.mark.parametrize(
    "name, rate, weight_decay, decayed",
    [("maf_unbounded", 1e-3, 0.3, 12), ("realnvp_vector", 5e-4, 0.1, 12)],
)
def test_compile_without_an_optimizer_uses_the_family_settings(name, rate, weight_decay, decayed):
    model = CASES[name][0]()
    model.compile()
    optimizer = model.optimizer
    # AdamW on the 100-step warmup schedule, decaying the networks, averaged.
    assert isinstance(optimizer, keras.optimizers.AdamW)
    assert optimizer.weight_decay == pytest.approx(weight_decay)
    assert optimizer.use_ema and optimizer.ema_momentum == pytest.approx(0.99)
    rates = [float(optimizer._learning_rate(step)) for step in (0, 99, 5000)]
    np.testing.assert_allclose(rates, [rate / 100, rate, rate], rtol=1e-6)
    networks = {id(v) for v in network_variables(model)}
    assert len(networks) == decayed
    assert all(
        optimizer._use_weight_decay(v) == (id(v) in networks) for v in model.trainable_variables
    )


def test_image_realnvp_keeps_the_library_optimizer():
    model = tfp_glow.RealNVP(input_shape=(4, 4, 1), levels=1, hidden_channels=8, num_blocks=1)
    model.compile()
    assert type(model.optimizer).__name__ == "WarmupAdam"
    assert float(model.optimizer.learning_rate) == pytest.approx(3e-3)


def test_a_reloaded_model_still_decays_its_networks_only(tmp_path):
    # Keras's optimizer config holds no exclusions: compile_from_config puts them back.
    model = perturb(CASES["realnvp_vector"][0](), rng=2)
    model.compile()
    path = str(tmp_path / "realnvp.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    networks = {id(v) for v in network_variables(loaded)}
    assert len(networks) == 12 and len(loaded.trainable_variables) == 16
    assert [loaded.optimizer._use_weight_decay(v) for v in loaded.trainable_variables] == [
        id(v) in networks for v in loaded.trainable_variables
    ]
