"""A Keras layer that only holds variables for a bijector.

Variables are created eagerly in the constructor (never lazily on the first
call), so `FlowModel`, `save_weights`, checkpoints and `tf.distribute` all see
them before any data flows.
"""

import keras
from keras.src.utils import naming


class ParameterLayer(keras.layers.Layer):
    """Holds the named `keras.Variable`s of one bijector.

    `add(name, shape, initializer, trainable)` creates a weight and returns it;
    the bijector keeps the returned variable and reads it inside its math.

    The layer's name is made unique in the process as Keras names its own
    layers (`act_norm_params`, `act_norm_params_1`, ...): bijectors of a
    flow often share a default name, and Keras's legacy `.h5` format and its
    weight paths need one name per layer. `.keras`, `.weights.h5` and
    `tf.train.Checkpoint` files do not depend on layer names.
    """

    def __init__(self, dtype="float32", name=None):
        super().__init__(dtype=dtype, name=None if name is None else naming.uniquify(name),
                         trainable=True)
        self.built = True

    def add(self, name, shape, initializer="zeros", trainable=True):
        weight = self.add_weight(
            name=name, shape=tuple(shape), initializer=initializer,
            trainable=trainable, dtype=self.dtype)
        # tf.train.Checkpoint and tf.saved_model find variables through
        # attributes (as Dense's `self._kernel = ...`), not Keras's tracker;
        # without this a checkpoint of the layer silently saves nothing.
        setattr(self, name, weight)
        return weight

    def call(self, inputs):  # Never used as a layer; variables only.
        return inputs
