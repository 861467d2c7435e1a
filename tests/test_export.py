"""Tests for tfp_glow.export: SavedModels that TF Serving's loaders run.

The expensive parts are shared: two tiny Glows (one class-conditional) are
exported once per module, and one fresh Python process loads both exports
with `tf.saved_model.load`, runs every signature, and runs every signature
again through `saved_model_cli run`'s own code (graph-mode session loader,
the path TF Serving takes). The real `saved_model_cli` executable runs twice
(`show --all`, `run` of `sample`).
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

import tfp_glow
from tfp_glow.export import SIGNATURE_NAMES, export_saved_model, load_exported

TINY = dict(image_shape=(8, 8, 1), levels=2, hidden_channels=16, num_bins=17, seed=0)
LATENT_DIM = 64
BATCHES = (1, 7)
OUTPUT_KEY = {
    "serving_default": "log_prob",
    "log_prob": "log_prob",
    "bits_per_dim": "bits_per_dim",
    "sample": "samples",
    "encode": "z",
    "decode": "x",
}
NUM_CLASSES = 3
SEED, OTHER_SEED, TEMPERATURE = 5, 6, 0.7
ATOL = 1e-5


def _perturbed_glow(steps_per_level, num_classes=None):
    """An initialised tiny Glow whose every weight is moved off its init.

    Couplings and priors start as the identity; random offsets make every
    network and prior change the outputs, so a missing variable would show.
    """
    rng = np.random.RandomState(1)
    model = tfp_glow.Glow(steps_per_level=steps_per_level, num_classes=num_classes, **TINY)
    x = rng.uniform(-0.5, 0.5, (32, 8, 8, 1)).astype(np.float32)
    labels = None if num_classes is None else (np.arange(32) % num_classes).astype(np.int32)
    model.initialize(x, labels)
    for v in model.trainable_variables:
        v.assign(v + 0.05 * rng.normal(size=v.shape).astype(np.float32))
    return model


def _data(b):
    rng = np.random.RandomState(100 + b)
    x = rng.uniform(-0.5, 0.5, (b, 8, 8, 1)).astype(np.float32)
    z = (0.5 * rng.normal(size=(b, LATENT_DIM))).astype(np.float32)
    labels = (np.arange(b) % NUM_CLASSES).astype(np.int32)
    return x, z, labels


class _Compiled:
    """The in-memory model's methods under `tf.function` (dynamic batch).

    This is how Keras runs the model in `fit`/`evaluate` and how any graph
    (the SavedModel included) runs it. Grappler's arithmetic optimizer
    re-associates the sum of the log-dets in a graph, so eager `log_prob`
    differs from every graph by float32 rounding of that sum (up to 2 ulp of
    |log det| ~ 75 here: 1.5e-5 for some weights);
    `test_loaded_matches_eager_model_up_to_float32_rounding` checks eager.
    """

    def __init__(self, model, conditional):
        x = tf.TensorSpec([None, 8, 8, 1], tf.float32)
        z = tf.TensorSpec([None, LATENT_DIM], tf.float32)
        lab = [tf.TensorSpec([None], tf.int32)] if conditional else []

        def fn(f, *specs):
            return tf.function(f, input_signature=list(specs), autograph=False)

        self.log_prob = fn(model.log_prob, x, *lab)
        self.bits_per_dim = fn(model.bits_per_dim, x, *lab)
        self.encode = fn(model.encode, x, *lab)
        self.decode = fn(model.decode, z, *lab)
        self.sample = fn(
            lambda n, t, s, *lab: model.sample(n, t, s, *lab),
            tf.TensorSpec([], tf.int32),
            tf.TensorSpec([], tf.float32),
            tf.TensorSpec([], tf.int64),
            *lab,
        )


def _expected(model, b, conditional):
    """In-memory outputs (compiled, see `_Compiled`) for every signature."""
    x, z, labels = _data(b)
    lab = (labels,) if conditional else ()
    n, t, s = tf.constant(b), tf.constant(TEMPERATURE), tf.constant(SEED, tf.int64)
    out = {
        "log_prob": model.log_prob(x, *lab),
        "bits_per_dim": model.bits_per_dim(x, *lab),
        "encode": model.encode(x, *lab),
        "decode": model.decode(z, *lab),
        # A scalar label 2 in the signature is label 2 for every sample.
        "sample": model.sample(n, t, s, *((tf.fill([b], 2),) if conditional else ())),
    }
    out["serving_default"] = out["log_prob"]
    if conditional:
        out["sample_label_vector"] = model.sample(n, t, s, labels)
    return {k: np.asarray(v) for k, v in out.items()}


# TF Serving loads a SavedModel with C++ `tensorflow::LoadSavedModel`. The
# TF C API wraps it as `TF_LoadSessionFromSavedModel`, exported by the
# library TF's Python bindings already loaded; ctypes calls it, then
# `TF_SessionRun` feeds and fetches the signature's tensors by name.
CPP_LOADER = textwrap.dedent(r"""
    import ctypes, glob, os
    from tensorflow.python.client import pywrap_tf_session
    from tensorflow.python.tools import saved_model_utils

    (_so,) = glob.glob(os.path.join(os.path.dirname(pywrap_tf_session.__file__),
                                    "_pywrap_tf_session*.so"))
    _lib = ctypes.CDLL(_so)  # already loaded by `import tensorflow`: same handle
    _P = ctypes.c_void_p

    class _Output(ctypes.Structure):
        _fields_ = [("oper", _P), ("index", ctypes.c_int)]

    def _fn(name, restype, *argtypes):
        f = getattr(_lib, name)
        f.restype, f.argtypes = restype, list(argtypes)
        return f

    _new_graph = _fn("TF_NewGraph", _P)
    _new_options = _fn("TF_NewSessionOptions", _P)
    _new_status = _fn("TF_NewStatus", _P)
    _code = _fn("TF_GetCode", ctypes.c_int, _P)
    _message = _fn("TF_Message", ctypes.c_char_p, _P)
    _load = _fn("TF_LoadSessionFromSavedModel", _P, _P, _P, ctypes.c_char_p,
                ctypes.POINTER(ctypes.c_char_p), ctypes.c_int, _P, _P, _P)
    _op_by_name = _fn("TF_GraphOperationByName", _P, _P, ctypes.c_char_p)
    _allocate = _fn("TF_AllocateTensor", _P, ctypes.c_int, ctypes.POINTER(ctypes.c_int64),
                    ctypes.c_int, ctypes.c_size_t)
    _data = _fn("TF_TensorData", _P, _P)
    _nbytes = _fn("TF_TensorByteSize", ctypes.c_size_t, _P)
    _ndims = _fn("TF_NumDims", ctypes.c_int, _P)
    _dim = _fn("TF_Dim", ctypes.c_int64, _P, ctypes.c_int)
    _dtype = _fn("TF_TensorType", ctypes.c_int, _P)
    _delete = _fn("TF_DeleteTensor", None, _P)
    _run = _fn("TF_SessionRun", None, _P, _P, ctypes.POINTER(_Output), ctypes.POINTER(_P),
               ctypes.c_int, ctypes.POINTER(_Output), ctypes.POINTER(_P), ctypes.c_int, _P,
               ctypes.c_int, _P, _P)

    def _check(status):
        if _code(status) != 0:
            raise RuntimeError(_message(status).decode())

    class CppSavedModel:
        def __init__(self, path):
            self.meta = saved_model_utils.get_meta_graph_def(path, "serve")
            self.graph = _new_graph()
            status = _new_status()
            tags = (ctypes.c_char_p * 1)(b"serve")
            self.session = _load(_new_options(), None, path.encode(), tags, 1, self.graph,
                                 None, status)
            _check(status)

        def _output(self, tensor_name):
            op, index = tensor_name.split(":")
            oper = _op_by_name(self.graph, op.encode())
            assert oper, tensor_name
            return _Output(oper, int(index))

        def run(self, signature, **inputs):
            sig = self.meta.signature_def[signature]
            keys, out_keys = sorted(inputs), sorted(sig.outputs)
            feeds = (_Output * len(keys))(*[self._output(sig.inputs[k].name) for k in keys])
            values = (_P * len(keys))()
            for i, k in enumerate(keys):
                dtype = sig.inputs[k].dtype
                arr = np.array(inputs[k], order="C", dtype=tf.as_dtype(dtype).as_numpy_dtype)
                dims = (ctypes.c_int64 * arr.ndim)(*arr.shape)
                values[i] = _allocate(dtype, dims, arr.ndim, arr.nbytes)
                ctypes.memmove(_data(values[i]), arr.ctypes.data, arr.nbytes)
            fetches = (_Output * len(out_keys))(
                *[self._output(sig.outputs[k].name) for k in out_keys])
            results = (_P * len(out_keys))()
            status = _new_status()
            _run(self.session, None, feeds, values, len(keys), fetches, results,
                 len(out_keys), None, 0, None, status)
            for t in values:
                _delete(t)
            _check(status)
            out = {}
            for k, t in zip(out_keys, results):
                shape = [_dim(t, d) for d in range(_ndims(t))]
                raw = (ctypes.c_char * _nbytes(t)).from_address(_data(t))
                out[k] = np.frombuffer(bytes(raw), tf.as_dtype(_dtype(t)).as_numpy_dtype
                                       ).reshape(shape)
                _delete(t)
            return out
