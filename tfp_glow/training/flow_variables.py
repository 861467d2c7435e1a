"""Every variable a flow holds, as Keras 3 weights of the model around it.

Keras 3 tracks `keras.Variable`s of Keras 3 layers and nothing else. A TFP flow
keeps its state in four other places, and `FlowModel` must see all of them, or
`fit` trains nothing, silently (TFP 0.25 has no Keras 3 support):

* Keras 3 layers held by tfp_glow bijectors (`FlowBijector.keras_layers`);
* Keras 3 layers held by TFP's bijectors as attributes or as their callables
  (`shift_and_log_scale_fn`, `bijector_fn`, `state_time_derivative_fn`: a
  layer, a bound method of one, a `functools.partial`, or a small object
  holding one, such as `tfp_glow.nets.AutoregressiveSplineFn`);
* `tf.Variable`s that `tf.Module` finds (`tfb.Shift(tf.Variable(...))`,
  `tfp.util.TransformedVariable`, `DeferredTensor`, tf_keras layers such as
  `tfb.AutoregressiveNetwork`, TFP's `tfb.Glow` networks, TF1 templates);
* variables that do not exist yet: tf_keras layers, templates and Keras 3
  layers are often built by their first call.

`collect(flow, probe_input)` runs the flow once on `probe_input` (when it holds
any bijector that is not tfp_glow's, whose variables may be lazy), watching
which trainable variables it reads, and returns the Keras layers and the plain
`tf.Variable`s. A variable that the flow reads but no walk reaches (hidden in a
Python closure or a global) is a `TypeError` naming the bijector and the fix:
a model that trains only part of its flow must not start.

The plain `tf.Variable`s become Keras weights through `SharedVariable`, a
`keras.Variable` whose storage *is* the original variable (no copy): the
optimizer's update, `save_weights`, checkpoints and the SavedModel all act on
the variable the bijector reads.
"""

import functools
import types

import keras
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_glow.bijectors import FlowBijector, forward_and_log_det
from tfp_glow.bijectors.base import sub_bijectors

tfb = tfp.bijectors

__all__ = [
    "FlowVariables",
    "SharedVariable",
    "check_trainable",
    "collect",
    "flow_dtype",
    "zeros_batch",
]

# How deep the attribute scan goes into containers and plain objects (a
# callable object holding a network, a partial of one): deep enough for every
# conditioner wiring of TFP's flows, shallow enough never to wander off into
# unrelated state.
_MAX_DEPTH = 3
# Attributes of TFP bijectors that hold no state of the flow. (`_parameters`
# is scanned: with `validate_args=True`, TFP's MAF keeps the user's
# `bijector_fn` only there, wrapped in a closure elsewhere.)
_SKIPPED_ATTRIBUTES = ("_cache", "_graph_parents", "_initial_parameter_control_dependencies")


class SharedVariable(keras.Variable):
    """A `keras.Variable` whose storage is an existing `tf.Variable` (not a copy).

    Reading, assigning, the optimizer's update and checkpoints all act on the
    wrapped variable, so the TFP bijector that reads it sees every change. Its
    `constraint` is the wrapped variable's: TFP's `AutoregressiveNetwork`
    keeps its kernels masked by a constraint that the optimizer must apply
    after every update, or the MAF stops being autoregressive.
    """

    def __init__(self, variable, name=None):
        self._shared = variable
        name = name or variable.name.split(":")[0]
        super().__init__(
            initializer=lambda shape, dtype: None,  # never called: see below
            shape=tuple(variable.shape),
            dtype=variable.dtype.name,
            trainable=variable.trainable,
            name=name.replace("/", "_"),
        )
        self.constraint = getattr(variable, "constraint", None)

    def _initialize_with_initializer(self, initializer):
        del initializer
        self._initialize(self._shared)  # a tf.Variable is adopted as the storage


class FlowVariables(keras.layers.Layer):
    """Holds the `SharedVariable`s of a flow's plain `tf.Variable`s as Keras weights."""

    def __init__(self, variables, **kwargs):
        super().__init__(**kwargs)
        self.shared = []
        for v in variables:
            shared = SharedVariable(v)
            self._track_variable(shared)
            self.shared.append(shared)
        self.built = True

    def call(self, inputs):
        raise TypeError("FlowVariables only holds a flow's variables; it is not called.")


def _is_tfp_glow(bijector):
    return isinstance(bijector, FlowBijector)


