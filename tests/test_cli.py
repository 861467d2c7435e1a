"""The `tfp-glow` command end to end: train (digits and a mock tfds data set),
resume, sample, evaluate, export, interpolate, and argument errors."""

import json
import logging
import math
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from tfp_glow import cli, data, recipe
from tfp_glow.training import callbacks

# A tiny Glow: one short epoch must take seconds, not minutes.
TINY = [
    "--levels",
    "2",
    "--steps",
    "2",
    "--width",
    "16",
    "--batch-size",
    "32",
    "--steps-per-epoch",
    "3",
    "--warmup-steps",
    "2",
]


def _png(path):
    with Image.open(path) as im:
        im.load()
        return im.size, np.asarray(im)


def _grid_size(rows, cols, tile):
    """`image_grid` size (width, height) with 1-pixel borders."""
    return cols * (tile + 1) + 1, rows * (tile + 1) + 1


def _run_cli(capsys, argv):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """Two epochs on digits, interrupted after the first and resumed by re-running."""
    run = str(tmp_path_factory.mktemp("cli") / "digits-glow")
    argv = ["train", *TINY, "--epochs", "2", "--sample-every", "1", "--output", run]
    original = callbacks.SampleGrid.write
    calls = []

    def interrupt_first_epoch(self, epoch):
        calls.append(epoch)
        path = original(self, epoch)
        if len(calls) == 1:
            raise KeyboardInterrupt  # as Ctrl-C would, after epoch 1 was saved
        return path

    callbacks.SampleGrid.write = interrupt_first_epoch
    try:
        first = cli.main(argv)
        backup_after_interrupt = sorted(os.listdir(os.path.join(run, "backup")))
        # An interrupted run (no model.keras yet) loads from its backup.
        interrupted, _ = recipe.load_run(run)
        x = np.asarray(next(iter(data.digits_dataset("test", 8, shuffle=False))))
        interrupted_log_prob = interrupted.log_prob(x).numpy()
        second = cli.main(argv)
    finally:
        callbacks.SampleGrid.write = original
    return dict(
        run=run,
        codes=(first, second),
        calls=calls,
        backup_after_interrupt=backup_after_interrupt,
        interrupted_log_prob=interrupted_log_prob,
    )


@pytest.mark.slow
def test_train_interrupted_then_resumed_by_rerunning(digits_run):
    assert digits_run["codes"] == (130, 0)
    assert digits_run["backup_after_interrupt"]  # BackupAndRestore state was kept
    # The re-run started at epoch 2: SampleGrid wrote epoch 1, then epoch 2 only.
    assert digits_run["calls"] == [1, 2]
    with open(os.path.join(digits_run["run"], "history.json")) as f:
        history = json.load(f)
    assert history["epoch"] == [0, 1]
    for key in ("loss", "bits_per_dim", "val_loss", "val_bits_per_dim"):
        assert len(history[key]) == 2 and all(math.isfinite(v) for v in history[key])
    # The finished run removes its backup.
    assert not os.path.exists(os.path.join(digits_run["run"], "backup"))
    assert np.all(np.isfinite(digits_run["interrupted_log_prob"]))
    # The finished run wrote its last weights: what model.keras holds.
    model, _ = recipe.load_run(digits_run["run"])
    last = type(model).from_config(model.get_config())
    last.load_weights(os.path.join(digits_run["run"], "checkpoints", "last.weights.h5"))
    x = np.asarray(next(iter(data.digits_dataset("test", 8, shuffle=False))))
    np.testing.assert_array_equal(last.log_prob(x).numpy(), model.log_prob(x).numpy())


