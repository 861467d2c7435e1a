"""One table of bad inputs at the public entry points of models, data,
training, export and the `tfp-glow` command. Each row names the error type
and a pattern the message must contain (the argument or the problem).

Bijector-level bad arguments live in tests/test_bad_arguments.py and the
hypothesis properties in tests/test_bijector_properties.py; the owners of the
other modules keep further rows beside their tests (tests/test_models.py
constructor rows, tests/test_data.py, tests/test_export.py shape/dtype rows
on a loaded export, tests/test_cli.py). This table adds what those do not
cover, so every entry point is exercised in one place.
"""

import math

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

import tfp_glow
from tfp_glow import data
from tfp_glow.export import export_saved_model, load_exported
from tfp_glow.training import WarmupSchedule

TINY = dict(image_shape=(8, 8, 1), levels=1, steps_per_level=1, hidden_channels=4, num_bins=17)


def _images(n=2, seed=0):
    return np.random.default_rng(seed).uniform(-0.5, 0.5, (n, 8, 8, 1)).astype(np.float32)


def _with(value, index=(0, 3, 3, 0)):
    x = _images()
    x[index] = value
    return x


@pytest.fixture(scope="module")
def models():
    glow = tfp_glow.Glow(**TINY)
    glow.initialize(_images(8))
    cond = tfp_glow.Glow(**TINY, num_classes=3)
    cond.initialize(_images(8), np.arange(8) % 3)
    vector = tfp_glow.NICE(
        (2,), coupling_layers=2, hidden_units=4, num_hidden_layers=1, num_bins=None
    )
    vector.initialize(np.random.default_rng(0).standard_normal((8, 2)).astype(np.float32))
    return dict(
        glow=glow, cond=cond, vector=vector, fresh=lambda **kw: tfp_glow.Glow(**{**TINY, **kw})
    )


