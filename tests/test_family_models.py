"""The vector families as models: MAF, IAF, NeuralSplineFlow (both variants), FFJORD.

Each builder fits 8 Gaussians, runs the digits as images through its
flatten, keeps its log-det exact (against an autodiff Jacobian), round trips
its config, `.keras` file (fresh process) and SavedModel (served where
tfp_glow cannot be imported), and refuses bad arguments naming them. The
CLI trains one and samples from its run directory.
"""

import json
import os
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import perturb

import tfp_glow
from tfp_glow import cli
from tfp_glow.models.ffjord import EXACT_TRACE_MAX_FEATURES, exact_trace_for

sys.path.insert(0, os.path.dirname(__file__))
# The fresh-process children and their runner of the TFP-flow tests, reused.
from test_tfp_flows import EXPORT_CHILD, KERAS_CHILD, _run_child  # noqa: E402

# One small model of each family on 2-D points. FFJORD's ODE solves and
# NSF-AR's graph (a spline bijector per MADE call) take tens of seconds on
# this 2-core machine: their checks, and IAF's 64-pass densities on the
# digits, run in the slow step.
SMALL = {
    "maf": (tfp_glow.MAF, dict(num_layers=2, hidden_units=[16, 16])),
    "iaf": (
        tfp_glow.IAF,
        dict(num_layers=2, hidden_units=[16, 16], permutation="shuffle", actnorm=True),
    ),
    "nsf_autoregressive": (
        tfp_glow.NeuralSplineFlow,
        dict(variant="autoregressive", num_layers=2, hidden_units=[16, 16], spline_bins=4),
    ),
    "nsf_coupling": (
        tfp_glow.NeuralSplineFlow,
        dict(
            variant="coupling",
            num_layers=2,
            hidden_units=[16, 16],
            spline_bins=4,
            permutation="shuffle",
        ),
    ),
    "ffjord": (tfp_glow.FFJORD, dict(hidden_units=[16, 16], atol=1e-5)),
}


def _names(slow):
    return [pytest.param(n, marks=pytest.mark.slow) if n in slow else n for n in SMALL]


NAMES = _names({"ffjord", "nsf_autoregressive"})


def build(name, input_shape=(2,), num_bins=None, seed=0, **overrides):
    cls, kwargs = SMALL[name]
    keras.utils.set_random_seed(seed)
    return cls(input_shape=input_shape, num_bins=num_bins, **{**kwargs, **overrides})


def eight_gaussians(n, seed=0):
    return tfp_glow.data.toy_density("8gaussians", n, seed=seed).astype(np.float32) / 2.0


def digits(n):
    """The first `n` training digits as the pipeline feeds them, [n, 8, 8, 1]."""
    ds = tfp_glow.data.digits_dataset("train", batch_size=n, shuffle=False)
    return next(iter(ds)).numpy()


@pytest.mark.parametrize("name", _names({"ffjord", "nsf_autoregressive", "iaf"}))
def test_fit_lowers_the_nll_of_8_gaussians(name):
    model = build(name)
    data = eight_gaussians(256, seed=1)
    model.compile(keras.optimizers.Adam(1e-2))
    before = model.evaluate(data, batch_size=128, verbose=0, return_dict=True)["loss"]
    model.fit(data, epochs=2, batch_size=64, verbose=0)
    after = model.evaluate(data, batch_size=128, verbose=0, return_dict=True)["loss"]
    assert after < before - 0.1, (before, after)


@pytest.mark.parametrize("name", NAMES)
def test_log_det_is_the_autodiff_jacobian_of_the_whole_flow(name):
    """Every layer, permutation and ActNorm moved off the identity: the
    model's log-det is `log|det dz/dx|` of its own map. FFJORD's log-det is
    the integrated trace and its map the solved ODE: they agree to the
    solver's error (2e-2 at rtol 1e-3), here tightened to 1e-6."""
    tight = dict(rtol=1e-6, atol=1e-7) if name == "ffjord" else {}
    model = perturb(build(name, **tight), 2, scale=0.3)
    x = tf.constant(eight_gaussians(8, seed=3))
    with tf.GradientTape(persistent=True) as tape:  # no pfor: FFJORD's solver
        tape.watch(x)
        z, log_det = tfp_glow.bijectors.forward_and_log_det(model.flow, x, 1)
    jacobian = tape.batch_jacobian(z, x, experimental_use_pfor=False)
    _, expected = tf.linalg.slogdet(jacobian)
    tol = 1e-3 if name == "ffjord" else 1e-5  # FFJORD: the solver's tolerance
    np.testing.assert_allclose(log_det.numpy(), expected.numpy(), rtol=tol, atol=tol)


