"""A SavedModel written by `export_saved_model`: its layout, and loading it back.

`load_exported(path)` returns an `ExportedFlow`, whose methods check their
inputs in Python (a `ValueError` naming the expected shape, a `TypeError`
naming the expected dtype) before calling the signature, so a wrong input
never reaches the graph. The signatures themselves are described in
`tfp_glow.export`.
"""

import json
import os
import re

import numpy as np
import tensorflow as tf

__all__ = ["ExportedFlow", "load_exported", "SIGNATURE_NAMES", "METADATA_FILE"]

SIGNATURE_NAMES = ("serving_default", "log_prob", "bits_per_dim", "sample", "encode", "decode")
VERSION_RE = re.compile(r"^\d+$")
# TF Serving reads only `tf_serving_warmup_requests` from assets.extra/ and
# ignores the rest: a safe place for a description of the model.
METADATA_FILE = os.path.join("assets.extra", "tfp_glow.json")


def numeric_versions(path, holding=None):
    """The numeric version subdirectories of `path` (holding the file `holding`)."""
    versions = []
    for name in tf.io.gfile.listdir(path):
        name = name.rstrip("/")
        sub = os.path.join(path, name)
        if VERSION_RE.match(name) and tf.io.gfile.isdir(sub):
            if holding is None or tf.io.gfile.exists(os.path.join(sub, holding)):
                versions.append(int(name))
    return versions


def _version_dir(path):
    """`path` itself if it holds a SavedModel, else its newest numeric version."""
    path = os.fspath(path)
    if tf.io.gfile.exists(os.path.join(path, "saved_model.pb")):
        return path
    if tf.io.gfile.isdir(path):
        versions = numeric_versions(path, holding="saved_model.pb")
        if versions:
            return os.path.join(path, str(max(versions)))
    raise ValueError(
        f"`path` {path!r} is neither a SavedModel directory nor a base directory with "
        "numeric version subdirectories holding one."
    )


def _shape_str(shape):
    return "[" + ", ".join("batch" if d is None else str(d) for d in shape) + "]"


