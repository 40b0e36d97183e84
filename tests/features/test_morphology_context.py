"""The opt-in ``morphology_context`` encoder: morphology channels plus their tissue context."""

import numpy as np
import torch

from gcmoe.config import FeatureConfig
from gcmoe.features import create_encoder, extract_features_with_stats, list_encoders


def test_registered_and_first_channels_are_the_morphology_encoder():
    assert "morphology_context" in list_encoders()
    enc, base = create_encoder("morphology_context"), create_encoder("morphology")
    assert enc.config.feature_dim == len(enc.channel_names) == 3 * base.config.feature_dim
    assert enc.channel_names[: base.config.feature_dim] == base.channel_names
    g = torch.Generator().manual_seed(0)
    x = 0.3 + 0.6 * torch.rand(1, 3, 200, 168, generator=g)
    with torch.inference_mode():
        out, ref = enc(x), base(x)
    assert out.shape == (1, enc.config.feature_dim, 50, 42) and torch.isfinite(out).all()
    torch.testing.assert_close(out[:, : base.config.feature_dim], ref)


def test_receptive_field_within_margin():
    enc = create_encoder("morphology_context")
    c = enc.config
    g = torch.Generator().manual_seed(0)
    base = 0.3 + 0.6 * torch.rand(1, 3, 768, 768, generator=g)
    pert = base.clone()
    pert[:, :, 384, 384] = 0.02
    with torch.inference_mode():
        diff = (enc(pert) - enc(base)).abs().amax(1)[0]
    rows, cols = torch.nonzero(diff > 1e-6, as_tuple=True)
    centres = (torch.cat([cols, rows]).double() + 0.5) * c.stride
    reach = (centres - 384.5).abs().max().item()
    assert 64 < reach <= c.margin - c.stride


def test_tiled_equals_one_big_tile(paint_he, sample_of):
    rng = np.random.default_rng(0)
    shape = (900, 960)
    n = 200
    nuclei = np.column_stack([rng.uniform(0, shape[1], n), rng.uniform(0, shape[0], n), rng.uniform(4, 12, n),
                              rng.uniform(3, 8, n), rng.uniform(0, np.pi, n), rng.uniform(0.3, 1.0, n)])
    sample = sample_of(paint_he(shape, nuclei, lumens=[(600, 400, 80)], noise=0.05), nuclei[:, :2])
    enc = create_encoder("morphology_context")
    settings = dict(encoder="morphology_context", batch_size=2)
    tiled, stats = extract_features_with_stats(sample, FeatureConfig(tile_size=1024, **settings), encoder=enc,
                                               progress=False)
    whole, one = extract_features_with_stats(sample, FeatureConfig(tile_size=1600, **settings), progress=False)
    assert one.tiles_run == 1 and stats.tiles_run > 4
    np.testing.assert_allclose(tiled, whole, atol=1e-4, rtol=1e-4)
