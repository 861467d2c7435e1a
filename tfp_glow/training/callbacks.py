"""Keras callbacks for flow models."""

import os
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tfp_glow import checks
from tfp_glow.images import save_image_grid

__all__ = ["SampleGrid", "WithAveragedWeights"]


class SampleGrid(keras.callbacks.Callback):
    """Writes a PNG grid of samples every `every_n_epochs` epochs.

    At the end of epoch `e` (counted from 1, as `ModelCheckpoint`'s
    `{epoch}`) with `e % every_n_epochs == 0` it draws
    `model.sample(num_samples, temperature, seed)` and writes
    `directory/samples_epoch_{e:03d}.png` via `save_image_grid`. The seed is
    fixed, so every grid decodes the same latents and successive grids show
    how the model changes, not sampling noise.

    Args:
      directory: folder for the PNGs (created if missing).
      num_samples: images per grid.
      temperature: latent temperature (openai/glow uses 0.7 for pictures).
      seed: int seed of the stateless draw.
      every_n_epochs: write every this many epochs.
      rows: grid rows (default: about square).
      upscale: nearest-neighbour enlargement of each image.
      labels: for class-conditional models, an int or `[num_samples]` ints;
        default `arange(num_samples) % num_classes` (every class in turn).
      context: for models built with `context_shape` (required there): one
        context `[*context_shape]` for every sample, or
        `[num_samples, *context_shape]`.

    #### Examples

    ```python
    model.fit(data, epochs=20, callbacks=[
        tfp_glow.SampleGrid("samples", num_samples=16, every_n_epochs=5)])
    ```
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        num_samples: int = 16,
        temperature: float = 0.7,
        seed: int = 0,
        every_n_epochs: int = 1,
        rows: int | None = None,
        upscale: int = 4,
        labels: int | Sequence[int] | None = None,
        context: Any = None,
    ) -> None:
        super().__init__()
        if not isinstance(directory, (str, os.PathLike)) or not os.fspath(directory):
            raise ValueError(f"`directory` must be a non-empty path; got {directory!r}.")
        self.directory = os.fspath(directory)
        self.num_samples = checks.positive_int(num_samples, "num_samples")
        self.temperature = checks.number(temperature, "temperature", minimum=0)
        if not checks.is_int(seed):  # an int, so that successive grids are comparable
            raise TypeError(f"`seed` must be an int; received {seed!r}.")
        self.seed = int(seed)
        self.every_n_epochs = checks.positive_int(every_n_epochs, "every_n_epochs")
        self.rows = checks.positive_int(rows, "rows", allow_none=True)
        self.upscale = checks.positive_int(upscale, "upscale")
        self.labels = labels
        self.context = context
        self.written: list[str] = []  # paths written so far, in order

    def path_for_epoch(self, epoch):
        """The PNG path for 1-based `epoch`."""
        return os.path.join(self.directory, f"samples_epoch_{epoch:03d}.png")

    def _context(self):
        """What `sample` is given: `context`, else a class-conditional model's labels."""
        num_classes = getattr(self.model, "num_classes", None)
        if self.context is not None or getattr(self.model, "context_shape", None) is None:
            return self.context
        if num_classes is None:
            raise ValueError(
                "SampleGrid of a conditional model needs `context`: one of shape "
                f"{list(self.model.context_shape)} for every sample, or "
                f"[{self.num_samples}, *{list(self.model.context_shape)}]."
            )
        if self.labels is None:
            return np.arange(self.num_samples, dtype=np.int64) % num_classes
        return np.broadcast_to(np.asarray(self.labels, np.int64), [self.num_samples])

    def write(self, epoch):
        """Draws the grid now and writes it for 1-based `epoch`."""
        num_bins = getattr(self.model, "num_bins", None)
        if num_bins is None:
            raise ValueError(
                "SampleGrid needs an image model with `num_bins` set; the model has "
                "num_bins=None (continuous data)."
            )
        if len(getattr(self.model, "event_shape", ())) != 3:
            raise ValueError(
                f"SampleGrid needs image events [H, W, C]; the model's event shape is "
                f"{getattr(self.model, 'event_shape', None)}."
            )
        samples = self.model.sample(
            self.num_samples, temperature=self.temperature, seed=self.seed, context=self._context()
        )
        path = self.path_for_epoch(epoch)
        save_image_grid(
            np.asarray(samples), path, num_bins=num_bins, rows=self.rows, upscale=self.upscale
        )
        self.written.append(path)
        return path

    def on_epoch_end(self, epoch, logs=None):
        epoch = epoch + 1  # Keras counts from 0; file names count from 1.
        from tfp_glow.training.distributed import is_chief  # one writer under multi-worker

        if epoch % self.every_n_epochs == 0 and is_chief(self.model.distribute_strategy):
            self.write(epoch)


