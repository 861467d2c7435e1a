"""SavedModel export with TF Serving signatures.

`export_saved_model(model, export_dir)` writes `<export_dir>/<version>/`, the
layout `tensorflow_model_server --model_base_path=<export_dir>` watches, with
these signatures (every batch dimension dynamic; `D = prod(event_shape)`):

| signature | inputs | outputs |
|---|---|---|
| `serving_default` | `x` [N, *event_shape] | `log_prob` [N] |
| `log_prob` | `x` [N, *event_shape] | `log_prob` [N] |
| `bits_per_dim` | `x` [N, *event_shape] | `bits_per_dim` [N] |
| `sample` | `num` int32 [], `temperature` float32 [], `seed` int64 [] | `samples` [num, *event] |
| `encode` | `x` [N, *event_shape] | `z` [N, *latent_shape] |
| `decode` | `z` [N, *latent_shape] | `x` [N, *event_shape] |

with `log_prob = log N(f(x); 0, I) + log|det df/dx|`,
`bits_per_dim = (-log_prob + D log(num_bins)) / (D ln 2)` and
`samples = f^-1(temperature * eps)`, `eps ~ N(0, I)` drawn statelessly from
`seed` (the same seed gives the same samples in every process; temperature 0
gives the mode). Class-conditional models (`model.num_classes` set) take an
extra `label` int32 input: [N] everywhere, and a scalar or [num] in `sample`.
`x`, `z` and the float outputs have `input_signature_dtype` (float32).

Every signature checks its inputs at run time, before the flow: a wrong
shape fails with "Shape of tensor x [2,4,4,1] is not compatible with expected
shape [?,8,8,1]", a label outside [0, num_classes) or a negative `num` or
`temperature` with a message naming the argument. A wrong dtype is refused
by the runtime before the graph runs ("expected to be a float tensor but is
a double tensor"); TF Serving's REST API converts JSON numbers to the
signature's dtypes, so it does not meet that case. `load_exported` wraps a
loaded export with Python-side checks that raise `ValueError`/`TypeError`
naming the expected shape and dtype.

Why a `tf.Module` holding `[v.value for v in model.variables]`: the project's
design notes record that `tf.saved_model.save` of Keras 3 objects can load in Python yet
fail in the graph-mode loader that TF Serving and `saved_model_cli run` use
unless the `tf.Variable`s under the Keras variables are tracked. (On TF 2.21
/ Keras 3.15 a quick check saving through the Keras model ran too.) The
module here tracks exactly those `tf.Variable`s and no Keras object, so the
SavedModel holds plain variables and functions, loads without Keras or
tfp_glow, and the tests run every signature under `saved_model_cli run`.
"""

import json
import os
import re
import shutil
import tempfile
import types

import numpy as np
import tensorflow as tf

from tfp_glow.training.flow_model import FlowModel

__all__ = ["export_saved_model", "load_exported", "ExportedFlow", "SIGNATURE_NAMES"]

SIGNATURE_NAMES = ("serving_default", "log_prob", "bits_per_dim", "sample", "encode",
                   "decode")
_VERSION_RE = re.compile(r"^\d+$")
# TF Serving reads only `tf_serving_warmup_requests` from assets.extra/ and
# ignores the rest: a safe place for a description of the model.
METADATA_FILE = os.path.join("assets.extra", "tfp_glow.json")


def _checked(t, spec):
    """`t` with a run-time check of its shape against `spec` (batch free).

    The input signature fixes the static shape, but neither a concrete
    function nor TF Serving checks what is fed at run time: a wrong shape
    would fail deep in the flow ("Incompatible shapes: [2,40] vs. [1,64]").
    `tf.ensure_shape` fails first, naming the expected shape, e.g. "Shape of
    tensor x [2,4,4,1] is not compatible with expected shape [?,8,8,1]". (A
    hand-written `tf.cond` on `tf.rank` does not work here: grappler folds
    the rank to the static one.)
    """
    return tf.ensure_shape(t, spec.shape)


