from __future__ import annotations

import json

import numpy as np
import pytest

from gcmoe.config import FeatureConfig
from gcmoe.errors import FeatureCacheError
from gcmoe.features import FeatureCache, cache_key, extract_features_with_stats


@pytest.fixture
def small(paint_he, sample_of):
    rng = np.random.default_rng(0)
    xy = np.column_stack([rng.uniform(0, 150, 50), rng.uniform(0, 100, 50)])
    return sample_of(paint_he((100, 150), None), xy, sample_id="small:slide 1")


def test_round_trip_hit_skips_the_encoder(small, box_encoder, tmp_path):
    enc = box_encoder()
    first, stats = extract_features_with_stats(small, FeatureConfig(cache_dir=tmp_path), encoder=enc, progress=False)
    calls = enc.calls
    assert calls > 0 and not stats.cache_hit and stats.cache_path
    second, hit = extract_features_with_stats(small, FeatureConfig(cache_dir=tmp_path), encoder=enc, progress=False)
    assert enc.calls == calls, "the encoder ran on a cache hit"
    assert hit.cache_hit and hit.tiles_run == 0 and hit.cache_path == stats.cache_path
    np.testing.assert_array_equal(first, second)
    assert second.dtype == np.float32 and second.shape == (small.n_cells, 3)
    # what the miss returned is float16-rounded, exactly what the hit returns
    np.testing.assert_array_equal(first, first.astype(np.float16).astype(np.float32))


def test_layout_and_metadata(small, box_encoder, tmp_path):
    enc = box_encoder()
    _, stats = extract_features_with_stats(small, FeatureConfig(cache_dir=tmp_path), encoder=enc, progress=False)
    entry = FeatureCache(tmp_path).path(small, enc.config)
    assert str(entry) == stats.cache_path
    assert entry.parent == tmp_path / "features" / "small_slide_1"  # sample id made safe for the file system
    assert entry.name == f"box-{cache_key(small.sample_id, small.fingerprint(), enc.config)}"
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["n_cells"] == 50 and meta["dim"] == 3 and meta["dtype"] == "float16"
    assert meta["encoder"] == enc.config.to_dict() and meta["fingerprint"] == small.fingerprint()
    assert meta["checksum"].startswith("sha256:") and meta["created"]
    assert [p.name for p in entry.parent.iterdir()] == [entry.name], "temporary directories left behind"
    assert FeatureCache(tmp_path).open(small, enc.config).chunks == (50, 3)


def test_key_changes_with_encoder_config_and_cells(small, box_encoder, sample_of, tmp_path):
    cache = FeatureCache(tmp_path)
    a, b = box_encoder(), box_encoder(tile_size=128)
    assert cache.path(small, a.config) != cache.path(small, b.config)
    moved = sample_of(small.image.read_region(0, 0, 150, 100), small.spatial[::-1].copy(), sample_id=small.sample_id)
    assert cache.path(small, a.config) != cache.path(moved, a.config)
    extract_features_with_stats(small, FeatureConfig(cache_dir=tmp_path), encoder=a, progress=False)
    _, stats = extract_features_with_stats(small, FeatureConfig(cache_dir=tmp_path, tile_size=128), encoder=a, progress=False)
    assert not stats.cache_hit, "a different tile size must not hit the entry of another"


def _corrupt_chunk(entry):
    chunk = next(p for p in (entry / "features.zarr").rglob("*") if p.is_file() and p.name != "zarr.json")
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage",
    [
        _corrupt_chunk,
        lambda entry: (entry / "meta.json").unlink(),
        lambda entry: (entry / "meta.json").write_text("{not json"),
        lambda entry: (entry / "features.zarr" / "zarr.json").unlink(),
    ],
)
def test_corruption_is_detected(small, box_encoder, tmp_path, damage):
    enc = box_encoder()
    extract_features_with_stats(small, FeatureConfig(cache_dir=tmp_path), encoder=enc, progress=False)
    entry = FeatureCache(tmp_path).path(small, enc.config)
    damage(entry)
    with pytest.raises(FeatureCacheError, match="delete"):
        extract_features_with_stats(small, FeatureConfig(cache_dir=tmp_path), encoder=enc, progress=False)


def test_checksum_mismatch_and_tampered_metadata(small, box_encoder, tmp_path):
    enc = box_encoder()
    cache = FeatureCache(tmp_path)
    features = np.random.default_rng(0).normal(size=(small.n_cells, 3))
    entry = cache.save(small, enc.config, features)
    np.testing.assert_allclose(cache.load(small, enc.config), features, rtol=1e-3, atol=1e-3)
    meta = json.loads((entry / "meta.json").read_text())
    (entry / "meta.json").write_text(json.dumps({**meta, "checksum": "sha256:" + "0" * 64}))
    with pytest.raises(FeatureCacheError, match="checksum"):
        cache.load(small, enc.config)
    (entry / "meta.json").write_text(json.dumps({**meta, "n_cells": 49}))
    with pytest.raises(FeatureCacheError, match="n_cells"):
        cache.load(small, enc.config)
    assert cache.remove(small, enc.config) and cache.load(small, enc.config) is None


def test_save_keeps_an_existing_entry_and_rejects_bad_input(small, box_encoder, tmp_path):
    enc = box_encoder()
    cache = FeatureCache(tmp_path)
    first = np.zeros((small.n_cells, 3))
    cache.save(small, enc.config, first)
    cache.save(small, enc.config, np.ones((small.n_cells, 3)))  # loses the race: the first entry stays
    np.testing.assert_array_equal(cache.load(small, enc.config), first)
    assert len(list((tmp_path / "features" / "small_slide_1").iterdir())) == 1
    with pytest.raises(ValueError):
        cache.save(small, enc.config, np.zeros((3, 3)))
    with pytest.raises(FeatureCacheError, match="float16"):
        cache.save(small, enc.config.with_tile_size(128), np.full((small.n_cells, 3), 1e6))