def test_train_writes_images_metrics_model_and_savedmodel(digits_run):
    run = digits_run["run"]
    size, pixels = _png(os.path.join(run, "samples.png"))
    # 64 digits, 8x8 upscaled to 32x32, under a caption band (model, bits/dim, T)
    grid = _grid_size(8, 8, 32)
    assert size[0] == grid[0] and size[1] > grid[1] + 10
    assert pixels.dtype == np.uint8 and pixels.std() > 10  # not a blank image
    # One row per temperature, each labelled in a band on its left, under a caption.
    size, _ = _png(os.path.join(run, "temperature_sweep.png"))
    grid = _grid_size(len(cli.TEMPERATURES), 10, 32)
    assert size[0] > grid[0] + 20 and size[1] > grid[1] + 10
    assert _png(os.path.join(run, "samples", "samples_epoch_002.png"))[0] == _grid_size(8, 8, 32)

    with open(os.path.join(run, "metrics.json")) as f:
        metrics = json.load(f)
    with open(os.path.join(run, "config.json")) as f:
        config = json.load(f)
    assert metrics["epochs"] == 2
    for key in ("test_bits_per_dim", "test_nll", "train_bits_per_dim", "best_test_bits_per_dim"):
        assert math.isfinite(metrics[key])
    # 17 levels on 64 pixels: a uniform model scores log2(17) = 4.09 bits/dim;
    # the identity-at-init flow after init is near that, an untrained NaN is not.
    assert 1.0 < metrics["test_bits_per_dim"] < 6.0
    assert config["model_class"] == "Glow" and config["dataset"] == "digits"
    assert config["model_config"]["steps_per_level"] == 2
    assert config["model_config"]["num_bins"] == data.DIGITS_NUM_BINS

    # model.keras and the last checkpoint hold the same trained weights.
    model = keras.saving.load_model(os.path.join(run, "model.keras"), compile=False)
    os.rename(os.path.join(run, "model.keras"), os.path.join(run, "model.keras.bak"))
    try:
        from_checkpoint, _ = cli.load_run_model(run)
    finally:
        os.rename(os.path.join(run, "model.keras.bak"), os.path.join(run, "model.keras"))
    x = next(iter(data.digits_dataset("test", 16, dequantize=False, shuffle=False)))
    lp = model.log_prob(x).numpy()
    np.testing.assert_allclose(from_checkpoint.log_prob(x).numpy(), lp, rtol=1e-5, atol=1e-4)
    assert model.is_initialized

    # The SavedModel scores like the Keras model.
    version_dir = os.path.join(run, "export", "1")
    assert os.path.exists(os.path.join(version_dir, "saved_model.pb"))
    served = tf.saved_model.load(version_dir)
    np.testing.assert_allclose(
        served.signatures["log_prob"](x=x)["log_prob"].numpy(), lp, rtol=1e-5, atol=1e-3
    )


def test_sample_is_seeded_and_writes_the_requested_grid(digits_run, tmp_path, capsys):
    run = digits_run["run"]
    a, b, c = (str(tmp_path / n) for n in ("a.png", "b.png", "c.png"))
    assert (
        _run_cli(
            capsys,
            [
                "sample",
                "--run",
                run,
                "--num",
                "10",
                "--temperature",
                "0.5",
                "--seed",
                "3",
                "--output",
                a,
            ],
        )[0]
        == 0
    )
    assert (
        _run_cli(
            capsys,
            [
                "sample",
                "--model-file",
                os.path.join(run, "model.keras"),
                "--num",
                "10",
                "--temperature",
                "0.5",
                "--seed",
                "3",
                "--output",
                b,
            ],
        )[0]
        == 0
    )
    assert (
        _run_cli(
            capsys,
            [
                "sample",
                "--run",
                run,
                "--num",
                "10",
                "--temperature",
                "0.5",
                "--seed",
                "4",
                "--output",
                c,
            ],
        )[0]
        == 0
    )
    size, pa = _png(a)
    assert size == _grid_size(4, 3, 32)  # ceil(sqrt(10)) = 4 rows
    np.testing.assert_array_equal(_png(b)[1], pa)  # same seed, same samples
    assert np.any(_png(c)[1] != pa)


