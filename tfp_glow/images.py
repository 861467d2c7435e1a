"""Turning model-space images back into pictures (PNG grids).

Models see images in `[-0.5, 0.5]`: level `k` of `num_bins` sits at
`(k + u) / num_bins - 0.5` with `u ~ U(0, 1)` (dequantized) or `u = 0`.
`to_uint8` inverts that map and stretches the levels over 0..255:

    k = clip(floor((x + 0.5) * num_bins), 0, num_bins - 1)
    pixel = round(k * 255 / (num_bins - 1))

`image_grid` tiles a batch into one picture and `save_png` writes it with
Pillow; `save_image_grid` does all three (plus a nearest-neighbour upscale,
so an 8x8 digit is visible). `save_points_picture` shows 2-D points (toy
densities) as histograms.

#### Examples

```python
samples = model.sample(16, temperature=0.7, seed=1)
tfp_glow.save_image_grid(samples, "samples.png", num_bins=17, upscale=4)
```
"""

import math
import os

import numpy as np

from tfp_glow import checks

__all__ = ["to_uint8", "image_grid", "save_png", "save_image_grid", "save_points_picture"]


def to_uint8(x, num_bins=256):
    """Model-space values in `[-0.5, 0.5]` -> uint8 pixels in 0..255.

    `k = clip(floor((x + 0.5) * num_bins), 0, num_bins - 1)`, then
    `round(k * 255 / (num_bins - 1))`. Accepts NumPy arrays and tensors of any
    shape; values outside the range (e.g. samples at high temperature) clip.
    """
    num_bins = checks.positive_int(num_bins, "num_bins", minimum=2)
    x = np.asarray(x, dtype=np.float64)
    # NaN would turn into an arbitrary integer; show it as black instead.
    x = np.nan_to_num(x, nan=-0.5, posinf=0.5, neginf=-0.5)
    levels = np.clip(np.floor((x + 0.5) * num_bins), 0, num_bins - 1)
    return np.round(levels * (255.0 / (num_bins - 1))).astype(np.uint8)


def image_grid(images, rows=None, border=1, border_value=255):
    """Tiles a batch `[N, H, W, C]` (C = 1 or 3) into one uint8 image.

    The grid has `rows` rows (default: `ceil(sqrt(N))`) and
    `ceil(N / rows)` columns; every tile is surrounded by a `border`-pixel
    line of `border_value`, so the result has shape
    `[rows * (H + b) + b, cols * (W + b) + b, C]`. Empty cells stay
    `border_value`. `images` must already be uint8 (see `to_uint8`).
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(
            f"`images` must have shape [N, H, W, C] with C in (1, 3); got {images.shape}.")
    if images.dtype != np.uint8:
        raise TypeError(
            f"`images` must be uint8 (convert with `to_uint8`); got {images.dtype}.")
    n, h, w, c = images.shape
    if n == 0:
        raise ValueError("`images` is empty.")
    if rows is None:
        rows = int(math.ceil(math.sqrt(n)))
    rows = checks.positive_int(rows, "rows")
    rows = min(rows, n)
    cols = int(math.ceil(n / rows))
    b = checks.positive_int(border, "border", minimum=0)
    grid = np.full((rows * (h + b) + b, cols * (w + b) + b, c), border_value, np.uint8)
    for i in range(n):
        r, col = divmod(i, cols)
        top, left = b + r * (h + b), b + col * (w + b)
        grid[top:top + h, left:left + w] = images[i]
    return grid


def save_png(array, path):
    """Writes a uint8 `[H, W]`, `[H, W, 1]` or `[H, W, 3]` array as a PNG."""
    from PIL import Image  # Pillow is a dependency; imported here to keep import light.

    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise TypeError(f"`array` must be uint8; got {array.dtype}.")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] != 3):
        raise ValueError(
            f"`array` must have shape [H, W], [H, W, 1] or [H, W, 3]; got {array.shape}.")
    path = os.fspath(path)
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")
    return path


def save_image_grid(x, path, num_bins=256, rows=None, upscale=1):
    """Writes a batch of model-space images `[N, H, W, C]` as one PNG grid.

    `to_uint8(x, num_bins)`, each image enlarged `upscale` times by
    nearest-neighbour repetition, then `image_grid(..., rows)` and
    `save_png`. Returns the grid array that was written.
    """
    upscale = checks.positive_int(upscale, "upscale")
    images = to_uint8(x, num_bins)
    if images.ndim != 4:
        raise ValueError(f"`x` must have shape [N, H, W, C]; got {images.shape}.")
    if upscale > 1:
        images = np.repeat(np.repeat(images, upscale, axis=1), upscale, axis=2)
    grid = image_grid(images, rows=rows)
    save_png(grid, path)
    return grid


def save_points_picture(point_sets, path, extent=3.0, bins=128):
    """Writes one panel per set of 2-D points as a PNG: a 2-D histogram.

    Each panel bins the finite points of one `[N, 2]` array on a `bins` x
    `bins` grid over `[-extent, extent]^2` (y up) and shows
    `255 * (1 - log1p(count) / max log1p(count))`: dark where points are
    dense, white where there are none. Panels sit side by side, 2-pixel black
    borders. Returns the grid array that was written.
    """
    bins = checks.positive_int(bins, "bins")
    extent = checks.number(extent, "extent", minimum=0, exclusive_minimum=True)
    panels = []
    for pts in point_sets:
        pts = np.asarray(pts, np.float64)
        if pts.ndim != 2 or pts.shape[-1] != 2:
            raise ValueError(f"`point_sets` must hold [N, 2] arrays; got shape {pts.shape}.")
        pts = pts[np.all(np.isfinite(pts), axis=1)]
        hist, _, _ = np.histogram2d(pts[:, 1], pts[:, 0], bins=bins,
                                    range=[[-extent, extent], [-extent, extent]])
        hist = hist[::-1]  # y up
        level = np.log1p(hist) / max(np.log1p(hist).max(), 1e-12)
        panels.append((255 * (1.0 - level)).astype(np.uint8)[..., None])
    if not panels:
        raise ValueError("`point_sets` is empty.")
    grid = image_grid(np.stack(panels), rows=1, border=2, border_value=0)
    save_png(grid, path)
    return grid
