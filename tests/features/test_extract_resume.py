"""Resumable and sharded extraction: parts of finished tiles in a partial folder beside the cache entry."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zipfile

import numpy as np
import pytest
import torch

import gcmoe.features.partial as partial_module
from gcmoe.config import FeatureConfig
from gcmoe.data.sample import Sample
from gcmoe.errors import ConfigError, FeatureCacheError
from gcmoe.features import Encoder, FeatureCache, create_encoder, extract_features, extract_features_with_stats
from gcmoe.features.partial import partial_path

TILE = 256  # morphology tiles of 256 px (step 96 px): 25 tiles on the 480 px slide below, 13 batches of 2
BATCH = 2


class Crash(RuntimeError):
    pass


class Wrapped(Encoder):
    """The morphology encoder (same config, so the same cache key) that sleeps, or raises after some batches."""

    def __init__(self, crash_after: int | None = None, pause: float = 0.0) -> None:
        inner = create_encoder("morphology")
        super().__init__(inner.config)
        self.inner, self.crash_after, self.pause, self.calls = inner, crash_after, pause, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.crash_after is not None and self.calls > self.crash_after:
            raise Crash
        time.sleep(self.pause)
        return self.inner(x)


def _slide(paint_he, sample_of, shape, n, seed, sample_id):
    """n nuclei on an H&E-like image of ``shape`` (0.5 um/px), a cell at each nucleus."""
    rng = np.random.default_rng(seed)
    h, w = shape
    nuclei = np.column_stack([rng.uniform(4, w - 4, n), rng.uniform(4, h - 4, n), rng.uniform(4, 9, n),
                              rng.uniform(3, 7, n), rng.uniform(0, np.pi, n), rng.uniform(0.3, 1.0, n)])
    return sample_of(paint_he(shape, nuclei, noise=0.05), nuclei[:, :2], sample_id=sample_id)


@pytest.fixture
def slide(paint_he, sample_of) -> Sample:
    """160 cells on a 480 x 480 px H&E-like image (0.5 um/px)."""
    return _slide(paint_he, sample_of, (480, 480), 160, seed=3, sample_id="resume")


@pytest.fixture
def one_thread():
    """One intra-op thread, as in the subprocesses (the same kernels, so the same float16 values)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _extract(sample, cache_dir, encoder=None, tile_size=TILE, **kw):
    settings = FeatureConfig(cache_dir=cache_dir, tile_size=tile_size, batch_size=BATCH)
    return extract_features_with_stats(sample, settings, encoder=encoder, progress=False, **kw)


def _crash(sample, cache_dir, after: int, **kw) -> None:
    with pytest.raises(Crash):
        _extract(sample, cache_dir, Wrapped(crash_after=after), **kw)


def _folders(sample, cache_dir, tile_size=TILE):
    entry = FeatureCache(cache_dir).path(sample, create_encoder("morphology").config.with_tile_size(tile_size))
    return entry, partial_path(entry)


def _n_tiles(sample, tile_size=TILE):
    from gcmoe.features import make_tile_grid

    config = create_encoder("morphology").config.with_tile_size(tile_size)
    return len(make_tile_grid(sample.image.shape, sample.mpp, config).assign(sample.spatial))


