from __future__ import annotations

import math

import numpy as np
import pytest

from gcmoe.config import FeatureConfig
from gcmoe.errors import ConfigError
from gcmoe.features import create_encoder, extract_features, extract_features_with_stats


def _nuclei(rng, n, shape, scale=1.0):
    h, w = shape
    return np.column_stack(
        [
            rng.uniform(0, w, n),
            rng.uniform(0, h, n),
            rng.uniform(4, 12, n) * scale,
            rng.uniform(3, 8, n) * scale,
            rng.uniform(0, np.pi, n),
            rng.uniform(0.3, 1.0, n),
        ]
    )


def test_tiled_equals_one_big_tile(paint_he, sample_of):
    rng = np.random.default_rng(0)
    shape = (600, 640)
    nuclei = _nuclei(rng, 150, shape)
    image = paint_he(shape, nuclei, lumens=[(450, 300, 50)], noise=0.05)
    sample = sample_of(image, nuclei[:, :2])
    tiled, stats = extract_features_with_stats(sample, FeatureConfig(tile_size=256, batch_size=3), progress=False)
    whole, one = extract_features_with_stats(sample, FeatureConfig(tile_size=832), progress=False)
    assert one.tiles_run == 1 and stats.tiles_run > 9
    np.testing.assert_allclose(tiled, whole, atol=1e-4, rtol=1e-4)  # every cell, even at the slide's edge
    assert stats.encoder_passes == math.ceil(stats.tiles_run / 3)
    assert stats.tiles_run <= stats.tiles_total and stats.tiles_per_cell == stats.tiles_run / 150
    assert stats.megapixels_encoded == pytest.approx(stats.tiles_run * 256**2 / 1e6)


def test_cell_order_is_the_samples(paint_he, sample_of):
    rng = np.random.default_rng(1)
    nuclei = _nuclei(rng, 40, (200, 200))
    image = paint_he((200, 200), nuclei)
    features = extract_features(sample_of(image, nuclei[:, :2]), FeatureConfig(tile_size=256), progress=False)
    perm = rng.permutation(40)
    shuffled = extract_features(sample_of(image, nuclei[perm, :2]), FeatureConfig(tile_size=256), progress=False)
    np.testing.assert_allclose(shuffled, features[perm], atol=1e-6)


def test_mpp_resampling_matches_native_resolution(paint_he, sample_of):
    """The same tissue scanned at 0.25 um/px gives features close to its 0.5 um/px version."""
    rng = np.random.default_rng(2)
    fine_shape = (640, 640)  # 160 x 160 um
    nuclei = _nuclei(rng, 60, fine_shape, scale=2.0)  # sizes in fine pixels
    fine = paint_he(fine_shape, nuclei, noise=0.0)
    coarse = fine.reshape(320, 2, 320, 2, 3).mean(axis=(1, 3)).round().astype(np.uint8)  # 2 x 2 binning
    keep = (nuclei[:, :2] > 40).all(axis=1) & (nuclei[:, :2] < 600).all(axis=1)
    xy_fine = nuclei[keep, :2]
    f_fine = extract_features(sample_of(fine, xy_fine, mpp=0.25), FeatureConfig(tile_size=256), progress=False)
    f_coarse = extract_features(sample_of(coarse, xy_fine / 2, mpp=0.5), FeatureConfig(tile_size=256), progress=False)
    spread = f_coarse.std(axis=0)
    informative = spread > 0.05
    assert informative.sum() > 25
    corr = [np.corrcoef(f_fine[:, k], f_coarse[:, k])[0, 1] for k in np.flatnonzero(informative)]
    assert np.median(corr) > 0.97 and np.min(corr) > 0.8
    assert np.median(np.abs(f_fine - f_coarse)) < 0.1


def test_argument_errors(tiny_sample, tmp_path):
    with pytest.raises(ConfigError):
        extract_features(tiny_sample, FeatureConfig(batch_size=0), progress=False)
    with pytest.raises(ConfigError):
        extract_features(tiny_sample, FeatureConfig(weights=str(tmp_path / "w.pt")), progress=False)  # takes none
    with pytest.raises(ConfigError):
        extract_features(tiny_sample, encoder=object(), progress=False)


def test_progress_bar_runs(tiny_sample):
    features = extract_features(tiny_sample, FeatureConfig(tile_size=256), progress=True)
    assert features.shape == (tiny_sample.n_cells, create_encoder("morphology").config.feature_dim)
