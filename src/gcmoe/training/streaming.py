"""Training from disk: a cell store read in shuffled chunks, so memory is bounded by a buffer, not the data set.

A **cell store** is a folder of zarr v3 arrays with one row per cell, all chunked alike (``chunk`` rows):

    features.zarr     (N, D) float16   the cells' image features (as in the feature cache)
    targets.zarr      (N, G) float32   the targets of the evaluated genes
    neighbours.zarr   (N, M) int32     C2CA neighbours as row indices into the store, -1 pads (M may be 0)
    positions.zarr    (N, 2) float32   cell centres, micrometres
    cell_type.zarr    (N,)   int16     routing label codes, -1 unknown
    meta.json         format, sizes, chunk, gene names, routing types, a content digest, creation time

Rows should be in spatial order (``spatial_order`` gives a Z-order per slide) so that a chunk is a compact
piece of tissue and its cells' neighbours lie in the same or nearby chunks.

:class:`StreamingCells` feeds the trainer: each epoch it shuffles the chunks, loads ``buffer_chunks`` of them
(plus the "halo" rows their cells' neighbours point to), shuffles their training cells and cuts batches;
validation and prediction read the chunks in order. At any moment it holds one buffer: memory does not grow
with the number of cells. Batches mix ``buffer_chunks`` pieces of tissue instead of the whole slide — the
price of bounded memory (in-memory :class:`~gcmoe.training.cells.CellData` shuffles over all cells).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gcmoe.errors import FeatureCacheError
from gcmoe.files import publish, temporary_path
from gcmoe.training.cells import CellData

FORMAT = "gcmoe-cell-store/1"
DEFAULT_CHUNK = 16_384
_ARRAYS = ("features", "targets", "neighbours", "positions", "cell_type")


def release_memory() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Buffers of slightly different sizes, allocated and freed one after another, fragment glibc's heap: without
    this, resident memory creeps up with the number of buffers an epoch loads, i.e. with the number of cells.
    """
    global _TRIM
    if _TRIM is None:
        try:
            import ctypes

            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM = None


def spatial_order(xy_um: np.ndarray, sample_ids: np.ndarray | None = None, cell_um: float = 64.0) -> np.ndarray:
    """A permutation putting cells in Z-order (Morton) of ``cell_um`` squares, slide by slide."""
    xy = np.asarray(xy_um, dtype=np.float64)
    if len(xy) == 0:
        return np.zeros(0, dtype=np.int64)
    q = np.floor((xy - xy.min(axis=0)) / cell_um).astype(np.uint64)
    code = np.zeros(len(xy), dtype=np.uint64)
    for bit in range(21):
        code |= ((q[:, 0] >> np.uint64(bit)) & np.uint64(1)) << np.uint64(2 * bit)
        code |= ((q[:, 1] >> np.uint64(bit)) & np.uint64(1)) << np.uint64(2 * bit + 1)
    keys = [code] if sample_ids is None else [code, np.unique(np.asarray(sample_ids), return_inverse=True)[1]]
    return np.lexsort(keys)


