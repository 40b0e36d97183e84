"""Cell features on disk: written once per (sample, encoder), float16, chunked zarr, checksummed.

Layout under the cache root (shared with other caches, e.g. ``neighbours/``)::

    <root>/features/<sample id>/<encoder name>-<key>/
        features.zarr/     zarr v3 array, float16, shape (n_cells, D), chunks (16384, D), zstd
        meta.json          format, key, sample id, fingerprint, n_cells, dim, dtype, chunks,
                           encoder config (+ its hash), creation time, gcmoe version,
                           checksum = "sha256:<hex>" of the float16 array's C-order bytes

``key`` = SHA-256 of (sample id, ``Sample.fingerprint()``, the encoder config hash, which includes the
weights file's SHA-256 when there is one), 20 hex digits. Rows are in the sample's cell order.

An entry is written to a hidden temporary directory beside its final place and renamed into place, so a
directory that exists is complete; a second writer that loses the race discards its copy. Reading an
entry checks its metadata and checksum: a mismatch or an unreadable file raises
:class:`~gcmoe.errors.FeatureCacheError` naming the directory (delete it to recompute).

While an extraction with a cache runs, its progress lies beside the entry in
``.partial-<encoder name>-<key>/`` (part files of finished tiles, see :mod:`gcmoe.features.partial`);
the entry itself is still written only here, by :meth:`FeatureCache.save`, once every cell has a feature.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gcmoe.errors import FeatureCacheError
from gcmoe.features.registry import EncoderConfig

if TYPE_CHECKING:
    import zarr

    from gcmoe.data.sample import Sample

__all__ = ["CACHE_FORMAT", "FeatureCache", "cache_key", "to_float16"]

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
CHUNK_CELLS = 16_384
FEATURES_DIR = "features"
FEATURES_NAME = "features.zarr"
META_NAME = "meta.json"


def cache_key(sample_id: str, fingerprint: str, config: EncoderConfig) -> str:
    """20 hex digits identifying (sample, cell centres, encoder config incl. weights hash)."""
    text = json.dumps([CACHE_FORMAT, str(sample_id), str(fingerprint), config.hash()], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _safe(name: str) -> str:
    """A file-system-safe directory name."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._")
    return safe[:100] or "_"


def _checksum(array: np.ndarray) -> str:
    return "sha256:" + hashlib.sha256(np.ascontiguousarray(array).view(np.uint8)).hexdigest()