@pytest.mark.parametrize("name", _names({"ffjord", "nsf_autoregressive", "iaf", "nsf_coupling"}))
def test_digits_train_as_64_vectors_through_the_flatten(name):
    """Images in, images out: the flatten costs nothing (the image model's
    density is the vector model's on the flattened images) and a few steps
    on the digits lower the loss. FFJORD: the flatten only (on 64 features
    a few exact-trace steps took 9 minutes here; its fit is the 8 Gaussians')."""
    images = digits(64 if name != "ffjord" else 8)
    # FFJORD on 64 features would take Hutchinson's noisy trace: exact, to compare.
    options = dict(
        num_bins=17,
        hidden_units=[16, 16] if name != "ffjord" else [8],
        **({"trace": "exact"} if name == "ffjord" else {}),
    )
    image_model = build(name, input_shape=(8, 8, 1), **options)
    vector_model = build(name, input_shape=(64,), **options)
    perturb(image_model, 4, scale=0.05)
    vector_model.set_weights(image_model.get_weights())
    np.testing.assert_array_equal(
        image_model.log_prob(images).numpy(), vector_model.log_prob(images.reshape(-1, 64)).numpy()
    )
    assert image_model.sample(3, seed=1).shape == (3, 8, 8, 1)
    if name == "ffjord":
        return
    image_model.compile(keras.optimizers.Adam(3e-3))
    before = image_model.evaluate(images, batch_size=64, verbose=0, return_dict=True)
    image_model.fit(images, epochs=4, batch_size=32, verbose=0)
    after = image_model.evaluate(images, batch_size=64, verbose=0, return_dict=True)
    assert after["loss"] < before["loss"] - 1.0, (before, after)
    assert np.isfinite(after["bits_per_dim"])


@pytest.mark.parametrize("name", NAMES)
def test_config_round_trip_rebuilds_the_same_model(name):
    model = perturb(build(name, input_shape=(4, 2, 1), num_bins=17), 5, scale=0.2)
    config = json.loads(json.dumps(model.get_config()))  # what a .keras file stores
    rebuilt = type(model).from_config(config)
    assert rebuilt.get_config() == model.get_config()
    rebuilt.set_weights(model.get_weights())
    x = np.random.default_rng(6).uniform(-0.5, 0.5, (5, 4, 2, 1)).astype(np.float32)
    np.testing.assert_array_equal(rebuilt.log_prob(x).numpy(), model.log_prob(x).numpy())


@pytest.mark.slow
def test_default_models_hold_about_150k_parameters_on_the_digits():
    """The digits protocol's budget (issue 28): within 10% of 150k."""
    counts = {
        name: cls(input_shape=(8, 8, 1)).count_params()
        for name, cls in [
            ("maf", tfp_glow.MAF),
            ("iaf", tfp_glow.IAF),
            ("nsf", tfp_glow.NeuralSplineFlow),
            ("ffjord", tfp_glow.FFJORD),
        ]
    }
    counts["nsf_coupling"] = tfp_glow.NeuralSplineFlow(variant="coupling").count_params()
    assert all(135_000 <= n <= 165_000 for n in counts.values()), counts


def test_ffjord_auto_trace_is_exact_up_to_16_features():
    assert EXACT_TRACE_MAX_FEATURES == 16  # the threshold the docs state
    assert exact_trace_for("auto", 16) and not exact_trace_for("auto", 17)
    assert not exact_trace_for("auto", 64)  # the digits: Hutchinson
    assert exact_trace_for("exact", 64) and not exact_trace_for("hutchinson", 2)


@pytest.mark.slow
@pytest.mark.parametrize("shape, trace", [((2,), "auto"), ((17,), "auto"), ((2,), "hutchinson")])
def test_ffjord_models_use_the_trace_they_state(shape, trace):
    """The exact trace gives one log-density; Hutchinson's probes a new one per call."""
    model = perturb(
        tfp_glow.FFJORD(input_shape=shape, hidden_units=[4], trace=trace, num_bins=None),
        11,
        scale=0.5,
    )
    x = np.random.default_rng(12).standard_normal((4, *shape)).astype(np.float32)
    first, second = model.log_prob(x).numpy(), model.log_prob(x).numpy()
    assert model.exact_trace == exact_trace_for(trace, shape[0])
    assert np.array_equal(first, second) == model.exact_trace, (first, second)


