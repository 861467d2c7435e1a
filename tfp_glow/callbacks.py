"""Keras callbacks for flow models."""

import os

import keras
import numpy as np

from tfp_glow import checks
from tfp_glow.images import save_image_grid

__all__ = ["SampleGrid"]


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

    #### Examples

    ```python
    model.fit(data, epochs=20, callbacks=[
        tfp_glow.SampleGrid("samples", num_samples=16, every_n_epochs=5)])
    ```
    """

    def __init__(self, directory, num_samples=16, temperature=0.7, seed=0,
                 every_n_epochs=1, rows=None, upscale=4, labels=None):
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
        self.written = []  # paths written so far, in order

    def path_for_epoch(self, epoch):
        """The PNG path for 1-based `epoch`."""
        return os.path.join(self.directory, f"samples_epoch_{epoch:03d}.png")

    def _labels(self):
        num_classes = getattr(self.model, "num_classes", None)
        if num_classes is None:
            return None
        if self.labels is None:
            return np.arange(self.num_samples, dtype=np.int64) % num_classes
        return np.broadcast_to(np.asarray(self.labels, np.int64), [self.num_samples])

    def write(self, epoch):
        """Draws the grid now and writes it for 1-based `epoch`."""
        num_bins = getattr(self.model, "num_bins", None)
        if num_bins is None:
            raise ValueError(
                "SampleGrid needs an image model with `num_bins` set; the model has "
                "num_bins=None (continuous data).")
        if len(getattr(self.model, "event_shape", ())) != 3:
            raise ValueError(
                f"SampleGrid needs image events [H, W, C]; the model's event shape is "
                f"{getattr(self.model, 'event_shape', None)}.")
        samples = self.model.sample(self.num_samples, temperature=self.temperature,
                                    seed=self.seed, labels=self._labels())
        path = self.path_for_epoch(epoch)
        save_image_grid(np.asarray(samples), path, num_bins=num_bins, rows=self.rows,
                        upscale=self.upscale)
        self.written.append(path)
        return path

    def on_epoch_end(self, epoch, logs=None):
        epoch = epoch + 1  # Keras counts from 0; file names count from 1.
        from tfp_glow.distributed import is_chief  # one writer under multi-worker
        if epoch % self.every_n_epochs == 0 and is_chief(self.model.distribute_strategy):
            self.write(epoch)

