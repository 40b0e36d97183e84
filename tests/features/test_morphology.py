from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.color import rgb2hed

from gcmoe.config import FeatureConfig
from gcmoe.features import MORPHOLOGY_CHANNELS, create_encoder, extract_features
from gcmoe.features.morphology import rgb_to_hed


@pytest.fixture(scope="module")
def encoder():
    return create_encoder("morphology")


@pytest.fixture(scope="module")
def nuclei_features(nuclei_sample):
    sample, labels = nuclei_sample
    features = extract_features(sample, FeatureConfig(tile_size=384), progress=False)
    return features, labels


def channel(name: str) -> int:
    return MORPHOLOGY_CHANNELS.index(name)


def test_colour_deconvolution_matches_skimage():
    rng = np.random.default_rng(0)
    rgb = rng.integers(1, 256, size=(16, 16, 3)).astype(np.uint8)
    ours = rgb_to_hed(torch.from_numpy(rgb).permute(2, 0, 1)[None].double() / 255)[0].permute(1, 2, 0).numpy()
    ref = rgb2hed(rgb) * -np.log(1e-6)
    np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_output_finite_shape_deterministic_and_batch_independent(encoder, paint_he):
    image = paint_he((160, 192), np.array([[60, 60, 10, 10, 0, 0.9], [130, 90, 6, 6, 0, 0.5]]), noise=0.05)
    x = torch.from_numpy(image).permute(2, 0, 1).float().div(255)[None]
    with torch.inference_mode():
        a = encoder(x)
        b = encoder(x)
        both = encoder(torch.cat([torch.rand_like(x), x]))
    assert a.shape == (1, len(MORPHOLOGY_CHANNELS), 40, 48)
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)
    torch.testing.assert_close(both[1:], a, atol=1e-5, rtol=1e-5)


def test_receptive_field_within_margin(encoder):
    """A pixel changes no feature farther than margin - stride from it, so tile borders never reach a cell."""
    c = encoder.config
    g = torch.Generator().manual_seed(0)
    base = 0.3 + 0.6 * torch.rand(1, 3, 256, 256, generator=g)
    pert = base.clone()
    pert[:, :, 128, 128] = 0.02
    with torch.inference_mode():
        diff = (encoder(pert) - encoder(base)).abs().amax(1)[0]
    rows, cols = torch.nonzero(diff > 0, as_tuple=True)
    centres = (torch.cat([cols, rows]).double() + 0.5) * c.stride  # feature pixel centres, x then y
    reach = (centres - 128.5).abs().max().item()  # Chebyshev distance to the changed pixel's centre
    assert 0 < reach <= c.margin - c.stride


def test_channels_are_order_one(encoder, nuclei_features):
    features, _ = nuclei_features
    assert np.isfinite(features).all()
    assert np.abs(features).mean() < 3
    assert np.abs(np.median(features, axis=0)).max() < 10


def _effect(features, labels, a, b, name):
    """Standardised mean difference of one channel between classes a and b."""
    x, y = features[labels == a, channel(name)], features[labels == b, channel(name)]
    return (x.mean() - y.mean()) / np.sqrt(0.5 * (x.var() + y.var()) + 1e-12)


def test_features_separate_size_darkness_and_elongation(nuclei_features):
    features, labels = nuclei_features  # 0 small dark, 1 big dark, 2 small pale, 3 elongated
    assert _effect(features, labels, 1, 0, "blob_log2_scale") > 2  # big nuclei answer at larger scales
    assert _effect(features, labels, 1, 0, "blob_4.0um") > 2
    assert _effect(features, labels, 0, 2, "h_1um") > 2  # dark vs pale
    assert _effect(features, labels, 3, 0, "h_anisotropy_2.0um") > 2  # elongated vs round
    assert _effect(features, labels, 3, 0, "h_coherence_2um") > 2


def test_features_linearly_separate_all_classes(nuclei_features):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    features, labels = nuclei_features
    accuracy = cross_val_score(LogisticRegression(max_iter=2000), features, labels, cv=3).mean()
    assert accuracy > 0.9


def test_stroma_vs_lumen(paint_he, sample_of):
    image = paint_he((200, 320), None, stroma=0.35, lumens=[(240, 100, 60)])
    xy = np.array([[60.0, 60.0], [80.0, 150.0], [240.0, 100.0], [230.0, 90.0]])  # two in stroma, two in lumen
    features = extract_features(sample_of(image, xy), FeatureConfig(tile_size=512), progress=False)
    for name in ("tissue_2um", "e_2um", "tissue_8um"):
        k = channel(name)
        assert features[:2, k].min() > features[2:, k].max() + 1.0
