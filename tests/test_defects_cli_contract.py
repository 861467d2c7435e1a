"""Defects found by outside checks: the `tfp-glow` command on damaged or
foreign run directories, the Keras backend check of `import tfp_glow`."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import tfp_glow
from tfp_glow import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(tfp_glow.__file__)))

# One epoch of two batches of a tiny Glow: a real run directory in seconds.
TINY_RUN = [
    "train",
    "--levels",
    "2",
    "--steps",
    "2",
    "--width",
    "16",
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
    "--dequantization",
    "uniform",
    "--verbose",
    "0",
]

# What TensorFlow's C++ runtime prints on import whatever TF_CPP_MIN_LOG_LEVEL
# says (absl logs before its initialisation): not the command's output.
_TF_NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\)"
    r"|[IWEF]\d{4} [\d:.]+ +\d+ \S+:\d+\]"
    r"|To enable the following instructions)"
)


def _env(**extra):
    """The test's environment, importing this checkout's tfp_glow."""
    return {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2", **extra}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run = str(tmp_path_factory.mktemp("cli_contract") / "run")
    assert cli.main([*TINY_RUN, "--output", run]) == 0
    return run


def _listing(root):
    """Every file and folder under `root`: size, mtime and SHA-256 of each file."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for d in dirs:
            out[os.path.relpath(os.path.join(folder, d), root)] = "dir"
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            st = os.stat(path)
            out[os.path.relpath(path, root)] = (st.st_size, st.st_mtime_ns, digest)
    return out


def _config(run):
    return os.path.join(run, "config.json")


def _model_file(run):
    return os.path.join(run, "model.keras")


def _last_weights(run):
    return os.path.join(run, "checkpoints", "last.weights.h5")


def _edit_config(run, edit):
    with open(_config(run)) as f:
        config = json.load(f)
    edit(config)
    with open(_config(run), "w") as f:
        json.dump(config, f)


def _truncate(path, size=1000):
    with open(path, "r+b") as f:
        f.truncate(size)


def _zero(path):
    size = os.path.getsize(path)
    with open(path, "wb") as f:
        f.write(b"\0" * size)


def _checkpoint_only(run):
    """A run whose model.keras is not written yet (interrupted): `load_run`
    builds the model from config.json and reads checkpoints/last.weights.h5."""
    os.remove(_model_file(run))


