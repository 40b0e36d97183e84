"""Cell features for a whole slide: tile, encode in batches, sample at cell centres, cache.

One encoder pass per batch of tiles, never one per cell; only tiles that hold a cell are read, and the
slide is never loaded whole (a background thread reads the next batch while the current one is encoded).

With a cache, finished tiles are saved as they go in a partial folder beside the cache entry
(``.partial-<encoder>-<key>/``, :mod:`gcmoe.features.partial`): a run that is killed resumes from the
tiles already done, and the batches are always cut the same way, so a resumed run gives the very values
of an uninterrupted one. Under ``torchrun`` (``distributed=True``) the ranks share the batches out
(batch ``k`` to rank ``k % world``), write their parts into the same folder, and rank 0 assembles them into
the cache entry.

With ``config.stain_norm = "reinhard"`` the slide's Lab tissue statistics are measured once (in small windows
around its cells, :func:`gcmoe.features.stain.slide_lab_stats`) and every tile is read Reinhard-normalised to
a fixed target; the setting is part of the cache key (:func:`run_encoder_config`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from gcmoe.config import FeatureConfig
from gcmoe.errors import ConfigError, FeatureCacheError
from gcmoe.features.cache import FeatureCache, to_float16
from gcmoe.features.partial import PartialExtraction, PartWriter, partial_path
from gcmoe.features.registry import Encoder, EncoderConfig, create_encoder
from gcmoe.features.stain import STAIN_NORMS
from gcmoe.features.tiling import Tile, TileGrid, make_tile_grid

if TYPE_CHECKING:
    import torch

    from gcmoe.data.image import SlideImage
    from gcmoe.data.sample import Sample

__all__ = ["FeatureResult", "FeatureStats", "extract_features", "extract_features_with_stats", "read_tiles",
           "run_encoder_config"]

log = logging.getLogger(__name__)


@dataclass
class FeatureStats:
    """What one extraction did (for logs and benchmarks).

    Attributes
    ----------
    tiles_total
        Tiles in the grid covering the slide.
    tiles_run
        Tiles read and encoded by this call (those holding at least one cell); 0 on a cache hit. Under
        ``torchrun`` each rank counts its own share.
    tiles_reused
        Tiles not encoded because an interrupted run had saved them in the partial folder.
    encoder_passes
        Encoder forward calls (one per batch of tiles).
    megapixels_read, megapixels_encoded
        Slide pixels read and encoder-input pixels encoded (tiles including their overlap), millions.
    seconds
        Wall time of the whole call; ``seconds_read`` is spent reading and resizing tiles (in a
        background thread, mostly hidden behind encoding), ``seconds_encode`` in the encoder and sampling,
        ``seconds_parts`` writing the partial folder's part files; ``seconds_stain`` measuring the slide's
        stain statistics (``stain_norm = "reinhard"``; reading normalised tiles counts in ``seconds_read``).
    stain_norm, stain_lab_mean, stain_lab_std
        The stain normalisation, and the slide's Lab tissue mean and standard deviation it measured (None
        when none was measured: no normalisation, a cache hit, or every tile reused).
    """

    sample_id: str
    encoder: str
    encoder_hash: str
    n_cells: int
    feature_dim: int
    tile_size: int
    read_size: int
    tiles_total: int = 0
    tiles_run: int = 0
    tiles_reused: int = 0
    encoder_passes: int = 0
    megapixels_read: float = 0.0
    megapixels_encoded: float = 0.0
    seconds: float = 0.0
    seconds_read: float = 0.0
    seconds_encode: float = 0.0
    seconds_parts: float = 0.0
    seconds_stain: float = 0.0
    stain_norm: str = "none"
    stain_lab_mean: list[float] | None = None
    stain_lab_std: list[float] | None = None
    cache_hit: bool = False
    cache_path: str | None = None

    @property
    def tiles_per_cell(self) -> float:
        """Encoder tile passes per cell: ``tiles_run / n_cells``."""
        return self.tiles_run / max(self.n_cells, 1)

    @property
    def cells_per_second(self) -> float:
        return self.n_cells / self.seconds if self.seconds > 0 else float("nan")

    @property
    def megapixels_per_second(self) -> float:
        """Encoder-input megapixels per second of wall time."""
        return self.megapixels_encoded / self.seconds if self.seconds > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(
            tiles_per_cell=self.tiles_per_cell,
            cells_per_second=self.cells_per_second,
            megapixels_per_second=self.megapixels_per_second,
        )
        return out


class FeatureResult(NamedTuple):
    """Features (n_cells, D) float32 in the sample's cell order, and what computing them took."""

    features: np.ndarray
    stats: FeatureStats