BAD_ARGUMENTS = [
    (tfp_glow.MAF, dict(num_layers=0), "num_layers"),
    (tfp_glow.IAF, dict(hidden_units=[]), "hidden_units"),
    (tfp_glow.MAF, dict(hidden_units=[16, 0]), "hidden_units"),
    (tfp_glow.MAF, dict(permutation="conv_lu"), "permutation"),
    (tfp_glow.MAF, dict(input_shape=(8, 8)), "input_shape"),
    (tfp_glow.IAF, dict(input_shape=(0,)), "input_shape"),
    (tfp_glow.NeuralSplineFlow, dict(variant="spline"), "variant"),
    (tfp_glow.NeuralSplineFlow, dict(num_layers=0), "num_layers"),
    (tfp_glow.NeuralSplineFlow, dict(spline_bins=1), "spline_bins"),
    (tfp_glow.NeuralSplineFlow, dict(tail_bound=0.0), "tail_bound"),
    (tfp_glow.NeuralSplineFlow, dict(variant="coupling", input_shape=(1,)), "input_shape"),
    (tfp_glow.NeuralSplineFlow, dict(variant="coupling", hidden_units=[16, 32]), "hidden_units"),
    (tfp_glow.NeuralSplineFlow, dict(input_shape=(2, 3)), "input_shape"),
    (tfp_glow.FFJORD, dict(trace="approximate"), "trace"),
    (tfp_glow.FFJORD, dict(solver="euler"), "solver"),
    (tfp_glow.FFJORD, dict(rtol=0.0), "rtol"),
    (tfp_glow.FFJORD, dict(atol=-1e-6), "atol"),
    (tfp_glow.FFJORD, dict(trace_samples=0), "trace_samples"),
    (tfp_glow.FFJORD, dict(input_shape=(8, 8, 1, 1)), "input_shape"),
]