def test_evaluate_gives_metrics_json_figure_at_every_batch_size(digits_run, capsys):
    run = digits_run["run"]
    with open(os.path.join(run, "metrics.json")) as f:
        metrics = json.load(f)
    with open(os.path.join(run, "history.json")) as f:
        history = json.load(f)
    reports = {}
    for batch in (1, 7, 64, 360):
        code, out, err = _run_cli(
            capsys, ["evaluate", "--run", run, "--json", "--batch-size", str(batch)]
        )
        assert code == 0, err
        reports[batch] = json.loads(out)
    assert {r["split"] for r in reports.values()} == {"test"}
    assert {r["model"] for r in reports.values()} == {"Glow"}
    # Every test example keeps its own dequantization noise (a stateless seed
    # keyed by its index), so batching changes only the float32 rounding of
    # the mean: 360 values near 2.3 bits/dim summed in float32 (< 5e-5).
    for batch, report in reports.items():
        assert report["bits_per_dim"] == pytest.approx(metrics["test_bits_per_dim"], abs=5e-5), (
            batch
        )
        assert report["nll"] == pytest.approx(metrics["test_nll"], abs=5e-5 * 64 * math.log(2))
    # The last epoch's validation figure is the same evaluation of the same model.
    assert history["val_bits_per_dim"][-1] == pytest.approx(metrics["test_bits_per_dim"], abs=5e-5)
    code, out, _ = _run_cli(capsys, ["evaluate", "--run", run])
    assert code == 0 and out.startswith(f"test bits/dim: {metrics['test_bits_per_dim']:.4f}")


def test_export_writes_a_version_and_refuses_to_overwrite(digits_run, tmp_path, capsys):
    base = str(tmp_path / "served")
    code, out, _ = _run_cli(
        capsys, ["export", "--run", digits_run["run"], "--export-dir", base, "--version", "7"]
    )
    assert code == 0 and out.strip() == os.path.join(base, "7")
    assert os.path.exists(os.path.join(base, "7", "saved_model.pb"))
    code, _, err = _run_cli(
        capsys, ["export", "--run", digits_run["run"], "--export-dir", base, "--version", "7"]
    )
    assert code == 2 and "tfp-glow: error:" in err and "already exists" in err


def test_interpolate_writes_pairs_by_steps(digits_run, tmp_path, capsys):
    out_png = str(tmp_path / "interp.png")
    code, _, _ = _run_cli(
        capsys,
        [
            "interpolate",
            "--run",
            digits_run["run"],
            "--output",
            out_png,
            "--steps",
            "5",
            "--pairs",
            "3",
        ],
    )
    assert code == 0
    size, pixels = _png(out_png)
    assert size == _grid_size(3, 5, 32)
    # Columns 0 and 4 decode encoded test images: they are the (bin-centred)
    # test digits themselves, so each matches one of the first 512 test images.
    test = np.asarray(next(iter(data.digits_dataset("test", 512, dequantize=False, shuffle=False))))
    from tfp_glow.images import to_uint8

    test_u8 = to_uint8(test, data.DIGITS_NUM_BINS)[..., 0]
    for row in range(3):
        top = 1 + row * 33
        tile = pixels[top : top + 32 : 4, 1 : 1 + 32 : 4]
        assert np.any(np.all(np.abs(test_u8.astype(int) - tile) <= 16, axis=(1, 2)))