def read_tiles(image: SlideImage, grid: TileGrid, tiles: list[Tile]) -> torch.Tensor:
    """Read tiles and bring them to the encoder's pixel size: ``(len(tiles), 3, T, T)`` float32 in [0, 1].

    Resizing (when the slide's pixel size differs from the encoder's) is bilinear with antialiasing and
    ``align_corners=False``, so slide point ``x`` lands at ``(x - x0) * tile_size / read_size`` exactly.
    """
    import torch
    import torch.nn.functional as F

    size = grid.tile_size
    out = torch.empty((len(tiles), 3, size, size), dtype=torch.float32)
    for i, tile in enumerate(tiles):
        region = image.read_region(tile.x0, tile.y0, tile.read_size, tile.read_size)
        pixels = torch.from_numpy(np.ascontiguousarray(region)).permute(2, 0, 1).float().div_(255.0)
        if grid.resample:
            pixels = F.interpolate(
                pixels.unsqueeze(0), size=(size, size), mode="bilinear", align_corners=False, antialias=True
            )[0].clamp_(0.0, 1.0)
        out[i] = pixels
    return out


def run_encoder_config(encoder_config: EncoderConfig, config: FeatureConfig) -> EncoderConfig:
    """The encoder's config as a run with ``config`` uses it: at ``config.tile_size`` (None: the encoder's own)
    and with ``config.stain_norm``. Its hash keys the feature cache, so every reader of the cache and every
    model card must derive it here."""
    out = encoder_config if config.tile_size is None else encoder_config.with_tile_size(config.tile_size)
    if config.stain_norm not in STAIN_NORMS:
        raise ConfigError(f"features.stain_norm must be one of {', '.join(STAIN_NORMS)}, got {config.stain_norm!r}")
    return out if out.stain_norm == config.stain_norm else dataclasses.replace(out, stain_norm=config.stain_norm)


def _resolve_encoder(config: FeatureConfig, encoder: Encoder | None) -> Encoder:
    if encoder is None:
        return create_encoder(config.encoder, weights=config.weights)
    if not isinstance(encoder, Encoder):
        raise ConfigError(
            f"encoder must be a gcmoe.features.Encoder (or None: FeatureConfig.encoder), got {type(encoder).__name__}"
        )
    return encoder


def _progress(enabled: bool) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=True,
    )


@dataclass
class _Job:
    """One slide's extraction: what every step reads."""

    sample: Sample
    encoder: Encoder
    config: EncoderConfig  # the encoder's config at the run's tile size
    grid: TileGrid
    batch_size: int
    device: str
    progress: bool
    stats: FeatureStats


def _new_stats(sample: Sample, config: EncoderConfig, grid: TileGrid) -> FeatureStats:
    return FeatureStats(
        sample_id=sample.sample_id,
        encoder=config.name,
        encoder_hash=config.hash(),
        n_cells=sample.n_cells,
        feature_dim=config.feature_dim,
        tile_size=grid.tile_size,
        read_size=grid.read_size,
        tiles_total=grid.n_tiles,
        stain_norm=config.stain_norm,
    )


def _slide_image(job: _Job) -> SlideImage:
    """The slide as the encoder reads it: stain-normalised when the run says so (statistics measured here)."""
    if job.config.stain_norm == "none":
        return job.sample.image
    from gcmoe.features.stain import stain_normalised

    t = time.perf_counter()
    image = stain_normalised(job.sample.image, job.sample.spatial, job.config.stain_norm, name=job.sample.sample_id)
    job.stats.seconds_stain = time.perf_counter() - t
    job.stats.stain_lab_mean, job.stats.stain_lab_std = list(image.stats.mean), list(image.stats.std)
    return image


def _batches(tiles: list[Tile], batch_size: int) -> list[list[Tile]]:
    """The tiles in encoder batches, always cut the same way so that every run sees the same batches."""
    return [tiles[i : i + batch_size] for i in range(0, len(tiles), batch_size)]


# (batch index, its tiles, the cells of those tiles in order, their float32 features)
BatchSink = Callable[[int, list[Tile], np.ndarray, np.ndarray], None]


