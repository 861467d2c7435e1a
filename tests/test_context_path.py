"""The model-level context path of conditional flows `p(x | context)`.

`FlowModel(..., context_shape=)` canonicalises every context (`InputSpec.context`)
to float `[N, *context_shape]` and hands it to every bijector as
`conditional_input`: through `log_prob`, `sample` (one context broadcast or one
per sample), `encode`/`decode`/`interpolate`, `fit`/`evaluate` batches (tuples,
dicts, tf.data), ActNorm's data-dependent init, `.keras` saving and the
SavedModel export. The flow here is a test-local conditional affine map whose
density has a closed form, so every number is checked against NumPy.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

import tfp_glow
from tfp_glow.bijectors import ActNorm, FlowBijector

tfb = tfp.bijectors

CONTEXT = 3
EVENT = 2


class ContextAffine(FlowBijector):
    """`z = (x - t(c)) exp(-s(c))`, `[t, s] = W flatten(c) + b`: a conditional
    affine map (the normalizing direction), `log|det dz/dx| = -sum s(c)`."""

    def __init__(self, event_size, context_size, seed=0, name="context_affine"):
        super().__init__(forward_min_event_ndims=1, name=name)
        init = keras.initializers.RandomNormal(stddev=0.3, seed=seed)
        self.net = keras.layers.Dense(2 * event_size, kernel_initializer=init)
        self.net.build((None, context_size))
        self._track_layers(self.net)

    def _shift_and_log_scale(self, kwargs):
        c = kwargs.get("conditional_input")
        if c is None:
            raise ValueError("ContextAffine needs `conditional_input`.")
        c = tf.reshape(c, [tf.shape(c)[0], -1])
        return tf.split(self.net(c), 2, axis=-1)

    def _forward_and_log_det(self, x, **kwargs):
        shift, log_scale = self._shift_and_log_scale(kwargs)
        return (x - shift) * tf.exp(-log_scale), -tf.reduce_sum(log_scale, -1)

    def _inverse_and_log_det(self, y, **kwargs):
        shift, log_scale = self._shift_and_log_scale(kwargs)
        return y * tf.exp(log_scale) + shift, tf.reduce_sum(log_scale, -1)


@keras.saving.register_keras_serializable(package="test_context_path")
def context_flow():
    """ActNorm after the conditional affine map (Chain applies right to left)."""
    return tfb.Chain([ActNorm(EVENT, event_ndims=1), ContextAffine(EVENT, CONTEXT)])


def _model(**kwargs):
    kwargs.setdefault("context_shape", [CONTEXT])
    return tfp_glow.FlowModel(context_flow, event_shape=[EVENT], num_bins=None, **kwargs)


def _pairs(n, seed):
    """`x | c ~ N(A c + 1, 0.1^2 I)`: the data depend on the context."""
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(n, CONTEXT)).astype(np.float32)
    a = np.array([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]], np.float32)
    x = c @ a.T + 1.0 + 0.1 * rng.normal(size=(n, EVENT)).astype(np.float32)
    return x.astype(np.float32), c


def _closed_form_log_prob(model, x, c):
    """`log p(x | c)` in NumPy from the two bijectors' weights."""
    actnorm, affine = model.flow.bijectors
    kernel, bias = (w.numpy() for w in affine.net.weights)
    out = c.reshape(len(c), -1) @ kernel + bias
    shift, log_scale = out[:, :EVENT], out[:, EVENT:]
    h = (x - shift) * np.exp(-log_scale)
    act_log_scale, act_bias = actnorm.log_scale.numpy(), actnorm.bias.numpy()
    z = h * np.exp(act_log_scale) + act_bias  # ActNorm: y = x exp(log s) + b
    base = -0.5 * np.sum(z**2, -1) - 0.5 * EVENT * np.log(2 * np.pi)
    return base + act_log_scale.sum() - log_scale.sum(-1)


@pytest.fixture(scope="module")
def trained():
    """A model fitted on `(x, c)` pairs, with its first-epoch and last losses."""
    keras.utils.set_random_seed(0)
    x, c = _pairs(512, seed=0)
    model = _model()
    model.compile(optimizer=keras.optimizers.Adam(0.05))
    first = model.evaluate(x, c, batch_size=128, verbose=0, return_dict=True)["loss"]
    history = model.fit((x, c), batch_size=64, epochs=12, verbose=0)
    return model, x, c, first, history.history["loss"][-1]


