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

import pytest

import tfp_glow
from tfp_glow import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(tfp_glow.__file__)))

# One epoch of two batches of a tiny Glow: a real run directory in seconds.
TINY_RUN = ["train", "--levels", "2", "--steps", "2", "--width", "16", "--batch-size", "32",
            "--steps-per-epoch", "2", "--warmup-steps", "1", "--epochs", "1",
            "--sample-every", "0", "--no-export", "--dequantization", "uniform",
            "--verbose", "0"]

# What TensorFlow's C++ runtime prints on import whatever TF_CPP_MIN_LOG_LEVEL
# says (absl logs before its initialisation): not the command's output.
_TF_NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\)"
    r"|[IWEF]\d{4} [\d:.]+ +\d+ \S+:\d+\]"
    r"|To enable the following instructions)")


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
    "truncated_model_file": (lambda r: _truncate(_model_file(r)), _model_file,
                             ("is not a .keras zip archive (1,000 bytes)", "truncated")),
    "zeroed_model_file": (lambda r: _zero(_model_file(r)), _model_file,
                          ("is not a .keras zip archive (", "zeroed")),
    "truncated_checkpoint": (lambda r: (_checkpoint_only(r), _truncate(_last_weights(r))),
                             _last_weights, ("cannot be loaded as the weights of this Glow",
                                             "truncated file: eof = 1000")),
    "zeroed_checkpoint": (lambda r: (_checkpoint_only(r), _zero(_last_weights(r))),
                          _last_weights, ("cannot be loaded as the weights of this Glow",
                                          "file signature not found")),
    "unknown_model_class": (_unknown_class, _config,
                            ("names model_class 'Flow9'", "['Glow', 'NICE', 'RealNVP']")),
    "malformed_config": (_malformed_config, _config,
                         ("is not valid JSON", "line 1 column 25")),
    # Built, this model failed only at its first triangular solve (no float16 kernel).
    "float16_dtype_in_config": (_float16_config, _config,
                                ("gives the model dtype 'float16'",)),
    # Keras' deserialisation raised AttributeError: 'str' object has no attribute ...
    "foreign_dtype_in_model_file": (
        lambda r: _set_model_keras_dtype(r, {"class_name": "NotAPolicy", "config": {}}),
        _model_file, ("cannot be loaded as a tfp_glow model (AttributeError",)),
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
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
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
        trained_run, tmp_path, capsys):
    run = str(tmp_path / "run")
    shutil.copytree(trained_run, run)
    _edit_config(run, lambda c: c.update(model_class="NICE"))
    before = _listing(run)
    assert cli.main(["sample", "--run", run]) == 2
    err = capsys.readouterr().err
    assert err == (f"tfp-glow: error: --run {run!r}: {_config(run)} names model_class 'NICE' "
                   f"but {os.path.join(run, 'model.keras')} holds a Glow.\n")
    assert _listing(run) == before


def _python(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=_env(**env), timeout=300)


BACKEND_MESSAGE = ("ImportError: tfp_glow needs Keras' TensorFlow backend, but the Keras "
                   "backend is {!r}: set KERAS_BACKEND=tensorflow (or unset it) before "
                   "importing keras.")


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
    proc = _python("import sys, types; sys.modules['keras'] = types.SimpleNamespace("
                   "config=types.SimpleNamespace(backend=lambda: 'jax')); import tfp_glow",
                   KERAS_BACKEND="")
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-1] == BACKEND_MESSAGE.format("jax")


def test_import_after_keras_chose_tensorflow_ignores_a_later_keras_backend():
    proc = _python("import os, keras; os.environ['KERAS_BACKEND'] = 'jax'; "
                   "import tfp_glow; print(keras.config.backend(), tfp_glow.Glow.__name__)",
                   KERAS_BACKEND="")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "tensorflow Glow\n"