def _encode_batches(job: _Job, batches: list[tuple[int, list[Tile]]], sink: BatchSink) -> None:
    """Encode ``(index, tiles)`` batches in order and hand each one's cell features to ``sink``."""
    import torch

    from gcmoe.features.sampling import sample_feature_map

    sample, config, grid, device, stats = job.sample, job.config, job.grid, job.device, job.stats
    if not batches:
        return
    xy = sample.spatial
    image = _slide_image(job)
    expected = (config.feature_dim, *job.encoder.output_size(grid.tile_size, grid.tile_size))
    read_seconds = [0.0]

    def read(batch: list[Tile]) -> torch.Tensor:
        t = time.perf_counter()
        pixels = read_tiles(image, grid, batch)
        read_seconds[0] += time.perf_counter() - t
        return pixels

    encoder = job.encoder.to(device).eval()
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gcmoe-tiles")
    with pool, torch.inference_mode(), _progress(job.progress) as bar:
        task = bar.add_task(f"features {sample.sample_id} ({config.name})", total=sum(len(b) for _, b in batches))
        pending = pool.submit(read, batches[0][1]) if batches else None
        for i, (k, batch) in enumerate(batches):
            pixels = pending.result()
            pending = pool.submit(read, batches[i + 1][1]) if i + 1 < len(batches) else None
            t = time.perf_counter()
            fmap = encoder(pixels.to(device))
            if tuple(fmap.shape[1:]) != expected:
                raise RuntimeError(
                    f"encoder '{config.name}' returned {tuple(fmap.shape)} for tiles of {grid.tile_size} px; "
                    f"its config promises (B, {expected[0]}, {expected[1]}, {expected[2]})"
                )
            cells = np.concatenate([tile.cells for tile in batch])
            features = np.concatenate([
                sample_feature_map(tile_map, grid.to_tile(xy[tile.cells], tile), config.stride).float().cpu().numpy()
                for tile, tile_map in zip(batch, fmap)
            ])  # fmt: skip
            if not np.isfinite(features).all():
                bad = int((~np.isfinite(features)).any(axis=1).sum())
                raise RuntimeError(
                    f"encoder '{config.name}' gave non-finite features for {bad} cells of {sample.sample_id}"
                )
            stats.seconds_encode += time.perf_counter() - t
            stats.encoder_passes += 1
            stats.tiles_run += len(batch)
            sink(k, batch, cells, features)
            bar.advance(task, len(batch))
    stats.seconds_read += read_seconds[0]
    stats.megapixels_read = stats.tiles_run * grid.read_size**2 / 1e6
    stats.megapixels_encoded = stats.tiles_run * grid.tile_size**2 / 1e6


def _encode_in_memory(job: _Job) -> np.ndarray:
    """Features (n_cells, D) float32 of every cell, held in memory only (extraction without a cache)."""
    features = np.empty((job.sample.n_cells, job.config.feature_dim), dtype=np.float32)

    def keep(k: int, batch: list[Tile], cells: np.ndarray, values: np.ndarray) -> None:
        features[cells] = values

    batches = list(enumerate(_batches(job.grid.assign(job.sample.spatial), job.batch_size)))
    _encode_batches(job, batches, keep)
    return features


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed

        torch.distributed.barrier()


def _encode_with_parts(job: _Job, partial: PartialExtraction, rank: int, world: int) -> np.ndarray | None:
    """Float16 features (n_cells, D) of every cell, resuming from and saving progress to ``partial``.

    Tiles whose cells the parts already hold are skipped; rank ``r`` of ``world`` encodes the batches
    ``k`` with ``k % world == r``. Every rank must call this; rank 0 gets the assembled features, the
    others None.
    """
    sample, config, stats = job.sample, job.config, job.stats
    if rank == 0:
        partial.prepare()
    _barrier(world)  # the folder is ready (a stale one is gone) before any rank reads or writes parts
    tiles = job.grid.assign(sample.spatial)
    features = np.zeros((sample.n_cells, config.feature_dim), dtype=np.float16)
    done = np.zeros(sample.n_cells, dtype=bool)
    seen: set[str] = set()
    partial.load(features, done, seen)
    todo = []
    for k, batch in enumerate(_batches(tiles, job.batch_size)):
        rest = [tile for tile in batch if not done[tile.cells].all()]
        if rest and k % world == rank:
            todo.append((k, rest))
    stats.tiles_reused = sum(1 for tile in tiles if done[tile.cells].all())
    if stats.tiles_reused and rank == 0:
        log.info(
            "features of %s (%s): %d of %d tiles reused from %s, %d to encode",
            sample.sample_id, config.name, stats.tiles_reused, len(tiles), partial.folder,
            len(tiles) - stats.tiles_reused,
        )  # fmt: skip
    writer = PartWriter(partial, rank)

    def save(k: int, batch: list[Tile], cells: np.ndarray, values: np.ndarray) -> None:
        values16 = to_float16(values, sample.sample_id, config.name)
        features[cells] = values16
        done[cells] = True
        writer.add(k, len(batch), cells, values16)

    try:
        _encode_batches(job, todo, save)
    except BaseException:
        with contextlib.suppress(Exception):
            writer.flush()  # keep the batches finished before the error
        raise
    writer.flush()
    stats.seconds_parts = writer.seconds
    _barrier(world)  # every rank's parts are written
    if rank != 0:
        return None
    if world > 1:
        partial.load(features, done, seen)
    if not done.all():
        raise FeatureCacheError(
            f"{int((~done).sum())} of {sample.n_cells} cells of {sample.sample_id} have no features in "
            f"{partial.folder} after all {world} processes finished: the cache folder must be on storage "
            f"that every process sees (a shared file system), and nothing else may delete it meanwhile"
        )
    return features


