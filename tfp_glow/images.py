"""Turning model-space images back into pictures (PNG grids).

Models see images in `[-0.5, 0.5]`: level `k` of `num_bins` sits at
`(k + u) / num_bins - 0.5` with `u ~ U(0, 1)` (dequantized) or `u = 0`.
`to_uint8` inverts that map and stretches the levels over 0..255:

    k = clip(floor((x + 0.5) * num_bins), 0, num_bins - 1)
    pixel = round(k * 255 / (num_bins - 1))

`image_grid` tiles a batch into one picture and `save_png` writes it with
Pillow; `save_image_grid` does all three (plus a nearest-neighbour upscale,
so an 8x8 digit is visible). `save_points_picture` shows 2-D points (toy
densities) as histograms. `label_grid` adds what a reader needs to read a
grid: a title band on top and a label beside each row (or above each
column), in Pillow's built-in font (no font files); both savers take
`title=` and their labels.

#### Examples

```python
samples = model.sample(16, temperature=0.7, seed=1)
tfp_glow.save_image_grid(samples, "samples.png", num_bins=17, upscale=4,
                         title="Glow, T = 0.7")
rows = [model.sample(8, temperature=t, seed=1) for t in (0.0, 0.5, 1.0)]
tfp_glow.save_image_grid(np.concatenate(rows), "sweep.png", num_bins=17, rows=3,
                         upscale=4, row_labels=["T = 0", "T = 0.5", "T = 1"])
```
"""

import math
import os
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from tfp_glow import checks

__all__ = [
    "to_uint8",
    "image_grid",
    "label_grid",
    "save_png",
    "save_image_grid",
    "save_points_picture",
]

_PAD = 3  # pixels around every label


def to_uint8(x: npt.ArrayLike, num_bins: int = 256) -> np.ndarray:
    """Model-space values in `[-0.5, 0.5]` -> uint8 pixels in 0..255.

    `k = clip(floor((x + 0.5) * num_bins), 0, num_bins - 1)`, then
    `round(k * 255 / (num_bins - 1))`. Accepts NumPy arrays and tensors of any
    shape; values outside the range (e.g. samples at high temperature) clip.
    """
    num_bins = checks.positive_int(num_bins, "num_bins", minimum=2)
    values = np.asarray(x, dtype=np.float64)
    # NaN would turn into an arbitrary integer; show it as black instead.
    values = np.nan_to_num(values, nan=-0.5, posinf=0.5, neginf=-0.5)
    levels = np.clip(np.floor((values + 0.5) * num_bins), 0, num_bins - 1)
    return np.round(levels * (255.0 / (num_bins - 1))).astype(np.uint8)


def image_grid(
    images: npt.ArrayLike, rows: int | None = None, border: int = 1, border_value: int = 255
) -> np.ndarray:
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
            f"`images` must have shape [N, H, W, C] with C in (1, 3); got {images.shape}."
        )
    if images.dtype != np.uint8:
        raise TypeError(f"`images` must be uint8 (convert with `to_uint8`); got {images.dtype}.")
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
        grid[top : top + h, left : left + w] = images[i]
    return grid


def _labels(labels, count, arg_name, what):
    if labels is None:
        return None
    labels = [str(label) for label in labels]
    if len(labels) != count:
        raise ValueError(
            f"`{arg_name}` must hold one label per {what} ({count}); got {len(labels)}."
        )
    return labels


