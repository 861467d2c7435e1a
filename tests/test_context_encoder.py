"""`context_encoder=`: one Keras network shared by every layer of a conditional flow.

The model takes the raw context `c` (`[N, *context_shape]`), every bijector
and prior receives `e(c)`: `log p(x | c) = log N(f(x; e(c))) + log|det df/dx|`.
Checked for every model builder: the density equals the flow evaluated on
`e(c)` by hand, gradients reach every encoder weight, `fit` trains it to the
closed-form optimum, `.keras` files and SavedModel exports keep it, and bad
encoders are refused with errors naming `context_encoder`.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfp_glow

CONTEXT = 6


def _dense_encoder(units=4):
    return keras.Sequential(
        [keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(units)], name="encoder"
    )


def _conv_encoder():
    # An image context [4, 4, 1] to a feature map [4, 4, 3] (the flow resizes it).
    return keras.Sequential([keras.layers.Conv2D(3, 3, padding="same")], name="encoder")


BUILDERS = {
    "maf": lambda e: tfp_glow.MAF((3,), num_layers=2, hidden_units=(8,), **e),
    "iaf": lambda e: tfp_glow.IAF((3,), num_layers=2, hidden_units=(8,), **e),
    "realnvp": lambda e: tfp_glow.RealNVP((4,), coupling_layers=2, hidden_channels=8, **e),
    "nice": lambda e: tfp_glow.NICE((4,), coupling_layers=2, hidden_units=8, **e),
    "nsf": lambda e: tfp_glow.NeuralSplineFlow((4,), num_layers=2, hidden_units=(8,), **e),
    "ffjord": lambda e: tfp_glow.FFJORD((2,), hidden_units=(8,), **e),
    "glow": lambda e: tfp_glow.Glow(
        (4, 4, 1), levels=1, steps_per_level=1, hidden_channels=8, dequantization="uniform", **e
    ),
}


def _build(name, seed=0):
    keras.utils.set_random_seed(seed)
    if name == "glow":
        encoder, context_shape = _conv_encoder(), (4, 4, 1)
    else:
        encoder, context_shape = _dense_encoder(), (CONTEXT,)
    model = BUILDERS[name](
        dict(context_shape=context_shape, context_encoder=encoder, num_bins=None)
    )
    return model, encoder, context_shape


def _perturb(model, seed=1):
    """Every weight moved off its initial value: zero-initialised output layers
    and context maps would otherwise hide the context's path."""
    rng = np.random.default_rng(seed)
    for w in model.trainable_weights:
        w.assign(w.numpy() + 0.1 * rng.standard_normal(w.shape).astype(w.dtype))


# FFJORD's ODE solves and the spline's networks take 8-20 s here: CI's slow step.
SLOW_BUILDERS = ("ffjord", "nsf")


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_BUILDERS else n for n in BUILDERS],
)
def test_every_layer_reads_the_encoded_context_and_gradients_reach_the_encoder(name):
    model, encoder, context_shape = _build(name)
    _perturb(model)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, *model.event_shape)).astype("float32") * 0.3
    c = rng.standard_normal((5, *context_shape)).astype("float32")
    # The encoder's weights are the model's (trained, saved, exported with it).
    model_vars = {id(w) for w in model.trainable_weights}
    assert encoder.trainable_weights and all(id(w) in model_vars for w in encoder.weights)
    assert model.flow_context_shape == tuple(encoder(c[:1]).shape[1:])
    # The density is the flow's on e(c): log N(f(x; e(c))) + log|det|.
    log_prob = model.log_prob(x, c).numpy()
    by_hand = model.distribution.log_prob(
        x, bijector_kwargs={"conditional_input": encoder(c)}
    ).numpy()
    # FFJORD: two adaptive ODE solves (the model's is compiled), equal to the
    # solver's tolerance (rtol = atol = 1e-5 per step, ~5e-4 in log p here).
    atol = 2e-3 if name == "ffjord" else 1e-4
    np.testing.assert_allclose(log_prob, by_hand, rtol=1e-5, atol=atol)
    # The context matters, through the encoder.
    assert np.max(np.abs(model.log_prob(x, c[::-1]).numpy() - log_prob)) > 1e-3
    with tf.GradientTape() as tape:
        total = tf.reduce_sum(model.log_prob(x, c))
    grads = tape.gradient(total, encoder.trainable_weights)
    norms = [float(tf.norm(g)) if g is not None else 0.0 for g in grads]
    assert min(norms) > 1e-6, dict(zip([w.path for w in encoder.trainable_weights], norms))