""")


# The fresh process. It gets a job file naming the exports and the .npy
# inputs, and writes results.npz and cli.json.
CHILD = textwrap.dedent(r"""
    import contextlib, io, json, sys
    import numpy as np
    import tensorflow as tf
    from tensorflow.python.tools import saved_model_cli

    job = json.load(open(sys.argv[1]))
    out, cli = {}, {}

    def sig_inputs(sig, b, conditional):
        d = {k: np.load(job["inputs"][f"{k}_{b}"]) for k in ("x", "z", "labels")}
        if sig == "sample":
            inputs = dict(num=tf.constant(b), temperature=tf.constant(job["temperature"]),
                          seed=tf.constant(job["seed"], tf.int64))
            if conditional:
                inputs["label"] = tf.constant(2)
            return inputs
        inputs = {"z": d["z"]} if sig == "decode" else {"x": d["x"]}
        if conditional:
            inputs["label"] = d["labels"]
        return inputs

    for tag, path, conditional in (("plain", job["plain"], False),
                                   ("cond", job["cond"], True)):
        loaded = tf.saved_model.load(path)
        out[f"{tag}/signature_names"] = np.array(sorted(loaded.signatures))
        for sig in job["signatures"]:
            for b in job["batches"]:
                res = loaded.signatures[sig](**sig_inputs(sig, b, conditional))
                (key,) = res
                out[f"{tag}/{sig}/{b}"] = res[key].numpy()
        if conditional:
            x, labels = np.load(job["inputs"]["x_7"]), np.load(job["inputs"]["labels_7"])
            s = loaded.signatures["sample"](
                num=tf.constant(7), temperature=tf.constant(job["temperature"]),
                seed=tf.constant(job["seed"], tf.int64), label=tf.constant(labels))
            out["cond/sample_label_vector/7"] = s["samples"].numpy()
            continue
        sample = loaded.signatures["sample"]
        def draw(num, t, seed):
            return sample(num=tf.constant(num), temperature=tf.constant(t),
                          seed=tf.constant(seed, tf.int64))["samples"].numpy()
        out["seed_again"] = draw(7, job["temperature"], job["seed"])
        out["seed_other"] = draw(7, job["temperature"], job["other_seed"])
        out["mode"] = draw(3, 0.0, 9)
        out["decode_zeros"] = loaded.signatures["decode"](
            z=tf.zeros([3, job["latent_dim"]]))["x"].numpy()

    # saved_model_cli run, every signature, through the CLI's own argument
    # parser and run() (one process instead of one per signature).
    def smcli(argv):
        args = saved_model_cli.create_parser().parse_args(argv)
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            args.func()
        return buf.getvalue()

    for run in job["cli_runs"]:
        argv = ["run", "--dir", run["dir"], "--tag_set", "serve", "--signature_def",
                run["signature"], "--inputs=" + run.get("inputs", ""),
                "--input_exprs=" + run.get("exprs", ""), "--input_examples=",
                "--outdir", run["outdir"], "--overwrite"]
        try:
            cli[run["name"]] = {"ok": True, "stdout": smcli(argv)}
        except Exception as e:  # recorded; the test decides what is expected
            cli[run["name"]] = {"ok": False, "error": f"{type(e).__name__}: {e}"}

    # The C++ loader TF Serving uses: every signature at batch 7.
    for tag, path, conditional in (("plain", job["plain"], False),
                                   ("cond", job["cond"], True)):
        cpp = CppSavedModel(path)
        for sig in job["signatures"]:
            inputs = {k: np.asarray(v) for k, v in sig_inputs(sig, 7, conditional).items()}
            (value,) = cpp.run(sig, **inputs).values()
            out[f"cpp/{tag}/{sig}"] = value
    try:
        cpp.run("log_prob", x=np.zeros((2, 4, 4, 1), np.float32),
                label=np.zeros(2, np.int32))
        cli["cpp_bad_shape"] = {"ok": True}
    except RuntimeError as e:
        cli["cpp_bad_shape"] = {"ok": False, "error": str(e)}

    np.savez(job["results"], **out)
    json.dump(cli, open(job["cli"], "w"))