def _set_model_keras_dtype(run, dtype):
    """Rewrites the config.json inside model.keras with another `dtype`."""
    with zipfile.ZipFile(_model_file(run)) as z:
        members = {name: z.read(name) for name in z.namelist()}
    config = json.loads(members["config.json"])
    config["config"]["dtype"] = dtype
    members["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(_model_file(run), "w") as z:
        for name, data in members.items():
            z.writestr(name, data)


def _malformed_config(run):
    with open(_config(run), "w") as f:
        f.write('{"model_class": "Glow", model_config')


def _unknown_class(run):
    _checkpoint_only(run)  # else model.keras alone would decide the class
    _edit_config(run, lambda c: c.update(model_class="Flow9"))


def _float16_config(run):
    _checkpoint_only(run)
    _edit_config(run, lambda c: c["model_config"].update(dtype="float16"))


# name: (damage, the file the message names, what it says about it)
CASES = {
    "truncated_model_file": (
        lambda r: _truncate(_model_file(r)),
        _model_file,
        ("is not a .keras zip archive (1,000 bytes)", "truncated"),
    ),
    "zeroed_model_file": (
        lambda r: _zero(_model_file(r)),
        _model_file,
        ("is not a .keras zip archive (", "zeroed"),
    ),
    "truncated_checkpoint": (
        lambda r: (_checkpoint_only(r), _truncate(_last_weights(r))),
        _last_weights,
        ("cannot be loaded as the weights of this Glow", "truncated file: eof = 1000"),
    ),
    "zeroed_checkpoint": (
        lambda r: (_checkpoint_only(r), _zero(_last_weights(r))),
        _last_weights,
        ("cannot be loaded as the weights of this Glow", "file signature not found"),
    ),
    "unknown_model_class": (
        _unknown_class,
        _config,
        (
            "names model_class 'Flow9'",
            "['FFJORD', 'Glow', 'IAF', 'MAF', 'NICE', 'NeuralSplineFlow', 'RealNVP', "
            "'ResidualFlow']",
        ),
    ),
    "malformed_config": (_malformed_config, _config, ("is not valid JSON", "line 1 column 25")),
    # Built, this model failed only at its first triangular solve (no float16 kernel).
    "float16_dtype_in_config": (_float16_config, _config, ("gives the model dtype 'float16'",)),
    # Keras' deserialisation raised AttributeError: 'str' object has no attribute ...
    "foreign_dtype_in_model_file": (
        lambda r: _set_model_keras_dtype(r, {"class_name": "NotAPolicy", "config": {}}),
        _model_file,
        ("cannot be loaded as a tfp_glow model (AttributeError",),
    ),
}


@pytest.fixture(scope="module")
def damaged_runs(trained_run, tmp_path_factory):
    """Every case of CASES on its own copy of the run, with `tfp-glow sample`
    (default output: inside the run directory) run on each as a command,
    all started together (most of each is importing TensorFlow)."""
    runs, procs = {}, {}
    for name, (damage, _, _) in CASES.items():
        run = str(tmp_path_factory.mktemp(name) / "run")
        shutil.copytree(trained_run, run)
        damage(run)
        runs[name] = (run, _listing(run))
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "tfp_glow.cli", "sample", "--run", run, "--num", "4"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        results[name] = (*runs[name], proc.returncode, out, err)
    return results


def _assert_one_line_error(damaged_runs, name, capsys):
    """`tfp-glow sample` (a command) and `tfp-glow export` (its `main`, default
    output inside the run) exit 2 with one stderr line naming the damaged
    file and what is wrong, and leave every file of the run as it was."""
    run, before, code, out, err = damaged_runs[name]
    _, path, fragments = CASES[name]
    lines = [line for line in err.splitlines() if line and not _TF_NOISE.match(line)]
    assert "Traceback" not in err, err
    assert len(lines) == 1, lines
    assert (code, out) == (2, "")
    assert cli.main(["export", "--run", run]) == 2
    export_out, export_err = capsys.readouterr()
    assert export_out == ""
    assert export_err == lines[0] + "\n"  # the same one line from both commands
    assert lines[0].startswith(f"tfp-glow: error: --run {run!r}: {path(run)} "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert _listing(run) == before


def test_cli_truncated_model_file_is_one_line_error(damaged_runs, capsys):
    _assert_one_line_error(damaged_runs, "truncated_model_file", capsys)


def test_cli_zeroed_model_file_is_one_line_error(damaged_runs, capsys):
    _assert_one_line_error(damaged_runs, "zeroed_model_file", capsys)


def test_cli_truncated_checkpoint_is_one_line_error(damaged_runs, capsys):
    _assert_one_line_error(damaged_runs, "truncated_checkpoint", capsys)


def test_cli_zeroed_checkpoint_is_one_line_error(damaged_runs, capsys):
    _assert_one_line_error(damaged_runs, "zeroed_checkpoint", capsys)


def test_cli_unknown_model_class_is_one_line_error(damaged_runs, capsys):
    _assert_one_line_error(damaged_runs, "unknown_model_class", capsys)


def test_cli_malformed_config_is_one_line_error_naming_the_file(damaged_runs, capsys):
    _assert_one_line_error(damaged_runs, "malformed_config", capsys)


def test_cli_tampered_dtype_in_config_is_one_line_error(damaged_runs, capsys):
    _assert_one_line_error(damaged_runs, "float16_dtype_in_config", capsys)


def test_cli_tampered_dtype_in_model_file_is_one_line_error(damaged_runs, capsys):
    _assert_one_line_error(damaged_runs, "foreign_dtype_in_model_file", capsys)


def test_cli_config_naming_another_class_than_model_file_is_one_line_error(
    trained_run, tmp_path, capsys
):
    run = str(tmp_path / "run")
    shutil.copytree(trained_run, run)
    _edit_config(run, lambda c: c.update(model_class="NICE"))
    before = _listing(run)
    assert cli.main(["sample", "--run", run]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"tfp-glow: error: --run {run!r}: {_config(run)} names model_class 'NICE' "
        f"but {os.path.join(run, 'model.keras')} holds a Glow.\n"
    )
    assert _listing(run) == before


def _python(code, **env):
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_env(**env), timeout=300
    )


BACKEND_MESSAGE = (
    "ImportError: tfp_glow needs Keras' TensorFlow backend, but the Keras "
    "backend is {!r}: set KERAS_BACKEND=tensorflow (or unset it) before "
    "importing keras."
)


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_import_under_another_keras_backend_is_one_clear_import_error(backend):
    proc = _python("import tfp_glow", KERAS_BACKEND=backend)
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-1] == BACKEND_MESSAGE.format(backend)
    # Refused before keras is imported: no error about jax or torch themselves.
    assert "ModuleNotFoundError" not in proc.stderr
    assert "No module named" not in proc.stderr


def test_import_after_keras_chose_another_backend_is_one_clear_import_error():
    # Every other backend of Keras imports jax (numpy's too), which is not
    # installed: a stand-in keras module says which backend it runs.
    proc = _python(
        "import sys, types; sys.modules['keras'] = types.SimpleNamespace("
        "config=types.SimpleNamespace(backend=lambda: 'jax')); import tfp_glow",
        KERAS_BACKEND="",
    )
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-1] == BACKEND_MESSAGE.format("jax")


@pytest.mark.slow
def test_import_after_keras_chose_tensorflow_ignores_a_later_keras_backend():
    proc = _python(
        "import os, keras; os.environ['KERAS_BACKEND'] = 'jax'; "
        "import tfp_glow; print(keras.config.backend(), tfp_glow.Glow.__name__)",
        KERAS_BACKEND="",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "tensorflow Glow\n"


# ------------------------------------------------------------------ labelled pictures


def _png_array(path):
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im)


