"""Plot helpers shared by the examples: matplotlib when installed, else Pillow.

`pip install -e ".[examples]"` installs matplotlib; without it (or with
TFP_GLOW_NO_MATPLOTLIB=1) the same files are written with Pillow, which the
library already depends on.
"""

import os

import numpy as np

from tfp_glow.images import image_grid, label_grid, save_png

# Five anchors of matplotlib's "viridis", interpolated linearly.
_VIRIDIS = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], np.float64
)


def matplotlib_pyplot():
    """`matplotlib.pyplot` with a file-only backend, or None."""
    if os.environ.get("TFP_GLOW_NO_MATPLOTLIB"):
        return None
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colormap(values):
    """[H, W] values in [0, 1] -> uint8 [H, W, 3] viridis-like colours."""
    t = np.clip(values, 0.0, 1.0) * (len(_VIRIDIS) - 1)
    lo = np.floor(t).astype(int).clip(0, len(_VIRIDIS) - 2)
    frac = (t - lo)[..., None]
    rgb = (1 - frac) * _VIRIDIS[lo] + frac * _VIRIDIS[lo + 1]
    return np.round(rgb).astype(np.uint8)


def _upscale(image, factor):
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def _histogram(points, extent, bins):
    points = np.asarray(points, np.float64)
    points = points[np.all(np.isfinite(points), axis=1)]
    hist, _, _ = np.histogram2d(
        points[:, 1], points[:, 0], bins=bins, range=[[-extent, extent], [-extent, extent]]
    )
    return hist[::-1]  # row 0 at the top: y grows upwards


def density_panels_png(panels, titles, path, extent):
    """One panel per `[H, W]` non-negative array (row 0 = top), e.g. densities."""
    plt = matplotlib_pyplot()
    if plt is not None:
        fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4))
        for ax, panel, title in zip(np.atleast_1d(axes), panels, titles):
            ax.imshow(panel, extent=[-extent, extent, -extent, extent], cmap="viridis")
            ax.set_title(title)
            ax.set_xticks([])
            ax.set_yticks([])
        fig.tight_layout()
        fig.savefig(path, dpi=80)
        plt.close(fig)
        return path
    images = []
    for panel in panels:
        panel = np.asarray(panel, np.float64)
        images.append(_colormap(panel / max(panel.max(), 1e-12)))
    size = max(1, 256 // images[0].shape[0])
    tiles = np.stack([_upscale(im, size) for im in images])
    grid = image_grid(tiles, rows=1, border=4)
    return save_png(label_grid(grid, tiles.shape[1:3], border=4, column_labels=titles), path)


def scatter_png(point_sets, titles, path, extent=3.0, bins=128):
    """One panel per `[N, 2]` point set: a scatter plot (or a 2-D histogram)."""
    plt = matplotlib_pyplot()
    if plt is not None:
        fig, axes = plt.subplots(1, len(point_sets), figsize=(4 * len(point_sets), 4))
        for ax, pts, title in zip(np.atleast_1d(axes), point_sets, titles):
            pts = np.asarray(pts)
            ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.4)
            ax.set_xlim(-extent, extent)
            ax.set_ylim(-extent, extent)
            ax.set_aspect("equal")
            ax.set_title(title)
        fig.tight_layout()
        fig.savefig(path, dpi=80)
        plt.close(fig)
        return path
    panels = [np.log1p(_histogram(p, extent, bins)) for p in point_sets]
    return density_panels_png(panels, titles, path, extent)