def test_interrupted_run_resumes_with_the_uninterrupted_features(slide, tmp_path, monkeypatch):
    reference, ref_stats = _extract(slide, tmp_path / "ref")
    in_memory, _ = _extract(slide, None)
    np.testing.assert_array_equal(reference, in_memory.astype(np.float16).astype(np.float32))
    n_tiles = _n_tiles(slide)
    assert ref_stats.tiles_run == n_tiles > 20 and ref_stats.tiles_reused == 0

    monkeypatch.setattr(partial_module, "FLUSH_TILES", 4)  # a part every 2 batches
    _crash(slide, tmp_path / "cache", after=5)
    entry, partial = _folders(slide, tmp_path / "cache")
    assert not entry.exists() and partial.is_dir()
    parts = sorted(p.name for p in partial.glob("part-*.npz"))
    assert len(parts) == 3, parts  # batches 0-1, 2-3, and batch 4, written as the error went up
    assert json.loads((partial / "partial.json").read_text())["key"] == entry.name.rsplit("-", 1)[-1]

    resumed, stats = _extract(slide, tmp_path / "cache")
    assert stats.tiles_reused == 5 * BATCH and stats.tiles_run == n_tiles - 5 * BATCH
    assert stats.encoder_passes == -(-(n_tiles - 5 * BATCH) // BATCH)
    np.testing.assert_array_equal(resumed, reference)
    assert [p.name for p in entry.parent.iterdir()] == [entry.name], "partial or temporary folders left behind"
    np.testing.assert_array_equal(FeatureCache(tmp_path / "cache").load(slide, create_encoder("morphology").config
                                                                        .with_tile_size(TILE)), reference)


def test_partial_folder_of_another_key_is_not_used(slide, tmp_path, caplog):
    reference, _ = _extract(slide, tmp_path / "ref")
    _crash(slide, tmp_path / "cache", after=4)
    _, partial = _folders(slide, tmp_path / "cache")
    before = sorted(p.name for p in partial.iterdir())

    # another tile size is another key: its own folder, and this one left alone
    _, other = _extract(slide, tmp_path / "cache", tile_size=288)
    assert other.tiles_reused == 0 and other.tiles_run == _n_tiles(slide, 288)
    assert sorted(p.name for p in partial.iterdir()) == before

    # a folder whose partial.json names another extraction is deleted, never mixed in
    info = json.loads((partial / "partial.json").read_text())
    (partial / "partial.json").write_text(json.dumps(info | {"key": "0" * 20}))
    with caplog.at_level("WARNING", logger="gcmoe.features.partial"):
        features, stats = _extract(slide, tmp_path / "cache")
    assert "belongs to another extraction" in caplog.text and "key: stored '00000" in caplog.text
    assert stats.tiles_reused == 0 and stats.tiles_run == _n_tiles(slide)
    np.testing.assert_array_equal(features, reference)
    assert not partial.exists()


def _flip_a_byte(path):
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def _foreign_part(path):
    with open(path, "wb") as fh:
        np.savez(fh, cells=np.arange(3), features=np.zeros((3, 5), np.float16))


@pytest.mark.parametrize("damage", [_flip_a_byte, lambda p: p.write_bytes(p.read_bytes()[:100]), _foreign_part],
                         ids=["flipped-byte", "truncated", "foreign"])
def test_a_corrupt_part_file_is_reported(slide, tmp_path, damage):
    reference, _ = _extract(slide, tmp_path / "ref")
    _crash(slide, tmp_path / "cache", after=3)
    entry, partial = _folders(slide, tmp_path / "cache")
    part = sorted(partial.glob("part-*.npz"))[0]
    damage(part)
    with pytest.raises(FeatureCacheError, match=rf"partial feature file .*{part.name}.*delete the folder"):
        _extract(slide, tmp_path / "cache")
    assert not entry.exists()
    shutil.rmtree(partial)  # what the message says: those tiles are encoded again
    features, stats = _extract(slide, tmp_path / "cache")
    assert stats.tiles_reused == 0
    np.testing.assert_array_equal(features, reference)


def test_part_files_are_plain_npz_without_pickles(slide, tmp_path):
    _crash(slide, tmp_path, after=2)
    _, partial = _folders(slide, tmp_path)
    part = next(partial.glob("part-*.npz"))
    assert sorted(zipfile.ZipFile(part).namelist()) == ["cells.npy", "features.npy"]
    with np.load(part, allow_pickle=False) as z:
        assert z["cells"].dtype == np.int64 and z["features"].dtype == np.float16
        assert z["features"].shape == (len(z["cells"]), create_encoder("morphology").config.feature_dim)


def test_sharding_without_a_cache_is_refused(slide, monkeypatch):
    monkeypatch.setattr("gcmoe.training.distributed.rank_world", lambda: (0, 2))
    with pytest.raises(ConfigError, match=r"split across 2 processes \(torchrun\) needs a cache folder"):
        extract_features(slide, distributed=True, progress=False)


def test_parts_missing_after_all_ranks_say_the_folder_must_be_shared(slide, tmp_path, monkeypatch):
    """Rank 0 of two, alone: rank 1's parts never appear (as on storage rank 0 does not see)."""
    reference, _ = _extract(slide, tmp_path / "ref")
    monkeypatch.setattr("gcmoe.training.distributed.rank_world", lambda: (0, 2))
    monkeypatch.setattr("gcmoe.features.extract._barrier", lambda world: None)
    with pytest.raises(FeatureCacheError, match="must be on storage that every process sees"):
        _extract(slide, tmp_path / "cache", distributed=True)
    monkeypatch.undo()
    # its own share stays in the partial folder: a single process finishes the other batches
    features, stats = _extract(slide, tmp_path / "cache")
    n_tiles = _n_tiles(slide)
    assert stats.tiles_reused == sum(min(BATCH, n_tiles - k * BATCH) for k in range(0, -(-n_tiles // BATCH), 2))
    np.testing.assert_array_equal(features, reference)


_ENV = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")} | {"OMP_NUM_THREADS": "1"}

# An extraction in its own process, slowed per batch so that it can be killed mid-slide; a part per batch.
_SCRIPT = textwrap.dedent(f"""
    import sys, time
    import torch
    import gcmoe.features.partial as partial
    from gcmoe.data.sample import Sample
    from gcmoe.config import FeatureConfig
    from gcmoe.features import Encoder, create_encoder, extract_features

    class Slow(Encoder):
        def __init__(self, pause):
            inner = create_encoder("morphology")
            super().__init__(inner.config)
            self.inner, self.pause = inner, pause

        def forward(self, x):
            time.sleep(self.pause)
            return self.inner(x)

    torch.set_num_threads(1)
    partial.FLUSH_TILES = 1
    extract_features(Sample.read(sys.argv[1]), FeatureConfig(cache_dir=sys.argv[2], tile_size={TILE}, batch_size={BATCH}),
                     encoder=Slow(float(sys.argv[3])), progress=False)
""")


@pytest.mark.slow
def test_sigkill_mid_slide_then_resume_equals_an_uninterrupted_run(slide, tmp_path, one_thread):
    script = tmp_path / "extract.py"
    script.write_text(_SCRIPT)
    cache = tmp_path / "cache"
    slide = Sample.read(slide.write(tmp_path / "slide" / "resume.h5ad"))  # what the subprocess reads
    reference, _ = _extract(slide, tmp_path / "ref")
    entry, partial = _folders(slide, cache)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "slide" / "resume.h5ad"), str(cache), "0.25"],
                            env=_ENV)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(partial.glob("part-*.npz"))) < 3 and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_parts = len(list(partial.glob("part-*.npz")))
    n_batches = -(-_n_tiles(slide) // BATCH)
    assert 3 <= n_parts < n_batches, "the run must be killed mid-slide"
    assert not entry.exists()

    resumed, stats = _extract(slide, cache)
    assert stats.tiles_reused >= 3 * BATCH and stats.tiles_run + stats.tiles_reused == _n_tiles(slide)
    np.testing.assert_array_equal(resumed, reference)
    assert not partial.exists()


@pytest.mark.slow
def test_two_torchrun_processes_extract_what_one_process_extracts(paint_he, sample_of, tmp_path, one_thread):
    """`torchrun --nproc-per-node 2 -m gcmoe extract`: 2 x 3 tiles of 1024 px, batch k to rank k % 2."""
    sample = _slide(paint_he, sample_of, (1200, 2000), 240, seed=4, sample_id="sharded")
    h5ad = sample.write(tmp_path / "sharded.h5ad")
    sample = Sample.read(h5ad)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "gcmoe", "extract", str(h5ad), "--cache-dir", str(tmp_path / "cache"),
                          "--out", str(tmp_path / "two.npy"), "--batch-size", "1"],
                         env=_ENV | {"COLUMNS": "200"}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("x 42 features") == 1, run.stdout  # rank 0 alone writes --out
    log = run.stdout + run.stderr
    for rank in (0, 1):  # each rank encoded its 3 tiles
        assert re.search(rf"from\s+3\s+tiles.*\(rank\s+{rank}\s+of\s+2\)", log), log[-3000:]

    one, stats = extract_features_with_stats(sample, FeatureConfig(cache_dir=tmp_path / "one", batch_size=1), progress=False)
    assert stats.tiles_run == 6
    two = np.load(tmp_path / "two.npy")
    np.testing.assert_array_equal(two, one)
    config = create_encoder("morphology").config
    np.testing.assert_array_equal(FeatureCache(tmp_path / "cache").load(sample, config), one)
    entry = FeatureCache(tmp_path / "cache").path(sample, config)
    assert [p.name for p in entry.parent.iterdir()] == [entry.name], "one entry, no partial or temporary folder"