def _inked(region):
    """True if `region` has text on it (dark pixels on the white band)."""
    return bool(np.any(np.asarray(region) < 128))


def _band_sizes(labelled, plain):
    """(top band height, left band width) of `labelled` around the grid `plain`."""
    top, left = labelled.shape[0] - plain.shape[0], labelled.shape[1] - plain.shape[1]
    np.testing.assert_array_equal(labelled[top:, left:], plain)  # the grid, untouched
    return top, left


def test_temperature_sweep_png_labels_each_row_and_the_figure(trained_run, tmp_path):
    from tfp_glow import recipe
    from tfp_glow.images import label_grid

    model, _ = recipe.load_run(trained_run)
    with open(os.path.join(trained_run, "metrics.json")) as f:
        metrics = json.load(f)
    title = recipe.figure_title(model, metrics)
    assert title == f"Glow, test {metrics['test_bits_per_dim']:.3f} bits/dim"
    from tfp_glow.images import save_image_grid

    rows = [model.sample(10, temperature=t, seed=0) for t in recipe.TEMPERATURES]
    plain = save_image_grid(
        np.concatenate(rows), str(tmp_path / "plain.png"), 17, rows=len(rows), upscale=4
    )[..., 0]  # the grid alone
    labelled = _png_array(os.path.join(trained_run, "temperature_sweep.png"))  # `train`'s
    top, left = _band_sizes(labelled, plain)
    assert top >= 10 and left >= 20  # a title band and a row-label band
    assert _inked(labelled[:top]) and not _inked(labelled[top:, :left][:1])
    tile = 32  # 8x8 digits enlarged 4 times, 1-pixel borders
    crops = []
    for row in range(len(recipe.TEMPERATURES)):
        y0 = top + 1 + row * (tile + 1)
        band = labelled[y0 : y0 + tile, :left]
        assert _inked(band), row  # "T = ..." beside its own row
        crops.append(band.tobytes())
    assert len(set(crops)) == len(recipe.TEMPERATURES)  # six different labels
    # The same labels through the library function, given as arguments.
    again = label_grid(
        plain, (tile, tile), title=title, row_labels=[f"T = {t:g}" for t in recipe.TEMPERATURES]
    )
    np.testing.assert_array_equal(again, labelled)


def test_samples_png_has_a_caption(trained_run, tmp_path):
    from tfp_glow import recipe

    model, _ = recipe.load_run(trained_run)
    plain = recipe.write_samples(model, str(tmp_path / "plain.png"))[..., 0]
    labelled = _png_array(os.path.join(trained_run, "samples.png"))
    top, left = _band_sizes(labelled, plain)
    assert top >= 10 and left == 0 and _inked(labelled[:top])


def test_label_grid_takes_title_row_and_column_labels():
    from tfp_glow.images import image_grid, label_grid, save_image_grid

    tiles = np.full((6, 10, 12, 3), 128, np.uint8)
    grid = image_grid(tiles, rows=2)  # 2 rows x 3 columns of 10x12 tiles, RGB
    assert label_grid(grid, (10, 12)) is grid  # nothing to draw
    out = label_grid(grid, (10, 12), row_labels=["first", "second"], column_labels=["a", "b", "c"])
    assert out.dtype == np.uint8 and out.shape[2] == 3
    top, left = _band_sizes(out, grid)
    assert _inked(out[:top, left:]) and _inked(out[top:, :left])
    assert not _inked(out[:top, :left])  # the corner stays blank
    # A title wider than the grid widens the picture.
    title = "a title much wider than these three small tiles"
    wide = label_grid(grid, (10, 12), title=title)
    assert wide.shape[1] > grid.shape[1] + 50 and _inked(wide[:, grid.shape[1] :])
    for bad, match in [
        (dict(row_labels=["one"]), r"one label per row \(2\); got 1"),
        (dict(column_labels=list("abcd")), r"one label per column \(3\)"),
    ]:
        with pytest.raises(ValueError, match=match):
            label_grid(grid, (10, 12), **bad)
    with pytest.raises(ValueError, match="row_labels"):
        save_image_grid(np.zeros((4, 8, 8, 1)), "unused.png", 17, rows=2, row_labels=["x"])


def test_points_picture_labels_every_panel(tmp_path):
    from tfp_glow.images import save_points_picture

    rng = np.random.default_rng(0)
    sets = [t * rng.standard_normal((500, 2)) for t in (0.5, 1.0)]
    plain = save_points_picture(sets, str(tmp_path / "plain.png"), bins=32)
    labelled = save_points_picture(
        sets, str(tmp_path / "labelled.png"), bins=32, title="RealNVP", labels=["T = 0.5", "T = 1"]
    )
    np.testing.assert_array_equal(_png_array(tmp_path / "labelled.png"), labelled[..., 0])
    top, left = _band_sizes(labelled, plain)
    assert left == 0 and top >= 20
    for panel in range(2):  # each label above its own panel
        x0 = 2 + panel * 34
        assert _inked(labelled[:top, x0 : x0 + 32])
