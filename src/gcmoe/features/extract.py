"""Cell features for a whole slide: tile, encode in batches, sample at cell centres, cache.

One encoder pass per batch of tiles, never one per cell; only tiles that hold a cell are read, and the
slide is never loaded whole (a background thread reads the next batch while the current one is encoded).
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from gcmoe.errors import ConfigError
from gcmoe.features.cache import FeatureCache
from gcmoe.features.registry import Encoder, EncoderConfig, create_encoder
from gcmoe.features.tiling import Tile, TileGrid, make_tile_grid

if TYPE_CHECKING:
    import torch

    from gcmoe.data.image import SlideImage
    from gcmoe.data.sample import Sample

__all__ = ["FeatureResult", "FeatureStats", "extract_features", "extract_features_with_stats", "read_tiles"]

log = logging.getLogger(__name__)


@dataclass
class FeatureStats:
    """What one extraction did (for logs and benchmarks).

    Attributes
    ----------
    tiles_total
        Tiles in the grid covering the slide.
    tiles_run
        Tiles read and encoded (those holding at least one cell); 0 on a cache hit.
    encoder_passes
        Encoder forward calls (one per batch of tiles).
    megapixels_read, megapixels_encoded
        Slide pixels read and encoder-input pixels encoded (tiles including their overlap), millions.
    seconds
        Wall time of the whole call; ``seconds_read`` is spent reading and resizing tiles (in a
        background thread, mostly hidden behind encoding), ``seconds_encode`` in the encoder and sampling.
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
    encoder_passes: int = 0
    megapixels_read: float = 0.0
    megapixels_encoded: float = 0.0
    seconds: float = 0.0
    seconds_read: float = 0.0
    seconds_encode: float = 0.0
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


def _resolve_encoder(encoder: str | Encoder, weights: str | os.PathLike | None) -> Encoder:
    if isinstance(encoder, str):
        return create_encoder(encoder, weights=weights)
    if not isinstance(encoder, Encoder):
        raise ConfigError(
            f"encoder must be a registered name or a gcmoe.features.Encoder, got {type(encoder).__name__}"
        )
    if weights is not None:
        raise ConfigError("weights= goes with an encoder name; an Encoder instance already holds its weights")
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


def _encode_sample(
    sample: Sample, encoder: Encoder, config: EncoderConfig, batch_size: int, device: str, progress: bool
) -> FeatureResult:
    import torch

    from gcmoe.features.sampling import sample_feature_map

    start = time.perf_counter()
    grid = make_tile_grid(sample.image.shape, sample.mpp, config)
    xy = sample.spatial
    tiles = grid.assign(xy)
    stats = FeatureStats(
        sample_id=sample.sample_id,
        encoder=config.name,
        encoder_hash=config.hash(),
        n_cells=sample.n_cells,
        feature_dim=config.feature_dim,
        tile_size=grid.tile_size,
        read_size=grid.read_size,
        tiles_total=grid.n_tiles,
    )
    features = np.empty((sample.n_cells, config.feature_dim), dtype=np.float32)
    batches = [tiles[i : i + batch_size] for i in range(0, len(tiles), batch_size)]
    expected = (config.feature_dim, *encoder.output_size(grid.tile_size, grid.tile_size))
    read_seconds = [0.0]

    def read(batch: list[Tile]) -> torch.Tensor:
        t = time.perf_counter()
        pixels = read_tiles(sample.image, grid, batch)
        read_seconds[0] += time.perf_counter() - t
        return pixels

    encoder = encoder.to(device).eval()
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gcmoe-tiles")
    with pool, torch.inference_mode(), _progress(progress) as bar:
        task = bar.add_task(f"features {sample.sample_id} ({config.name})", total=len(tiles))
        pending = pool.submit(read, batches[0]) if batches else None
        for k, batch in enumerate(batches):
            pixels = pending.result()
            pending = pool.submit(read, batches[k + 1]) if k + 1 < len(batches) else None
            t = time.perf_counter()
            fmap = encoder(pixels.to(device))
            if tuple(fmap.shape[1:]) != expected:
                raise RuntimeError(
                    f"encoder '{config.name}' returned {tuple(fmap.shape)} for tiles of {grid.tile_size} px; "
                    f"its config promises (B, {expected[0]}, {expected[1]}, {expected[2]})"
                )
            for tile, tile_map in zip(batch, fmap):
                uv = grid.to_tile(xy[tile.cells], tile)
                features[tile.cells] = sample_feature_map(tile_map, uv, config.stride).float().cpu().numpy()
            stats.seconds_encode += time.perf_counter() - t
            stats.encoder_passes += 1
            stats.tiles_run += len(batch)
            bar.advance(task, len(batch))
    stats.seconds_read = read_seconds[0]
    stats.megapixels_read = stats.tiles_run * grid.read_size**2 / 1e6
    stats.megapixels_encoded = stats.tiles_run * grid.tile_size**2 / 1e6
    stats.seconds = time.perf_counter() - start
    if not np.isfinite(features).all():
        bad = int((~np.isfinite(features)).any(axis=1).sum())
        raise RuntimeError(f"encoder '{config.name}' gave non-finite features for {bad} cells of {sample.sample_id}")
    return FeatureResult(features, stats)