def _function(python_fn, input_signature):
    # No autograph: the flow has no tensor-dependent Python control flow, and
    # converting the whole library on every trace costs seconds per signature.
    return tf.function(python_fn, input_signature=input_signature, autograph=False)


class _ServingModule(tf.Module):
    """Plain variables plus `tf.function`s with input signatures."""

    def __init__(self, model, input_dtype):
        super().__init__(name="tfp_glow_serving")
        # The C++ loader resolves captured variables through the object graph:
        # track the raw tf.Variables (`.value`) under the Keras variables.
        self.model_variables = [v.value for v in model.variables]
        # A plain namespace is not trackable: the Keras objects stay out of
        # the SavedModel, only the variables above and the functions go in.
        # The signatures call the model's density (`FlowDensity`), whose
        # `InputSpec` gives their static shapes.
        density = model.density
        self._held = types.SimpleNamespace(model=density)
        self._input_dtype = tf.as_dtype(input_dtype)
        self._model_dtype = density.dtype
        self._num_classes = density.num_classes
        self._x_spec = tf.TensorSpec(density.spec.signature("data").shape, self._input_dtype,
                                     name="x")
        self._z_spec = tf.TensorSpec(density.spec.signature("latent").shape,
                                     self._input_dtype, name="z")
        label_spec = tf.TensorSpec([None], tf.int32, name="label")
        sample_specs = [tf.TensorSpec([], tf.int32, name="num"),
                        tf.TensorSpec([], tf.float32, name="temperature"),
                        tf.TensorSpec([], tf.int64, name="seed")]
        if model.num_classes is not None:
            # Unknown rank: a scalar label (one class for every sample) or [num].
            sample_specs.append(tf.TensorSpec(None, tf.int32, name="label"))
            x_in, z_in = [self._x_spec, label_spec], [self._z_spec, label_spec]
            self.log_prob = _function(self._log_prob, x_in)
            self.bits_per_dim = _function(self._bits_per_dim, x_in)
            self.encode = _function(self._encode, x_in)
            self.decode = _function(self._decode, z_in)
        else:
            # One-argument functions: a signature has no optional inputs.
            self.log_prob = _function(lambda x: self._log_prob(x), [self._x_spec])
            self.bits_per_dim = _function(lambda x: self._bits_per_dim(x), [self._x_spec])
            self.encode = _function(lambda x: self._encode(x), [self._x_spec])
            self.decode = _function(lambda z: self._decode(z), [self._z_spec])
        self.sample = _function(self._sample, sample_specs)

    # -- input checks (run time, inside the graph) ---------------------------
    def _inputs(self, t, spec, label):
        t = tf.cast(_checked(t, spec), self._model_dtype)
        if label is None:
            return t, None
        label = tf.ensure_shape(label, [None])
        checks = [tf.debugging.assert_equal(
            tf.shape(label)[0], tf.shape(t)[0],
            message="`label` must have shape [batch] with the batch of the data")]
        checks += self._label_range(label)
        with tf.control_dependencies(checks):
            return t, tf.identity(label)

    def _label_range(self, label):
        # tf.one_hot maps an out-of-range label to zeros: refuse it instead.
        return [tf.debugging.assert_non_negative(label, message="`label` must be >= 0"),
                tf.debugging.assert_less(label, tf.constant(self._num_classes, tf.int32),
                                         message=f"`label` must be < num_classes = "
                                                 f"{self._num_classes}")]

    def _to_output(self, t):
        return tf.cast(t, self._input_dtype)

    # -- signatures -------------------------------------------------------------
    def _log_prob(self, x, label=None):
        x, label = self._inputs(x, self._x_spec, label)
        return {"log_prob": self._to_output(self._held.model.log_prob(x, label))}

    def _bits_per_dim(self, x, label=None):
        x, label = self._inputs(x, self._x_spec, label)
        return {"bits_per_dim": self._to_output(self._held.model.bits_per_dim(x, label))}

    def _encode(self, x, label=None):
        x, label = self._inputs(x, self._x_spec, label)
        return {"z": self._to_output(self._held.model.encode(x, label))}

    def _decode(self, z, label=None):
        z, label = self._inputs(z, self._z_spec, label)
        return {"x": self._to_output(self._held.model.decode(z, label))}

    def _sample(self, num, temperature, seed, label=None):
        checks = [
            tf.debugging.assert_non_negative(num, message="`num` must be >= 0"),
            tf.debugging.assert_non_negative(temperature,
                                             message="`temperature` must be >= 0"),
        ]
        if label is not None:
            checks.append(tf.debugging.assert_less_equal(
                tf.rank(label), 1, message="`label` must be a scalar or have shape [num]"))
            checks += self._label_range(label)
        with tf.control_dependencies(checks):
            num = tf.identity(num)
        if label is not None:
            label = tf.broadcast_to(label, [num])
        x = self._held.model.sample(num, temperature=temperature, seed=seed, labels=label)
        return {"samples": self._to_output(x)}