# (id, call(models, tmp_path), error type, regex the message must match)
ROWS = [
    # ---------------------------------------------------- model constructors
    (
        "glow-odd-spatial-size",
        lambda m, t: tfp_glow.Glow((12, 12, 1), levels=3),
        ValueError,
        r"image_shape.*divisible by 2\*\*levels = 8",
    ),
    (
        "glow-height-not-width",
        lambda m, t: tfp_glow.Glow((8, 6, 1), levels=2),
        ValueError,
        r"image_shape.*\(8, 6, 1\)",
    ),
    (
        "realnvp-too-many-levels",
        lambda m, t: tfp_glow.RealNVP((6, 6, 1), levels=3),
        ValueError,
        r"input_shape",
    ),
    (
        "nonfinite-mode",
        lambda m, t: m["fresh"](nonfinite="ignore"),
        ValueError,
        r"`nonfinite` must be one of \('raise', 'skip'\)",
    ),
    (
        "nonfinite-setter",
        lambda m, t: setattr(m["fresh"](), "nonfinite", None),
        ValueError,
        r"`nonfinite`",
    ),
    (
        "validate-args-not-bool",
        lambda m, t: m["fresh"](validate_args="yes"),
        TypeError,
        r"`validate_args` must be a bool",
    ),
    (
        "integer-model-dtype",
        lambda m, t: m["fresh"](dtype="int32"),
        ValueError,
        r"`dtype` must be a float dtype",
    ),
    (
        "flowmodel-flow-not-bijector",
        lambda m, t: tfp_glow.FlowModel(object(), (2,)),
        TypeError,
        r"`flow` must be a tfp bijector",
    ),
    (
        "flowmodel-no-event-shape",
        lambda m, t: tfp_glow.FlowModel(tfp.bijectors.Identity(), None),
        ValueError,
        r"`event_shape` is required",
    ),
    # ---------------------------------------------------- model inputs: dtype
    (
        "log_prob-uint8-pixels",
        lambda m, t: m["glow"].log_prob(np.zeros((2, 8, 8, 1), np.uint8)),
        TypeError,
        r"`x` must be a floating tensor.*uint8.*tfp_glow\.data\.preprocess",
    ),
    (
        "bits_per_dim-int-levels",
        lambda m, t: m["glow"].bits_per_dim(tf.zeros((2, 8, 8, 1), tf.int32)),
        TypeError,
        r"preprocess\(images, num_bins=17\)",
    ),
    (
        "log_prob-None",
        lambda m, t: m["glow"].log_prob(None),
        TypeError,
        r"`x` must be a float tensor",
    ),
    (
        "vector-int-data",
        lambda m, t: m["vector"].log_prob(np.zeros((2, 2), np.int64)),
        TypeError,
        r"`x` must be a floating tensor.*Cast it to a float",
    ),
    (
        "decode-int-latent",
        lambda m, t: m["glow"].decode(np.zeros((2, 64), np.int32)),
        TypeError,
        r"`z` must be a floating tensor",
    ),
    # ---------------------------------------------------- model inputs: shape
    (
        "log_prob-missing-batch-axis",
        lambda m, t: m["glow"].log_prob(_images()[0]),
        ValueError,
        r"\[batch, 8, 8, 1\].*Add a batch axis",
    ),
    (
        "encode-wrong-channels",
        lambda m, t: m["glow"].encode(np.zeros((2, 8, 8, 3), "f")),
        ValueError,
        r"`x` must have shape \[batch, 8, 8, 1\]; got \(2, 8, 8, 3\)",
    ),
    (
        "initialize-wrong-rank",
        lambda m, t: m["fresh"]().initialize(np.zeros((8, 64), "f")),
        ValueError,
        r"`x` must have shape \[batch, 8, 8, 1\]",
    ),
    (
        "decode-vector-without-batch",
        lambda m, t: m["glow"].decode(np.zeros(64, "f")),
        ValueError,
        r"`z` must have shape \[batch, 64\]",
    ),
    (
        "interpolate-batch-mismatch",
        lambda m, t: m["glow"].interpolate(_images(2), _images(3)),
        ValueError,
        r"`x_start` and `x_end` must have the same batch size",
    ),
    # ---------------------------------------------------- model inputs: values
    (
        "log_prob-nan",
        lambda m, t: m["glow"].log_prob(_with(np.nan)),
        ValueError,
        r"`x` contains 1 non-finite values",
    ),
    (
        "bits_per_dim-inf",
        lambda m, t: m["glow"].bits_per_dim(_with(np.inf)),
        ValueError,
        r"non-finite",
    ),
    ("encode-nan", lambda m, t: m["glow"].encode(_with(np.nan)), ValueError, r"non-finite"),
    (
        "initialize-nan-batch",
        lambda m, t: m["fresh"]().initialize(_with(np.nan)),
        ValueError,
        r"non-finite",
    ),
    (
        "vector-nan",
        lambda m, t: m["vector"].log_prob(np.array([[np.nan, 0.0]], "f")),
        ValueError,
        r"non-finite",
    ),
    (
        "decode-nan-latent",
        lambda m, t: m["glow"].decode(np.full((1, 64), np.nan, np.float32)),
        ValueError,
        r"`z` contains 64 non-finite values",
    ),
    # Raw pixels are refused where data enter training and evaluation (any
    # finite input can be scored: see test_defects.py).
    (
        "fit-raw-pixels-0-255",
        lambda m, t: _compiled(m["fresh"]()).fit(
            np.full((2, 8, 8, 1), 255.0, np.float32), epochs=1, verbose=0
        ),
        ValueError,
        r"data range \[-0\.5, 0\.5\].*num_bins=17.*\[255, 255\]",
    ),
    (
        "initialize-unit-interval",
        lambda m, t: m["fresh"]().initialize(
            np.random.default_rng(1).uniform(0, 1, (2, 8, 8, 1)).astype(np.float32)
        ),
        ValueError,
        r"data range \[-0\.5, 0\.5\]",
    ),
    (
        "evaluate-just-outside-range",
        lambda m, t: _compiled(m["fresh"]()).evaluate(_with(-0.502), verbose=0),
        ValueError,
        r"got values in \[-0\.502",
    ),
    (
        "fit-initialised-raw-pixels",
        lambda m, t: _compiled(m["glow"]).fit(
            np.full((2, 8, 8, 1), 16.0, np.float32), epochs=1, verbose=0
        ),
        ValueError,
        r"data range \[-0\.5, 0\.5\].*\[16, 16\]",
    ),
    # ---------------------------------------------------- sample / interpolate
    (
        "sample-zero",
        lambda m, t: m["glow"].sample(0),
        ValueError,
        r"`num_samples` must be an int >= 1; received 0",
    ),
    (
        "sample-negative-tensor",
        lambda m, t: m["glow"].sample(tf.constant(-2)),
        ValueError,
        r"`num_samples` must be an int >= 1",
    ),
    (
        "sample-float",
        lambda m, t: m["glow"].sample(2.5),
        TypeError,
        r"`num_samples` must be an int",
    ),
    (
        "sample-bool",
        lambda m, t: m["glow"].sample(True),
        TypeError,
        r"`num_samples` must be an int",
    ),
    (
        "sample-nan-temperature",
        lambda m, t: m["glow"].sample(2, temperature=math.nan),
        ValueError,
        r"`temperature` must be a finite number >= 0",
    ),
    (
        "interpolate-one-step",
        lambda m, t: m["glow"].interpolate(_images(), _images(), 1),
        ValueError,
        r"`num_steps` must be an int >= 2",
    ),
    # ---------------------------------------------------- labels
    (
        "labels-for-unconditional",
        lambda m, t: m["glow"].log_prob(_images(), [0, 1]),
        ValueError,
        r"`labels` were given but this model is not class-conditional",
    ),
    (
        "labels-missing",
        lambda m, t: m["cond"].log_prob(_images()),
        ValueError,
        r"class-conditional \(num_classes=3\): pass `labels`",
    ),
    (
        "labels-out-of-range",
        lambda m, t: m["cond"].log_prob(_images(), [0, 3]),
        ValueError,
        r"class ids in \[0, 2\].*\[0, 3\]",
    ),
    (
        "labels-negative",
        lambda m, t: m["cond"].encode(_images(), [-1, 0]),
        ValueError,
        r"class ids in \[0, 2\]",
    ),
    (
        "labels-wrong-count",
        lambda m, t: m["cond"].log_prob(_images(), [0, 1, 2]),
        ValueError,
        r"`labels` has 3 entries but the batch has 2",
    ),
    (
        "labels-one-hot-wrong-width",
        lambda m, t: m["cond"].log_prob(_images(), np.eye(4, dtype="f")[:2]),
        ValueError,
        r"one-hot\) `labels` must have shape \[batch, 3\]",
    ),
    (
        "labels-strings",
        lambda m, t: m["cond"].log_prob(_images(), ["a", "b"]),
        TypeError,
        r"`labels` must be int class ids or float one-hot",
    ),
    (
        "sample-label-out-of-range",
        lambda m, t: m["cond"].sample(2, labels=7),
        ValueError,
        r"class ids in \[0, 2\]",
    ),
    # ---------------------------------------------------- fit
    (
        "fit-uninitialised-from-generator",
        lambda m, t: _compiled(m["fresh"]()).fit(iter([_images()]), epochs=1, verbose=0),
        ValueError,
        r"call `model.initialize\(batch\)` first",
    ),
    (
        "fit-nan-first-batch",
        lambda m, t: _compiled(m["fresh"]()).fit(_with(np.nan), epochs=1, verbose=0),
        ValueError,
        r"non-finite",
    ),
    # ---------------------------------------------------- training
    (
        "warmup-zero-lr",
        lambda m, t: WarmupSchedule(0.0, 10),
        ValueError,
        r"`learning_rate` must be a positive finite number",
    ),
    ("warmup-nan-lr", lambda m, t: WarmupSchedule(math.nan, 10), ValueError, r"`learning_rate`"),
    (
        "warmup-negative-steps",
        lambda m, t: WarmupSchedule(1e-3, -1),
        ValueError,
        r"`warmup_steps` must be an int >= 0",
    ),
    ("warmup-float-steps", lambda m, t: WarmupSchedule(1e-3, 2.5), ValueError, r"`warmup_steps`"),
    (
        "warmup-zero-decay",
        lambda m, t: WarmupSchedule(1e-3, 10, decay_steps=0),
        ValueError,
        r"`decay_steps` must be None or an int >= 1",
    ),
    (
        "warmup-alpha",
        lambda m, t: WarmupSchedule(1e-3, 10, decay_steps=5, alpha=1.5),
        ValueError,
        r"`alpha` must be in \[0, 1\]",
    ),
    # ---------------------------------------------------- data
    (
        "preprocess-8bit-pixels-17-bins",
        lambda m, t: data.preprocess(np.full((2, 2), 200, np.uint8), 17),
        ValueError,
        r"`images` must hold integer levels in 0\.\.16.*reduce_bits.*\[200, 200\]",
    ),
    (
        "preprocess-already-float",
        lambda m, t: data.preprocess(np.array([0.25, -0.3], np.float32), 17),
        ValueError,
        r"`images` must hold integer levels.*not all integers",
    ),
    (
        "preprocess-negative-levels",
        lambda m, t: data.preprocess(np.array([-1, 3], np.int32), 17, dequantize=False),
        ValueError,
        r"`images`.*\[-1, 3\]",
    ),
    (
        "preprocess-strings",
        lambda m, t: data.preprocess(tf.constant(["a"]), 17),
        TypeError,
        r"`images` must be integer levels; got dtype string",
    ),
    (
        "reduce_bits-unit-floats",
        lambda m, t: data.reduce_bits(np.array([0.2, 0.9], np.float32), 5),
        ValueError,
        r"`images_uint8` must hold integer levels in 0\.\.255",
    ),
    (
        "reduce_bits-too-large",
        lambda m, t: data.reduce_bits(np.array([0, 300], np.int32), 5),
        ValueError,
        r"`images_uint8`.*\[0, 300\]",
    ),
    (
        "digits-bool-batch-size",
        lambda m, t: data.digits_dataset(batch_size=True),
        TypeError,
        r"`batch_size` must be an int >= 1; received True",
    ),
    (
        "toy-float-count",
        lambda m, t: data.toy_density("two_moons", 10.5),
        TypeError,
        r"`num_samples` must be an int >= 1; received 10.5",
    ),
    (
        "dataset_info-unknown",
        lambda m, t: data.dataset_info("no_such_dataset_xyz"),
        ValueError,
        r"`name`='no_such_dataset_xyz'",
    ),
    # ---------------------------------------------------- export
    (
        "export-float-version",
        lambda m, t: export_saved_model(m["glow"], t / "e", version=1.5),
        ValueError,
        r"`version` must be a non-negative int",
    ),
    (
        "export-bool-version",
        lambda m, t: export_saved_model(m["glow"], t / "e", version=True),
        ValueError,
        r"`version` must be a non-negative int",
    ),
    (
        "export-string-dtype",
        lambda m, t: export_saved_model(m["glow"], t / "e", input_signature_dtype=tf.string),
        TypeError,
        r"`input_signature_dtype` must be a float dtype; got string",
    ),
    (
        "export-uninitialised",
        lambda m, t: export_saved_model(m["fresh"](), t / "e"),
        ValueError,
        r"not initialised",
    ),
    (
        "load-exported-missing",
        lambda m, t: load_exported(t / "nothing_here"),
        ValueError,
        r"`path`.*neither a SavedModel directory",
    ),
]

