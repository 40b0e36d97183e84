"""A grid of overlapping tiles over a slide, and the one tile each cell takes its feature from.

Coordinates: slide pixels are continuous, pixel ``k`` spanning ``[k, k + 1)`` (its centre at ``k + 0.5``),
the same space as ``Sample.spatial``. A tile is read as the square region
``[x0, x0 + read_size) x [y0, y0 + read_size)`` of slide pixels (white outside the slide) and resized to
``tile_size`` encoder pixels when the slide's pixel size differs from the encoder's, so a slide point
``(x, y)`` lies at ``((x - x0) * s, (y - y0) * s)`` in the tile, with ``s = tile_size / read_size``
(exact for ``torch.nn.functional.interpolate(..., align_corners=False)``).

Layout: tile ``(row, col)`` starts at ``x0 = col * step - margin``, ``y0 = row * step - margin`` with
``step = read_size - 2 * margin`` (slide pixels), so its central ``step x step`` core is
``[col * step, (col + 1) * step) x [row * step, (row + 1) * step)`` and the cores tile the slide
without gaps or overlap. A cell belongs to the tile whose core holds it: ``col = floor(x / step)``,
``row = floor(y / step)``. That is the tile in which it lies most centrally (the nearest tile centre in
Chebyshev distance; on a core boundary both neighbours are equally central and the lower index wins),
at least ``margin`` slide pixels (at least the encoder's margin in encoder pixels) from the tile's border.
Tiles holding no cell are never read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from gcmoe.errors import ConfigError
from gcmoe.features.registry import EncoderConfig

__all__ = ["Tile", "TileGrid", "make_tile_grid"]

_MPP_RTOL = 1e-3  # slide and encoder pixel sizes this close are treated as equal (no resampling)


@dataclass(frozen=True)
class Tile:
    """One tile to encode and the cells that take their feature from it.

    Attributes
    ----------
    row, col
        Position in the grid.
    x0, y0
        Top-left corner of the region read, slide pixels (may be negative at the slide's edge).
    read_size
        Side of the region read, slide pixels.
    cells
        Indices (into the sample's cells) of the cells assigned to this tile, ascending.
    """

    row: int
    col: int
    x0: int
    y0: int
    read_size: int
    cells: np.ndarray


@dataclass(frozen=True)
class TileGrid:
    """Overlapping square tiles over a slide of ``shape`` (height, width) slide pixels.

    Attributes
    ----------
    tile_size
        Tile side in encoder pixels (what the encoder sees).
    read_size
        Tile side in slide pixels (what is read): ``round(tile_size * target_mpp / slide_mpp)``.
    margin
        Slide pixels between a tile's border and its core, >= the encoder's margin converted to slide
        pixels.
    step
        Slide pixels between neighbouring tile origins: ``read_size - 2 * margin``.
    n_rows, n_cols
        Grid size: ``ceil(height / step)`` x ``ceil(width / step)``.
    """

    shape: tuple[int, int]
    tile_size: int
    read_size: int
    margin: int
    step: int
    n_rows: int
    n_cols: int

    @property
    def scale(self) -> float:
        """Encoder pixels per slide pixel."""
        return self.tile_size / self.read_size

    @property
    def resample(self) -> bool:
        """Whether tiles are resized between reading and encoding."""
        return self.read_size != self.tile_size

    @property
    def n_tiles(self) -> int:
        return self.n_rows * self.n_cols

    def origin(self, row: int, col: int) -> tuple[int, int]:
        """(x0, y0) slide pixels of tile (row, col)'s top-left corner."""
        return col * self.step - self.margin, row * self.step - self.margin

    def locate(self, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row, col) of the tile each point (n, 2) of slide (x, y) pixels belongs to."""
        xy = np.asarray(xy, dtype=np.float64)
        col = np.clip(np.floor(xy[:, 0] / self.step), 0, self.n_cols - 1).astype(np.int64)
        row = np.clip(np.floor(xy[:, 1] / self.step), 0, self.n_rows - 1).astype(np.int64)
        return row, col

    def assign(self, xy: np.ndarray) -> list[Tile]:
        """The tiles that hold at least one of the points, each with its cells, in row-major order."""
        xy = np.asarray(xy, dtype=np.float64)
        row, col = self.locate(xy)
        flat = row * self.n_cols + col
        order = np.argsort(flat, kind="stable")
        keys, starts = np.unique(flat[order], return_index=True)
        bounds = np.append(starts, len(order))
        tiles = []
        for k, key in enumerate(keys):
            r, c = divmod(int(key), self.n_cols)
            x0, y0 = self.origin(r, c)
            tiles.append(Tile(r, c, x0, y0, self.read_size, np.sort(order[bounds[k] : bounds[k + 1]])))
        return tiles

    def to_tile(self, xy: np.ndarray, tile: Tile) -> np.ndarray:
        """Slide (x, y) pixels -> continuous encoder-pixel coordinates inside ``tile`` (n, 2) float64."""
        xy = np.asarray(xy, dtype=np.float64)
        return (xy - np.array([tile.x0, tile.y0], dtype=np.float64)) * self.scale


def make_tile_grid(
    shape: tuple[int, int], slide_mpp: float, config: EncoderConfig, tile_size: int | None = None
) -> TileGrid:
    """The tile grid for a slide of ``shape`` (height, width) pixels at ``slide_mpp`` um/px.

    ``tile_size`` (encoder pixels) overrides ``config.tile_size``. When the pixel sizes agree (within
    0.1%) tiles are read at the encoder's size; otherwise ``read_size = round(tile_size * ratio)`` slide
    pixels, with ``ratio = config.target_mpp / slide_mpp``, are read and resized to ``tile_size``.
    """
    if tile_size is not None:
        config = config.with_tile_size(tile_size)
    height, width = (int(v) for v in shape)
    if height < 1 or width < 1:
        raise ConfigError(f"cannot tile an empty slide of shape {shape}")
    if not slide_mpp > 0:
        raise ConfigError(f"slide pixel size must be > 0 um/px, got {slide_mpp}")
    ratio = config.target_mpp / slide_mpp  # slide pixels per encoder pixel
    if abs(ratio - 1.0) <= _MPP_RTOL:
        read_size, margin = config.tile_size, config.margin
    else:
        read_size = max(1, int(round(config.tile_size * ratio)))
        margin = math.ceil(config.margin * read_size / config.tile_size - 1e-9)
    step = read_size - 2 * margin
    if step < 1:
        raise ConfigError(
            f"encoder '{config.name}': tiles of {config.tile_size} px leave no core inside a {config.margin} px "
            f"margin at slide mpp {slide_mpp}; use a larger tile_size"
        )
    return TileGrid(
        shape=(height, width),
        tile_size=config.tile_size,
        read_size=read_size,
        margin=margin,
        step=step,
        n_rows=math.ceil(height / step),
        n_cols=math.ceil(width / step),
    )