class CellStoreWriter:
    """Writes a cell store chunk by chunk (rows in order); ``close`` makes it appear atomically."""

    def __init__(self, path: str | os.PathLike, n_cells: int, feature_dim: int, genes: list[str], max_neighbours: int,
                 cell_types: list[str] | None = None, chunk: int = DEFAULT_CHUNK) -> None:
        import zarr

        if n_cells < 1:
            raise ValueError("a cell store needs at least one cell")
        self.path = Path(path)
        self.tmp = temporary_path(self.path)
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.n_cells, self.chunk = int(n_cells), int(min(chunk, n_cells))
        m = int(max_neighbours)
        shapes = {"features": ((n_cells, feature_dim), "float16"), "targets": ((n_cells, len(genes)), "float32"),
                  "neighbours": ((n_cells, m), "int32"), "positions": ((n_cells, 2), "float32"),
                  "cell_type": ((n_cells,), "int16")}
        self.arrays = {
            name: zarr.create_array(store=str(self.tmp / f"{name}.zarr"), shape=shape, dtype=dtype,
                                    chunks=(self.chunk, *shape[1:]))
            for name, (shape, dtype) in shapes.items()
        }
        self.meta: dict[str, Any] = {"format": FORMAT, "n_cells": self.n_cells, "feature_dim": int(feature_dim),
                                     "n_genes": len(genes), "max_neighbours": m, "chunk": self.chunk,
                                     "genes": list(genes), "cell_types": list(cell_types or [])}
        self.written = 0
        self.digest = hashlib.sha256()
        self.sums = {name: hashlib.sha256() for name in _ARRAYS}  # rows appended in order: the whole array's bytes

    def append(self, features: np.ndarray, targets: np.ndarray, neighbours: np.ndarray, positions: np.ndarray,
               cell_type: np.ndarray | None = None) -> None:
        """Write the next rows (any count; the arrays' chunking is independent of the call sizes)."""
        n = len(features)
        stop = self.written + n
        if stop > self.n_cells:
            raise ValueError(f"the store holds {self.n_cells} cells; {stop} were written")
        cell_type = np.full(n, -1) if cell_type is None else cell_type
        rows = {"features": np.asarray(features, np.float16), "targets": np.asarray(targets, np.float32),
                "neighbours": np.asarray(neighbours, np.int32).reshape(n, -1), "positions": np.asarray(positions, np.float32),
                "cell_type": np.asarray(cell_type, np.int16)}
        if not np.isfinite(rows["features"]).all() or not np.isfinite(rows["targets"]).all():
            raise FeatureCacheError(f"rows {self.written}-{stop} hold NaN or infinite features or targets")
        for name, value in rows.items():
            self.arrays[name][self.written:stop] = value
            self.digest.update(np.ascontiguousarray(value).tobytes())
            self.sums[name].update(np.ascontiguousarray(value).tobytes())
        self.written = stop

    def close(self) -> CellStore:
        if self.written != self.n_cells:
            raise ValueError(f"{self.written} of {self.n_cells} cells were written")
        self.meta["digest"] = self.digest.hexdigest()[:20]
        self.meta["sha256"] = {name: h.hexdigest() for name, h in self.sums.items()}
        self.meta["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        (self.tmp / "meta.json").write_text(json.dumps(self.meta, indent=1))
        publish(self.tmp, self.path)
        return CellStore(self.path)


def write_cell_store(path: str | os.PathLike, features: np.ndarray, targets: np.ndarray, neighbours: np.ndarray | None,
                     positions: np.ndarray, cell_type: np.ndarray | None, genes: list[str],
                     cell_types: list[str] | None = None, chunk: int = DEFAULT_CHUNK,
                     order: np.ndarray | None = None) -> CellStore:
    """Write in-memory arrays as a cell store. ``order`` (e.g. :func:`spatial_order`) permutes the rows and
    remaps the neighbour indices to match; row ``i`` of the store is then cell ``order[i]``."""
    n = len(features)
    nbr = np.zeros((n, 0), np.int64) if neighbours is None else np.asarray(neighbours)
    if order is not None:
        order = np.asarray(order)
        new_row = np.empty(n, dtype=np.int64)
        new_row[order] = np.arange(n)
        nbr = nbr[order]
        nbr = np.where(nbr >= 0, new_row[nbr.clip(min=0)], -1)
        features, targets, positions = features[order], targets[order], positions[order]
        cell_type = None if cell_type is None else cell_type[order]
    writer = CellStoreWriter(path, n, features.shape[1], genes, nbr.shape[1], cell_types, chunk)
    for start in range(0, n, writer.chunk):
        s = slice(start, start + writer.chunk)
        writer.append(features[s], targets[s], nbr[s], positions[s], None if cell_type is None else cell_type[s])
    return writer.close()


class CellStore:
    """A cell store opened for reading (arrays stay on disk)."""

    def __init__(self, path: str | os.PathLike) -> None:
        import zarr

        self.path = Path(path)
        try:
            self.meta = json.loads((self.path / "meta.json").read_text())
            self.arrays = {name: zarr.open_array(self.path / f"{name}.zarr", mode="r") for name in _ARRAYS}
        except Exception as exc:
            raise FeatureCacheError(f"{self.path} is not a complete cell store ({exc}); rebuild it") from exc
        if self.meta.get("format") != FORMAT:
            raise FeatureCacheError(f"{self.path}: unknown cell-store format {self.meta.get('format')!r}")
        n = self.meta["n_cells"]
        for name, array in self.arrays.items():
            if array.shape[0] != n:
                raise FeatureCacheError(f"{self.path}: {name} has {array.shape[0]} rows, meta.json says {n}; rebuild it")

    @property
    def n_cells(self) -> int:
        return int(self.meta["n_cells"])

    def verify(self) -> bool:
        """Check every array against the SHA-256 in meta.json (reads the store once); False when the store has no
        checksums (written by an older gcmoe). A mismatch (a damaged file) raises FeatureCacheError."""
        sums = self.meta.get("sha256")
        if not isinstance(sums, dict):
            return False
        for name in _ARRAYS:
            h = hashlib.sha256()
            try:
                for start in range(0, self.n_cells, self.chunk):
                    h.update(np.ascontiguousarray(self.rows(name, start, min(start + self.chunk, self.n_cells))).tobytes())
            except Exception as exc:  # zarr and its codecs raise many types for a damaged chunk
                raise FeatureCacheError(f"cell store {self.path}: {name}.zarr cannot be read ({type(exc).__name__}: "
                                        f"{exc}); the store is damaged: delete {self.path} to rebuild it") from None
            if h.hexdigest() != sums.get(name):
                raise FeatureCacheError(
                    f"cell store {self.path}: {name}.zarr does not match its checksum in meta.json: the store is "
                    f"damaged; delete {self.path} to rebuild it from the feature cache")
        return True

    @property
    def chunk(self) -> int:
        return int(self.meta["chunk"])

    @property
    def n_chunks(self) -> int:
        return -(-self.n_cells // self.chunk)

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        return np.asarray(self.arrays[name][start:stop])

    def take(self, name: str, index: np.ndarray, columns: np.ndarray | None = None) -> np.ndarray:
        """Rows ``index`` (sorted, unique) of one array, reading one chunk at a time; ``columns`` of a 2-D array."""
        array = self.arrays[name]
        width = array.shape[1:] if columns is None else (len(columns),)
        out = np.empty((len(index), *width), dtype=array.dtype)
        chunk_of = index // self.chunk
        for c in np.unique(chunk_of):
            sel = np.flatnonzero(chunk_of == c)
            block = np.asarray(array[c * self.chunk:(c + 1) * self.chunk])[index[sel] - c * self.chunk]
            out[sel] = block if columns is None else block[:, columns]
        return out


class StreamingCells:
    """The trainer's view of a cell store: buffered, shuffled training batches and chunk-ordered evaluation.

    ``neighbours``: give the models C2CA neighbours (their features gathered from the buffer and its halo);
    ``cell_types``: pass routing labels in training; ``target_columns``: the store's target columns (genes)
    to train on, in that order (None: all), so one store serves every fold's gene selection.
    """

    def __init__(self, store: CellStore, buffer_chunks: int = 4, neighbours: bool = True, cell_types: bool = True,
                 eval_batch_size: int = 2048, target_columns: np.ndarray | None = None) -> None:
        self.store = store
        n_genes = int(store.meta["n_genes"])
        self.columns = None if target_columns is None else np.asarray(target_columns, dtype=np.int64)
        if self.columns is not None and (self.columns.ndim != 1 or not len(self.columns)
                                         or self.columns.min() < 0 or self.columns.max() >= n_genes):
            raise ValueError(f"target_columns must index the store's {n_genes} genes, got {target_columns!r}")
        # evaluation batches gather (B, M, D) neighbour features: a cap keeps that peak small and fixed
        self.eval_batch_size = int(eval_batch_size)
        self.buffer_chunks = max(1, int(buffer_chunks))
        self.use_neighbours = neighbours and store.meta["max_neighbours"] > 0
        self.use_cell_types = cell_types

    @property
    def n_cells(self) -> int:
        return self.store.n_cells

    @property
    def n_targets(self) -> int:
        return int(self.store.meta["n_genes"]) if self.columns is None else len(self.columns)

    def digest(self) -> str:
        """The store's content digest, and the target columns when a subset is used."""
        base = str(self.store.meta.get("digest"))
        if self.columns is None:
            return base
        return base + ":" + hashlib.sha256(self.columns.tobytes()).hexdigest()[:12]

    def digests(self) -> dict[str, str]:
        """The store's digest for both the features and the targets (the protocol's ``digests``)."""
        return {"features": self.digest(), "targets": self.digest()}

    def _buffer(self, chunks: list[int]):
        """A CellData over the rows of ``chunks`` plus their neighbours' rows; returns (data, global row ids)."""
        s, c = self.store, self.store.chunk
        ranges = [(k * c, min((k + 1) * c, s.n_cells)) for k in sorted(chunks)]
        own = np.concatenate([np.arange(a, b) for a, b in ranges])
        read = {name: np.concatenate([self._rows(name, a, b) for a, b in ranges]) for name in _ARRAYS}
        feats, pos = read["features"], read["positions"]
        ids = own
        nbr_local = None
        if self.use_neighbours:
            nbr = read["neighbours"].astype(np.int64)
            wanted = np.unique(nbr[nbr >= 0])
            halo = wanted[~np.isin(wanted, own, assume_unique=True)]
            if len(halo):
                feats = np.concatenate([feats, s.take("features", halo)])
                pos = np.concatenate([pos, s.take("positions", halo)])
                ids = np.concatenate([own, halo])
            order = np.argsort(ids, kind="stable")
            local = np.full(nbr.shape, -1, dtype=np.int64)
            hit = nbr >= 0
            local[hit] = order[np.searchsorted(ids[order], nbr[hit])]
            nbr_local = np.concatenate([local, np.full((len(ids) - len(own), nbr.shape[1]), -1, np.int64)])
        n_extra = len(ids) - len(own)
        targets = read["targets"] if not n_extra else np.concatenate(
            [read["targets"], np.zeros((n_extra, read["targets"].shape[1]), np.float32)])
        types = np.concatenate([read["cell_type"].astype(np.int64), np.full(n_extra, -1, np.int64)])
        data = CellData(
            torch.from_numpy(feats.astype(np.float32)), torch.from_numpy(targets),
            cell_type=torch.from_numpy(types) if self.use_cell_types else None,
            neighbours=torch.from_numpy(nbr_local) if nbr_local is not None else None,
            positions=torch.from_numpy(pos.astype(np.float32)) if nbr_local is not None else None,
        )
        return data, own

    def _rows(self, name: str, start: int, stop: int) -> np.ndarray:
        rows = self.store.rows(name, start, stop)
        return rows[:, self.columns] if name == "targets" and self.columns is not None else rows

    def train_batches(self, train_idx: np.ndarray, batch_size: int, generator: torch.Generator
                      ) -> Iterator[tuple[Any, Tensor]]:
        """One epoch: (buffer CellData, local row indices of a batch), chunks and cells shuffled (seeded)."""
        is_train = np.zeros(self.n_cells, dtype=bool)
        is_train[np.asarray(train_idx)] = True
        order = torch.randperm(self.store.n_chunks, generator=generator).tolist()
        for start in range(0, len(order), self.buffer_chunks):
            data, own = self._buffer(order[start:start + self.buffer_chunks])
            local = torch.from_numpy(np.flatnonzero(is_train[own]))
            if len(local) == 0:
                continue
            perm = local[torch.randperm(len(local), generator=generator)]
            for part in torch.tensor_split(perm, max(1, round(len(perm) / batch_size))):
                yield data, part
            del data
            release_memory()

    def eval_batches(self, idx: np.ndarray, batch_size: int) -> Iterator[tuple[Any, Tensor, np.ndarray]]:
        """(buffer CellData, local rows, positions of those cells in ``idx``), chunk by chunk; batches of at
        most ``eval_batch_size`` cells."""
        idx = np.asarray(idx)
        batch_size = min(batch_size, self.eval_batch_size)
        chunk_of = idx // self.store.chunk
        for k in np.unique(chunk_of):
            where = np.flatnonzero(chunk_of == k)
            data, own = self._buffer([int(k)])
            local = idx[where] - own[0]
            for start in range(0, len(where), batch_size):
                yield data, torch.from_numpy(local[start:start + batch_size]), where[start:start + batch_size]
            del data
            release_memory()

    def targets_of(self, idx: np.ndarray) -> np.ndarray:
        """Targets of cells ``idx`` (in that order)."""
        idx = np.asarray(idx)
        order = np.argsort(idx)
        out = np.empty((len(idx), self.n_targets), np.float32)
        out[order] = self.store.take("targets", idx[order], self.columns)
        return out

    def feature_stats(self, idx: np.ndarray) -> tuple[Tensor, Tensor]:
        """Mean and standard deviation (ddof 1) of the features of cells ``idx``, one chunk at a time."""
        idx = np.sort(np.asarray(idx))
        d = self.store.meta["feature_dim"]
        total, total_sq, n = np.zeros(d), np.zeros(d), 0
        chunk_of = idx // self.store.chunk
        for k in np.unique(chunk_of):
            rows = idx[chunk_of == k]
            block = self.store.rows("features", int(k) * self.store.chunk, int(k + 1) * self.store.chunk).astype(np.float64)
            x = block[rows - int(k) * self.store.chunk]
            total += x.sum(0)
            total_sq += (x * x).sum(0)
            n += len(x)
        mean = total / max(n, 1)
        var = np.maximum(total_sq - n * mean * mean, 0.0) / max(n - 1, 1)
        return torch.from_numpy(mean.astype(np.float32)), torch.from_numpy(np.sqrt(var).astype(np.float32))