# `tfp-glow` arguments: exit code 2 and an "error:" line naming the argument.


def _compiled(model):
    model.compile("adam")
    return model


def test_table_ids_are_unique():
    ids = [row[0] for row in ROWS]
    assert len(ids) == len(set(ids)) and len(ROWS) >= 60


@pytest.mark.parametrize(
    "call, error, pattern", [pytest.param(*row[1:], id=row[0]) for row in ROWS]
)
def test_bad_input_raises_naming_the_problem(models, tmp_path, call, error, pattern):
    with pytest.raises(error, match=pattern):
        call(models, tmp_path)


def test_failed_checks_change_nothing(models, tmp_path):
    """A rejected call leaves no trace: no half-initialised ActNorm, no export."""
    fresh = models["fresh"]()
    with pytest.raises(ValueError):
        fresh.initialize(_with(np.nan))
    assert not fresh.is_initialized
    assert all(float(np.abs(a.log_scale.numpy()).max()) == 0.0 for a in fresh._actnorms)
    with pytest.raises(ValueError):
        export_saved_model(fresh, tmp_path / "e")
    assert not (tmp_path / "e").exists()


def test_valid_edge_inputs_pass(models):
    """The checks reject only what is wrong: the range edges with float32
    rounding, vector models with no data range, one-hot labels, scalar
    sample labels, and float64 inputs all pass."""
    glow, cond, vector = models["glow"], models["cond"], models["vector"]
    edges = np.full((2, 8, 8, 1), 0.5, np.float32)
    edges[1] = -0.5 - 5e-4  # inside the 1e-3 slack
    assert np.isfinite(glow.log_prob(edges).numpy()).all()
    assert np.isfinite(glow.log_prob(_images().astype(np.float64)).numpy()).all()
    assert np.isfinite(vector.log_prob(np.array([[100.0, -40.0]], np.float32)).numpy()).all()
    one_hot = np.eye(3, dtype=np.float32)[[0, 2]]
    np.testing.assert_allclose(
        cond.log_prob(_images(), one_hot).numpy(),
        cond.log_prob(_images(), [0, 2]).numpy(),
        rtol=1e-6,
    )
    assert cond.sample(3, labels=2, seed=1).shape == (3, 8, 8, 1)
    assert glow.sample(tf.constant(2), seed=1).shape == (2, 8, 8, 1)
    levels = data.preprocess(np.array([0, 16], np.uint8), 17, dequantize=False).numpy()
    np.testing.assert_allclose(levels, [0.5 / 17 - 0.5, 16.5 / 17 - 0.5], rtol=1e-6)


def test_validate_args_checks_values_inside_tf_function(models):
    """Graphs skip value checks by default (the hot path stays lean); with
    `validate_args=True` the same checks run as assertions in the graph."""
    checked = tfp_glow.Glow(**TINY, validate_args=True)
    checked.set_weights(models["glow"].get_weights())
    log_prob = tf.function(checked.log_prob)
    assert np.isfinite(log_prob(_images()).numpy()).all()
    with pytest.raises(tf.errors.InvalidArgumentError, match="non-finite"):
        log_prob(_with(np.nan))
    # Any finite input can be scored; the data range is a rule of training data.
    assert np.isfinite(log_prob(_with(3.0)).numpy()).all()
    checked.compile("adam")
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"data range \[-0.5, 0.5\]"):
        tf.function(checked.test_step)(_with(3.0))
    decode = tf.function(checked.decode)
    with pytest.raises(tf.errors.InvalidArgumentError, match="`z` contains non-finite"):
        decode(np.full((1, 64), np.inf, np.float32))
    # Without validate_args the graph computes (a NaN in, a NaN out) at full speed.
    unchecked = tf.function(models["glow"].log_prob)
    assert np.isnan(unchecked(_with(np.nan)).numpy()[0])
