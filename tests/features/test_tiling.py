from __future__ import annotations

import numpy as np
import pytest

from gcmoe.errors import ConfigError
from gcmoe.features import EncoderConfig, make_tile_grid


def _config(**overrides) -> EncoderConfig:
    values = dict(name="t", target_mpp=0.5, tile_size=128, stride=4, feature_dim=3, margin=24, align=4)
    values.update(overrides)
    return EncoderConfig(**values)


def _border_distance(xy: np.ndarray, x0: float, y0: float, size: float) -> np.ndarray:
    """Distance of points to the nearest border of the square [x0, x0 + size) x [y0, y0 + size) (< 0 outside)."""
    return np.minimum.reduce([xy[:, 0] - x0, x0 + size - xy[:, 0], xy[:, 1] - y0, y0 + size - xy[:, 1]])


@pytest.mark.parametrize("slide_mpp", [0.5, 0.25, 0.2125, 0.8])
def test_every_cell_in_exactly_one_tile_the_most_central(slide_mpp):
    rng = np.random.default_rng(0)
    shape = (530, 777)
    xy = np.column_stack([rng.uniform(0, shape[1], 3000), rng.uniform(0, shape[0], 3000)])
    # slide corners and points on core borders
    xy[:5] = [[0, 0], [shape[1] - 1e-6, shape[0] - 1e-6], [80.0, 80.0], [160.0, 0.5], [0.0, 240.0]]
    config = _config()
    grid = make_tile_grid(shape, slide_mpp, config)
    tiles = grid.assign(xy)
    owner = np.full(len(xy), -1)
    for k, tile in enumerate(tiles):
        assert len(tile.cells) > 0
        assert np.all(owner[tile.cells] == -1), "a cell assigned twice"
        owner[tile.cells] = k
    assert np.all(owner >= 0), "a cell assigned to no tile"

    # the assigned tile is the most central of all grid tiles, and the cell is >= margin from its border
    best = np.full(len(xy), -np.inf)
    for row in range(grid.n_rows):
        for col in range(grid.n_cols):
            x0, y0 = grid.origin(row, col)
            best = np.maximum(best, _border_distance(xy, x0, y0, grid.read_size))
    mine = np.empty(len(xy))
    for tile in tiles:
        mine[tile.cells] = _border_distance(xy[tile.cells], tile.x0, tile.y0, tile.read_size)
    np.testing.assert_allclose(mine, best, atol=1e-9)
    assert mine.min() >= grid.margin - 1e-9
    assert grid.margin * grid.scale >= config.margin - 1e-9  # the encoder's margin holds in encoder pixels


def test_empty_tiles_are_skipped_and_cells_sorted():
    grid = make_tile_grid((1000, 1000), 0.5, _config())
    xy = np.array([[10.0, 10.0], [900.0, 900.0], [12.0, 15.0]])
    tiles = grid.assign(xy)
    assert len(tiles) == 2 < grid.n_tiles
    assert [t.cells.tolist() for t in tiles] == [[0, 2], [1]]
    assert (tiles[0].row, tiles[0].col) == (0, 0)


def test_grid_geometry_same_mpp():
    config = _config()
    grid = make_tile_grid((300, 500), 0.5, config)
    assert not grid.resample and grid.read_size == grid.tile_size == 128
    assert grid.margin == 24 and grid.step == 80
    assert (grid.n_rows, grid.n_cols) == (4, 7)
    assert grid.origin(0, 0) == (-24, -24) and grid.origin(1, 2) == (136, 56)
    # origins are multiples of the encoder's alignment so every tile sees the same pixel lattice
    assert all(v % config.align == 0 for r in range(4) for c in range(7) for v in grid.origin(r, c))


def test_grid_geometry_resampled():
    grid = make_tile_grid((1000, 1000), 0.25, _config())  # slide twice as fine as the encoder wants
    assert grid.resample and grid.read_size == 256 and grid.scale == 0.5
    assert grid.margin == 48 and grid.step == 160
    tile = grid.assign(np.array([[170.0, 10.0]]))[0]
    np.testing.assert_allclose(grid.to_tile(np.array([[170.0, 10.0]]), tile), [[(170 - 112) * 0.5, (10 + 48) * 0.5]])


def test_tile_size_override_and_errors():
    assert make_tile_grid((100, 100), 0.5, _config(), tile_size=256).tile_size == 256
    with pytest.raises(ConfigError):
        make_tile_grid((100, 100), 0.5, _config(), tile_size=48)  # smaller than twice the margin
    with pytest.raises(ConfigError):
        make_tile_grid((100, 100), 0.0, _config())