def _holds_variables(obj):
    # TF1 `make_template` objects (TFP's `real_nvp_default_template`) are not
    # tf.Modules: their variables live in a variable scope, reachable only
    # through the template's `variables`. Matched by class name: no TF internals.
    return any(
        c.__name__ == "Template" and c.__module__.startswith("tensorflow")
        for c in type(obj).__mro__
    )


def _scan(value, depth, found):
    """Keras 3 layers and bijectors inside an attribute value (bounded depth)."""
    if (
        depth > _MAX_DEPTH
        or value is None
        or isinstance(
            value,
            (
                str,
                bytes,
                int,
                float,
                bool,
                tf.Tensor,
                tf.Variable,
                type,
                types.ModuleType,
                types.FunctionType,
                types.BuiltinFunctionType,
            ),
        )
    ):
        return
    if isinstance(value, (keras.layers.Layer, tfb.Bijector)):
        found.append(value)
    elif _holds_variables(value):
        found.append(value)  # a TF1 template: its variables live in a scope
    elif isinstance(value, types.MethodType):
        _scan(value.__self__, depth, found)
    elif isinstance(value, functools.partial):
        for part in (value.func, *value.args, *value.keywords.values()):
            _scan(part, depth + 1, found)
    elif isinstance(value, (list, tuple, set)):
        for part in value:
            _scan(part, depth + 1, found)
    elif isinstance(value, dict):
        for part in value.values():
            _scan(part, depth + 1, found)
    elif hasattr(value, "__dict__"):
        # A plain object or tf.Module holding a network (a callable such as
        # `nets.AutoregressiveSplineFn`): its attributes.
        for part in vars(value).values():
            _scan(part, depth + 1, found)


def _walk(flow):
    """Every bijector of `flow` (composites and attribute-held ones) and every
    Keras 3 layer held by them, in a fixed order."""
    bijectors, layers, seen = [], [], set()

    def visit(obj):
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, keras.layers.Layer):
            layers.append(obj)
            return
        bijectors.append(obj)  # a bijector, or a template holding variables
        if not isinstance(obj, tfb.Bijector):
            return
        if _is_tfp_glow(obj):
            for layer in obj.keras_layers:
                visit(layer)
        else:
            found = []
            for key in sorted(vars(obj)):
                if key not in _SKIPPED_ATTRIBUTES:
                    _scan(vars(obj)[key], 0, found)
            for item in found:
                visit(item)
        for child in sub_bijectors(obj):
            visit(child)

    visit(flow)
    return bijectors, layers


def _outermost(layers):
    """Drops layers that another layer of the list contains (Keras counts them there)."""
    inner = {id(sub) for layer in layers for sub in layer._flatten_layers(include_self=False)}
    return [layer for layer in layers if id(layer) not in inner]


def _refs(variables):
    refs = set()
    for v in variables:
        refs.add(v.ref())
        for component in getattr(v, "values", ()) or ():  # a distributed variable
            refs.add(component.ref())
    return refs


def _plain_variables(bijectors, keras_owned):
    """The `tf.Variable`s `tf.Module` finds in the bijectors, not held by Keras 3."""
    out, refs = [], set(keras_owned)
    for b in bijectors:
        if _is_tfp_glow(b) or not (isinstance(b, tf.Module) or _holds_variables(b)):
            continue
        for v in b.variables:
            if v.ref() not in refs:
                refs.add(v.ref())
                out.append(v)
    return out


def _gather(flow):
    bijectors, layers = _walk(flow)
    layers = _outermost(layers)
    keras_owned = _refs(w.value for layer in layers for w in layer.weights)
    return bijectors, layers, _plain_variables(bijectors, keras_owned), keras_owned


def _variables_behind(fn):
    """Variables reachable from a Python function's closure cells and globals."""
    if not isinstance(fn, types.FunctionType):
        return set()
    objects = [c.cell_contents for c in fn.__closure__ or ()]
    objects += [fn.__globals__[n] for n in fn.__code__.co_names if n in fn.__globals__]
    refs = set()
    for obj in objects:
        if isinstance(obj, (tf.Variable, keras.Variable)):
            refs |= _refs([obj.value if isinstance(obj, keras.Variable) else obj])
        elif isinstance(obj, keras.layers.Layer):
            refs |= _refs(w.value for w in obj.weights)
        elif isinstance(obj, tf.Module):
            refs |= _refs(obj.variables)
    return refs