def test_fit_on_pairs_lowers_the_nll_and_log_prob_is_the_closed_form(trained):
    model, x, c, first, last = trained
    # x | c has std 0.1 per dim: the best NLL is log(2 pi 0.01) + 1 = -1.77. The
    # best *unconditional* Gaussian (marginal variances 5.01, 2.51) has NLL 4.10.
    # Measured: 14.1 before init (placeholder ActNorm), -1.51 after 12 epochs.
    assert first > 4.1 and last < -1.2, (first, last)
    x_test, c_test = _pairs(64, seed=1)
    got = model.log_prob(x_test, c_test).numpy()
    assert np.mean(got) > 1.2  # held out (measured 1.59)
    np.testing.assert_allclose(got, _closed_form_log_prob(model, x_test, c_test), atol=2e-4)
    # The density depends on the context: the right one scores far higher.
    shuffled = np.roll(c_test, 1, axis=0)
    assert np.mean(got - model.log_prob(x_test, shuffled).numpy()) > 10.0
    # labels= is the older name of the same argument.
    np.testing.assert_array_equal(model.log_prob(x_test, labels=c_test).numpy(), got)
    # An int context is the same context in floats.
    ints = np.round(c_test).astype(np.int64)
    np.testing.assert_allclose(
        model.log_prob(x_test, ints).numpy(),
        model.log_prob(x_test, ints.astype(np.float32)).numpy(),
    )


def test_every_batch_form_evaluates_to_the_eager_nll(trained):
    model, _, _, _, _ = trained
    x, c = _pairs(96, seed=2)
    expected = -np.mean(model.log_prob(x, c).numpy())
    forms = {
        "x, y": lambda: model.evaluate(x, c, batch_size=32, verbose=0),
        "tuple": lambda: model.evaluate((x, c), batch_size=32, verbose=0),
        "dict x/context": lambda: model.evaluate({"x": x, "context": c}, batch_size=32, verbose=0),
        "dict image/label": lambda: model.evaluate(
            {"image": x, "label": c}, batch_size=32, verbose=0
        ),
        "tf.data": lambda: model.evaluate(
            tf.data.Dataset.from_tensor_slices((x, c)).batch(32), verbose=0
        ),
    }
    for name, run in forms.items():
        assert run()[0] == pytest.approx(expected, abs=1e-4), name


def test_fit_initialises_actnorm_from_the_first_batch_with_its_context():
    keras.utils.set_random_seed(1)
    x, c = _pairs(256, seed=3)
    model = _model()
    model.compile(optimizer=keras.optimizers.Adam(0.0))  # no update: the init alone
    model.fit(tf.data.Dataset.from_tensor_slices((x, c)).batch(128), epochs=1, verbose=0)
    z = model.encode(x[:128], c[:128]).numpy()
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(z.std(0), 1.0, atol=1e-3)


def test_sample_broadcasts_one_context_and_temperature_scales_the_latent(trained):
    model = trained[0]
    c0 = np.array([0.5, -1.0, 0.2], np.float32)
    one = model.sample(5, temperature=0.7, seed=3, context=c0).numpy()
    tiled = model.sample(5, temperature=0.7, seed=3, context=np.tile(c0, [5, 1])).numpy()
    np.testing.assert_array_equal(one, tiled)
    eps = tf.random.stateless_normal([5, EVENT], seed=[3, 0]).numpy()
    np.testing.assert_allclose(model.encode(one, np.tile(c0, [5, 1])).numpy(), 0.7 * eps, atol=1e-5)
    mode = model.sample(2, temperature=0.0, seed=0, context=c0).numpy()
    decoded = model.decode(np.zeros([2, EVENT], np.float32), np.tile(c0, [2, 1])).numpy()
    np.testing.assert_allclose(mode, decoded, atol=1e-6)
    # The learned conditional mean A c + 1 (std 0.1 around it).
    np.testing.assert_allclose(mode[0], [1 + 1.0 - 0.2, 1 + 0.25 - 1.5], atol=0.1)


def test_image_shaped_context_interpolates_and_samples():
    keras.utils.set_random_seed(2)
    model = tfp_glow.FlowModel(
        lambda: tfb.Chain([ActNorm(EVENT, event_ndims=1), ContextAffine(EVENT, 4)]),
        event_shape=[EVENT],
        num_bins=None,
        context_shape=[2, 2, 1],
    )
    x = np.random.default_rng(4).normal(size=(3, EVENT)).astype(np.float32)
    c = np.random.default_rng(5).normal(size=(3, 2, 2, 1)).astype(np.float32)
    model.initialize(x, c)
    path = model.interpolate(x, x[::-1], num_steps=3, context=c).numpy()
    assert path.shape == (3, 3, EVENT)
    np.testing.assert_allclose(path[0], x, atol=1e-5)
    np.testing.assert_allclose(path[-1], x[::-1], atol=1e-5)
    samples = model.sample(4, seed=1, context=c[0]).numpy()
    np.testing.assert_array_equal(samples, model.sample(4, seed=1, context=np.stack([c[0]] * 4)))
    assert model.context_shape == (2, 2, 1)