def _rank_world(distributed: bool) -> tuple[int, int]:
    if not distributed:
        return 0, 1
    from gcmoe.training.distributed import rank_world

    return rank_world()


def extract_features_with_stats(sample: Sample, config: FeatureConfig | None = None, *, encoder: Encoder | None = None,
                                progress: bool = True, distributed: bool = False) -> FeatureResult:
    """:func:`extract_features` (same parameters), also returning :class:`FeatureStats` (of this process's share)."""
    start = time.perf_counter()
    config = FeatureConfig() if config is None else config
    batch_size = config.batch_size
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer (tiles per encoder pass), got {batch_size!r}")
    rank, world = _rank_world(distributed)
    if world > 1 and config.cache_dir is None:
        raise ConfigError(
            f"feature extraction split across {world} processes (torchrun) needs a cache folder (cache_dir, "
            f"--cache-dir) on storage every process sees: the processes hand their tiles' features to rank 0 "
            f"through files there; give one, or run a single process"
        )
    model = _resolve_encoder(config, encoder)
    enc_config = run_encoder_config(model.config, config)
    grid = make_tile_grid(sample.image.shape, sample.mpp, enc_config)
    stats = _new_stats(sample, enc_config, grid)
    job = _Job(sample, model, enc_config, grid, batch_size, config.device, progress and rank == 0, stats)
    if config.cache_dir is None:
        features = _encode_in_memory(job)
    else:
        cache = FeatureCache(config.cache_dir)
        entry = cache.path(sample, enc_config)
        stats.cache_path = str(entry)
        cached = cache.load(sample, enc_config)
        if cached is not None:
            if rank == 0 and partial_path(entry).exists():  # left by a run killed between save and clean-up
                PartialExtraction(entry, sample, enc_config).remove()
            stats.cache_hit = True
            stats.seconds = time.perf_counter() - start
            log.info("features of %s (%s) from the cache %s", sample.sample_id, enc_config.name, entry)
            return FeatureResult(cached, stats)
        partial = PartialExtraction(entry, sample, enc_config)
        features16 = _encode_with_parts(job, partial, rank, world)
        if features16 is not None:
            cache.save(sample, enc_config, features16)
            partial.remove()
        _barrier(world)  # the entry is written
        features = features16.astype(np.float32) if features16 is not None else cache.load(sample, enc_config)
    stats.seconds = time.perf_counter() - start
    log.info(
        "features of %s (%s): %d cells x %d from %d tiles (%.1f Mpx) in %.1f s%s",
        sample.sample_id, enc_config.name, stats.n_cells, stats.feature_dim, stats.tiles_run,
        stats.megapixels_encoded, stats.seconds, f" (rank {rank} of {world})" if world > 1 else "",
    )  # fmt: skip
    return FeatureResult(features, stats)


def extract_features(sample: Sample, config: FeatureConfig | None = None, *, encoder: Encoder | None = None,
                     progress: bool = True, distributed: bool = False) -> np.ndarray:
    """Image features of every cell of a sample, ``(n_cells, D)`` float32, in the sample's cell order.

    Parameters
    ----------
    sample
        The slide and its cell centres.
    config
        The feature settings (:class:`gcmoe.config.FeatureConfig`; default: its defaults): the encoder's name
        and local ``weights``, ``tile_size`` (encoder-input side in pixels at the encoder's mpp, part of the
        cache key; None = the encoder's default), ``batch_size`` (tiles per encoder pass), ``device`` and
        ``cache_dir``, and ``stain_norm`` (``reinhard``: each tile read Reinhard-normalised in Lab to a fixed
        target with the slide's own statistics, :mod:`gcmoe.features.stain`; part of the cache key). With a
        cache folder, features are read from the cache when present (the encoder does not run) and written
        there otherwise; cached features are float16, so the returned values are then
        always float16-rounded. While encoding, finished tiles are saved in a partial folder there, so an
        interrupted run resumes where it stopped.
    encoder
        An :class:`~gcmoe.features.Encoder` to use instead of building ``config.encoder`` (weights loaded
        once for many slides); ``config.encoder`` and ``config.weights`` are then not read.
    progress
        Show a progress bar over tiles.
    distributed
        Split the tiles across the ranks of the ``torch.distributed`` process group (``torchrun``; join it
        first, e.g. with :func:`gcmoe.training.distributed.init_from_env`). Every rank must call this with
        the same arguments; it needs ``config.cache_dir`` on storage every rank sees. Rank 0 writes the cache
        entry; every rank returns the features. Without a process group it changes nothing.
    """
    return extract_features_with_stats(sample, config, encoder=encoder, progress=progress,
                                       distributed=distributed).features