@pytest.mark.parametrize(
    "cls, kwargs, argument", BAD_ARGUMENTS, ids=[f"{c.__name__}-{k}" for c, k, _ in BAD_ARGUMENTS]
)
def test_bad_arguments_raise_value_error_naming_the_argument(cls, kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        cls(**kwargs)


# -- saving and serving, all families in one fresh process each -----------------------
def _saved_cases(tmp_path, names):
    """Per family: a perturbed small model and the inputs it is scored on."""
    models, inputs = {}, {}
    for name in names:
        model = build(name)
        x = eight_gaussians(6, seed=8)
        model.initialize(x)  # IAF's ActNorms: an export refuses placeholder values
        perturb(model, 7, scale=0.2)
        inputs[name] = str(tmp_path / f"{name}_x.npy")
        np.save(inputs[name], x)
        models[name] = (model, x)
    return models, inputs


@pytest.mark.slow
def test_keras_files_reload_in_a_fresh_process_with_equal_log_prob(tmp_path):
    models, inputs = _saved_cases(tmp_path, SMALL)
    files = {}
    for name, (model, _) in models.items():
        model.compile(keras.optimizers.Adam(1e-3))
        files[name] = str(tmp_path / f"{name}.keras")
        model.save(files[name])
    (tmp_path / "job.json").write_text(json.dumps({"files": files, "inputs": inputs}))
    (tmp_path / "child.py").write_text(KERAS_CHILD)
    out = _run_child(tmp_path, os.path.dirname(__file__))
    for name, (model, x) in models.items():
        assert out[name]["class"] == type(model).__name__ and out[name]["compiled"]
        np.testing.assert_array_equal(np.float32(out[name]["log_prob"]), model.log_prob(x).numpy())


@pytest.mark.slow
def test_export_serves_log_prob_without_tfp_glow(tmp_path):
    models, inputs = _saved_cases(tmp_path, SMALL)
    exports = {
        name: str(tfp_glow.export_saved_model(model, tmp_path / name))
        for name, (model, _) in models.items()
    }
    (tmp_path / "job.json").write_text(json.dumps({"exports": exports, "inputs": inputs}))
    (tmp_path / "child.py").write_text(EXPORT_CHILD)
    out = _run_child(tmp_path)
    for name, (model, x) in models.items():
        np.testing.assert_allclose(
            out[name]["log_prob"], model.log_prob(x).numpy(), rtol=1e-5, atol=1e-5
        )
        assert out[name]["sample_shape"] == [5, 2] and out[name]["sample_finite"], name


def test_keras_file_reloads_in_process(tmp_path):
    """The quick form of the fresh-process check above, for one family."""
    model = perturb(build("nsf_coupling"), 9, scale=0.2)
    model.save(tmp_path / "nsf.keras")
    loaded = keras.saving.load_model(tmp_path / "nsf.keras", compile=False)
    x = eight_gaussians(6, seed=10)
    assert type(loaded) is tfp_glow.NeuralSplineFlow
    np.testing.assert_array_equal(loaded.log_prob(x).numpy(), model.log_prob(x).numpy())


# -- the command line ---------------------------------------------------------------------
TINY = [
    "--steps",
    "2",
    "--width",
    "8",
    "--batch-size",
    "32",
    "--steps-per-epoch",
    "2",
    "--warmup-steps",
    "1",
    "--epochs",
    "1",
    "--sample-every",
    "0",
    "--no-export",
]


@pytest.mark.slow
def test_cli_trains_maf_and_samples_from_its_run(tmp_path, capsys):
    run = str(tmp_path / "digits-maf")
    assert cli.main(["train", "--model", "maf", *TINY, "--output", run]) == 0
    config = json.loads(open(os.path.join(run, "config.json")).read())
    assert config["model_class"] == "MAF" and config["model_config"]["num_layers"] == 2
    assert json.loads(open(os.path.join(run, "metrics.json")).read())["test_bits_per_dim"] > 0
    png = str(tmp_path / "s.png")
    assert cli.main(["sample", "--run", run, "--num", "4", "--output", png]) == 0
    assert os.path.getsize(png) > 0
    model, _ = cli.load_run_model(run)
    assert type(model) is tfp_glow.MAF and model.sample(2, seed=0).shape == (2, 8, 8, 1)
    capsys.readouterr()


@pytest.mark.parametrize(
    "argv, expected",
    [
        (
            ["--model", "maf", "--steps", "3", "--width", "8", "--permutation", "shuffle"],
            dict(cls=tfp_glow.MAF, num_layers=3, hidden_units=[8, 8], permutation="shuffle"),
        ),
        (
            ["--model", "iaf", "--steps", "1", "--width", "8"],
            dict(cls=tfp_glow.IAF, num_layers=1, hidden_units=[8, 8]),
        ),
        (
            ["--model", "nsf", "--variant", "coupling"],
            dict(
                cls=tfp_glow.NeuralSplineFlow,
                variant="coupling",
                num_layers=4,
                hidden_units=[48, 48],
            ),
        ),
        pytest.param(
            ["--model", "ffjord", "--trace", "exact", "--width", "8"],
            dict(cls=tfp_glow.FFJORD, trace="exact", hidden_units=[8, 8, 8]),
            marks=pytest.mark.slow,
        ),  # building it solves the ODE once
        (
            ["--model", "nsf", "--dataset", "two_moons", "--width", "8"],
            dict(cls=tfp_glow.NeuralSplineFlow, input_shape=(2,), hidden_units=[8, 8]),
        ),
        (
            ["--model", "resflow", "--dataset", "two_moons", "--steps", "2", "--width", "8"],
            dict(cls=tfp_glow.ResidualFlow, input_shape=(2,), blocks=2, hidden_units=8),
        ),
        (
            ["--model", "resflow", "--steps", "1", "--width", "8"],
            dict(
                cls=tfp_glow.ResidualFlow,
                input_shape=(8, 8, 1),
                blocks=1,
                levels=2,
                hidden_channels=8,
            ),
        ),
    ],
)
def test_cli_flags_build_the_family_models(argv, expected):
    args = cli.build_parser().parse_args(["train", *argv])
    plan = cli.check_train_args(args)
    model = cli._build_model(args, plan.info, plan.arch)
    expected = dict(expected)
    assert type(model) is expected.pop("cls")
    config = model.get_config()
    assert {k: config[k] for k in expected} == expected


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--model", "maf", "--variant", "coupling"], "--variant"),
        (["--model", "nsf", "--trace", "exact"], "--trace"),
        (["--model", "iaf", "--permutation", "conv_lu"], "--permutation"),
        (["--model", "ffjord", "--steps", "3"], "--steps"),
        (["--model", "maf", "--levels", "2"], "--levels"),
        (["--model", "resflow", "--permutation", "reverse"], "--permutation"),
        (["--model", "nsf", "--variant", "spline"], "--variant"),
    ],
)
def test_cli_refuses_flags_that_do_not_apply(argv, flag, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", *argv]) == 2
    err = capsys.readouterr().err
    assert flag in err[err.index("error:") :] and os.listdir(tmp_path) == []