def test_fit_trains_the_encoder_to_the_closed_form_optimum():
    """x = W c + 0.1 noise with a 6-D context: the optimum NLL is the noise's entropy."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    W = rng.standard_normal((CONTEXT, 2)).astype("float32") / np.sqrt(CONTEXT)
    c = rng.standard_normal((4000, CONTEXT)).astype("float32")
    x = c @ W + 0.1 * rng.standard_normal((4000, 2)).astype("float32")
    encoder = _dense_encoder(units=4)
    model = tfp_glow.MAF(
        (2,), num_layers=2, hidden_units=(16,), num_bins=None,
        context_shape=(CONTEXT,), context_encoder=encoder,
    )  # fmt: skip
    before = [w.numpy().copy() for w in encoder.trainable_weights]
    model.compile(keras.optimizers.Adam(3e-3))
    start = float(-np.mean(model.log_prob(x[:1000], c[:1000])))
    model.fit((x, c), epochs=30, batch_size=200, verbose=0)
    end = float(-np.mean(model.log_prob(x[:1000], c[:1000])))
    optimum = 2 * 0.5 * np.log(2 * np.pi * np.e * 0.01)  # -2.61 nats
    print(f"[context encoder] NLL {start:.3f} -> {end:.3f} (optimum {optimum:.3f})")
    assert start > optimum + 1.0
    assert end < optimum + 0.15
    moved = [np.max(np.abs(w.numpy() - b)) for w, b in zip(encoder.trainable_weights, before)]
    assert min(moved) > 1e-3


def test_keras_file_keeps_the_encoder_and_its_weights(tmp_path):
    model, encoder, context_shape = _build("maf")
    _perturb(model)
    assert model.get_config()["context_encoder"]["class_name"] == "Sequential"
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 3)).astype("float32")
    c = rng.standard_normal((4, CONTEXT)).astype("float32")
    path = str(tmp_path / "maf.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.context_encoder is not None and loaded.context_shape == (CONTEXT,)
    np.testing.assert_array_equal(loaded.log_prob(x, c).numpy(), model.log_prob(x, c).numpy())
    s1 = model.sample(3, context=c[0], seed=4).numpy()
    np.testing.assert_allclose(loaded.sample(3, context=c[0], seed=4).numpy(), s1, atol=1e-6)


@pytest.mark.slow
def test_export_serves_the_raw_context_through_the_encoder(tmp_path):
    model, encoder, context_shape = _build("glow")
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 4, 4, 1)).astype("float32") * 0.2
    c = rng.standard_normal((4, *context_shape)).astype("float32")
    model.initialize(x, c)
    _perturb(model)
    served = tfp_glow.load_exported(tfp_glow.export_saved_model(model, tmp_path / "served"))
    # The signature takes the raw context; the encoder is inside the graph.
    assert served.context_shape == context_shape
    np.testing.assert_array_equal(served.log_prob(x, c), model.log_prob(x, c))
    np.testing.assert_array_equal(
        served.sample(3, 0.7, seed=1, context=c[0]), model.sample(3, 0.7, seed=1, context=c[0])
    )


BAD_ENCODERS = [
    (dict(context_shape=(3,), context_encoder="dense"), TypeError, "must be a Keras layer"),
    (dict(context_encoder=keras.layers.Dense(4)), ValueError, "needs a conditional model"),
    (
        dict(num_classes=3, context_encoder=keras.layers.Dense(4)),
        ValueError,
        "context_shape=(num_classes,)",
    ),
    (
        dict(context_shape=(3,), context_encoder=keras.layers.Reshape((7,))),
        ValueError,
        "`context_encoder` 'reshape",
    ),
]


@pytest.mark.parametrize("kwargs, error, message", BAD_ENCODERS)
def test_bad_encoders_are_refused_naming_context_encoder(kwargs, error, message):
    with pytest.raises(error) as info:
        tfp_glow.MAF((2,), num_layers=1, hidden_units=(4,), num_bins=None, **kwargs)
    assert message in str(info.value) and "context_encoder" in str(info.value)
