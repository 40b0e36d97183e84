"""The run's cell store (``train.stream``): every slide's cells written to disk one slide at a time.

With ``train.stream`` on, ``gcmoe cv`` and ``gcmoe train`` never hold the features of all cells: each slide's
features are extracted (or read from the feature cache), permuted into spatial (Z) order, written to a
:mod:`~gcmoe.training.streaming` cell store together with the targets of every gene of the run, the C2CA
neighbours (as store rows), the positions and the routing labels, and dropped before the next slide. Training
then reads the store in shuffled buffers; each fold picks its genes as target columns of the same store.

The store lives under ``<cache>/cells/<key>/``; ``key`` hashes what its content depends on (each slide's
feature-cache entry, which covers the cell centres and the encoder with its weights; the genes; the target
and neighbour settings; the routing labels; the chunk size), so a resumed or repeated run reuses it and a run
with other data or settings writes its own.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from gcmoe.config import RunConfig
    from gcmoe.features.registry import Encoder
    from gcmoe.training.streaming import CellStore

__all__ = ["RunStore", "build_run_store"]

log = logging.getLogger(__name__)

STORE_DIR = "cells"


@dataclass
class RunStore:
    """A run's cell store and where each pooled cell lies in it (``rows[i]`` = store row of pooled cell ``i``)."""

    store: CellStore
    rows: np.ndarray
    seconds: float


def build_run_store(cache_dir: Path, samples: list, genes: list[str], counts, routing_codes: np.ndarray | None,
                    routing_types: list[str], encoder: Encoder, config: RunConfig, progress: bool = True,
                    chunk: int | None = None) -> RunStore:
    """Write (or reuse) the cell store of ``samples``' cells, in pooled order slide after slide.

    ``counts``: cells x ``genes`` (sparse), pooled in the same order; ``routing_codes``: each cell's routing
    label code (-1 unknown) or None; ``encoder``: the run's encoder instance (used for slides not yet cached).
    """
    from gcmoe.config import to_dict
    from gcmoe.data.normalisation import compute_targets
    from gcmoe.features import extract_features
    from gcmoe.features.cache import FeatureCache
    from gcmoe.features.extract import run_encoder_config
    from gcmoe.features.neighbours import cached_window_neighbours
    from gcmoe.training.state import tensor_digest
    from gcmoe.training.streaming import DEFAULT_CHUNK, FORMAT, CellStore, CellStoreWriter, spatial_order

    t0 = time.perf_counter()
    f = config.features
    enc_config = run_encoder_config(encoder.config, f)
    chunk = int(chunk or DEFAULT_CHUNK)
    n = sum(s.n_cells for s in samples)
    codes = np.full(n, -1, np.int64) if routing_codes is None else np.asarray(routing_codes, np.int64)
    cache = FeatureCache(cache_dir)
    key_parts = [FORMAT, [cache.path(s, enc_config).name for s in samples], list(genes), to_dict(config.targets),
                 to_dict(config.neighbours), tensor_digest(codes), list(routing_types), chunk]
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True, default=str).encode()).hexdigest()[:20]
    path = Path(cache_dir) / STORE_DIR / key

    rows = np.empty(n, np.int64)
    orders, start = [], 0
    for s in samples:
        order = spatial_order(s.spatial * s.mpp)
        rows[start + order] = start + np.arange(s.n_cells)
        orders.append(order)
        start += s.n_cells
    if (path / "meta.json").is_file():
        store = CellStore(path)
        if store.n_cells == n and store.meta["genes"] == list(genes):
            if store.verify():  # a damaged file would otherwise train on NaN (issue 16)
                log.info("cell store %s reused (%d cells, checksums verified)", path, n)
                return RunStore(store, rows, time.perf_counter() - t0)
            log.warning("cell store %s has no checksums (an older gcmoe wrote it); rewriting it", path)
        else:
            log.warning("cell store %s does not match this run; rewriting it", path)

    m = config.neighbours.max_neighbours
    writer = None
    start = 0
    for s, order in zip(samples, orders):
        # one slide's features in memory at a time, float16 as cached (extracted first when not cached yet)
        feats = cache.load(s, enc_config, dtype=np.float16)
        if feats is None:  # extraction with a cache returns the float16 values it cached: the cast is exact
            feats = extract_features(s, replace(f, cache_dir=str(cache_dir)), encoder=encoder,
                                     progress=progress).astype(np.float16)
        if writer is None:
            writer = CellStoreWriter(path, n, feats.shape[1], list(genes), m, list(routing_types), chunk)
        nbr = cached_window_neighbours(s.spatial * s.mpp, config.neighbours.window_um, m, cache_dir, s.sample_id)
        new_row = np.empty(s.n_cells, np.int64)
        new_row[order] = np.arange(s.n_cells)
        xy_um = (s.spatial * s.mpp).astype(np.float32)
        for a in range(0, s.n_cells, chunk):
            sel = order[a:a + chunk]
            block_nbr = nbr[sel]
            block_nbr = np.where(block_nbr >= 0, new_row[block_nbr.clip(min=0)] + start, -1)
            # targets are computed per cell, so a block of rows gives the rows of the whole matrix
            targets = compute_targets(counts[start + sel], config.targets)
            writer.append(feats[sel], targets, block_nbr, xy_um[sel], codes[start + sel])
        start += s.n_cells
        del feats
    store = writer.close()
    seconds = time.perf_counter() - t0
    log.info("cell store %s: %d cells x %d features, %d genes (%.1f s)", path, n, store.meta["feature_dim"],
             len(genes), seconds)
    return RunStore(store, rows, seconds)
