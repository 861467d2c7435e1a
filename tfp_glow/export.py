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
Conditional models (`model.context_shape` set, `p(x | context)`) take an
extra float `context` input: [N, *context_shape] everywhere, and in `sample`
one [*context_shape] for every sample or [num, *context_shape]. `x`, `z`,
`context` and the float outputs have `input_signature_dtype` (float32).
Served values equal the model's own `log_prob(x, context)`,
`sample(num, temperature, seed, context)` ... (same float32 graph).

A TF Serving REST request (`tensorflow_model_server --rest_api_port=8501
--model_name=flow --model_base_path=<export_dir>`) for a model with
`context_shape=(3,)` and `event_shape=(2,)`:

    POST http://localhost:8501/v1/models/flow:predict
    {"signature_name": "log_prob",
     "inputs": {"x": [[0.1, -0.3], [1.2, 0.4]],
                "context": [[0.5, 1.0, -1.0], [0.0, 0.2, 0.3]]}}
    -> {"outputs": [-2.31, -3.07]}

    {"signature_name": "sample",
     "inputs": {"num": 4, "temperature": 0.7, "seed": 1, "context": [0.5, 1.0, -1.0]}}
    -> {"outputs": [[...], [...], [...], [...]]}            (4 samples, one context)

Every signature checks its inputs at run time, before the flow: a wrong
shape fails with "Shape of tensor x [2,4,4,1] is not compatible with expected
shape [?,8,8,1]" (a context: "Shape of tensor context [2,2] is not compatible
with expected shape [?,3]"), a label outside [0, num_classes) or a negative `num` or
`temperature` with a message naming the argument. A wrong dtype is refused
by the runtime before the graph runs ("expected to be a float tensor but is
a double tensor"); TF Serving's REST API converts JSON numbers to the
signature's dtypes, so it does not meet that case. `load_exported` (`tfp_glow.exported`)
wraps a loaded export with Python-side checks that raise `ValueError`/`TypeError`
naming the expected shape and dtype (a missing or misshaped `context` too).

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
import shutil
import tempfile
import types

import numpy as np
import tensorflow as tf

from tfp_glow.exported import (
    METADATA_FILE,
    SIGNATURE_NAMES,
    ExportedFlow,
    load_exported,
    numeric_versions,
)
from tfp_glow.training.flow_model import FlowModel

__all__ = ["export_saved_model", "load_exported", "ExportedFlow", "SIGNATURE_NAMES"]


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
    """Plain variables plus `tf.function`s with input signatures.

    The condition of a conditional model is one more input of every
    signature: int `label` ids of a class-conditional model, else a float
    `context`; the Python functions below take it under that name.
    """

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
        self._context_shape = density.context_shape
        self._x_spec = tf.TensorSpec(density.spec.signature("data").shape, self._input_dtype,
                                     name="x")
        self._z_spec = tf.TensorSpec(density.spec.signature("latent").shape,
                                     self._input_dtype, name="z")
        sample_specs = [tf.TensorSpec([], tf.int32, name="num"),
                        tf.TensorSpec([], tf.float32, name="temperature"),
                        tf.TensorSpec([], tf.int64, name="seed")]
        if self._context_shape is None:
            # One-argument functions: a signature has no optional inputs.
            self.log_prob = _function(lambda x: self._log_prob(x), [self._x_spec])
            self.bits_per_dim = _function(lambda x: self._bits_per_dim(x), [self._x_spec])
            self.encode = _function(lambda x: self._encode(x), [self._x_spec])
            self.decode = _function(lambda z: self._decode(z), [self._z_spec])
            self.sample = _function(lambda num, temperature, seed: self._sample(
                num, temperature, seed), sample_specs)
            return
        if self._num_classes is not None:
            cond_spec = tf.TensorSpec([None], tf.int32, name="label")
            # Unknown rank: a scalar label (one class for every sample) or [num].
            sample_specs.append(tf.TensorSpec(None, tf.int32, name="label"))
            x_in, z_in = [self._x_spec, cond_spec], [self._z_spec, cond_spec]
            self.log_prob = _function(lambda x, label: self._log_prob(x, label), x_in)
            self.bits_per_dim = _function(lambda x, label: self._bits_per_dim(x, label), x_in)
            self.encode = _function(lambda x, label: self._encode(x, label), x_in)
            self.decode = _function(lambda z, label: self._decode(z, label), z_in)
            self.sample = _function(lambda num, temperature, seed, label: self._sample(
                num, temperature, seed, label), sample_specs)
            return
        cond_spec = tf.TensorSpec([None, *self._context_shape], self._input_dtype,
                                  name="context")
        # Unknown rank: one context for every sample, or [num, *context_shape].
        sample_specs.append(tf.TensorSpec(None, self._input_dtype, name="context"))
        x_in, z_in = [self._x_spec, cond_spec], [self._z_spec, cond_spec]
        self.log_prob = _function(lambda x, context: self._log_prob(x, context), x_in)
        self.bits_per_dim = _function(lambda x, context: self._bits_per_dim(x, context), x_in)
        self.encode = _function(lambda x, context: self._encode(x, context), x_in)
        self.decode = _function(lambda z, context: self._decode(z, context), z_in)
        self.sample = _function(lambda num, temperature, seed, context: self._sample(
            num, temperature, seed, context), sample_specs)

    # -- input checks (run time, inside the graph) ---------------------------
    def _inputs(self, t, spec, condition):
        t = tf.cast(_checked(t, spec), self._model_dtype)
        if condition is None:
            return t, None
        if self._num_classes is None:
            return t, self._batch_context(condition, t)
        label = tf.ensure_shape(condition, [None])
        checks = [tf.debugging.assert_equal(
            tf.shape(label)[0], tf.shape(t)[0],
            message="`label` must have shape [batch] with the batch of the data")]
        checks += self._label_range(label)
        with tf.control_dependencies(checks):
            return t, tf.identity(label)

    def _batch_context(self, context, t):
        """`[batch, *context_shape]` with the data's batch, in the model's dtype."""
        dims = ", ".join(map(str, self._context_shape))
        context = tf.ensure_shape(context, [None, *self._context_shape])
        check = tf.debugging.assert_equal(
            tf.shape(context)[0], tf.shape(t)[0],
            message=f"`context` must have shape [batch, {dims}] with the batch of the data")
        with tf.control_dependencies([check]):
            return tf.cast(context, self._model_dtype)

    def _sample_context(self, context, num):
        """`[*context_shape]` (one for every sample) or `[num, *context_shape]` as
        `[num, *context_shape]`, checked at run time (the input's rank is unknown)."""
        shape = self._context_shape
        dims = ", ".join(map(str, shape))
        expected = f"`context` must have shape [{dims}] or [num, {dims}]"
        rank = tf.rank(context)
        rank_ok = tf.debugging.assert_equal(
            tf.logical_or(tf.equal(rank, len(shape)), tf.equal(rank, len(shape) + 1)), True,
            message=expected)
        with tf.control_dependencies([rank_ok]):
            tail = tf.shape(context)[rank - len(shape):]
        tail_ok = tf.debugging.assert_equal(tail, tf.constant(shape, tf.int32),
                                            message=expected)
        with tf.control_dependencies([tail_ok]):
            batched = tf.reshape(context, [-1, *shape])
        rows_ok = tf.debugging.assert_equal(
            tf.logical_or(tf.equal(rank, len(shape)), tf.equal(tf.shape(batched)[0], num)),
            True, message=f"{expected}: a batched `context` needs one row per sample")
        with tf.control_dependencies([rows_ok]):
            return tf.cast(tf.broadcast_to(batched, [num, *shape]), self._model_dtype)

    def _label_range(self, label):
        # tf.one_hot maps an out-of-range label to zeros: refuse it instead.
        return [tf.debugging.assert_non_negative(label, message="`label` must be >= 0"),
                tf.debugging.assert_less(label, tf.constant(self._num_classes, tf.int32),
                                         message=f"`label` must be < num_classes = "
                                                 f"{self._num_classes}")]

    def _to_output(self, t):
        return tf.cast(t, self._input_dtype)

    # -- signatures (`condition`: the label or context input) ----------------------
    def _log_prob(self, x, condition=None):
        x, condition = self._inputs(x, self._x_spec, condition)
        return {"log_prob": self._to_output(self._held.model.log_prob(x, condition))}

    def _bits_per_dim(self, x, condition=None):
        x, condition = self._inputs(x, self._x_spec, condition)
        return {"bits_per_dim": self._to_output(self._held.model.bits_per_dim(x, condition))}

    def _encode(self, x, condition=None):
        x, condition = self._inputs(x, self._x_spec, condition)
        return {"z": self._to_output(self._held.model.encode(x, condition))}

    def _decode(self, z, condition=None):
        z, condition = self._inputs(z, self._z_spec, condition)
        return {"x": self._to_output(self._held.model.decode(z, condition))}

    def _sample(self, num, temperature, seed, condition=None):
        checks = [
            tf.debugging.assert_non_negative(num, message="`num` must be >= 0"),
            tf.debugging.assert_non_negative(temperature,
                                             message="`temperature` must be >= 0"),
        ]
        if condition is not None and self._num_classes is not None:
            checks.append(tf.debugging.assert_less_equal(
                tf.rank(condition), 1, message="`label` must be a scalar or have shape [num]"))
            checks += self._label_range(condition)
        with tf.control_dependencies(checks):
            num = tf.identity(num)
        if condition is not None:
            condition = (tf.broadcast_to(condition, [num]) if self._num_classes is not None
                         else self._sample_context(condition, num))
        x = self._held.model.sample(num, temperature=temperature, seed=seed, context=condition)
        return {"samples": self._to_output(x)}


def _next_version(export_dir):
    if not tf.io.gfile.isdir(export_dir):
        return 1
    return max(numeric_versions(export_dir), default=0) + 1


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
    # A conditional model (context_shape=(3,)): checked in Python, then served.
    tfp_glow.load_exported(path).sample(4, 0.7, seed=1, context=[0.5, 1.0, -1.0])
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
        "context_shape": None if model.context_shape is None else list(model.context_shape),
        "num_bins": model.num_bins,
        "input_dtype": dtype.name,
        "signatures": list(SIGNATURE_NAMES),
    }
    path = os.path.join(version_dir, METADATA_FILE)
    tf.io.gfile.makedirs(os.path.dirname(path))
    with tf.io.gfile.GFile(path, "w") as f:
        json.dump(meta, f, indent=2, default=str)