@pytest.mark.slow
def test_train_on_mock_tfds_mnist_class_conditional(tmp_path, capsys):
    run = str(tmp_path / "mnist")
    with tfds.testing.mock_data(num_examples=40):
        code, out, err = _run_cli(
            capsys,
            [
                "train",
                *TINY,
                "--dataset",
                "mnist",
                "--image-size",
                "8",
                "--n-bits",
                "5",
                "--conditional",
                "--epochs",
                "1",
                "--sample-every",
                "0",
                "--no-export",
                "--run",
                run,
            ],
        )  # --run: the same flag as the other commands (--output)
    assert code == 0, err
    assert "test bits/dim" in out
    # The start of training says what the progress bar's numbers mean, with
    # this data's D = 8 x 8 x 1 and 2**5 bins.
    assert (
        "loss = -log p(x) in nats per example (below 0 is fine" in out
        and "bits_per_dim = (loss + 64 ln 32) / (64 ln 2)" in out
        and "uniform = 5.00" in out
        and "nonfinite_steps = steps skipped" in out
    ), out
    with open(os.path.join(run, "config.json")) as f:
        config = json.load(f)
    assert config["dataset_info"] == {"image_shape": [8, 8, 1], "num_bins": 32, "num_classes": 10}
    assert config["model_config"]["num_classes"] == 10
    with open(os.path.join(run, "metrics.json")) as f:
        metrics = json.load(f)
    assert math.isfinite(metrics["test_bits_per_dim"])
    # Captioned grids (above), the sweep's rows labelled on the left.
    (w, h), grid = _png(os.path.join(run, "samples.png"))[0], _grid_size(8, 8, 32)
    assert w == grid[0] and h > grid[1]
    (w, h), grid = _png(os.path.join(run, "temperature_sweep.png"))[0], _grid_size(6, 10, 32)
    assert w > grid[0] and h > grid[1]
    assert not os.path.exists(os.path.join(run, "samples"))  # --sample-every 0
    assert not os.path.exists(os.path.join(run, "export"))  # --no-export
    model = keras.saving.load_model(os.path.join(run, "model.keras"), compile=False)
    assert model.num_classes == 10 and model.num_bins == 32


def test_recipe_train_is_the_command_without_flags(tmp_path):
    """`recipe.train` called from Python (a 2-D NICE, two steps): it writes the
    run directory and returns what it wrote; its arguments go to config.json."""
    import tfp_glow

    keras.utils.set_random_seed(0)
    model = tfp_glow.NICE(
        input_shape=(2,), coupling_layers=2, hidden_units=8, num_hidden_layers=1, num_bins=None
    )
    train = data.make_dataset("two_moons", "train", 64, num_samples=256)
    test = data.make_dataset("two_moons", "test", 64, num_samples=128, shuffle=False)
    run = str(tmp_path / "toy")
    result = recipe.train(
        model,
        train,
        test,
        run_dir=run,
        epochs=1,
        steps_per_epoch=2,
        warmup_steps=1,
        export=False,
        verbose=0,
        extra_metrics={"note": "library call"},
    )
    assert not result.resumed and result.export_path is None
    assert result.paths == recipe.run_paths(run)
    with open(os.path.join(run, "metrics.json")) as f:
        assert json.load(f) == result.metrics
    assert result.metrics["epochs"] == 1 and result.metrics["note"] == "library call"
    assert result.history["epoch"] == [0] and len(result.history["val_loss"]) == 1
    # Points have no bins: bits/dim is the NLL in bits per coordinate.
    assert result.metrics["test_bits_per_dim"] == pytest.approx(
        result.metrics["test_nll"] / (2 * math.log(2)), rel=1e-5
    )
    assert result.metrics["test_bits_per_dim"] == pytest.approx(
        recipe.evaluate(model, test)["bits_per_dim"], abs=1e-6
    )
    loaded, config = recipe.load_run(run)
    assert config["epochs"] == 1 and config["steps_per_epoch"] == 2
    assert config["model_class"] == "NICE" and config["lr_decay"] == "none"
    assert type(loaded).__name__ == "NICE"
    # 2-D points are drawn as 128 x 128 histograms with 2-pixel borders: one
    # panel of samples, one per temperature in the sweep, under a caption band
    # (and the sweep's "T = ..." band above its panels); a caption wider than
    # the one panel widens the picture.
    (w, h) = _png(result.paths["samples"])[0]
    assert w >= 132 and h > 132
    (w, h_sweep) = _png(result.paths["sweep"])[0]
    assert w == len(recipe.TEMPERATURES) * 130 + 2 and h_sweep > h
    assert not os.path.exists(result.paths["export"])


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(epochs=0), ValueError, r"`epochs` must be an int >= 1; received 0"),
        (dict(epochs=2.0), TypeError, r"`epochs` must be an int"),
        (dict(learning_rate=0.0), ValueError, r"`learning_rate` must be a finite number > 0"),
        (dict(warmup_steps=-1), ValueError, r"`warmup_steps` must be an int >= 0"),
        (dict(lr_decay="linear"), ValueError, r"`lr_decay` must be one of \('cosine', 'none'\)"),
        (dict(clipnorm=0), ValueError, r"`clipnorm` must be a finite number > 0"),
        (dict(steps_per_epoch=0), ValueError, r"`steps_per_epoch` must be an int >= 1"),
        (dict(sample_every=-1), ValueError, r"`sample_every` must be an int >= 0"),
        (dict(verbose=3), ValueError, r"`verbose` must be one of \(0, 1, 2\)"),
        (dict(ema_momentum=1.0), ValueError, r"`ema_momentum` must be a number in \(0, 1\)"),
        (dict(ema_momentum="0.9"), TypeError, r"`ema_momentum` must be a number"),
    ],
)
def test_recipe_train_checks_its_arguments_before_writing(kwargs, error, message, tmp_path):
    with pytest.raises(error, match=message):
        recipe.train(None, None, None, run_dir=str(tmp_path / "run"), **kwargs)
    assert not os.path.exists(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match=r"`run_dir` .* is not a directory"):
        recipe.load_run(str(tmp_path / "run"))