def _next_version(export_dir):
    if not tf.io.gfile.isdir(export_dir):
        return 1
    versions = [int(name.rstrip("/")) for name in tf.io.gfile.listdir(export_dir)
                if _VERSION_RE.match(name.rstrip("/"))
                and tf.io.gfile.isdir(os.path.join(export_dir, name.rstrip("/")))]
    return max(versions, default=0) + 1


def export_saved_model(model: FlowModel, export_dir: str | os.PathLike,
                       version: int | None = None,
                       input_signature_dtype: tf.DType = tf.float32,
                       overwrite: bool = False) -> str:
    """Writes `model` as a TF Serving SavedModel at `<export_dir>/<version>/`.

    Args:
      model: an initialised `FlowModel` (`Glow`, `RealNVP`, `NICE`, ...).
      export_dir: the model base path TF Serving watches (a local directory:
        the version is renamed into place with `os.replace`).
      version: a non-negative int; `None` takes one more than the largest
        numeric subdirectory of `export_dir` (1 for a new directory).
      input_signature_dtype: float dtype of `x`/`z` inputs and of the float
        outputs (the model computes in its own dtype; values are cast).
      overwrite: replace an existing `<export_dir>/<version>/`.

    Returns:
      The path of the version directory.

    The version is written to a hidden temporary directory beside it and
    renamed into place, so a server polling `export_dir` never loads a
    half-written version. See the module docstring for the signatures.

    #### Examples

    ```python
    path = tfp_glow.export_saved_model(model, "/models/glow")   # /models/glow/1
    served = tf.saved_model.load(path)
    served.signatures["sample"](num=tf.constant(4), temperature=tf.constant(0.7),
                                seed=tf.constant(1, tf.int64))["samples"]
    ```
    """
    if not isinstance(model, FlowModel):
        raise TypeError(f"`model` must be a tfp_glow FlowModel; got {type(model).__name__}.")
    if not model.is_initialized:
        raise ValueError(
            "`model` is not initialised: its ActNorm layers still hold their "
            "placeholder values. Call `model.initialize(batch)` (or train it with "
            "`fit`, or load trained weights) before exporting.")
    dtype = tf.as_dtype(input_signature_dtype)
    if not dtype.is_floating:
        raise TypeError(
            f"`input_signature_dtype` must be a float dtype; got {dtype.name}.")
    export_dir = os.fspath(export_dir)
    if version is None:
        version = _next_version(export_dir)
    elif (isinstance(version, bool) or not isinstance(version, (int, np.integer))
          or version < 0):
        raise ValueError(f"`version` must be a non-negative int or None; got {version!r}.")
    version_dir = os.path.join(export_dir, str(int(version)))
    if tf.io.gfile.exists(version_dir) and not overwrite:
        raise FileExistsError(
            f"Version directory {version_dir} already exists; pass `version=None` for "
            "the next version, another `version`, or `overwrite=True` to replace it.")

    module = _ServingModule(model, dtype)
    # Pass the tf.functions, not concrete functions traced here: `save` traces
    # inside its own save context, so tracing first would trace every
    # function twice.
    signatures = {"serving_default": module.log_prob, "log_prob": module.log_prob,
                  "bits_per_dim": module.bits_per_dim, "sample": module.sample,
                  "encode": module.encode, "decode": module.decode}
    tf.io.gfile.makedirs(export_dir)
    tmp_dir = tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=export_dir)
    try:
        tf.saved_model.save(module, tmp_dir, signatures=signatures)
        _write_metadata(model, dtype, tmp_dir)
        if tf.io.gfile.exists(version_dir):
            shutil.rmtree(version_dir)
        os.replace(tmp_dir, version_dir)
    finally:
        if os.path.isdir(tmp_dir):
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return version_dir