def extract_features_with_stats(
    sample: Sample,
    encoder: str | Encoder = "morphology",
    *,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 4,
    device: str = "cpu",
    progress: bool = True,
    tile_size: int | None = None,
    weights: str | os.PathLike | None = None,
) -> FeatureResult:
    """:func:`extract_features`, also returning :class:`FeatureStats`."""
    start = time.perf_counter()
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer (tiles per encoder pass), got {batch_size!r}")
    model = _resolve_encoder(encoder, weights)
    config = model.config if tile_size is None else model.config.with_tile_size(tile_size)
    cache = FeatureCache(cache_dir) if cache_dir is not None else None
    if cache is not None:
        cached = cache.load(sample, config)
        if cached is not None:
            grid = make_tile_grid(sample.image.shape, sample.mpp, config)
            stats = FeatureStats(
                sample_id=sample.sample_id,
                encoder=config.name,
                encoder_hash=config.hash(),
                n_cells=sample.n_cells,
                feature_dim=config.feature_dim,
                tile_size=grid.tile_size,
                read_size=grid.read_size,
                tiles_total=grid.n_tiles,
                seconds=time.perf_counter() - start,
                cache_hit=True,
                cache_path=str(cache.path(sample, config)),
            )
            log.info("features of %s (%s) from the cache %s", sample.sample_id, config.name, stats.cache_path)
            return FeatureResult(cached, stats)
    features, stats = _encode_sample(sample, model, config, batch_size, device, progress)
    if cache is not None:
        stats.cache_path = str(cache.save(sample, config, features))
        features = features.astype(np.float16).astype(np.float32)  # what a later cache hit returns
    stats.seconds = time.perf_counter() - start
    log.info(
        "features of %s (%s): %d cells x %d from %d tiles (%.1f Mpx) in %.1f s",
        sample.sample_id, config.name, stats.n_cells, stats.feature_dim, stats.tiles_run,
        stats.megapixels_encoded, stats.seconds,
    )  # fmt: skip
    return FeatureResult(features, stats)


def extract_features(
    sample: Sample,
    encoder: str | Encoder = "morphology",
    *,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 4,
    device: str = "cpu",
    progress: bool = True,
    tile_size: int | None = None,
    weights: str | os.PathLike | None = None,
) -> np.ndarray:
    """Image features of every cell of a sample, ``(n_cells, D)`` float32, in the sample's cell order.

    Parameters
    ----------
    sample
        The slide and its cell centres.
    encoder
        A name from :func:`~gcmoe.features.list_encoders` or an :class:`~gcmoe.features.Encoder`.
    cache_dir
        Feature cache root; with it, features are read from the cache when present (the encoder does not
        run) and written there otherwise. Cached features are float16, so with a cache the returned
        values are always float16-rounded, whether just computed or read back.
    batch_size
        Tiles per encoder pass.
    device
        Torch device for the encoder (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
    progress
        Show a progress bar over tiles.
    tile_size
        Encoder-input tile side in pixels at the encoder's mpp; None = the encoder's default.
        Part of the cache key.
    weights
        Local weights file, for encoders that load weights (with an encoder name only).
    """
    return extract_features_with_stats(
        sample,
        encoder,
        cache_dir=cache_dir,
        batch_size=batch_size,
        device=device,
        progress=progress,
        tile_size=tile_size,
        weights=weights,
    ).features