def _hidden_error(flow, bijectors, hidden):
    names = sorted({v.name for v in hidden})
    culprit = None
    for b in bijectors:
        if _is_tfp_glow(b) or not isinstance(b, tfb.Bijector):
            continue
        for key, value in sorted(vars(b).items()):
            if callable(value) and _refs(hidden) & _variables_behind(value):
                culprit = f"{type(b).__name__} {b.name!r} (its `{key.lstrip('_')}`)"
                break
        if culprit:
            break
    where = culprit or f"the flow {type(flow).__name__} {flow.name!r}"
    return TypeError(
        f"FlowModel cannot reach {len(names)} trainable variable(s) that {where} reads: "
        f"{names[:6]}{' ...' if len(names) > 6 else ''}. They are hidden in a Python "
        "closure or global, so fit would not train them and save_weights would not save "
        "them. Hand the network to the bijector itself (e.g. "
        "`shift_and_log_scale_fn=made`, not `lambda x: made(x)`), or keep it as an "
        "attribute of the callable you pass (an object with `__call__`)."
    )


def collect(flow, probe_input=None, probe_kwargs=None):
    """`(keras_layers, plain_tf_variables)`: every variable `flow` holds.

    When `flow` holds a bijector that is not tfp_glow's and `probe_input` is
    given, `flow` first runs once on it (building lazily-created variables),
    and every trainable variable read during that run must be reachable, or a
    `TypeError` names the bijector that hides it.
    """
    bijectors, layers, plain, keras_owned = _gather(flow)
    foreign = [b for b in bijectors if not _is_tfp_glow(b)]
    if probe_input is None or not foreign:
        return layers, plain
    # The probe must leave no trace: TFP's own ActNorm (in `tfb.Glow`)
    # initialises itself from whatever batch comes first, and that must be the
    # data, not these zeros. Every variable that exists before it gets its
    # value back (variables the probe creates keep their initial values).
    existing = [w.value for layer in layers for w in layer.weights] + plain
    saved = [tf.identity(v) for v in existing]
    with tf.GradientTape(watch_accessed_variables=True) as tape:
        forward_and_log_det(flow, probe_input, len(probe_input.shape) - 1, **(probe_kwargs or {}))
    for v, value in zip(existing, saved):
        v.assign(value)
    bijectors, layers, plain, keras_owned = _gather(flow)  # the probe may build some
    reachable = keras_owned | _refs(plain)
    hidden = [v for v in tape.watched_variables() if not (_refs([v]) & reachable)]
    if hidden:
        raise _hidden_error(flow, bijectors, hidden)
    return layers, plain


def zeros_batch(density):
    """`(x, kwargs)`: one event of zeros (and a canonical context) for `collect`'s probe.

    A conditional flow's probe carries `conditional_input`, a context of the
    model's `context_shape` (class 0 for a class-conditional one), so networks
    that read it build their variables too."""
    x = tf.zeros([1, *density.event_shape], density.dtype)
    if density.context_shape is None:
        return x, {}
    if density.flow_context_shape != density.context_shape:  # a context encoder's output
        return x, {"conditional_input": tf.zeros([1, *density.flow_context_shape], x.dtype)}
    if density.num_classes is not None:
        return x, {"conditional_input": tf.one_hot([0], density.num_classes, dtype=x.dtype)}
    return x, {"conditional_input": tf.zeros([1, *density.context_shape], x.dtype)}


def flow_dtype(flow, policy, explicit_dtype):
    """The float dtype of the flow: its own, the model's if given, else its variables'."""
    if flow.dtype is not None:
        return tf.as_dtype(flow.dtype)
    if explicit_dtype:
        return tf.as_dtype(policy.variable_dtype)
    layers, plain = collect(flow)  # no probe: the variables that exist now
    for v in [w for layer in layers for w in layer.weights] + plain:
        if tf.as_dtype(v.dtype) in (tf.float32, tf.float64):
            return tf.as_dtype(v.dtype)
    return tf.float32


def check_trainable(model):
    """A `ValueError` before `fit` on a model with nothing to train (it would loop
    over the data and change nothing)."""
    if not model.trainable_weights:
        flow = model.flow
        raise ValueError(
            "This FlowModel has no trainable weights, so `fit` would train nothing: "
            f"its flow {type(flow).__name__} {flow.name!r} holds no trainable variable "
            "(tf.Variable, Keras layer or TFP network). Build the flow from trainable "
            "parts (e.g. tfb.Shift(tf.Variable(0.)), a tfp_glow.nets.MADE conditioner)."
        )
