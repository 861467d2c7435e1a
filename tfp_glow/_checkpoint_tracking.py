"""`ListedSublayers`: Keras 3 sublayers kept in lists, visible to `tf.train.Checkpoint`.

Keras 3 tracks a layer's sublayers for its own saving (`.keras`,
`.weights.h5`, `BackupAndRestore`) wherever they are held, but the
TensorFlow object graph that `tf.train.Checkpoint` walks only follows a
Keras layer's direct attributes: a `Conv2D` held in `self.step_nets = [...]`
is saved by `model.save_weights` and silently left out of
`tf.train.Checkpoint(model=m)` (measured: the variational dequantizer's
networks restored as freshly initialised weights). The flow's own layers do
not need this: its bijectors (`tf.Module`s) list every Keras layer they own.
A layer that holds sublayers in lists names those attributes in
`LISTED_SUBLAYERS`; this mixin adds each listed layer to the checkpoint graph
as `<attribute>_<index>`. Keras' own file formats are unchanged.
"""

__all__ = ["ListedSublayers"]


def _flat(value):
    if isinstance(value, (list, tuple)):
        for item in value:
            yield from _flat(item)
    else:
        yield value


class ListedSublayers:
    """Mixin (before `keras.layers.Layer`): see the module docstring."""

    LISTED_SUBLAYERS: tuple[str, ...] = ()

    def _trackable_children(self, save_type="checkpoint", **kwargs):
        children = super()._trackable_children(save_type, **kwargs)
        if save_type == "checkpoint":
            for name in self.LISTED_SUBLAYERS:
                for i, layer in enumerate(_flat(getattr(self, name))):
                    children.setdefault(f"{name}_{i}", layer)
        return children