def test_class_labels_are_one_hot_contexts():
    model = tfp_glow.FlowModel(context_flow, event_shape=[EVENT], num_bins=None, num_classes=3)
    assert model.context_shape == (3,) and model.num_classes == 3
    x, _ = _pairs(4, seed=6)
    ids = np.array([0, 2, 1, 2])
    model.initialize(x, ids)
    onehot = np.eye(3, dtype=np.float32)[ids]
    np.testing.assert_array_equal(model.log_prob(x, ids).numpy(), model.log_prob(x, onehot).numpy())
    np.testing.assert_array_equal(
        model.sample(4, seed=2, context=1).numpy(),
        model.sample(4, seed=2, labels=np.ones(4, np.int32)).numpy(),
    )


def test_tfp_maf_gets_the_context_as_conditional_input():
    """`FlowModel(Invert(MAF(MADE(context_size=3))), context_shape=[3])` equals TFP's
    own conditional density `p(x | c)`, and samples under a context."""
    keras.utils.set_random_seed(3)
    made = tfp_glow.nets.MADE(2, EVENT, [16], context_size=CONTEXT, zero_init_last=False)
    maf = tfb.MaskedAutoregressiveFlow(shift_and_log_scale_fn=made)
    model = tfp_glow.FlowModel(
        tfb.Invert(maf), event_shape=[EVENT], num_bins=None, context_shape=[CONTEXT]
    )
    x, c = _pairs(8, seed=7)
    reference = tfp.distributions.TransformedDistribution(
        tfp.distributions.Sample(tfp.distributions.Normal(0.0, 1.0), [EVENT]), maf
    )
    want = reference.log_prob(x[:8], bijector_kwargs={"conditional_input": c[:8]}).numpy()
    got = model.log_prob(x[:8], c[:8]).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # The context matters (the network's context weights start random here).
    assert np.max(np.abs(got - model.log_prob(x[:8], np.roll(c[:8], 1, axis=0)).numpy())) > 0.1
    # Sampling decodes under the context: encoding the samples gives back T * eps.
    samples = model.sample(8, temperature=0.5, seed=2, context=c[0])
    eps = tf.random.stateless_normal([8, EVENT], seed=[2, 0]).numpy()
    np.testing.assert_allclose(
        model.encode(samples, np.tile(c[:1], [8, 1])).numpy(), 0.5 * eps, atol=1e-4
    )


def test_sample_grid_draws_under_its_context(tmp_path):
    from PIL import Image

    flow = tfb.Chain([ContextAffine(4, CONTEXT), tfb.Reshape([4], event_shape_in=[2, 2, 1])])
    model = tfp_glow.FlowModel(flow, event_shape=[2, 2, 1], num_bins=17, context_shape=[CONTEXT])
    c0 = np.array([0.1, -0.2, 0.3], np.float32)
    grid = tfp_glow.SampleGrid(tmp_path, num_samples=4, seed=2, rows=2, upscale=1, context=c0)
    grid.set_model(model)
    path = grid.write(1)
    samples = model.sample(4, temperature=0.7, seed=2, context=c0)
    expected = tfp_glow.image_grid(tfp_glow.to_uint8(samples, 17), rows=2)
    with Image.open(path) as png:
        np.testing.assert_array_equal(np.asarray(png), expected[..., 0])
    missing = tfp_glow.SampleGrid(tmp_path, num_samples=4)
    missing.set_model(model)
    with pytest.raises(ValueError, match=r"needs `context`: one of shape \[3\]"):
        missing.write(1)


def test_keras_file_and_keras_export_keep_the_context(trained, tmp_path):
    model, x, c, _, _ = trained
    assert model.get_config()["context_shape"] == [CONTEXT]
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert loaded.context_shape == (CONTEXT,)
    np.testing.assert_array_equal(
        loaded.log_prob(x[:8], c[:8]).numpy(), model.log_prob(x[:8], c[:8]).numpy()
    )
    # Keras's own export: `serve((x, context))` is log p(x | context).
    model.export(tmp_path / "keras_export", verbose=False)
    served = tf.saved_model.load(tmp_path / "keras_export")
    np.testing.assert_array_equal(
        served.serve((tf.constant(x[:8]), tf.constant(c[:8]))).numpy(),
        model.log_prob(x[:8], c[:8]).numpy(),
    )


