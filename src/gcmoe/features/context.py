"""Wider spatial contexts of cells, for the baselines that look beyond C2CA's 64-um window.

- **Windows** (HisToGene*, :func:`tile_windows`): each slide is tiled with square windows of side S um at
  stride S/2; window centres lie on a grid of pitch S/2 starting S/2 inside the slide's lower corner, enough
  of them to cover every cell. A cell is *owned* by the window whose centre is nearest to it in Chebyshev
  distance (per axis the nearest centre; the lower index wins a tie): the window in which it lies most
  centrally, which always contains it. Every cell has exactly one owner. A window's members are all cells of
  its slide inside its square (borders included), its own cells first, then the others by Chebyshev distance
  to the centre, at most ``max_cells``; windows that own no cell are dropped.
- **Context grid** (TRIPLEX*, :func:`context_grid`): each slide is cut into squares of side C um from its
  lower corner; a square's token is the mean feature of its cells (:meth:`ContextGrid.mean_features`). A
  cell's context is the n x n squares centred on its own square, in row-major order (dy, then dx, from
  -n//2 to n//2), so its own square sits in the middle slot n*n//2; squares outside the slide or without
  cells are -1.

Both are built per slide (``sample_ids``): no window and no square crosses two slides. Both are O(N)
vectorised numpy with no KD-tree, a second or so for a million cells, so they are rebuilt when needed rather
than cached on disk. Only positions enter here; which cells are training cells is the trainer's business.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gcmoe.errors import ConfigError


@dataclass
class WindowTiling:
    """Overlapping windows over the cells of one or more slides (indices into the pooled cells).

    ``members`` (W, T) int64, -1 pads: each window's cells, owned cells first; ``centres`` (W, 2) um;
    ``cell_window`` (N,) the window owning each cell; ``cell_slot`` (N,) the cell's column in its owner's row
    of ``members``; ``side_um`` the window side.
    """

    members: np.ndarray
    centres: np.ndarray
    cell_window: np.ndarray
    cell_slot: np.ndarray
    side_um: float

    @property
    def n_windows(self) -> int:
        return int(self.members.shape[0])


@dataclass
class ContextGrid:
    """Squares of side ``side_um`` over each slide and, per cell, the ``size`` x ``size`` squares around it.

    ``cell_square`` (N,) the square of each cell; ``centres`` (Q, 2) um; ``context`` (N, size * size) int64,
    -1 where a square lies outside its slide or holds no cell, the cell's own square in the middle slot.
    """

    cell_square: np.ndarray
    centres: np.ndarray
    context: np.ndarray
    side_um: float
    size: int

    @property
    def n_squares(self) -> int:
        return int(self.centres.shape[0])

    def mean_features(self, features: np.ndarray) -> np.ndarray:
        """The mean feature of the cells of each square, (Q, D) float32."""
        feats = np.asarray(features, dtype=np.float64)
        sums = np.zeros((self.n_squares, feats.shape[1]), dtype=np.float64)
        np.add.at(sums, self.cell_square, feats)
        counts = np.bincount(self.cell_square, minlength=self.n_squares).astype(np.float64)
        return (sums / np.maximum(counts, 1.0)[:, None]).astype(np.float32)


def _per_sample(n: int, sample_ids: np.ndarray | None) -> list[np.ndarray]:
    if sample_ids is None:
        return [np.arange(n)]
    sample_ids = np.asarray(sample_ids)
    if len(sample_ids) != n:
        raise ValueError(f"sample_ids has {len(sample_ids)} entries for {n} cells")
    return [np.flatnonzero(sample_ids == s) for s in dict.fromkeys(sample_ids.tolist())]


def _check_xy(xy_um: np.ndarray) -> np.ndarray:
    xy = np.asarray(xy_um, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise ValueError(f"cell positions must be (N, 2) micrometres, got shape {xy.shape}")
    if not np.isfinite(xy).all():
        raise ValueError("cell positions contain NaN or infinite values")
    return xy


def tile_windows(
    xy_um: np.ndarray, side_um: float = 256.0, max_cells: int = 1024, sample_ids: np.ndarray | None = None
) -> WindowTiling:
    """Tile each slide with windows of side ``side_um`` at stride ``side_um / 2`` (see the module docstring).

    Raises ConfigError (a ValueError) when a window owns more than ``max_cells`` cells (its own cells must all
    be tokens): use a smaller window or allow more cells.
    """
    xy = _check_xy(xy_um)
    if side_um <= 0:
        raise ValueError(f"window side must be positive, got {side_um}")
    n = len(xy)
    stride = side_um / 2.0
    pair_cells, pair_windows, centres_parts = [], [], []
    own_window = np.empty(n, dtype=np.int64)
    offset = 0
    for cells in _per_sample(n, sample_ids):
        if len(cells) == 0:
            continue
        p = xy[cells]
        lo = p.min(axis=0)
        extent = p.max(axis=0) - lo
        counts = np.maximum(1, np.ceil(np.maximum(extent - side_um, 0.0) / stride).astype(np.int64) + 1)  # (2,)
        t = (p - lo - side_um / 2.0) / stride  # position in units of the centre pitch
        owner = np.clip(np.ceil(t - 0.5), 0, counts - 1).astype(np.int64)  # nearest centre per axis
        own_window[cells] = offset + owner[:, 1] * counts[0] + owner[:, 0]
        # windows k containing the cell: |x - c_k| <= S/2  <=>  k in [ (x - lo)/stride - 2, (x - lo)/stride ]
        u = (p - lo) / stride
        k_lo = np.clip(np.ceil(u - 2.0 - 1e-9), 0, counts - 1).astype(np.int64)
        k_hi = np.clip(np.floor(u + 1e-9), 0, counts - 1).astype(np.int64)
        for dy in range(3):
            for dx in range(3):
                kx, ky = k_lo[:, 0] + dx, k_lo[:, 1] + dy
                ok = (kx <= k_hi[:, 0]) & (ky <= k_hi[:, 1])
                pair_cells.append(cells[ok])
                pair_windows.append(offset + ky[ok] * counts[0] + kx[ok])
        gx, gy = np.meshgrid(np.arange(counts[0]), np.arange(counts[1]))  # row-major: id = ky * nx + kx
        centres_parts.append(lo + side_um / 2.0 + stride * np.column_stack([gx.ravel(), gy.ravel()]))
        offset += int(counts[0] * counts[1])
    centres_all = np.concatenate(centres_parts) if centres_parts else np.zeros((0, 2))
    cell = np.concatenate(pair_cells) if pair_cells else np.zeros(0, dtype=np.int64)
    win = np.concatenate(pair_windows) if pair_windows else np.zeros(0, dtype=np.int64)
    # keep windows that own a cell; renumber them 0..W-1 in grid order
    kept = np.unique(own_window) if n else np.zeros(0, dtype=np.int64)
    new_id = np.full(len(centres_all), -1, dtype=np.int64)
    new_id[kept] = np.arange(len(kept))
    keep_pair = new_id[win] >= 0
    cell, win = cell[keep_pair], new_id[win[keep_pair]]
    own_window = new_id[own_window]
    centres = centres_all[kept]
    owned = own_window[cell] == win
    dist = np.abs(xy[cell] - centres[win]).max(axis=1)
    order = np.lexsort((cell, dist, ~owned, win))
    cell, win, owned = cell[order], win[order], owned[order]
    starts = np.searchsorted(win, np.arange(len(kept)))
    rank = np.arange(len(win)) - starts[win]
    n_owned = np.bincount(win[owned], minlength=len(kept))
    if len(kept) and n_owned.max() > max_cells:
        raise ConfigError(
            f"a {side_um:g}-um window owns {int(n_owned.max())} cells, more than max_cells={max_cells}: use a "
            "smaller window or allow more cells per window (model_params: window_um, max_window_cells)"
        )
    fit = rank < max_cells
    width = int(rank[fit].max()) + 1 if fit.any() else 1
    members = np.full((len(kept), width), -1, dtype=np.int64)
    members[win[fit], rank[fit]] = cell[fit]
    cell_slot = np.empty(n, dtype=np.int64)
    cell_slot[cell[owned]] = rank[owned]
    return WindowTiling(members, centres.astype(np.float32), own_window, cell_slot, float(side_um))


def context_grid(
    xy_um: np.ndarray, side_um: float = 100.0, size: int = 5, sample_ids: np.ndarray | None = None
) -> ContextGrid:
    """Squares of side ``side_um`` per slide and each cell's ``size`` x ``size`` context (module docstring)."""
    xy = _check_xy(xy_um)
    if side_um <= 0:
        raise ValueError(f"context square side must be positive, got {side_um}")
    if size < 1 or size % 2 == 0:
        raise ValueError(f"the context grid needs an odd number of squares per side, got {size}")
    n, r = len(xy), size // 2
    cell_square = np.empty(n, dtype=np.int64)
    context = np.full((n, size * size), -1, dtype=np.int64)
    centres_parts = []
    offset = 0
    for cells in _per_sample(n, sample_ids):
        if len(cells) == 0:
            continue
        p = xy[cells]
        lo = p.min(axis=0)
        ij = np.floor((p - lo) / side_um).astype(np.int64)  # (n_s, 2) square column, row
        nx, ny = int(ij[:, 0].max()) + 1, int(ij[:, 1].max()) + 1
        flat = ij[:, 1] * nx + ij[:, 0]
        occupied, inverse = np.unique(flat, return_inverse=True)
        grid = np.full(nx * ny, -1, dtype=np.int64)
        grid[occupied] = offset + np.arange(len(occupied))
        cell_square[cells] = offset + inverse
        centres_parts.append(lo + side_um * (np.column_stack([occupied % nx, occupied // nx]) + 0.5))
        slot = 0
        for dy in range(-r, r + 1):
            for dx in range(-r, r + 1):
                x, y = ij[:, 0] + dx, ij[:, 1] + dy
                inside = (x >= 0) & (x < nx) & (y >= 0) & (y < ny)
                context[cells[inside], slot] = grid[y[inside] * nx + x[inside]]
                slot += 1
        offset += len(occupied)
    centres = np.concatenate(centres_parts) if centres_parts else np.zeros((0, 2))
    return ContextGrid(cell_square, centres.astype(np.float32), context, float(side_um), int(size))
