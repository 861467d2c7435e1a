"""A Keras layer that only holds variables for a bijector.

Variables are created eagerly in the constructor (never lazily on the first
call), so `FlowModel`, `save_weights`, checkpoints and `tf.distribute` all see
them before any data flows.
"""

import keras


class ParameterLayer(keras.layers.Layer):
    """Holds the named `keras.Variable`s of one bijector.

    `add(name, shape, initializer, trainable)` creates a weight and returns it;
    the bijector keeps the returned variable and reads it inside its math.
    """

    def __init__(self, dtype="float32", name=None):
        super().__init__(dtype=dtype, name=name, trainable=True)
        self.built = True

    def add(self, name, shape, initializer="zeros", trainable=True):
        weight = self.add_weight(
            name=name,
            shape=tuple(shape),
            initializer=initializer,
            trainable=trainable,
            dtype=self.dtype,
        )
        # tf.train.Checkpoint and tf.saved_model find variables through
        # attributes (as Dense's `self._kernel = ...`), not Keras's tracker;
        # without this a checkpoint of the layer silently saves nothing.
        setattr(self, name, weight)
        return weight

    def call(self, inputs):  # Never used as a layer; variables only.
        return inputs