# The one table of bad `tfp-glow` arguments: (argv, the flag the message
# must name). Each exits 2 with an "error:" line and writes nothing.
BAD_ARGUMENTS = [
    # train: argparse types
    (["train", "--model", "flowpp"], "--model"),
    (["train", "--epochs", "0"], "--epochs"),
    (["train", "--n-bits", "9", "--dataset", "mnist"], "--n-bits"),
    (["train", "--lr", "-1"], "--lr"),
    (["train", "--lr", "inf"], "--lr"),
    (["train", "--lr", "nan"], "--lr"),
    (["train", "--clipnorm", "0"], "--clipnorm"),
    (["train", "--warmup-steps", "-1"], "--warmup-steps"),
    (["train", "--batch-size", "0"], "--batch-size"),
    (["train", "--image-size", "-4"], "--image-size"),
    (["train", "--steps-per-epoch", "0"], "--steps-per-epoch"),
    (["train", "--strategy", "tpu"], "--strategy"),
    (["train", "--lr-decay", "linear"], "--lr-decay"),
    (["train", "--coupling", "rqs"], "--coupling"),
    (["train", "--dropout", "1"], "--dropout"),
    (["train", "--dropout", "-0.1"], "--dropout"),
    (["train", "--dequantization", "learned"], "--dequantization"),
    (["train", "--weight-decay", "-1"], "--weight-decay"),
    (["train", "--ema", "1"], "--ema"),
    (["train", "--ema", "-0.5"], "--ema"),
    # train: combinations (check_train_args)
    (["train", "--model", "nice", "--dropout", "0.1"], "--dropout"),
    (["train", "--model", "realnvp", "--dequantization", "variational"], "--dequantization"),
    (["train", "--dataset", "two_moons"], "--dataset"),
    (["train", "--model", "nice", "--permutation", "conv"], "--permutation"),
    (["train", "--model", "nice", "--levels", "3"], "--levels"),
    (["train", "--model", "nice", "--steps", "1"], "--steps"),
    (["train", "--model", "realnvp", "--steps", "4"], "--steps"),
    (["train", "--n-bits", "5"], "--n-bits"),
    (["train", "--dataset", "no_such_dataset_xyz"], "--dataset"),
    (["train", "--dataset", "celeb_a", "--conditional"], "--conditional"),
    # sample
    (["sample", "--num", "4"], "--run"),
    (["sample", "--run", "/nonexistent/run"], "--run"),
    (["sample", "--model-file", "/nonexistent/model.keras"], "--output"),
    (["sample", "--model-file", "/nonexistent/model.keras", "--output", "s.png"], "--model-file"),
    (["sample", "--run", ".", "--temperature", "-0.5"], "--temperature"),
    (["sample", "--run", ".", "--num", "0"], "--num"),
    (["sample", "--run", ".", "--label", "-1"], "--label"),
    (["sample", "--run", ".", "--upscale", "0"], "--upscale"),
    # evaluate, export, interpolate
    (["evaluate", "--run", "/nonexistent/run"], "--run"),
    (["evaluate", "--run", ".", "--batch-size", "-3"], "--batch-size"),
    (["export", "--run", ".", "--version", "-1"], "--version"),
    (["export", "--run", "/nonexistent/run"], "--run"),
    (["interpolate", "--run", "/nonexistent/run", "--steps", "0"], "--steps"),
    (["interpolate", "--run", ".", "--pairs", "0"], "--pairs"),
    (["interpolate", "--run", "."], "--run"),
    (["frobnicate"], "frobnicate"),
]