def test_export_serves_the_in_process_values(trained, tmp_path):
    model, x, c, _, _ = trained
    flow = tfp_glow.load_exported(tfp_glow.export_saved_model(model, tmp_path))
    assert flow.conditional and flow.context_shape == (CONTEXT,)
    assert flow.metadata["context_shape"] == [CONTEXT]
    np.testing.assert_array_equal(
        flow.log_prob(x[:6], c[:6]).numpy(), model.log_prob(x[:6], c[:6]).numpy()
    )
    np.testing.assert_array_equal(
        flow.bits_per_dim(x[:6], c[:6]).numpy(), model.bits_per_dim(x[:6], c[:6]).numpy()
    )
    z = model.encode(x[:6], c[:6]).numpy()
    np.testing.assert_array_equal(flow.encode(x[:6], c[:6]).numpy(), z)
    np.testing.assert_allclose(flow.decode(z, c[:6]).numpy(), x[:6], atol=1e-5)
    for context in (c[0], c[:4]):
        np.testing.assert_array_equal(
            flow.sample(4, 0.7, seed=5, context=context).numpy(),
            model.sample(4, 0.7, seed=5, context=context).numpy(),
        )
    # The raw signature takes the same request TF Serving's REST API forwards.
    served = flow.signatures["sample"](
        num=tf.constant(3),
        temperature=tf.constant(0.5),
        seed=tf.constant(9, tf.int64),
        context=tf.constant(c[1]),
    )
    np.testing.assert_array_equal(
        served["samples"].numpy(), model.sample(3, 0.5, seed=9, context=c[1]).numpy()
    )
    # Bad contexts: a ValueError naming `context` and the shape, before the graph.
    for call, message in (
        (lambda: flow.log_prob(x[:2]), r"pass `context` of shape \[2, 3\]"),
        (lambda: flow.log_prob(x[:2], c[:3]), r"`context` must have shape \[2, 3\]"),
        (lambda: flow.log_prob(x[:2], c[:2, :2]), r"`context` must have shape \[2, 3\]"),
        (lambda: flow.sample(2, context=c[:3]), r"`context` must have shape \[3\] or \[2, 3\]"),
    ):
        with pytest.raises(ValueError, match=message):
            call()
    # ... and inside the graph, for clients that call the signatures directly.
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"tensor context .* \[\?,3\]"):
        flow.signatures["log_prob"](x=tf.constant(x[:2]), context=tf.constant(c[:2, :2]))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"`context` must have shape \[3\]"):
        flow.signatures["sample"](
            num=tf.constant(2),
            temperature=tf.constant(1.0),
            seed=tf.constant(0, tf.int64),
            context=tf.constant(c[0, :2]),
        )


@pytest.fixture(scope="module")
def models():
    return {
        "cond": _model(),
        "classes": tfp_glow.FlowModel(
            context_flow, event_shape=[EVENT], num_bins=None, num_classes=3
        ),
        "plain": tfp_glow.FlowModel(
            lambda: tfb.Chain([ActNorm(EVENT, event_ndims=1)]), event_shape=[EVENT], num_bins=None
        ),
    }