def _write_metadata(model, dtype, version_dir):
    try:
        config = model.get_config()
    except (NotImplementedError, TypeError):  # a FlowModel around a flow object: no config
        config = None
    from tfp_glow import __version__
    meta = {
        "tfp_glow_version": __version__,
        "model_class": type(model).__name__,
        "config": config,
        "event_shape": list(model.event_shape),
        "latent_shape": list(model.latent_shape),
        "num_classes": model.num_classes,
        "num_bins": model.num_bins,
        "input_dtype": dtype.name,
        "signatures": list(SIGNATURE_NAMES),
    }
    path = os.path.join(version_dir, METADATA_FILE)
    tf.io.gfile.makedirs(os.path.dirname(path))
    with tf.io.gfile.GFile(path, "w") as f:
        json.dump(meta, f, indent=2, default=str)


def _version_dir(path):
    """`path` itself if it holds a SavedModel, else its newest numeric version."""
    path = os.fspath(path)
    if tf.io.gfile.exists(os.path.join(path, "saved_model.pb")):
        return path
    if tf.io.gfile.isdir(path):
        versions = [int(n.rstrip("/")) for n in tf.io.gfile.listdir(path)
                    if _VERSION_RE.match(n.rstrip("/"))
                    and tf.io.gfile.exists(os.path.join(path, n.rstrip("/"), "saved_model.pb"))]
        if versions:
            return os.path.join(path, str(max(versions)))
    raise ValueError(
        f"`path` {path!r} is neither a SavedModel directory nor a base directory with "
        "numeric version subdirectories holding one.")


def _shape_str(shape):
    return "[" + ", ".join("batch" if d is None else str(d) for d in shape) + "]"