class ExportedFlow:
    """A loaded export whose methods check their inputs before the graph does.

    The raw signatures (`self.signatures[name](**inputs)`) accept exactly the
    exported dtypes and check shapes inside the graph; these methods raise a
    `ValueError` naming the expected shape (or a `TypeError` naming the
    expected dtype) in Python, cast float inputs to the exported dtype, and
    return the signature's single output as a tensor.

    A conditional export takes its condition as every method's second argument:
    a float `context` `[batch, *context_shape]` (in `sample`, one
    `[*context_shape]` for every sample or `[num, *context_shape]`), or for a
    class-conditional export int class ids (`label=`, `[batch]`; a scalar in
    `sample`).

    Attributes: `path` (the version directory), `signatures`, `module` (the
    `tf.saved_model.load` result), `event_shape`, `latent_shape`,
    `conditional`, `context_shape` (None when unconditional; `(num_classes,)`
    for a class-conditional export), `num_classes` (None unless
    class-conditional), `metadata` (the exported JSON).
    """

    def __init__(self, path):
        self.path = _version_dir(path)
        self.module = tf.saved_model.load(self.path)
        self.signatures = self.module.signatures
        missing = [n for n in SIGNATURE_NAMES if n not in self.signatures]
        if missing:
            raise ValueError(
                f"{self.path} was not written by `export_saved_model`: it lacks the "
                f"signatures {missing}."
            )
        meta_path = os.path.join(self.path, METADATA_FILE)
        self.metadata = None
        if tf.io.gfile.exists(meta_path):
            with tf.io.gfile.GFile(meta_path) as f:
                self.metadata = json.load(f)
        self.event_shape = tuple(self._spec("log_prob", "x").shape[1:])
        self.latent_shape = tuple(self._spec("decode", "z").shape[1:])
        inputs = self.signatures["log_prob"].structured_input_signature[1]
        self._kind = "label" if "label" in inputs else "context" if "context" in inputs else None
        self.conditional = self._kind is not None
        self.num_classes = (self.metadata or {}).get("num_classes")
        self.context_shape = None
        if self._kind == "context":
            self.context_shape = tuple(inputs["context"].shape[1:])
        elif self._kind == "label" and self.num_classes is not None:
            self.context_shape = (self.num_classes,)

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

    # -- the condition: `context` (float) or `label` (int class ids) -----------------
    def _condition(self, context, label, batch_size=None, sample=False):
        """The signature's condition input, checked: `{}`, `{"label": ...}` or
        `{"context": ...}`."""
        if context is not None and label is not None:
            raise TypeError("Pass the condition once: as `context` or as `label`, not both.")
        value, name = (label, "label") if label is not None else (context, "context")
        if self._kind is None:
            if value is not None:
                raise ValueError(
                    "This export is unconditional (not class-conditional, no context): do "
                    f"not pass `{name}`."
                )
            return {}
        if self._kind == "label":
            return self._label(value, batch_size, scalar_ok=sample)
        if name == "label":
            raise TypeError(
                "This export takes a float `context` (context_shape="
                f"{self.context_shape}), not int `label`s: pass `context`."
            )
        return self._context(value, batch_size, sample)

    def _context(self, context, batch_size, sample):
        dims = ", ".join(map(str, self.context_shape))
        n = "batch" if batch_size is None else batch_size
        want = f"shape [{dims}] or [{n}, {dims}]" if sample else f"shape [{n}, {dims}]"
        expected = f"{want} (context_shape={self.context_shape}) and a float dtype"
        if context is None:
            raise ValueError(f"This export is conditional: pass `context` of {expected}.")
        t = tf.convert_to_tensor(context)
        if not (t.dtype.is_floating or t.dtype.is_integer):
            raise TypeError(f"`context` must have {expected}; got dtype {t.dtype.name}.")
        shape = tuple(t.shape)
        batched = len(shape) == len(self.context_shape) + 1 and shape[1:] == self.context_shape
        if not (batched and batch_size in (None, shape[0])) and not (
            sample and shape == self.context_shape
        ):
            raise ValueError(f"`context` must have {expected}; got shape {t.shape}.")
        signature = "sample" if sample else "log_prob"
        return {"context": tf.cast(t, self._spec(signature, "context").dtype)}

    def _label(self, label, batch_size=None, scalar_ok=False):
        if label is None:
            raise ValueError("This export is class-conditional: pass `label` (int [batch]).")
        t = tf.convert_to_tensor(label)
        if not t.dtype.is_integer:
            raise TypeError(f"`label` must be integer class ids; got dtype {t.dtype.name}.")
        allowed = (0, 1) if scalar_ok else (1,)
        if t.shape.rank not in allowed or (
            t.shape.rank == 1 and batch_size is not None and t.shape[0] != batch_size
        ):
            n = "batch" if batch_size is None else batch_size
            want = f"a scalar or shape [{n}]" if scalar_ok else f"shape [{n}]"
            raise ValueError(f"`label` must have {want}; got shape {t.shape}.")
        t = tf.cast(t, tf.int32)
        if self.num_classes is not None and t.shape.num_elements():
            lo, hi = int(tf.reduce_min(t)), int(tf.reduce_max(t))
            if lo < 0 or hi >= self.num_classes:
                raise ValueError(
                    f"`label` must be in [0, {self.num_classes}); got values in [{lo}, {hi}]."
                )
        return {"label": t}

    # -- the signatures ------------------------------------------------------------
    def _call_on(self, signature, key, value, context, label, out):
        t = self._float_input(value, signature, key)
        condition = self._condition(context, label, t.shape[0])
        return self.signatures[signature](**{key: t}, **condition)[out]

    def log_prob(self, x, context=None, label=None):
        """`log p(x | context)` per example, `[batch]`."""
        return self._call_on("log_prob", "x", x, context, label, "log_prob")

    def bits_per_dim(self, x, context=None, label=None):
        """`(-log p(x) + D log(num_bins)) / (D ln 2)` per example, `[batch]`."""
        return self._call_on("bits_per_dim", "x", x, context, label, "bits_per_dim")

    def encode(self, x, context=None, label=None):
        """`z = f(x)`, `[batch, *latent_shape]`."""
        return self._call_on("encode", "x", x, context, label, "z")

    def decode(self, z, context=None, label=None):
        """`x = f^-1(z)`, `[batch, *event_shape]`."""
        return self._call_on("decode", "z", z, context, label, "x")

    def sample(self, num, temperature=1.0, seed=0, context=None, label=None):
        """`f^-1(temperature * eps)`, `eps ~ N(0, I)` drawn statelessly from `seed`
        (given one context for every sample, or `[num, *context_shape]`)."""
        for name, value in (("num", num), ("seed", seed)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"`{name}` must be an int; got {value!r}.")
        if num < 0:
            raise ValueError(f"`num` must be >= 0; got {num}.")
        if not isinstance(temperature, (int, float, np.floating, np.integer)) or temperature < 0:
            raise ValueError(f"`temperature` must be a number >= 0; got {temperature!r}.")
        inputs = dict(
            num=tf.constant(num, tf.int32),
            temperature=tf.constant(temperature, tf.float32),
            seed=tf.constant(seed, tf.int64),
        )
        inputs.update(self._condition(context, label, num, sample=True))
        return self.signatures["sample"](**inputs)["samples"]


def load_exported(path: str | os.PathLike) -> "ExportedFlow":
    """Loads an export as an `ExportedFlow` (checked inputs, one output each).

    `path` is a version directory (`.../export/3`) or the base directory, in
    which case the newest numeric version is loaded, as TF Serving would.
    """
    return ExportedFlow(path)