X2 = np.zeros([2, EVENT], np.float32)
C2 = np.zeros([2, CONTEXT], np.float32)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (
            lambda m: m["cond"].log_prob(X2),
            ValueError,
            r"conditional: pass `context`, a float tensor of shape \[batch, 3\]",
        ),
        (
            lambda m: m["plain"].log_prob(X2, C2),
            ValueError,
            r"`context` was given but this model is unconditional",
        ),
        (
            lambda m: m["cond"].log_prob(X2, np.zeros([2, 4], "f")),
            ValueError,
            r"`context` must have shape \[batch, 3\] \(context_shape=\(3,\)\); got \(2, 4\)",
        ),
        (
            lambda m: m["cond"].encode(X2, C2[0]),
            ValueError,
            r"`context` must have shape \[batch, 3\].*Add a batch axis",
        ),
        (
            lambda m: m["cond"].decode(X2, np.zeros([3, CONTEXT], "f")),
            ValueError,
            r"`context` has 3 entries but the batch has 2 examples \(expected shape \[2, 3\]\)",
        ),
        (
            lambda m: m["cond"].log_prob(X2, np.full([2, CONTEXT], "a")),
            TypeError,
            r"`context` must be a float tensor of shape \[batch, 3\].*got dtype string",
        ),
        (
            lambda m: m["cond"].log_prob(X2, np.full([2, CONTEXT], np.nan, "f")),
            ValueError,
            r"`context` contains 6 non-finite values",
        ),
        (
            lambda m: m["cond"].sample(2, context=np.zeros([3, CONTEXT], "f")),
            ValueError,
            r"`context` has 3 entries but `num_samples` is 2",
        ),
        (
            lambda m: m["cond"].log_prob(X2, C2, labels=C2),
            TypeError,
            r"as `context` or as `labels`",
        ),
        (
            lambda m: m["classes"].log_prob(X2, [0, 3]),
            ValueError,
            r"class ids in \[0, 2\] \(num_classes=3, the model's `context`\); got .*\[0, 3\]",
        ),
        (
            lambda m: m["classes"].log_prob(X2),
            ValueError,
            r"pass `labels` as the `context` \(int class ids \[batch\] or one-hot \[batch, 3\]",
        ),
        (
            lambda m: m["cond"].fit(X2, np.zeros([2, 5], "f"), verbose=0),
            ValueError,
            r"`context` must have shape \[batch, 3\]",
        ),
        (
            lambda m: tfp_glow.FlowModel(
                context_flow, event_shape=[EVENT], num_bins=None, num_classes=3, context_shape=[3]
            ),
            ValueError,
            r"Pass `num_classes` or `context_shape`, not both",
        ),
        (
            lambda m: _model(context_shape=[0]),
            ValueError,
            r"`context_shape` must be a sequence of positive ints",
        ),
    ],
    ids=[
        "missing",
        "unconditional",
        "trailing-shape",
        "no-batch-axis",
        "batch-mismatch",
        "strings",
        "nan",
        "sample-count",
        "context-and-labels",
        "ids-out-of-range",
        "labels-missing",
        "fit-shape",
        "both-kinds",
        "bad-shape",
    ],
)
def test_bad_context_raises_naming_context_and_the_shape(models, call, error, message):
    with pytest.raises(error, match=message):
        call(models)


@pytest.mark.slow
def test_glow_with_an_image_context_exports_the_in_process_values(tmp_path):
    """A Glow (engineer B's conditional couplings and priors) with a `[4, 4, 1]`
    context: served log_prob and samples (one context broadcast, one per sample)
    equal the model's; interpolation keeps its endpoints; a class-conditional
    Glow's export keeps its int `label` input."""
    small = dict(image_shape=(8, 8, 1), steps_per_level=1, levels=2, hidden_channels=8)
    rng = np.random.default_rng(0)
    x = rng.uniform(-0.5, 0.5, size=(16, 8, 8, 1)).astype(np.float32)
    c = rng.normal(size=(16, 4, 4, 1)).astype(np.float32)
    glow = tfp_glow.Glow(**small, context_shape=(4, 4, 1), num_bins=17)
    glow.initialize(x, c)
    flow = tfp_glow.load_exported(tfp_glow.export_saved_model(glow, tmp_path / "ctx"))
    assert flow.context_shape == (4, 4, 1)
    np.testing.assert_array_equal(flow.log_prob(x[:4], c[:4]), glow.log_prob(x[:4], c[:4]))
    for context in (c[0], c[:3]):
        np.testing.assert_array_equal(
            flow.sample(3, 0.7, seed=1, context=context),
            glow.sample(3, 0.7, seed=1, context=context),
        )
    with pytest.raises(
        ValueError, match=r"`context` must have shape \[4, 4, 1\] or \[3, 4, 4, 1\]"
    ):
        flow.sample(3, context=c[0, :2])
    path = glow.interpolate(x[:2], x[2:4], num_steps=3, context=c[:2]).numpy()
    np.testing.assert_allclose(path[0], x[:2], atol=1e-5)
    np.testing.assert_allclose(path[-1], x[2:4], atol=1e-5)
    classes = tfp_glow.Glow(**small, num_classes=3, num_bins=17)
    ids = np.arange(16) % 3
    classes.initialize(x, ids)
    served = tfp_glow.load_exported(tfp_glow.export_saved_model(classes, tmp_path / "ids"))
    assert "label" in served.signatures["log_prob"].structured_input_signature[1]
    np.testing.assert_array_equal(served.log_prob(x[:4], ids[:4]), classes.log_prob(x[:4], ids[:4]))
    np.testing.assert_array_equal(
        served.sample(3, seed=2, label=1), classes.sample(3, seed=2, context=1)
    )