class ExportedFlow:
    """A loaded export whose methods check their inputs before the graph does.

    The raw signatures (`self.signatures[name](**inputs)`) accept exactly the
    exported dtypes and check shapes inside the graph; these methods raise a
    `ValueError` naming the expected shape (or a `TypeError` naming the
    expected dtype) in Python, cast float inputs to the exported dtype, and
    return the signature's single output as a tensor.

    Attributes: `path` (the version directory), `signatures`, `module` (the
    `tf.saved_model.load` result), `event_shape`, `latent_shape`,
    `num_classes` (None when unconditional), `metadata` (the exported JSON).
    """

    def __init__(self, path):
        self.path = _version_dir(path)
        self.module = tf.saved_model.load(self.path)
        self.signatures = self.module.signatures
        missing = [n for n in SIGNATURE_NAMES if n not in self.signatures]
        if missing:
            raise ValueError(
                f"{self.path} was not written by `export_saved_model`: it lacks the "
                f"signatures {missing}.")
        meta_path = os.path.join(self.path, METADATA_FILE)
        self.metadata = None
        if tf.io.gfile.exists(meta_path):
            with tf.io.gfile.GFile(meta_path) as f:
                self.metadata = json.load(f)
        x_spec = self._spec("log_prob", "x")
        z_spec = self._spec("decode", "z")
        self.event_shape = tuple(x_spec.shape[1:])
        self.latent_shape = tuple(z_spec.shape[1:])
        self.conditional = "label" in self.signatures["log_prob"].structured_input_signature[1]
        self.num_classes = (self.metadata or {}).get("num_classes")

    def _spec(self, signature, key):
        return self.signatures[signature].structured_input_signature[1][key]

    def _float_input(self, value, signature, key):
        spec = self._spec(signature, key)
        t = tf.convert_to_tensor(value)
        expected = f"shape {_shape_str(spec.shape)} and a float dtype ({spec.dtype.name})"
        if not t.dtype.is_floating:
            raise TypeError(f"`{key}` must have {expected}; got dtype {t.dtype.name}.")
        if not spec.shape.is_compatible_with(t.shape):
            raise ValueError(f"`{key}` must have {expected}; got shape {t.shape}.")
        return tf.cast(t, spec.dtype)

    def _label(self, label, batch_size=None, scalar_ok=False):
        if not self.conditional:
            if label is not None:
                raise ValueError("This export is not class-conditional: do not pass `label`.")
            return {}
        if label is None:
            raise ValueError("This export is class-conditional: pass `label` (int [batch]).")
        t = tf.convert_to_tensor(label)
        if not t.dtype.is_integer:
            raise TypeError(f"`label` must be integer class ids; got dtype {t.dtype.name}.")
        allowed = (0, 1) if scalar_ok else (1,)
        if t.shape.rank not in allowed or (
                t.shape.rank == 1 and batch_size is not None and t.shape[0] != batch_size):
            n = "batch" if batch_size is None else batch_size
            want = f"a scalar or shape [{n}]" if scalar_ok else f"shape [{n}]"
            raise ValueError(f"`label` must have {want}; got shape {t.shape}.")
        t = tf.cast(t, tf.int32)
        if self.num_classes is not None and t.shape.num_elements():
            lo, hi = int(tf.reduce_min(t)), int(tf.reduce_max(t))
            if lo < 0 or hi >= self.num_classes:
                raise ValueError(
                    f"`label` must be in [0, {self.num_classes}); got values in [{lo}, {hi}].")
        return {"label": t}

    def _call_on(self, signature, key, value, label, out):
        t = self._float_input(value, signature, key)
        result = self.signatures[signature](**{key: t}, **self._label(label, t.shape[0]))
        return result[out]

    def log_prob(self, x, label=None):
        """`log p(x)` per example, `[batch]`."""
        return self._call_on("log_prob", "x", x, label, "log_prob")

    def bits_per_dim(self, x, label=None):
        """`(-log p(x) + D log(num_bins)) / (D ln 2)` per example, `[batch]`."""
        return self._call_on("bits_per_dim", "x", x, label, "bits_per_dim")

    def encode(self, x, label=None):
        """`z = f(x)`, `[batch, *latent_shape]`."""
        return self._call_on("encode", "x", x, label, "z")

    def decode(self, z, label=None):
        """`x = f^-1(z)`, `[batch, *event_shape]`."""
        return self._call_on("decode", "z", z, label, "x")

    def sample(self, num, temperature=1.0, seed=0, label=None):
        """`f^-1(temperature * eps)`, `eps ~ N(0, I)` drawn statelessly from `seed`."""
        for name, value in (("num", num), ("seed", seed)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"`{name}` must be an int; got {value!r}.")
        if num < 0:
            raise ValueError(f"`num` must be >= 0; got {num}.")
        if not isinstance(temperature, (int, float, np.floating, np.integer)) or temperature < 0:
            raise ValueError(f"`temperature` must be a number >= 0; got {temperature!r}.")
        inputs = dict(num=tf.constant(num, tf.int32),
                      temperature=tf.constant(temperature, tf.float32),
                      seed=tf.constant(seed, tf.int64))
        inputs.update(self._label(label, num, scalar_ok=True))
        return self.signatures["sample"](**inputs)["samples"]


def load_exported(path: str | os.PathLike) -> "ExportedFlow":
    """Loads an export as an `ExportedFlow` (checked inputs, one output each).

    `path` is a version directory (`.../export/3`) or the base directory, in
    which case the newest numeric version is loaded, as TF Serving would.
    """
    return ExportedFlow(path)