""")


def _cli():
    exe = shutil.which("saved_model_cli")
    return [exe] if exe else [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli"]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    plain = _perturbed_glow(steps_per_level=2)
    cond = _perturbed_glow(steps_per_level=1, num_classes=NUM_CLASSES)
    plain_dir = export_saved_model(plain, root / "plain")
    cond_dir = export_saved_model(cond, root / "cond")
    return dict(root=root, plain=plain, cond=cond, plain_dir=plain_dir, cond_dir=cond_dir)


@pytest.fixture(scope="module")
def child(exports):
    """Runs CHILD once in a fresh interpreter; returns its results."""
    root = exports["root"]
    inputs = {}
    for b in BATCHES:
        for name, arr in zip(("x", "z", "labels"), _data(b)):
            path = root / f"{name}_{b}.npy"
            np.save(path, arr)
            inputs[f"{name}_{b}"] = str(path)
    np.save(root / "x_bad.npy", np.zeros((2, 4, 4, 1), np.float32))
    plain_dir, cond_dir = exports["plain_dir"], exports["cond_dir"]
    cli_runs = []
    for sig in SIGNATURE_NAMES:
        run = dict(name=sig, dir=plain_dir, signature=sig, outdir=str(root / f"cli_{sig}"))
        if sig == "sample":
            run["exprs"] = f"num=7;temperature={TEMPERATURE};seed={SEED}"
        else:
            key = "z" if sig == "decode" else "x"
            run["inputs"] = f"{key}={inputs[key + '_7']}"
        cli_runs.append(run)
    cli_runs.append(
        dict(
            name="cond_sample",
            dir=cond_dir,
            signature="sample",
            exprs=f"num=7;temperature={TEMPERATURE};seed={SEED};label=2",
            outdir=str(root / "cli_cond_sample"),
        )
    )
    cli_runs.append(
        dict(
            name="cond_log_prob",
            dir=cond_dir,
            signature="log_prob",
            inputs=f"x={inputs['x_7']};label={inputs['labels_7']}",
            outdir=str(root / "cli_cond_log_prob"),
        )
    )
    cli_runs.append(
        dict(
            name="bad_shape",
            dir=plain_dir,
            signature="log_prob",
            inputs=f"x={root / 'x_bad.npy'}",
            outdir=str(root / "cli_bad"),
        )
    )
    job = dict(
        plain=plain_dir,
        cond=cond_dir,
        signatures=list(SIGNATURE_NAMES),
        batches=list(BATCHES),
        inputs=inputs,
        temperature=TEMPERATURE,
        seed=SEED,
        other_seed=OTHER_SEED,
        latent_dim=LATENT_DIM,
        cli_runs=cli_runs,
        results=str(root / "results.npz"),
        cli=str(root / "cli.json"),
    )
    (root / "job.json").write_text(json.dumps(job))
    (root / "child.py").write_text(CPP_LOADER + CHILD)
    # Three fresh processes at once (they are mostly TF start-up): the job,
    # and the real saved_model_cli executable for `show --all` and `run`.
    commands = {
        "child": [sys.executable, str(root / "child.py"), str(root / "job.json")],
        "show": _cli() + ["show", "--all", "--dir", plain_dir],
        "run_sample": _cli()
        + [
            "run",
            "--dir",
            plain_dir,
            "--tag_set",
            "serve",
            "--signature_def",
            "sample",
            "--input_exprs",
            f"num=7;temperature={TEMPERATURE};seed={SEED}",
            "--outdir",
            str(root / "exe_sample"),
        ],
    }
    procs = {
        k: subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for k, c in commands.items()
    }
    done = {}
    for k, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        done[k] = subprocess.CompletedProcess(commands[k], proc.returncode, stdout, stderr)
    assert done["child"].returncode == 0, done["child"].stderr[-4000:]
    results = dict(np.load(root / "results.npz"))
    cli = json.loads((root / "cli.json").read_text())
    return dict(
        results=results,
        cli=cli,
        runs={r["name"]: r for r in cli_runs},
        show=done["show"],
        run_sample=done["run_sample"],
        exe_sample_dir=root / "exe_sample",
    )


@pytest.fixture(scope="module")
def expected(exports):
    """In-memory outputs, keyed by (tag, batch size)."""
    compiled = {tag: _Compiled(exports[tag], tag == "cond") for tag in ("plain", "cond")}
    return {
        (tag, b): _expected(compiled[tag], b, conditional=(tag == "cond"))
        for tag in ("plain", "cond")
        for b in BATCHES
    }


@pytest.fixture(scope="module")
def loaded(exports):
    """Both exports loaded in this process, through `load_exported`."""
    return {tag: load_exported(exports[f"{tag}_dir"]) for tag in ("plain", "cond")}


def _max_diff(a, b):
    assert np.shape(a) == np.shape(b), (np.shape(a), np.shape(b))
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# ------------------------------------------------------------ fresh process


def test_version_dir_layout(exports):
    for key in ("plain_dir", "cond_dir"):
        path = exports[key]
        assert os.path.basename(path) == "1"
        assert os.path.isfile(os.path.join(path, "saved_model.pb"))
        assert os.path.isfile(os.path.join(path, "variables", "variables.index"))
        # No temporary directory is left beside the version.
        assert sorted(os.listdir(os.path.dirname(path))) == ["1"]
    meta = json.loads(
        open(os.path.join(exports["cond_dir"], "assets.extra", "tfp_glow.json")).read()
    )
    assert meta["model_class"] == "Glow" and meta["num_classes"] == NUM_CLASSES
    assert meta["event_shape"] == [8, 8, 1] and meta["latent_shape"] == [LATENT_DIM]
    assert meta["config"]["steps_per_level"] == 1


def test_fresh_process_load_matches_in_memory_for_every_signature(child, expected):
    res = child["results"]
    assert list(res["plain/signature_names"]) == sorted(SIGNATURE_NAMES)
    worst = {}
    for tag in ("plain", "cond"):
        for b in BATCHES:
            for sig in SIGNATURE_NAMES:
                got = res[f"{tag}/{sig}/{b}"]
                assert got.shape[0] == b
                worst[(tag, sig, b)] = _max_diff(got, expected[(tag, b)][sig])
    assert max(worst.values()) <= ATOL, worst
    # The outputs are not trivially equal to each other: log-densities of
    # different images differ, and sampling is not the identity.
    lp = res["plain/log_prob/7"]
    assert np.ptp(lp) > 0.1 and np.all(np.isfinite(lp))
    np.testing.assert_allclose(
        res["plain/bits_per_dim/7"], (-lp + 64 * np.log(17)) / (64 * np.log(2)), rtol=1e-5
    )


def test_loaded_matches_eager_model_up_to_float32_rounding(exports, child):
    """The eager model too: 1e-5 everywhere but log_prob, whose bound is
    float32 rounding of the log-det sum re-associated in a graph."""
    model = exports["plain"]
    res = child["results"]
    x, z, _ = _data(7)
    eager = {
        "log_prob": model.log_prob(x),
        "bits_per_dim": model.bits_per_dim(x),
        "encode": model.encode(x),
        "decode": model.decode(z),
        "sample": model.sample(7, TEMPERATURE, seed=SEED),
    }
    log_det = eager["log_prob"] - model.distribution.distribution.log_prob(eager["encode"])
    ulp = np.spacing(np.float32(np.abs(log_det).max()))
    for sig, value in eager.items():
        tol = max(ATOL, 4 * ulp) if sig == "log_prob" else ATOL
        assert _max_diff(res[f"plain/{sig}/7"], value) <= tol, (sig, tol)


def test_class_conditional_sample_with_label_after_reload(child, expected):
    res = child["results"]
    _, _, labels = _data(7)
    assert (
        _max_diff(res["cond/sample_label_vector/7"], expected[("cond", 7)]["sample_label_vector"])
        <= ATOL
    )
    # The label matters: class 2 for all differs from labels 0, 1, 2, 0, ...
    assert _max_diff(res["cond/sample/7"], res["cond/sample_label_vector/7"]) > 1e-3
    # Rows whose label is 2 in both draws are equal (same seed, same eps).
    rows = np.where(labels == 2)[0]
    np.testing.assert_allclose(
        res["cond/sample/7"][rows], res["cond/sample_label_vector/7"][rows], atol=1e-6
    )


# --------------------------------------------------------------- sampling


def test_sample_is_reproducible_for_a_seed_across_processes(child, loaded):
    res = child["results"]
    again = res["seed_again"]
    # Same seed, same process, two calls.
    np.testing.assert_array_equal(again, res["plain/sample/7"])
    # Same seed, another process: this one.
    here = (
        loaded["plain"]
        .signatures["sample"](
            num=tf.constant(7),
            temperature=tf.constant(TEMPERATURE),
            seed=tf.constant(SEED, tf.int64),
        )["samples"]
        .numpy()
    )
    np.testing.assert_array_equal(again, here)
    assert _max_diff(res["seed_other"], again) > 0.05


def test_temperature_zero_gives_the_mode(exports, child):
    res = child["results"]
    mode = res["mode"]
    expected = exports["plain"].decode(np.zeros((3, LATENT_DIM), np.float32)).numpy()
    assert _max_diff(mode, expected) <= ATOL
    np.testing.assert_array_equal(mode, res["decode_zeros"])
    np.testing.assert_array_equal(mode[0], mode[2])


# ------------------------------------------------------------ saved_model_cli


def test_saved_model_cli_show_lists_every_signature(child):
    proc = child["show"]
    assert proc.returncode == 0, proc.stderr[-2000:]
    shown = proc.stdout
    for sig in SIGNATURE_NAMES:
        assert f"signature_def['{sig}']" in shown
    assert shown.count("shape: (-1, 8, 8, 1)") >= 5  # x of 4 signatures + decode's x
    assert "shape: (-1, 64)" in shown  # encode's z, decode's z
    for key in ("num", "temperature", "seed", "samples", "bits_per_dim"):
        assert f"['{key}'] tensor_info" in shown


def test_saved_model_cli_run_executes_every_signature(child, expected):
    cli = child["cli"]
    for sig in SIGNATURE_NAMES:
        assert cli[sig]["ok"], cli[sig]
        key = OUTPUT_KEY[sig]
        assert f"Result for output key {key}:" in cli[sig]["stdout"]
        got = np.load(os.path.join(child["runs"][sig]["outdir"], f"{key}.npy"))
        assert _max_diff(got, expected[("plain", 7)][sig]) <= ATOL, sig
    for name, sig in (("cond_sample", "sample"), ("cond_log_prob", "log_prob")):
        assert cli[name]["ok"], cli[name]
        got = np.load(os.path.join(child["runs"][name]["outdir"], f"{OUTPUT_KEY[sig]}.npy"))
        assert _max_diff(got, expected[("cond", 7)][sig]) <= ATOL, name
    # The session feed refuses a wrong shape, naming the expected one.
    assert not cli["bad_shape"]["ok"]
    assert "(None, 8, 8, 1)" in cli["bad_shape"]["error"]


def test_cpp_loader_runs_every_signature(child, expected):
    """TF Serving's own loader (C++ LoadSavedModel) gives the in-memory numbers."""
    res = child["results"]
    for tag in ("plain", "cond"):
        for sig in SIGNATURE_NAMES:
            got = res[f"cpp/{tag}/{sig}"]
            assert _max_diff(got, expected[(tag, 7)][sig]) <= ATOL, (tag, sig)
    # A wrong shape fed to the C++ session is stopped by the in-graph check,
    # which names the expected shape (TF Serving returns this message).
    bad = child["cli"]["cpp_bad_shape"]
    assert not bad["ok"]
    assert "[2,4,4,1] is not compatible with expected shape [?,8,8,1]" in bad["error"]


