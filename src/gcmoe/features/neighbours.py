"""Neighbours for C2CA: for every cell, the cells within the square window of side S um around it,
nearest first (Euclidean), at most M, the cell itself excluded.

Built per sample from a KD-tree (no edge crosses two slides), returned as a padded (N, M) index array
with -1 in empty slots. Offsets are computed on the fly from cell positions, so a batch gathers neighbour
features from the feature tensor by index and never copies windows.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from gcmoe.files import atomic_path


def window_neighbours(xy_um: np.ndarray, window_um: float = 64.0, max_neighbours: int = 32,
                      block: int = 65_536) -> np.ndarray:
    """Indices (N, M) of each cell's neighbours within the square window, nearest first; -1 pads.

    Exact: cells whose window may hold more candidates than were fetched are queried again with more.
    Cells are queried ``block`` at a time, so the query's scratch arrays do not grow with N.
    """
    from scipy.spatial import cKDTree

    xy = np.asarray(xy_um, dtype=np.float64)
    n, m = len(xy), int(max_neighbours)
    out = np.full((n, m), -1, dtype=np.int64)
    if n < 2 or m == 0:
        return out
    tree = cKDTree(xy)
    for start in range(0, n, block):
        _fill_window(tree, xy, np.arange(start, min(start + block, n)), window_um / 2.0, m, out)
    return out


def _fill_window(tree, xy: np.ndarray, todo: np.ndarray, half: float, m: int, out: np.ndarray) -> None:
    """Write the window neighbours of cells ``todo`` into ``out``."""
    n = len(xy)
    radius = half * np.sqrt(2.0)  # the window's corners
    k = min(2 * m + 1, n)
    while len(todo):
        dist, idx = tree.query(xy[todo], k=k, distance_upper_bound=radius)
        dist, idx = np.atleast_2d(dist), np.atleast_2d(idx)
        found = idx < n
        safe = np.where(found, idx, 0)
        delta = np.abs(xy[safe] - xy[todo][:, None, :]).max(axis=-1)
        keep = found & (delta <= half) & (safe != todo[:, None])
        # a row that filled all k slots inside the radius may have window cells further out; it is complete
        # once it holds m window cells, since any cell not fetched lies further than every fetched one
        exhausted = found[:, -1] & (k < n)
        done = ~exhausted | (keep.sum(axis=1) >= m)
        for row in np.flatnonzero(done):
            chosen = idx[row][keep[row]][:m]
            out[todo[row], : len(chosen)] = chosen
        todo = todo[~done]
        k = min(2 * k, n)


def neighbour_cache_key(xy_um: np.ndarray, window_um: float, max_neighbours: int) -> str:
    h = hashlib.sha256(np.ascontiguousarray(xy_um, dtype=np.float64).tobytes())
    h.update(f"{window_um}:{max_neighbours}".encode())
    return h.hexdigest()[:16]


def cached_window_neighbours(
    xy_um: np.ndarray, window_um: float, max_neighbours: int, cache_dir: str | os.PathLike | None, name: str
) -> np.ndarray:
    """:func:`window_neighbours`, computed once per sample and kept as ``<cache_dir>/neighbours/<name>-<key>.npy``."""
    if cache_dir is None:
        return window_neighbours(xy_um, window_um, max_neighbours)
    path = Path(cache_dir) / "neighbours" / f"{name}-{neighbour_cache_key(xy_um, window_um, max_neighbours)}.npy"
    if path.is_file():
        try:
            nbr = np.load(path, allow_pickle=False)
            if nbr.shape == (len(xy_um), max_neighbours) and nbr.dtype == np.int64 and nbr.max(initial=-1) < len(xy_um):
                return nbr
        except (OSError, ValueError):
            pass  # a damaged entry is recomputed and replaced below
    nbr = window_neighbours(xy_um, window_um, max_neighbours)
    with atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, nbr)
    return nbr