def label_grid(
    grid,
    tile_shape,
    border=1,
    title=None,
    row_labels=None,
    column_labels=None,
    background=255,
    ink=0,
):
    """`grid` (an `image_grid` of tiles `tile_shape = (H, W)` with `border`)
    with text bands around it: `title` on top, `row_labels` (one per row)
    in a band on the left, each level with its row, and `column_labels` (one
    per column) in a band above the columns.

    Bands are `background` with text in `ink` (Pillow's default font, which
    needs no font file); the canvas widens if the title is wider than the
    grid. Returns the labelled uint8 array (`[H', W']` or `[H', W', C]` as
    `grid`). With nothing to draw it returns `grid` unchanged.
    """
    from PIL import Image, ImageDraw, ImageFont

    grid = np.asarray(grid)
    if grid.dtype != np.uint8 or grid.ndim not in (2, 3):
        raise ValueError(
            f"`grid` must be a uint8 [H, W] or [H, W, C] image; got {grid.dtype} {grid.shape}."
        )
    if title is None and row_labels is None and column_labels is None:
        return grid
    h, w = (checks.positive_int(d, "tile_shape") for d in tile_shape)
    b = checks.positive_int(border, "border", minimum=0)
    rows, cols = (grid.shape[0] - b) // (h + b), (grid.shape[1] - b) // (w + b)
    row_labels = _labels(row_labels, rows, "row_labels", "row")
    column_labels = _labels(column_labels, cols, "column_labels", "column")
    font = ImageFont.load_default()

    def size(text):
        left, top, right, bottom = font.getbbox(text)
        return right - left, bottom - top

    line = size("Tg0")[1] + 2 * _PAD
    left = max(size(t)[0] for t in row_labels) + 2 * _PAD if row_labels else 0
    top_title = line if title is not None else 0
    top = top_title + (line if column_labels else 0)
    width = max(left + grid.shape[1], size(title)[0] + 2 * _PAD if title is not None else 0)
    channels = grid.shape[2] if grid.ndim == 3 else 1
    mode, fill, pen = (
        ("RGB", (background,) * 3, (ink,) * 3) if channels == 3 else ("L", background, ink)
    )
    canvas = Image.new(mode, (width, top + grid.shape[0]), fill)
    canvas.paste(
        Image.fromarray(grid if channels == 3 else grid.reshape(grid.shape[:2])), (left, top)
    )
    draw = ImageDraw.Draw(canvas)

    def text(x, y, t):  # (x, y): the top-left corner of the text's ink
        left_ink, top_ink, _, _ = font.getbbox(t)
        draw.text((x - left_ink, y - top_ink), t, font=font, fill=pen)

    if title is not None:
        text(_PAD, _PAD, title)
    for c, label in enumerate(column_labels or []):
        centre = left + b + c * (w + b) + w // 2
        text(max(left, centre - size(label)[0] // 2), top_title + _PAD, label)
    for r, label in enumerate(row_labels or []):
        centre = top + b + r * (h + b) + h // 2
        text(left - _PAD - size(label)[0], centre - size(label)[1] // 2, label)
    out = np.asarray(canvas, np.uint8)
    return out[..., None] if grid.ndim == 3 and channels == 1 else out


def save_png(array: npt.ArrayLike, path: str | os.PathLike) -> str:
    """Writes a uint8 `[H, W]`, `[H, W, 1]` or `[H, W, 3]` array as a PNG."""
    from PIL import Image  # Pillow is a dependency; imported here to keep import light.

    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise TypeError(f"`array` must be uint8; got {array.dtype}.")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] != 3):
        raise ValueError(
            f"`array` must have shape [H, W], [H, W, 1] or [H, W, 3]; got {array.shape}."
        )
    path = os.fspath(path)
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")
    return path


def save_image_grid(
    x: npt.ArrayLike,
    path: str | os.PathLike,
    num_bins: int = 256,
    rows: int | None = None,
    upscale: int = 1,
    title: str | None = None,
    row_labels: Sequence[str] | None = None,
) -> np.ndarray:
    """Writes a batch of model-space images `[N, H, W, C]` as one PNG grid.

    `to_uint8(x, num_bins)`, each image enlarged `upscale` times by
    nearest-neighbour repetition, then `image_grid(..., rows)`, `label_grid`
    with `title` (a band on top) and `row_labels` (one per row, beside it)
    when given, and `save_png`. Returns the array that was written.
    """
    upscale = checks.positive_int(upscale, "upscale")
    images = to_uint8(x, num_bins)
    if images.ndim != 4:
        raise ValueError(f"`x` must have shape [N, H, W, C]; got {images.shape}.")
    if upscale > 1:
        images = np.repeat(np.repeat(images, upscale, axis=1), upscale, axis=2)
    grid = image_grid(images, rows=rows)
    grid = label_grid(grid, images.shape[1:3], title=title, row_labels=row_labels)
    save_png(grid, path)
    return grid


def save_points_picture(point_sets, path, extent=3.0, bins=128, title=None, labels=None):
    """Writes one panel per set of 2-D points as a PNG: a 2-D histogram.

    Each panel bins the finite points of one `[N, 2]` array on a `bins` x
    `bins` grid over `[-extent, extent]^2` (y up) and shows
    `255 * (1 - log1p(count) / max log1p(count))`: dark where points are
    dense, white where there are none. Panels sit side by side, 2-pixel black
    borders; `title` goes on top and `labels` (one per panel) above the
    panels (`label_grid`). Returns the array that was written.
    """
    bins = checks.positive_int(bins, "bins")
    extent = checks.number(extent, "extent", minimum=0, exclusive_minimum=True)
    panels = []
    for pts in point_sets:
        pts = np.asarray(pts, np.float64)
        if pts.ndim != 2 or pts.shape[-1] != 2:
            raise ValueError(f"`point_sets` must hold [N, 2] arrays; got shape {pts.shape}.")
        pts = pts[np.all(np.isfinite(pts), axis=1)]
        hist, _, _ = np.histogram2d(
            pts[:, 1], pts[:, 0], bins=bins, range=[[-extent, extent], [-extent, extent]]
        )
        hist = hist[::-1]  # y up
        level = np.log1p(hist) / max(np.log1p(hist).max(), 1e-12)
        panels.append((255 * (1.0 - level)).astype(np.uint8)[..., None])
    if not panels:
        raise ValueError("`point_sets` is empty.")
    grid = image_grid(np.stack(panels), rows=1, border=2, border_value=0)
    grid = label_grid(grid, (bins, bins), border=2, title=title, column_labels=labels)
    save_png(grid, path)
    return grid