def test_saved_model_cli_executable_runs_sample(child):
    proc = child["run_sample"]
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Result for output key samples:" in proc.stdout
    samples = np.load(child["exe_sample_dir"] / "samples.npy")
    assert samples.shape == (7, 8, 8, 1)
    # A graph-mode session vs the eager-loaded function: same kernels, same seed.
    np.testing.assert_allclose(samples, child["results"]["plain/sample/7"], rtol=0, atol=1e-6)


# ------------------------------------------------------------- bad inputs


def test_wrong_shape_or_dtype_names_the_expected_shape(exports, loaded, expected):
    flow = loaded["plain"]
    log_prob = flow.signatures["log_prob"]
    # The raw signature checks the shape in the graph, before the flow.
    for bad in ([2, 4, 4, 1], [2, 8, 8], [2, 8, 8, 3]):
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"expected shape \[\?,8,8,1\]"):
            log_prob(x=tf.zeros(bad))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"expected shape \[\?,64\]"):
        flow.signatures["decode"](z=tf.zeros([2, 63]))
    # A raw signature refuses another dtype before running (it names the dtype).
    with pytest.raises(tf.errors.InvalidArgumentError, match="expected to be a float tensor"):
        log_prob(x=tf.zeros([2, 8, 8, 1], tf.float64))
    # The restored tf.function names the full expected spec.
    with pytest.raises(TypeError, match=r"shape=\(None, 8, 8, 1\), dtype=tf.float32"):
        flow.module.log_prob(tf.zeros([2, 8, 8, 1], tf.float64))
    with pytest.raises(tf.errors.InvalidArgumentError, match="`temperature` must be >= 0"):
        flow.signatures["sample"](
            num=tf.constant(2), temperature=tf.constant(-1.0), seed=tf.constant(0, tf.int64)
        )
    # load_exported checks in Python and casts float inputs.
    assert flow.path == exports["plain_dir"]
    assert flow.event_shape == (8, 8, 1) and flow.latent_shape == (LATENT_DIM,)
    with pytest.raises(ValueError, match=r"`x` must have shape \[batch, 8, 8, 1\]"):
        flow.log_prob(np.zeros((2, 4, 4, 1), np.float32))
    with pytest.raises(TypeError, match=r"`x` must have shape \[batch, 8, 8, 1\].*int64"):
        flow.log_prob(np.zeros((2, 8, 8, 1), np.int64))
    with pytest.raises(ValueError, match=r"`z` must have shape \[batch, 64\]"):
        flow.decode(np.zeros((2, 8, 8, 1), np.float32))
    with pytest.raises(ValueError, match="not class-conditional"):
        flow.log_prob(np.zeros((2, 8, 8, 1), np.float32), label=[0, 1])
    x, _, _ = _data(7)
    assert (
        _max_diff(flow.log_prob(x.astype(np.float64)), expected[("plain", 7)]["log_prob"]) <= ATOL
    )


