"""Smooth random fields and resampling helpers shared by the layout and the renderer."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def smooth_field(shape: tuple[int, int], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """A Gaussian random field of correlation length ``sigma`` (grid cells), zero mean, unit variance.

    Large sigmas are drawn on a coarser grid and interpolated, so the cost does not grow with sigma.
    """
    factor = max(1.0, sigma / 3.0)
    coarse = (int(np.ceil(shape[0] / factor)) + 3, int(np.ceil(shape[1] / factor)) + 3)
    white = rng.standard_normal(coarse).astype(np.float32)
    field = ndimage.gaussian_filter(white, sigma / factor, mode="reflect")
    if factor > 1.0:
        field = resize(field, (int(np.ceil(coarse[0] * factor)), int(np.ceil(coarse[1] * factor))))
    field = field[: shape[0], : shape[1]]
    field -= field.mean()
    return field / (field.std() + 1e-12)


def resize(array: np.ndarray, shape: tuple[int, int], order: int = 1) -> np.ndarray:
    """Resample a 2-D array to ``shape`` (pixel-centre aligned), float32."""
    zy, zx = shape[0] / array.shape[0], shape[1] / array.shape[1]
    yy = (np.arange(shape[0], dtype=np.float32) + 0.5) / zy - 0.5
    xx = (np.arange(shape[1], dtype=np.float32) + 0.5) / zx - 0.5
    if order == 0:
        iy = np.clip(np.round(yy).astype(np.int64), 0, array.shape[0] - 1)
        ix = np.clip(np.round(xx).astype(np.int64), 0, array.shape[1] - 1)
        return array[iy[:, None], ix[None, :]]
    # separable linear interpolation: rows, then columns
    a = np.asarray(array, dtype=np.float32)
    a = _interp_axis(a, yy, axis=0)
    return _interp_axis(a, xx, axis=1)


def _interp_axis(a: np.ndarray, coords: np.ndarray, axis: int) -> np.ndarray:
    n = a.shape[axis]
    c = np.clip(coords, 0, n - 1)
    i0 = np.floor(c).astype(np.int64)
    i1 = np.minimum(i0 + 1, n - 1)
    w = (c - i0).astype(np.float32)
    if axis == 0:
        return a[i0] * (1 - w)[:, None] + a[i1] * w[:, None]
    return a[:, i0] * (1 - w)[None, :] + a[:, i1] * w[None, :]


def sample_grid(grid: np.ndarray, xy_px: np.ndarray, step: float) -> np.ndarray:
    """Values of a grid (cells of ``step`` px) at points (x, y) in pixels, nearest cell."""
    iy = np.clip((xy_px[:, 1] / step).astype(np.int64), 0, grid.shape[0] - 1)
    ix = np.clip((xy_px[:, 0] / step).astype(np.int64), 0, grid.shape[1] - 1)
    return grid[iy, ix]


def periodic_texture(size: int, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """A seamless (periodic) band-limited noise tile, zero mean, unit variance, float32."""
    white = rng.standard_normal((size, size)).astype(np.float32)
    tex = ndimage.gaussian_filter(white, sigma, mode="wrap")
    tex -= tex.mean()
    return tex / (tex.std() + 1e-12)
