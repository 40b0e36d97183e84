"""Raw-pixel tiles for models trained end to end on the H&E image (GHIST*), and the cell discs in them.

Each slide is seen at a *working* pixel size ``mpp`` (um/px, default 1.0) in square tiles of ``tile_size``
working pixels that overlap by ``2 * margin``: the tile layout is :class:`gcmoe.features.tiling.TileGrid`'s
(slide regions of ``read_size = round(tile_size * mpp / slide_mpp)`` slide pixels, resized to ``tile_size``
with antialiased bilinear interpolation, ``align_corners=False``). A cell is **owned** by the tile whose core
holds it, the tile in which it lies most centrally, at least ``margin`` working pixels from its border; every
cell has exactly one owner and is predicted from it. Tiles that own no cell are never read.

Coordinates inside a tile are continuous working pixels: pixel ``(row i, col j)`` spans ``[j, j + 1) x
[i, i + 1)`` and has its centre at ``(j + 0.5, i + 0.5)``; a slide point ``(x, y)`` lies at
``((x - x0) * s, (y - y0) * s)`` with ``s = tile_size / read_size``.

A **disc** of radius r around a point c is the set of pixels whose centre lies within r of c (distance <= r).
:func:`gcmoe.ops.disc_pixels` lists them (vectorised, on any torch device); GHIST* averages its expression map over a
cell's disc, and its nuclei target is the union of the discs of radius ``nucleus_radius`` around every cell
centre that falls in (or within that radius of) a tile, test cells included: positions only, never their
expression.

Memory: tiles are read per batch; when all tiles of the run fit in ``cache_bytes`` (uint8, 3 x T x T bytes
each; default 256 MB) each is kept after its first read, otherwise every batch reads its tiles again.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from gcmoe.data.image import SlideImage
from gcmoe.errors import ConfigError
from gcmoe.features.tiling import TileGrid
from gcmoe.ops import disc_pixels

__all__ = ["PixelTiles", "build_pixel_tiles", "pixel_grid"]

DEFAULT_CACHE_BYTES = 256 * 2**20


def pixel_grid(shape: tuple[int, int], slide_mpp: float, mpp: float, tile_size: int, margin: int) -> TileGrid:
    """The tile grid of a slide of ``shape`` (height, width) px at ``slide_mpp`` seen at ``mpp`` um/px.

    ``tile_size`` and ``margin`` are working pixels; the margin in slide pixels is rounded up.
    """
    if tile_size < 8 or margin < 0 or tile_size - 2 * margin < 1:
        raise ConfigError(
            f"pixel tiles of {tile_size} px with a {margin} px margin leave no core: use tile_size >= 8 and "
            "margin < tile_size / 2"
        )
    if not (mpp > 0 and slide_mpp > 0):
        raise ConfigError(f"pixel sizes must be > 0 um/px, got working {mpp} and slide {slide_mpp}")
    ratio = mpp / slide_mpp  # slide pixels per working pixel
    if abs(ratio - 1.0) <= 1e-3:
        read_size, margin_s = tile_size, margin
    else:
        read_size = max(1, int(round(tile_size * ratio)))
        margin_s = math.ceil(margin * read_size / tile_size - 1e-9)
    step = read_size - 2 * margin_s
    if step < 1:
        raise ConfigError(f"pixel tiles of {tile_size} px at {mpp} um/px leave no core on a {slide_mpp} um/px slide")
    height, width = (int(v) for v in shape)
    return TileGrid((height, width), tile_size, read_size, margin_s, step, math.ceil(height / step),
                    math.ceil(width / step))


@dataclass
class PixelTiles:
    """The owning tiles of the cells of one or more slides (cells indexed as the run pools them).

    ``tile_sample`` (U,) the slide of each tile; ``tile_origin`` (U, 2) its (x0, y0) slide pixels;
    ``cell_tile`` (N,) the tile owning each cell; ``cell_xy`` (N, 2) float32 the cell centre in its tile's
    working pixels; ``centre_ptr`` (U + 1,) and ``centre_xy`` (nnz, 2) float32: CSR of the centres (working
    pixels, in the tile's frame) of every cell of the slide within ``nucleus_radius`` px of the tile.
    """

    images: list[SlideImage]
    grids: list[TileGrid]
    mpp: float
    tile_sample: np.ndarray
    tile_origin: np.ndarray
    cell_tile: np.ndarray
    cell_xy: np.ndarray
    centre_ptr: np.ndarray
    centre_xy: np.ndarray
    nucleus_radius: float  # working pixels
    cache_bytes: int = DEFAULT_CACHE_BYTES
    _cache: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def tile_size(self) -> int:
        return self.grids[0].tile_size

    @property
    def n_tiles(self) -> int:
        return len(self.tile_sample)

    @property
    def caching(self) -> bool:
        """Whether every tile of the run fits the cache budget (then tiles are read once)."""
        return self.n_tiles * 3 * self.tile_size**2 <= self.cache_bytes

    def read(self, tiles: Sequence[int] | np.ndarray | Tensor) -> Tensor:
        """Pixels of ``tiles`` as uint8 (U, 3, T, T), RGB."""
        t = self.tile_size
        out = torch.empty((len(tiles), 3, t, t), dtype=torch.uint8)
        for k, tile in enumerate(np.asarray(tiles, dtype=np.int64).tolist()):
            pixels = self._cache.get(tile)
            if pixels is None:
                pixels = self._read_one(tile)
                if self.caching:
                    self._cache[tile] = pixels
            out[k] = torch.from_numpy(pixels)
        return out

    def _read_one(self, tile: int) -> np.ndarray:
        import torch.nn.functional as F

        grid = self.grids[int(self.tile_sample[tile])]
        x0, y0 = (int(v) for v in self.tile_origin[tile])
        region = self.images[int(self.tile_sample[tile])].read_region(x0, y0, grid.read_size, grid.read_size)
        pixels = torch.from_numpy(np.ascontiguousarray(region)).permute(2, 0, 1)
        if grid.resample:
            resized = F.interpolate(pixels[None].float(), size=(grid.tile_size, grid.tile_size), mode="bilinear",
                                    align_corners=False, antialias=True)[0]
            pixels = resized.round_().clamp_(0, 255).to(torch.uint8)
        return pixels.contiguous().numpy()

    def nuclei(self, tiles: Sequence[int] | np.ndarray | Tensor) -> Tensor:
        """The nuclei target of ``tiles``: 1 inside a disc of ``nucleus_radius`` around a cell centre,
        float32 (U, 1, T, T)."""
        t = self.tile_size
        tiles = np.asarray(tiles, dtype=np.int64)
        out = torch.zeros(len(tiles) * t * t)
        parts = [np.arange(self.centre_ptr[u], self.centre_ptr[u + 1]) for u in tiles]
        which = np.concatenate([np.full(len(p), k) for k, p in enumerate(parts)]) if parts else np.zeros(0, np.int64)
        rows = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        if len(rows):
            owner, r, c = disc_pixels(torch.from_numpy(self.centre_xy[rows]), self.nucleus_radius, t)
            out[torch.from_numpy(which)[owner] * t * t + r * t + c] = 1.0
        return out.reshape(len(tiles), 1, t, t)

    def inputs(self, idx: Tensor, train: bool) -> dict[str, Tensor]:
        """The tiles owning cells ``idx``, each once, and each cell's tile row and position in it.

        Returns ``tile_pixels`` uint8 (U, 3, T, T), ``tile_index`` (B,) long, ``cell_xy`` (B, 2) float32
        working pixels, and when ``train`` also ``tile_nuclei`` (U, 1, T, T).
        """
        owner = torch.from_numpy(self.cell_tile).index_select(0, idx)
        tiles, row = torch.unique(owner, return_inverse=True)
        batch = {
            "tile_pixels": self.read(tiles.numpy()),
            "tile_index": row,
            "cell_xy": torch.from_numpy(self.cell_xy).index_select(0, idx),
        }
        if train:
            batch["tile_nuclei"] = self.nuclei(tiles.numpy())
        return batch


def build_pixel_tiles(
    images: Sequence[SlideImage],
    slide_mpps: Sequence[float],
    centres: Sequence[np.ndarray],
    mpp: float = 1.0,
    tile_size: int = 128,
    margin: int = 16,
    nucleus_radius_um: float = 3.0,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
) -> PixelTiles:
    """Tile every slide at ``mpp`` um/px and index its cells (see the module docstring).

    ``centres[s]`` are slide ``s``'s cell centres (n_s, 2), (x, y) slide pixels; cells are numbered slide after
    slide, as the run pools them. ``tile_size`` and ``margin`` are working pixels.
    """
    if not (len(images) == len(slide_mpps) == len(centres)) or not images:
        raise ConfigError("give one image, one pixel size and one array of cell centres per slide")
    radius = float(nucleus_radius_um) / float(mpp)
    tile_sample, tile_origin, cell_tile, cell_xy, grids = [], [], [], [], []
    ptr_parts, xy_parts = [], []
    offset = 0
    for s, (image, slide_mpp, xy) in enumerate(zip(images, slide_mpps, centres)):
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        if not np.isfinite(xy).all():
            raise ConfigError(f"slide {s}: cell centres contain NaN or infinite values")
        grid = pixel_grid(image.shape, float(slide_mpp), float(mpp), int(tile_size), int(margin))
        grids.append(grid)
        row, col = grid.locate(xy)
        key = row * grid.n_cols + col
        kept, local = np.unique(key, return_inverse=True)
        kr, kc = np.divmod(kept, grid.n_cols)
        origin = np.column_stack([kc * grid.step - grid.margin, kr * grid.step - grid.margin]).astype(np.int64)
        tile_sample.append(np.full(len(kept), s, dtype=np.int64))
        tile_origin.append(origin)
        cell_tile.append(offset + local)
        cell_xy.append(((xy - origin[local]) * grid.scale).astype(np.float32))
        # every cell within `radius` of a tile's square goes into that tile's nuclei target
        lookup = np.full(grid.n_rows * grid.n_cols, -1, dtype=np.int64)
        lookup[kept] = np.arange(len(kept))
        reach = radius / grid.scale  # slide pixels
        lo = np.floor((xy + grid.margin - grid.read_size - reach) / grid.step).astype(np.int64)
        hi = np.floor((xy + grid.margin + reach) / grid.step).astype(np.int64)
        spans = int((hi - lo).max()) + 1 if len(xy) else 0
        pair_tile, pair_cell = [], []
        for dy in range(spans):
            for dx in range(spans):
                r_, c_ = lo[:, 1] + dy, lo[:, 0] + dx
                ok = (r_ <= hi[:, 1]) & (c_ <= hi[:, 0]) & (r_ >= 0) & (c_ >= 0)
                ok &= (r_ < grid.n_rows) & (c_ < grid.n_cols)
                t = np.where(ok, lookup[np.where(ok, r_ * grid.n_cols + c_, 0)], -1)
                pair_tile.append(t[t >= 0])
                pair_cell.append(np.flatnonzero(t >= 0))
        pt = np.concatenate(pair_tile) if pair_tile else np.zeros(0, np.int64)
        pc = np.concatenate(pair_cell) if pair_cell else np.zeros(0, np.int64)
        order = np.lexsort((pc, pt))
        pt, pc = pt[order], pc[order]
        ptr_parts.append(np.bincount(pt, minlength=len(kept)))
        xy_parts.append(((xy[pc] - origin[pt]) * grid.scale).astype(np.float32))
        offset += len(kept)
    counts = np.concatenate(ptr_parts)
    return PixelTiles(
        images=list(images), grids=grids, mpp=float(mpp),
        tile_sample=np.concatenate(tile_sample), tile_origin=np.concatenate(tile_origin),
        cell_tile=np.concatenate(cell_tile).astype(np.int64), cell_xy=np.concatenate(cell_xy),
        centre_ptr=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        centre_xy=np.concatenate(xy_parts) if xy_parts else np.zeros((0, 2), np.float32),
        nucleus_radius=radius, cache_bytes=int(cache_bytes),
    )