def test_conditional_export_checks_labels(exports, loaded):
    flow = loaded["cond"]
    x = tf.zeros([2, 8, 8, 1])
    with pytest.raises(tf.errors.InvalidArgumentError, match="must be < num_classes = 3"):
        flow.signatures["log_prob"](x=x, label=tf.constant([0, 3]))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"`label` must have shape \[batch\]"):
        flow.signatures["log_prob"](x=x, label=tf.constant([0, 1, 2]))
    assert flow.conditional and flow.num_classes == NUM_CLASSES
    with pytest.raises(ValueError, match="pass `label`"):
        flow.log_prob(x)
    with pytest.raises(ValueError, match=r"`label` must have shape \[2\]"):
        flow.log_prob(x, label=[0, 1, 2])
    with pytest.raises(ValueError, match=r"`label` must be in \[0, 3\)"):
        flow.sample(2, seed=1, label=5)
    a = flow.sample(4, 0.5, seed=3, label=1).numpy()
    b = exports["cond"].sample(4, 0.5, seed=3, labels=tf.constant(1)).numpy()
    assert _max_diff(a, b) <= ATOL


def test_uninitialised_model_is_refused(tmp_path):
    model = tfp_glow.Glow(steps_per_level=1, **TINY)
    with pytest.raises(ValueError, match=r"not initialised.*model\.initialize\(batch\)"):
        export_saved_model(model, tmp_path)
    assert not os.listdir(tmp_path)


