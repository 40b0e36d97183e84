"""The progress of an unfinished feature extraction, on disk, so that a crash loses at most the last part.

An extraction with a cache writes, beside its cache entry ``<root>/features/<sample id>/<encoder>-<key>/``,
a hidden folder::

    .partial-<encoder>-<key>/
        partial.json                            format, key, sample id, fingerprint, encoder name and
                                                hash, n_cells, dim: the extraction the parts belong to
        part-r<rank>-b<batch>-<random>.npz      ``cells`` (int64, m) and ``features`` (float16, m x D) of
                                                whole tiles, the float16 values the cache entry will hold

Parts are written every :data:`FLUSH_TILES` encoded tiles or :data:`FLUSH_SECONDS` seconds, whichever
comes first, each to a hidden temporary name and renamed (``os.replace``), so a part that exists is
complete. A rerun reads the parts and encodes only the tiles they do not hold; once every cell has a
feature the cache entry is written the usual way (:meth:`FeatureCache.save`) and the folder is deleted.
Under ``torchrun`` every rank writes its own parts into the same folder (which must therefore be on storage
every rank sees) and rank 0 assembles them.

A folder whose ``partial.json`` is unreadable or describes another extraction is deleted and started afresh;
its key is in its name, so the folders of other encoders, tile sizes or cell sets are never looked at.
A part file that cannot be read, or holds what no tile of this extraction can hold, raises
:class:`~gcmoe.errors.FeatureCacheError` naming the file: renames are atomic, so such a file means damaged
storage or a foreign file, which is reported rather than silently recomputed. Parts are ``.npz`` files
read with ``allow_pickle=False``; zip's CRC-32 catches flipped bytes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gcmoe.errors import FeatureCacheError
from gcmoe.features.registry import EncoderConfig

if TYPE_CHECKING:
    from gcmoe.data.sample import Sample

__all__ = ["FLUSH_SECONDS", "FLUSH_TILES", "PartWriter", "PartialExtraction", "partial_path"]

log = logging.getLogger(__name__)

PARTIAL_FORMAT = 1
INFO_NAME = "partial.json"
FLUSH_TILES = 256  # ~25 s of morphology tiles on 2 CPU cores; a few hundred ms of ViT tiles on a GPU
FLUSH_SECONDS = 60.0  # bounds the loss for slow encoders (a ViT-L on the CPU)


def partial_path(entry: Path) -> Path:
    """The partial folder of the cache entry ``entry``: ``.partial-<entry name>`` beside it."""
    return entry.parent / f".partial-{entry.name}"


class PartialExtraction:
    """The parts written so far for one cache entry (sample, encoder config).

    Parameters
    ----------
    entry
        The cache entry directory (:meth:`FeatureCache.path`); the folder is ``.partial-<name>`` beside it.
    sample, config
        What is being extracted; recorded in ``partial.json`` and checked against it.
    """

    def __init__(self, entry: Path, sample: Sample, config: EncoderConfig) -> None:
        self.folder = partial_path(Path(entry))
        self.n_cells = int(sample.n_cells)
        self.dim = int(config.feature_dim)
        self.info: dict[str, Any] = {
            "format": PARTIAL_FORMAT,
            "key": Path(entry).name.rsplit("-", 1)[-1],
            "sample_id": sample.sample_id,
            "fingerprint": sample.fingerprint(),
            "encoder": config.name,
            "encoder_hash": config.hash(),
            "n_cells": self.n_cells,
            "dim": self.dim,
        }

    def prepare(self) -> None:
        """Keep a folder that belongs to this extraction; replace any other by an empty one."""
        if self.folder.is_dir():
            stored = self._read_info()
            if stored == self.info:
                return
            log.warning(
                "partial feature folder %s belongs to another extraction (%s); deleting it and starting afresh",
                self.folder, "unreadable partial.json" if stored is None else _difference(stored, self.info),
            )  # fmt: skip
            shutil.rmtree(self.folder)
        elif self.folder.exists():
            self.folder.unlink()
        self._create()

    def _read_info(self) -> dict[str, Any] | None:
        try:
            info = json.loads((self.folder / INFO_NAME).read_text())
        except (OSError, ValueError):
            return None
        return info if isinstance(info, dict) else None

    def _create(self) -> None:
        """Create the folder with its ``partial.json`` atomically (a folder that exists has one)."""
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.folder.parent / f".tmp{self.folder.name}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()
            (tmp / INFO_NAME).write_text(json.dumps(self.info, indent=2))
            try:
                os.rename(tmp, self.folder)
            except OSError:
                if not self.folder.is_dir():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # another process created it meanwhile
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def load(self, features: np.ndarray, done: np.ndarray, seen: set[str]) -> int:
        """Copy the parts not named in ``seen`` into ``features`` (n_cells, D) and ``done`` (n_cells,).

        Adds their names to ``seen`` and returns how many were read.

        Raises
        ------
        FeatureCacheError
            When a part cannot be read or does not fit this extraction.
        """
        count = 0
        for path in sorted(self.folder.glob("part-*.npz")):
            if path.name in seen:
                continue
            cells, values = self._read_part(path)
            features[cells] = values
            done[cells] = True
            seen.add(path.name)
            count += 1
        return count

    def _read_part(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        fix = f"delete the folder {self.folder} and run again (its tiles are then encoded afresh)"
        try:
            with np.load(path, allow_pickle=False) as part:
                cells, values = part["cells"], part["features"]
        except Exception as exc:  # zipfile, numpy and OS errors alike
            raise FeatureCacheError(
                f"partial feature file {path} cannot be read ({type(exc).__name__}: {exc}); {fix}"
            ) from exc
        problem = None
        if cells.ndim != 1 or cells.dtype.kind not in "iu":
            problem = f"cells is {cells.dtype} {cells.shape}, expected int64 (m,)"
        elif values.dtype != np.float16 or values.shape != (len(cells), self.dim):
            problem = f"features is {values.dtype} {values.shape}, expected float16 ({len(cells)}, {self.dim})"
        elif len(cells) and (cells.min() < 0 or cells.max() >= self.n_cells):
            problem = f"cell indices outside [0, {self.n_cells})"
        elif not np.isfinite(values).all():
            problem = "non-finite features"
        if problem:
            raise FeatureCacheError(f"partial feature file {path} does not fit this extraction ({problem}); {fix}")
        return cells, values

    def write(self, name: str, cells: np.ndarray, features: np.ndarray) -> Path:
        """Write one part atomically: ``part-<name>-<random>.npz`` (``features`` float16 (m, D))."""
        if not self.folder.is_dir():  # a concurrent run finished and removed it: our tiles still count
            self._create()
        path = self.folder / f"part-{name}-{uuid.uuid4().hex[:8]}.npz"
        tmp = self.folder / f".{path.name}.tmp"
        try:
            with open(tmp, "wb") as fh:
                np.savez(fh, cells=np.asarray(cells, dtype=np.int64), features=np.asarray(features, np.float16))
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return path

    def remove(self) -> None:
        """Delete the folder (after its parts went into the cache entry)."""
        shutil.rmtree(self.folder, ignore_errors=True)


class PartWriter:
    """Collects encoded batches and writes them as one part every ``flush_tiles`` tiles or ``flush_seconds``.

    Parameters
    ----------
    partial
        Where the parts go.
    rank
        This process's rank (part of the file names, for the record).
    flush_tiles, flush_seconds
        A part is written once this many tiles are pending or this long after the previous part;
        None = :data:`FLUSH_TILES`, :data:`FLUSH_SECONDS` (read at call time, so tests may change them).
    """

    def __init__(
        self, partial: PartialExtraction, rank: int = 0, flush_tiles: int | None = None,
        flush_seconds: float | None = None,
    ) -> None:  # fmt: skip
        self.partial = partial
        self.rank = rank
        self.flush_tiles = FLUSH_TILES if flush_tiles is None else flush_tiles
        self.flush_seconds = FLUSH_SECONDS if flush_seconds is None else flush_seconds
        self.parts_written = 0
        self.seconds = 0.0
        self._cells: list[np.ndarray] = []
        self._features: list[np.ndarray] = []
        self._tiles = 0
        self._first_batch = 0
        self._since = time.monotonic()

    def add(self, batch: int, n_tiles: int, cells: np.ndarray, features: np.ndarray) -> None:
        """Queue the float16 features of one encoded batch (index ``batch``, ``n_tiles`` whole tiles)."""
        if not self._cells:
            self._first_batch = batch
        self._cells.append(cells)
        self._features.append(features)
        self._tiles += n_tiles
        if self._tiles >= self.flush_tiles or time.monotonic() - self._since >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Write what is queued as one part (nothing when the queue is empty)."""
        if not self._cells:
            return
        start = time.perf_counter()
        self.partial.write(
            f"r{self.rank:03d}-b{self._first_batch:06d}", np.concatenate(self._cells), np.concatenate(self._features)
        )
        self._cells, self._features, self._tiles = [], [], 0
        self._since = time.monotonic()
        self.parts_written += 1
        self.seconds += time.perf_counter() - start


def _difference(stored: dict[str, Any], expected: dict[str, Any]) -> str:
    keys = [k for k in expected if stored.get(k) != expected[k]] or ["format"]
    return ", ".join(f"{k}: stored {stored.get(k)!r}, expected {expected[k]!r}" for k in keys)