def _averaged_pairs(optimizer):
    """`(weight, its moving average)` of an optimizer built with `use_ema=True`."""
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)  # LossScaleOptimizer
    if not getattr(optimizer, "use_ema", False):
        raise ValueError(
            "WithAveragedWeights needs an optimizer with Polyak averaging "
            "(`use_ema=True`, as `tfp_glow.training.recommended_optimizer()` and "
            f"`model.compile()` give); got {type(optimizer).__name__} with use_ema=False."
        )
    averages = getattr(optimizer, "_model_variables_moving_average", None) or []
    return [(w, a) for w, a in zip(optimizer._trainable_variables, averages) if a is not None]


class WithAveragedWeights(keras.callbacks.Callback):
    """Validation and the wrapped callbacks' epoch ends see the weights' average.

    With Polyak averaging (`use_ema=True`, the default of `model.compile()`)
    `fit` trains the raw weights and leaves the model with their moving
    average only when it ends. Inside this callback, `fit`'s validation (so
    `val_bits_per_dim`) and the `on_epoch_end` of the callbacks it wraps
    (`ModelCheckpoint`, `SampleGrid`, ...) run with the average copied into
    the weights; the raw weights are put back before training goes on.

    The swap copies values (Keras' `SwapEMAWeights` swaps by adding and
    subtracting, which rounds the raw weights at every epoch), so training is
    bit for bit what it is without this callback. Keep `BackupAndRestore`
    outside it: the backup must hold the raw weights with their average.

    #### Examples

    ```python
    model.compile()                      # Adam + warmup + Polyak averaging
    model.fit(train, epochs=60, validation_data=test, callbacks=[
        keras.callbacks.BackupAndRestore("backup"),
        tfp_glow.WithAveragedWeights(
            keras.callbacks.ModelCheckpoint("best.weights.h5", save_weights_only=True,
                                            monitor="val_bits_per_dim",
                                            save_best_only=True))])
    ```
    """

    def __init__(self, *callbacks: keras.callbacks.Callback) -> None:
        super().__init__()
        for cb in callbacks:
            if not isinstance(cb, keras.callbacks.Callback):
                raise TypeError(f"WithAveragedWeights takes Keras callbacks; got {cb!r}.")
        self.callbacks = list(callbacks)
        self._raw = None  # the raw weights while the average is in the model

    def set_model(self, model):
        super().set_model(model)
        for cb in self.callbacks:
            cb.set_model(model)

    def set_params(self, params):
        super().set_params(params)
        for cb in self.callbacks:
            cb.set_params(params)

    def _swap_functions(self):
        """Two compiled functions (one call each instead of an eager op per
        variable): copy the average in, returning the raw values; put them back."""
        optimizer = self.model.optimizer
        if getattr(self, "_functions_for", None) is not optimizer:
            pairs = _averaged_pairs(optimizer)

            @tf.function(autograph=False)
            def average_in():
                raw = [tf.identity(w) for w, _ in pairs]  # read before the writes
                with tf.control_dependencies(raw):
                    for w, a in pairs:
                        w.assign(a)
                return raw

            @tf.function(autograph=False)
            def raw_back(raw):
                for (w, _), value in zip(pairs, raw):
                    w.assign(value)

            self._functions, self._functions_for = (average_in, raw_back), optimizer
        return self._functions

    def _average_in(self):
        if self._raw is None:
            self._raw = self._swap_functions()[0]()

    def _raw_back(self):
        if self._raw is not None:
            self._swap_functions()[1](self._raw)
            self._raw = None

    def _each(self, hook, *args):
        for cb in self.callbacks:
            getattr(cb, hook)(*args)

    def on_test_begin(self, logs=None):
        if self.model.optimizer.iterations.numpy() > 0:  # an average exists
            self._average_in()
        self._each("on_test_begin", logs)

    def on_test_end(self, logs=None):
        self._each("on_test_end", logs)
        self._raw_back()

    def on_epoch_end(self, epoch, logs=None):
        if self.model.optimizer.iterations.numpy() > 0:
            self._average_in()
        try:
            self._each("on_epoch_end", epoch, logs)
        finally:
            self._raw_back()

    # Every other hook goes to the wrapped callbacks unchanged.
    def on_train_begin(self, logs=None):
        self._each("on_train_begin", logs)

    def on_train_end(self, logs=None):
        self._each("on_train_end", logs)

    def on_epoch_begin(self, epoch, logs=None):
        self._each("on_epoch_begin", epoch, logs)

    def on_train_batch_begin(self, batch, logs=None):
        self._each("on_train_batch_begin", batch, logs)

    def on_train_batch_end(self, batch, logs=None):
        self._each("on_train_batch_end", batch, logs)

    def on_test_batch_begin(self, batch, logs=None):
        self._each("on_test_batch_begin", batch, logs)

    def on_test_batch_end(self, batch, logs=None):
        self._each("on_test_batch_end", batch, logs)

    def on_predict_begin(self, logs=None):
        self._each("on_predict_begin", logs)

    def on_predict_end(self, logs=None):
        self._each("on_predict_end", logs)

    def on_predict_batch_begin(self, batch, logs=None):
        self._each("on_predict_batch_begin", batch, logs)

    def on_predict_batch_end(self, batch, logs=None):
        self._each("on_predict_batch_end", batch, logs)