def to_float16(features: np.ndarray, sample_id: str, encoder_name: str) -> np.ndarray:
    """``features`` as C-contiguous float16, refusing values that are not finite there.

    Raises
    ------
    FeatureCacheError
        When a value is NaN or beyond float16's range (|value| > 65504): the encoder needs rescaling.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        data = np.ascontiguousarray(features, dtype=np.float16)
    if not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).any(axis=1).sum())
        raise FeatureCacheError(
            f"{bad} cells of sample {sample_id} have features that are not finite in float16 "
            f"(|value| > 65504 or NaN; largest finite input {np.nanmax(np.abs(features)):.3g}) with encoder "
            f"'{encoder_name}'; the encoder's output needs rescaling"
        )
    return data


class FeatureCache:
    """Feature cache entries under ``<root>/features`` (created on first write)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.directory = self.root / FEATURES_DIR

    def path(self, sample: Sample, config: EncoderConfig) -> Path:
        """The entry directory for (sample, encoder); it may not exist."""
        key = cache_key(sample.sample_id, sample.fingerprint(), config)
        return self.directory / _safe(sample.sample_id) / f"{_safe(config.name)}-{key}"

    def __contains__(self, item: tuple[Sample, EncoderConfig]) -> bool:
        sample, config = item
        return self.path(sample, config).is_dir()

    def _read_meta(self, entry: Path, sample: Sample, config: EncoderConfig) -> dict[str, Any]:
        fix = f"delete {entry} to recompute the features"
        try:
            meta = json.loads((entry / META_NAME).read_text())
        except (OSError, ValueError) as exc:
            raise FeatureCacheError(f"feature cache entry {entry}: unreadable {META_NAME} ({exc}); {fix}") from exc
        expected = {
            "format": CACHE_FORMAT,
            "key": entry.name.rsplit("-", 1)[-1],
            "sample_id": sample.sample_id,
            "fingerprint": sample.fingerprint(),
            "n_cells": sample.n_cells,
            "encoder_hash": config.hash(),
        }
        if not isinstance(meta, dict):
            raise FeatureCacheError(f"feature cache entry {entry}: {META_NAME} is not a JSON object; {fix}")
        wrong = {k: (meta.get(k), v) for k, v in expected.items() if meta.get(k) != v}
        if wrong:
            detail = ", ".join(f"{k}: stored {a!r}, expected {b!r}" for k, (a, b) in wrong.items())
            raise FeatureCacheError(f"feature cache entry {entry} does not match its key ({detail}); {fix}")
        return meta

    def open(self, sample: Sample, config: EncoderConfig) -> zarr.Array | None:
        """The stored float16 array, lazily (for streaming), or None on a miss; metadata checked, data not."""
        entry = self.path(sample, config)
        return self._open(entry, sample, config)[0] if entry.is_dir() else None

    def _open(self, entry: Path, sample: Sample, config: EncoderConfig) -> tuple[zarr.Array, dict[str, Any]]:
        import zarr

        meta = self._read_meta(entry, sample, config)
        try:
            array = zarr.open_array(entry / FEATURES_NAME, mode="r")
        except Exception as exc:  # zarr raises several types for missing or broken metadata
            raise FeatureCacheError(
                f"feature cache entry {entry}: cannot open {FEATURES_NAME} ({type(exc).__name__}: {exc}); "
                f"delete {entry} to recompute the features"
            ) from exc
        if tuple(array.shape) != (meta["n_cells"], meta.get("dim")) or array.dtype != np.float16:
            raise FeatureCacheError(
                f"feature cache entry {entry}: array is {array.dtype} {tuple(array.shape)}, metadata says float16 "
                f"({meta['n_cells']}, {meta.get('dim')}); delete {entry} to recompute the features"
            )
        return array, meta

    def load(self, sample: Sample, config: EncoderConfig, dtype: Any = np.float32) -> np.ndarray | None:
        """Features (n_cells, D) from the cache as ``dtype`` (float16: as stored, half the memory), or None
        when there is no entry.

        Raises :class:`~gcmoe.errors.FeatureCacheError` when the entry is corrupt (checksum, metadata,
        unreadable chunks).
        """
        entry = self.path(sample, config)
        if not entry.is_dir():
            return None
        array, meta = self._open(entry, sample, config)
        try:
            data = np.asarray(array[...])
        except Exception as exc:
            raise FeatureCacheError(
                f"feature cache entry {entry}: cannot read the features ({type(exc).__name__}: {exc}); "
                f"delete {entry} to recompute them"
            ) from exc
        if _checksum(data) != meta.get("checksum"):
            raise FeatureCacheError(
                f"feature cache entry {entry}: checksum mismatch, the stored features are corrupt; "
                f"delete {entry} to recompute them"
            )
        log.debug("feature cache hit: %s", entry)
        return data.astype(dtype, copy=False)

    def save(self, sample: Sample, config: EncoderConfig, features: np.ndarray) -> Path:
        """Write ``features`` (n_cells, D) as float16, atomically; returns the entry directory.

        If another writer created the entry meanwhile, that entry is kept and this copy discarded.
        """
        import zarr

        features = np.asarray(features)
        if features.ndim != 2 or features.shape != (sample.n_cells, config.feature_dim):
            raise ValueError(
                f"features must be (n_cells, D) = ({sample.n_cells}, {config.feature_dim}), got {features.shape}"
            )
        data = to_float16(features, sample.sample_id, config.name)
        entry = self.path(sample, config)
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.parent / f".tmp-{entry.name}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()
            chunks = (max(1, min(CHUNK_CELLS, data.shape[0])), data.shape[1])
            array = zarr.create_array(store=str(tmp / FEATURES_NAME), shape=data.shape, chunks=chunks, dtype="float16")
            array[...] = data
            from gcmoe import __version__

            meta = {
                "format": CACHE_FORMAT,
                "key": entry.name.rsplit("-", 1)[-1],
                "sample_id": sample.sample_id,
                "fingerprint": sample.fingerprint(),
                "n_cells": int(data.shape[0]),
                "dim": int(data.shape[1]),
                "dtype": "float16",
                "chunks": list(chunks),
                "encoder": config.to_dict(),
                "encoder_hash": config.hash(),
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "gcmoe_version": __version__,
                "checksum": _checksum(data),
            }
            (tmp / META_NAME).write_text(json.dumps(meta, indent=2))
            try:
                os.rename(tmp, entry)
            except OSError:
                if not entry.is_dir():
                    raise
                log.info("feature cache entry %s was written by another process; keeping it", entry)
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("wrote features of %d cells x %d to %s", data.shape[0], data.shape[1], entry)
        return entry

    def remove(self, sample: Sample, config: EncoderConfig) -> bool:
        """Delete the entry for (sample, encoder); True when one existed."""
        entry = self.path(sample, config)
        if not entry.exists():
            return False
        shutil.rmtree(entry)
        return True