@pytest.mark.parametrize(
    "argv, name", BAD_ARGUMENTS, ids=[" ".join(argv) for argv, _ in BAD_ARGUMENTS]
)
def test_bad_arguments_exit_2_naming_the_flag(argv, name, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a refused run must not leave runs/ behind
    code, out, err = _run_cli(capsys, argv)
    assert code == 2
    assert "error:" in err and "Traceback" not in err
    # Only the message counts: argparse's usage line above it lists every flag.
    assert name in err[err.index("error:") :], err
    assert os.listdir(tmp_path) == []


def test_unprepared_tfds_data_set_speaks_in_flags_without_absl_noise(tmp_path, capsys, caplog):
    empty = str(tmp_path / "empty")
    with caplog.at_level(logging.DEBUG):
        code, _, err = _run_cli(
            capsys,
            [
                "train",
                "--dataset",
                "fashion_mnist",
                "--data-dir",
                empty,
                "--output",
                str(tmp_path / "run"),
            ],
        )
    assert code == 2
    message = err[err.index("tfp-glow: error:") :]
    assert message.startswith(
        f"tfp-glow: error: --dataset fashion_mnist is not prepared in "
        f"--data-dir {empty}: there is no {empty}/fashion_mnist/"
    )
    assert "tfds build fashion_mnist --data_dir DIR" in message
    assert "pass --data-dir DIR" in message
    # The library's wording (keyword arguments) is not what a CLI user types.
    assert "data_dir=" not in err and "download=" not in err
    # tensorflow-datasets' absl warning about the missing folder is not shown.
    assert not [r for r in caplog.records if r.name == "absl"], caplog.records
    assert "absl" not in err
    assert not os.path.exists(tmp_path / "run")


def test_help_exits_0(capsys):
    assert cli.main(["--help"]) == 0
    assert cli.main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--warmup-steps" in out and "--strategy" in out


@pytest.mark.parametrize("model", ["glow", "nice"])
def test_backprop_flag_reaches_the_model_config(model):
    from tfp_glow import cli
    from tfp_glow.cli_args import build_parser

    args = build_parser().parse_args(["train", "--model", model, "--backprop", "reversible"])
    plan = cli.check_train_args(args)
    built = cli._build_model(args, plan.info, plan.arch)
    assert built.backprop == "reversible"
    assert built.get_config()["backprop"] == "reversible"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--backprop", "fast"])


def test_ema_flag_reaches_the_recipe(monkeypatch, tmp_path):
    """`--ema 0.9` is `recipe.train(ema_momentum=0.9)`; left out, the
    recommended 0.99; `--ema 0` turns the averaging off (None)."""
    from tfp_glow import cli

    seen = []

    def fake_train(model, *args, **kwargs):
        seen.append(kwargs["ema_momentum"])
        raise SystemExit(0)  # stop before any training

    monkeypatch.setattr(cli.recipe, "train", fake_train)
    for flags in ([], ["--ema", "0.9"], ["--ema", "0"]):
        with pytest.raises(SystemExit):
            cli.main(["train", "--output", str(tmp_path / "run"), *flags])
    assert seen == [0.99, 0.9, None]


def test_dropout_flag_builds_glow_with_that_rate():
    """Default 0.2 (the library's DEFAULT_DROPOUT) with every backprop mode
    (the masks are a function of the step); --dropout sets it; variational
    dequantization is the default, uniform on request."""
    from tfp_glow import cli, nets
    from tfp_glow.bijectors import keras_layers_of
    from tfp_glow.cli_args import build_parser
    from tfp_glow.variational_dequantization import VariationalDequantizer

    built = {}
    for argv in (
        ["train"],
        ["train", "--dropout", "0.1"],
        ["train", "--dropout", "0"],
        ["train", "--backprop", "reversible"],
        ["train", "--dequantization", "uniform"],
    ):
        args = build_parser().parse_args(argv)
        plan = cli.check_train_args(args)
        model = cli._build_model(args, plan.info, plan.arch)
        config = model.get_config()
        rates = {
            layer.dropout
            for layer in keras_layers_of(model.flow)
            if isinstance(layer, nets.GlowCouplingNet)
        }
        assert rates == {config["dropout"]}
        assert isinstance(model.dequantizer, VariationalDequantizer) == (
            config["dequantization"] == "variational"
        )
        built[" ".join(argv[1:])] = (config["dropout"], config["dequantization"])
    assert built == {
        "": (0.2, "variational"),
        "--dropout 0.1": (0.1, "variational"),
        "--dropout 0": (0.0, "variational"),
        "--backprop reversible": (0.2, "variational"),
        "--dequantization uniform": (0.2, "uniform"),
    }


@pytest.mark.slow
def test_variational_dequantization_run_reports_bound_and_uniform_everywhere(tmp_path, capsys):
    run = str(tmp_path / "vd")
    code, out, err = _run_cli(
        capsys,
        ["train", *TINY, "--epochs", "1", "--output", run, "--dequantization", "variational"],
    )
    assert code == 0, err
    with open(os.path.join(run, "metrics.json")) as f:
        metrics = json.load(f)
    bound, uniform = metrics["test_bits_per_dim"], metrics["test_uniform_bits_per_dim"]
    assert 2.0 < bound < 6.0 and 2.0 < uniform < 6.0 and bound != uniform  # 3 steps in
    assert f"test bits/dim {bound:.4f}" in out
    assert f"uniform dequantization {uniform:.4f}" in out
    code, out, err = _run_cli(capsys, ["evaluate", "--run", run, "--json", "--batch-size", "7"])
    assert code == 0, err
    report = json.loads(out)
    assert report["bits_per_dim"] == pytest.approx(bound, abs=5e-5)
    assert report["uniform_bits_per_dim"] == pytest.approx(uniform, abs=5e-5)
    with open(os.path.join(run, "config.json")) as f:
        assert json.load(f)["model_config"]["dequantization"] == "variational"


@pytest.mark.parametrize("coupling", ["spline", "mol"])
def test_coupling_flag_builds_the_named_coupling(coupling):
    from tfp_glow import cli, models
    from tfp_glow.cli_args import COUPLINGS, build_parser

    assert COUPLINGS == models.COUPLINGS
    args = build_parser().parse_args(["train", "--coupling", coupling])
    plan = cli.check_train_args(args)
    built = cli._build_model(args, plan.info, plan.arch)
    assert built.get_config()["coupling"] == coupling
