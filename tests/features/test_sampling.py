from __future__ import annotations

import numpy as np
import pytest
import torch

from gcmoe.features import extract_features, make_tile_grid, read_tiles, sample_feature_map


@pytest.mark.parametrize("stride", [1, 4, 16])
def test_linear_feature_map_is_read_back_exactly(stride):
    """Feature pixel (j, i) sits at ((i + 0.5) s, (j + 0.5) s); bilinear reading of a linear map is exact."""
    h, w = 12, 17
    yc, xc = torch.meshgrid((torch.arange(h) + 0.5) * stride, (torch.arange(w) + 0.5) * stride, indexing="ij")
    fmap = torch.stack([1.0 + 0.5 * xc - 0.25 * yc, 3.0 * yc, torch.full_like(xc, 7.0)]).float()
    rng = np.random.default_rng(0)
    uv = np.column_stack([rng.uniform(0.5, w - 0.5, 200), rng.uniform(0.5, h - 0.5, 200)]) * stride
    uv = np.vstack([uv, [[0.5 * stride, 0.5 * stride], [(w - 0.5) * stride, (h - 0.5) * stride]]])
    out = sample_feature_map(fmap, uv, stride).numpy()
    expected = np.column_stack([1.0 + 0.5 * uv[:, 0] - 0.25 * uv[:, 1], 3.0 * uv[:, 1], np.full(len(uv), 7.0)])
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-4 * stride)


def test_sampling_edges_and_empty():
    fmap = torch.arange(6.0).view(1, 2, 3)
    out = sample_feature_map(fmap, np.array([[0.0, 0.0], [12.0, 8.0]]), 4)  # outside the centres: border values
    assert out[:, 0].tolist() == [0.0, 5.0]
    assert sample_feature_map(fmap, np.zeros((0, 2)), 4).shape == (0, 1)
    with pytest.raises(ValueError):
        sample_feature_map(fmap[0], np.zeros((1, 2)), 4)


def _ramp(height: int, width: int) -> np.ndarray:
    """R = column index, G = row index: in continuous coordinates R(x) = x - 0.5, G(y) = y - 0.5."""
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[..., 0] = np.arange(width)[None, :]
    image[..., 1] = np.arange(height)[:, None]
    image[..., 2] = 100
    return image


def test_pipeline_reads_linear_features_exactly_including_overlap_cells(box_encoder, sample_of):
    """Through tiling and sampling: a ramp image through a block-mean encoder comes back as the ramp."""
    encoder = box_encoder(stride=4, tile_size=64, margin=8)
    image = _ramp(200, 256)
    rng = np.random.default_rng(1)
    xy = np.column_stack([rng.uniform(2, 254, 400), rng.uniform(2, 198, 400)])
    sample = sample_of(image, xy)
    features = extract_features(sample, encoder=encoder, progress=False)
    np.testing.assert_allclose(features[:, 0] * 255, xy[:, 0] - 0.5, atol=2e-3)
    np.testing.assert_allclose(features[:, 1] * 255, xy[:, 1] - 0.5, atol=2e-3)
    np.testing.assert_allclose(features[:, 2] * 255, 100, atol=2e-3)

    # cells in the overlap of two neighbouring tiles read the same value from either tile
    grid = make_tile_grid(sample.image.shape, sample.mpp, encoder.config)
    tiles = grid.assign(xy)
    checked = 0
    for tile in tiles:
        for dcol in (-1, 1):
            col = tile.col + dcol
            if not 0 <= col < grid.n_cols:
                continue
            x0, y0 = grid.origin(tile.row, col)
            pts = xy[tile.cells]
            inside = (pts[:, 0] >= x0 + 2) & (pts[:, 0] <= x0 + grid.read_size - 2)
            if not inside.any():
                continue
            other = type(tile)(tile.row, col, x0, y0, grid.read_size, tile.cells[inside])
            with torch.inference_mode():
                fmap = encoder(read_tiles(sample.image, grid, [other]))[0]
            values = sample_feature_map(fmap, grid.to_tile(pts[inside], other), 4).numpy()
            np.testing.assert_allclose(values[:, 0] * 255, pts[inside, 0] - 0.5, atol=2e-3)
            np.testing.assert_allclose(values, features[tile.cells[inside]], atol=1e-5)
            checked += int(inside.sum())
    assert checked > 20


def test_resampled_slide_maps_coordinates_exactly(box_encoder, sample_of):
    """A slide at 0.25 um/px, encoder at 0.5: tiles are read at 2x and resized; positions still map exactly."""
    encoder = box_encoder(stride=4, tile_size=64, margin=8)
    image = _ramp(240, 256)
    rng = np.random.default_rng(2)
    xy = np.column_stack([rng.uniform(12, 244, 300), rng.uniform(12, 228, 300)])
    sample = sample_of(image, xy, mpp=0.25)
    grid = make_tile_grid(sample.image.shape, sample.mpp, encoder.config)
    assert grid.resample and grid.read_size == 128
    features = extract_features(sample, encoder=encoder, progress=False)
    np.testing.assert_allclose(features[:, 0] * 255, xy[:, 0] - 0.5, atol=1e-2)
    np.testing.assert_allclose(features[:, 1] * 255, xy[:, 1] - 0.5, atol=1e-2)
