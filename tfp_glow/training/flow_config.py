"""The `.keras` config of a `FlowModel` built around a user's own flow.

A TFP bijector has no Keras config, so a `.keras` file cannot rebuild a flow
object. It can rebuild a flow from the *function that builds it*, when Keras
can find that function again in a fresh process: a zero-argument function
registered with `@keras.saving.register_keras_serializable()`:

    @keras.saving.register_keras_serializable(package="my_flows")
    def maf_flow():
        made = tfp_glow.nets.MADE(params=2, event_size=2, hidden_units=[64, 64])
        return tfb.Invert(tfb.MaskedAutoregressiveFlow(made))

    model = tfp_glow.FlowModel(maf_flow, event_shape=(2,), num_bins=None)
    model.save("maf.keras")          # a fresh process that imports my_flows loads it

The weights are saved by Keras as for any model; the builder only has to make
the same variables in the same order. A flow object, a lambda or a closure
cannot be found again: saving refuses with a `TypeError` before any file is
written (`save_weights` and `export_saved_model` work for any flow).
"""

import types

import keras

__all__ = ["FlowConfigMethods", "builder_config", "restore_builder", "unique_layer_names"]


def unique_layer_names(model):
    """Renames layers of `model` that share a name: `name_1`, `name_2`, ... in
    the model's layer order (the first keeps its name).

    Bijectors often share a default name (`act_norm`, `invertible_conv1x1`), so
    their parameter layers do; Keras's legacy `.h5` format writes one group per
    layer name. Per model, so the same flow gets the same names in every
    process; `.keras`, `.weights.h5` and checkpoints do not key on layer names.
    """
    layers = list(model._flatten_layers(include_self=False))
    taken = {layer.name for layer in layers}
    seen = set()
    for layer in layers:
        if layer.name not in seen:
            seen.add(layer.name)
            continue
        k = 1
        while f"{layer.name}_{k}" in taken:
            k += 1
        layer.name = f"{layer.name}_{k}"
        taken.add(layer.name)
        seen.add(layer.name)


def _is_registered(fn):
    name = keras.saving.get_registered_name(fn)
    return keras.saving.get_registered_object(name) is fn


def builder_config(model):
    """`{"flow": ..., "event_shape": ..., ...}` for `model.get_config()`.

    Raises a `TypeError` (saying what to do instead) unless the model was
    built from a registered zero-argument flow builder without a dequantizer.
    """
    builder = model._flow_builder
    if not isinstance(builder, types.FunctionType) or not _is_registered(builder):
        given = (
            "a flow object"
            if builder is None
            else f"the unregistered function {getattr(builder, '__name__', builder)!r}"
        )
        raise TypeError(
            f"This FlowModel was built from {given}, which a .keras file cannot rebuild in "
            "another process. Pass `flow=` a zero-argument function that builds the flow, "
            "decorated with @keras.saving.register_keras_serializable(), or use Glow, "
            "RealNVP or NICE. save_weights/load_weights and "
            "tfp_glow.export_saved_model work for any flow."
        )
    if model.dequantizer is not None:
        raise TypeError(
            "A FlowModel with a custom `dequantizer` has no .keras config; use "
            "save_weights/load_weights, or Glow(dequantization='variational')."
        )
    return {
        "flow": keras.saving.serialize_keras_object(builder),
        "event_shape": list(model.event_shape),
        "num_bins": model.num_bins,
        "num_classes": model.num_classes,
        # `num_classes=K` already means context_shape (K,): one of the two only.
        "context_shape": (
            None
            if model.num_classes is not None or model.context_shape is None
            else list(model.context_shape)
        ),
    }


def restore_builder(config):
    """The config with its serialized flow builder turned back into the function."""
    flow = config.get("flow")
    if isinstance(flow, dict):
        config = dict(config, flow=keras.saving.deserialize_keras_object(flow))
    return config


class FlowConfigMethods:
    """`get_config`, `from_config`, `save` and `export` of a `FlowModel` (mixed
    in before `keras.Model`); subclasses (`Glow`, ...) extend `_base_config()`."""

    def _base_config(self):
        """`keras.Model`'s config plus FlowModel's options (for subclasses)."""
        return {
            **super().get_config(),
            "nonfinite": self.nonfinite,
            "validate_args": self.validate_args,
            "backprop": self.backprop,
            "context_encoder": (
                None
                if self.context_encoder is None
                else keras.saving.serialize_keras_object(self.context_encoder)
            ),
        }

    def get_config(self):
        """The config of a model built from a registered flow builder; a flow
        object has none (`TypeError`)."""
        return {**self._base_config(), **builder_config(self)}

    @classmethod
    def from_config(cls, config):
        return super().from_config(restore_builder(config))

    def save(self, filepath, *args, **kwargs):
        """`keras.Model.save` (`.keras`, or the legacy `.h5`: load that with
        `keras.models.load_model(path, custom_objects={"Glow": tfp_glow.Glow})`);
        a model without a config is refused before any file is written (Keras
        opens the file first, then asks for the config)."""
        self.get_config()
        return super().save(filepath, *args, **kwargs)

    def export(
        self, filepath, format="tf_saved_model", verbose=None, input_signature=None, **kwargs
    ):
        """`keras.Model.export`: the SavedModel's `serve` endpoint is `call`,
        `log p(x)` per example.

        Without `input_signature` it is `[TensorSpec([None, *event_shape])]`
        (a batch of any size), or for a conditional model one `(x, context)` pair,
        the context canonical: `[None, *context_shape]` floats (one-hot labels
        `[None, num_classes]` for a class-conditional model); Keras itself would
        refuse a model whose `call` it never saw. For TF Serving with
        `log_prob`, `bits_per_dim`, `sample`, `encode`, `decode` signatures
        use `tfp_glow.export_saved_model`.
        """
        if input_signature is None:
            data, *context = self._density._signature("data")
            input_signature = [(data, context[0]) if context else data]
        return super().export(
            filepath, format=format, verbose=verbose, input_signature=input_signature, **kwargs
        )