def test_bad_arguments(exports, tmp_path):
    model = exports["plain"]
    with pytest.raises(TypeError, match="`model` must be a tfp_glow FlowModel"):
        export_saved_model(object(), tmp_path)
    with pytest.raises(ValueError, match="`version` must be a non-negative int"):
        export_saved_model(model, tmp_path, version=-1)
    with pytest.raises(ValueError, match="`version` must be a non-negative int"):
        export_saved_model(model, tmp_path, version="2")
    with pytest.raises(TypeError, match="`input_signature_dtype` must be a float dtype"):
        export_saved_model(model, tmp_path, input_signature_dtype=tf.int32)
    with pytest.raises(ValueError, match="neither a SavedModel directory"):
        load_exported(tmp_path)
    assert not os.listdir(tmp_path)


# --------------------------------------------------------------- versions


def test_version_numbering_overwrite_and_float64_inputs(tmp_path):
    # A small NICE on 2-D vectors: cheap exports, and vector events work too.
    model = tfp_glow.NICE(
        (2,), coupling_layers=4, hidden_units=16, num_hidden_layers=1, num_bins=None
    )
    x = np.random.RandomState(0).normal(size=(8, 2)).astype(np.float32)
    model.initialize(x)
    base = tmp_path / "export"
    (base / "notes").mkdir(parents=True)  # non-numeric entries are ignored
    (base / "10.txt").write_text("not a version")
    assert export_saved_model(model, base) == str(base / "1")
    assert export_saved_model(model, base) == str(base / "2")
    assert export_saved_model(model, base, version=5, input_signature_dtype=tf.float64) == str(
        base / "5"
    )
    # The float64 export takes and returns float64, with the model's numbers.
    lp64 = tf.saved_model.load(str(base / "5")).signatures["log_prob"](
        x=tf.constant(x, tf.float64)
    )["log_prob"]
    assert lp64.dtype == tf.float64
    np.testing.assert_allclose(lp64.numpy(), model.log_prob(x).numpy(), atol=ATOL)
    with pytest.raises(FileExistsError, match=r"5 already exists.*overwrite=True"):
        export_saved_model(model, base, version=5)
    assert export_saved_model(model, base, version=5, overwrite=True) == str(base / "5")
    assert sorted(os.listdir(base)) == ["1", "10.txt", "2", "5", "notes"]
    # The overwrite replaced the float64 export by a float32 one; the base
    # directory loads its newest version, as TF Serving does.
    newest = load_exported(base)
    assert newest.path == str(base / "5")
    assert newest.signatures["log_prob"].structured_input_signature[1]["x"].dtype == tf.float32
    np.testing.assert_allclose(newest.log_prob(x).numpy(), model.log_prob(x).numpy(), atol=ATOL)
