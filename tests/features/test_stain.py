"""Stain normalisation before the encoder (features.stain_norm, gcmoe.features.stain)."""

from __future__ import annotations

import hashlib
import json
import warnings

import numpy as np
import pytest
import torch
from skimage.color import lab2rgb, rgb2lab

from gcmoe.config import FeatureConfig, TissueConfig
from gcmoe.data.image import ArrayImage, SlideImage
from gcmoe.data.virtual_tissue import simulate_tissue
from gcmoe.errors import ConfigError, InvalidSampleError
from gcmoe.features import create_encoder, extract_features, extract_features_with_stats
from gcmoe.features.cache import FeatureCache
from gcmoe.features.extract import run_encoder_config
from gcmoe.features.stain import (
    TARGET_MEAN,
    TARGET_STD,
    LabStats,
    ReinhardImage,
    StainNormError,
    lab_to_rgb,
    reinhard_normalise,
    rgb_to_lab,
    slide_lab_stats,
)
from gcmoe.inference import model_encoder
from gcmoe.pipeline.outputs import _encoder_card


def _colour_grid(step: int = 5) -> np.ndarray:
    axis = np.arange(0, 256, step)
    return np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3).astype(np.uint8)


def test_lab_conversion_matches_skimage():
    rgb = _colour_grid()
    lab = rgb_to_lab(torch.from_numpy(rgb).float() / 255).numpy()
    assert np.abs(lab - rgb2lab(rgb[None])[0]).max() < 0.01
    back = lab_to_rgb(torch.from_numpy(rgb2lab(rgb[None])[0]).float()).numpy()
    assert np.abs(back - rgb / 255.0).max() <= 1 / 255
    # any Lab colour, out of gamut and negative z included, as skimage maps it
    rng = np.random.default_rng(0)
    lab = np.stack([rng.uniform(0, 100, 5000), rng.uniform(-100, 100, 5000), rng.uniform(-100, 100, 5000)], -1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # skimage warns about the clipped negative z
        expected = lab2rgb(lab[None])[0]
    assert np.abs(lab_to_rgb(torch.from_numpy(lab).float()).numpy() - expected).max() < 1e-3


def test_reinhard_normalise_is_the_lab_transfer():
    rgb = _colour_grid(7)
    stats = LabStats((60.0, 20.0, -5.0), (14.0, 9.0, 6.0), 1)
    scale = np.array(TARGET_STD) / np.array(stats.std)
    lab = (rgb2lab(rgb[None])[0] - stats.mean) * scale + TARGET_MEAN
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        expected = np.round(lab2rgb(lab[None])[0] * 255)
    got = reinhard_normalise(rgb, stats)
    assert got.dtype == np.uint8 and got.shape == rgb.shape
    assert np.abs(got.astype(float) - expected).max() <= 1
    # the slide's own statistics equal to the target: the identity
    assert np.array_equal(reinhard_normalise(rgb, LabStats(TARGET_MEAN, TARGET_STD, 1)), rgb)


class _CountingImage(ArrayImage):
    def __init__(self, array):
        super().__init__(array)
        self.reads = []

    def read_region(self, x, y, width, height):
        self.reads.append((width, height))
        return super().read_region(x, y, width, height)


def test_slide_stats_read_a_few_seeded_windows(paint_he):
    rng = np.random.default_rng(0)
    xy = rng.uniform(20, 580, (500, 2))
    nuclei = np.column_stack([xy, np.full(500, 5.0), np.full(500, 4.0), np.zeros(500), np.full(500, 0.8)])
    image = _CountingImage(paint_he((600, 600), nuclei, noise=0.05))
    stats = slide_lab_stats(image, xy)
    assert image.reads == [(128, 128)] * 64  # never the whole slide
    assert stats == slide_lab_stats(image, xy) and stats != slide_lab_stats(image, xy, seed=1)
    lab = rgb2lab(image.array).reshape(-1, 3)
    whole = lab[lab[:, 0] < 88]
    # the windows are centred on cells, so they see more nuclei than the whole image: close, a little darker
    assert np.abs(np.array(stats.mean) - whole.mean(0)).max() < 5
    assert np.abs(np.array(stats.std) - whole.std(0)).max() < 5


def test_a_slide_without_tissue_is_refused():
    xy = np.array([[50.0, 50.0], [200.0, 120.0]])
    with pytest.raises(StainNormError, match="stain_norm: none"):
        slide_lab_stats(ArrayImage(np.full((300, 300, 3), 245, np.uint8)), xy, name="blank")
    with pytest.raises(InvalidSampleError, match="no cells"):
        slide_lab_stats(ArrayImage(np.full((300, 300, 3), 120, np.uint8)), np.zeros((0, 2)))


def test_the_wrapper_keeps_the_image_attributes(paint_he):
    base = ArrayImage(paint_he((200, 300)))
    stats = LabStats((70.0, 15.0, -2.0), (8.0, 4.0, 3.0), 1)
    image = ReinhardImage(base, stats)
    assert isinstance(image, SlideImage)
    assert image.shape == base.shape and image.path is None and image.array is base.array
    region = image.read_region(-10, 150, 40, 80)  # partly outside the slide, read white and normalised alike
    assert region.shape == (80, 40, 3) and region.dtype == np.uint8
    assert np.array_equal(region, reinhard_normalise(base.read_region(-10, 150, 40, 80), stats))


@pytest.fixture(scope="module")
def two_stains():
    """One small virtual tissue rendered with two stain presets (same cells, other stain vectors and optics)."""
    cfg = dict(n_cells=600, height=480, width=480, n_genes=60, n_reference_cells=100, seed=1)
    return (simulate_tissue(TissueConfig(**cfg)).sample,
            simulate_tissue(TissueConfig(**cfg, stain="alternate")).sample)


def test_normalising_a_restained_slide_brings_its_features_back(two_stains):
    """The same cells under another stain: with stain_norm their features lie much closer to the original's.

    What a classifier trained on one stain sees is each feature's level, so the comparison keeps it: the
    correlation over every (cell, channel) value, channels scaled by the original's standard deviation, and
    the mean absolute difference in those units. (Within one slide, per channel, the features correlate
    about 0.91 with or without: Reinhard's transfer is affine in Lab, and correlation ignores offsets.)
    """
    standard, alternate = two_stains
    assert np.array_equal(standard.spatial, alternate.spatial)
    reference = extract_features(standard, progress=False)
    centre, scale = reference.mean(0), reference.std(0) + 1e-6

    def compare(stain_norm: str) -> tuple[float, float]:
        a, b = ((extract_features(s, FeatureConfig(stain_norm=stain_norm), progress=False) - centre) / scale
                for s in two_stains)
        return float(np.corrcoef(a.ravel(), b.ravel())[0, 1]), float(np.abs(a - b).mean())

    (r_none, d_none), (r_norm, d_norm) = compare("none"), compare("reinhard")
    assert r_norm > r_none + 0.1  # measured: 0.75 -> 0.91
    assert d_norm < 0.5 * d_none  # measured: 1.0 -> 0.25 standard deviations


def test_the_cache_key_and_stats_follow_stain_norm(two_stains, tmp_path):
    sample = two_stains[0]
    encoder = create_encoder("morphology")
    plain = run_encoder_config(encoder.config, FeatureConfig())
    normalised = run_encoder_config(encoder.config, FeatureConfig(stain_norm="reinhard"))
    assert normalised.stain_norm == "reinhard" and plain == encoder.config
    cache = FeatureCache(tmp_path)
    assert cache.path(sample, plain) != cache.path(sample, normalised)
    # "none" leaves the hash as it was before the field existed, so older cache entries and model cards stay valid
    old_fields = {k: v for k, v in plain.to_dict().items() if k != "stain_norm"}
    old_hash = hashlib.sha256(json.dumps(old_fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]
    assert plain.hash() == old_hash != normalised.hash()

    config = FeatureConfig(stain_norm="reinhard", cache_dir=str(tmp_path))
    first = extract_features_with_stats(sample, config, encoder=encoder, progress=False)
    assert first.stats.cache_path == str(cache.path(sample, normalised))
    assert first.stats.stain_norm == "reinhard" and len(first.stats.stain_lab_mean) == 3
    again = extract_features_with_stats(sample, config, encoder=encoder, progress=False)
    assert again.stats.cache_hit and again.stats.stain_lab_mean is None  # a hit measures nothing
    assert np.array_equal(first.features, again.features)
    with pytest.raises(ConfigError, match="stain_norm"):
        extract_features(sample, FeatureConfig(stain_norm="macenko"), progress=False)


def test_the_model_card_carries_stain_norm(tmp_path):
    card = _encoder_card("morphology", None, 42, None, "reinhard")
    assert card["stain_norm"] == "reinhard"
    encoder = model_encoder({"encoder": card}, tmp_path)
    assert encoder.config.stain_norm == "reinhard" and encoder.config.hash() == card["config_hash"]
    # a card written before the setting existed has no stain_norm and the hash of an unnormalised config
    old = {k: v for k, v in _encoder_card("morphology", None, 42, None).items() if k != "stain_norm"}
    assert model_encoder({"encoder": old}, tmp_path).config.stain_norm == "none"
    # a card whose setting was edited no longer matches its hash
    with pytest.raises(InvalidSampleError, match="config_hash"):
        model_encoder({"encoder": old | {"stain_norm": "reinhard"}}, tmp_path)
    with pytest.raises(InvalidSampleError, match="stain_norm"):
        model_encoder({"encoder": old | {"stain_norm": "macenko"}}, tmp_path)
