"""Data preparation: the run's slides and reference, pooled cells, routing labels, features and neighbours.

:func:`prepare_run` gives everything the folds share (:class:`RunData`): the cells of every slide pooled in
one index space (:class:`PooledCells`), their routing labels, their features in memory (or, with
``train.stream``, a cell store on disk: gcmoe.run_store) and the C2CA neighbours, as the models' declared
inputs ask (:class:`gcmoe.models.inputs.ModelInputs`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from gcmoe._constants import Key
from gcmoe.config import DataConfig, RunConfig, TargetConfig
from gcmoe.data.sample import Sample
from gcmoe.errors import ConfigError, InvalidSampleError
from gcmoe.files import write_h5ad
from gcmoe.models.inputs import ModelInputs

log = logging.getLogger(__name__)


@dataclass
class PooledCells:
    """The cells of all samples of a run, in one index space."""

    name: str
    samples: list[Sample]
    genes: list[str]
    counts: sp.csr_matrix  # cells x genes (shared genes)
    features: np.ndarray | None  # cells x D, float32; None when the cells stream from a store (train.stream)
    feature_dim: int
    xy: np.ndarray  # cells x 2, H&E pixels of each cell's own slide
    xy_um: np.ndarray  # cells x 2, micrometres of each cell's own slide
    sample_ids: np.ndarray  # cells, str
    cell_type: np.ndarray | None  # cells, str, when every sample has it
    expected: np.ndarray | None  # E[target | truth], cells x genes, when every sample has a truth (virtual tissue)


@dataclass
class Routing:
    """The routing types of a run and each cell's label (code into ``types``, -1 = unknown)."""

    types: list[str]
    codes: np.ndarray
    source: str  # "obs" or "transfer"
    report: dict[str, Any]


def read_data_samples(d: DataConfig) -> list[Sample]:
    """The slides ``d.samples`` names, each read with ``d``'s reader settings; their sample ids must be unique."""
    if not d.samples:
        raise ConfigError("data.source is 'samples' but data.samples lists no data path")
    from gcmoe.data.readers import read_samples

    samples = read_samples(d.samples, d.format, d.sample_ids, image=d.image, mpp=d.mpp,
                           cell_type_key=d.cell_type_key, min_qv=d.min_qv, coords=d.coords, xy_columns=d.xy_columns,
                           alignment=d.alignment, keypoint_units=d.keypoint_units, segmentation=d.segmentation)
    ids = [s.sample_id for s in samples]
    if len(set(ids)) != len(ids):
        raise InvalidSampleError(f"sample ids must be unique across the run, got {ids}")
    return samples


def load_samples(config: RunConfig, out: Path) -> tuple[list[Sample], Any, str]:
    """The run's Samples, reference (or None) and data-set name: a generated virtual tissue (written under
    ``out/data``) or the files of ``config.data``."""
    if config.data.source == "virtual":
        from gcmoe.data.virtual_tissue import simulate_tissue

        t0 = time.perf_counter()
        tissue = simulate_tissue(config.data.tissue)
        log.info(
            "virtual tissue: %d cells, %d genes, %dx%d px (%.1f s)",
            tissue.sample.n_cells, len(tissue.sample.genes), *tissue.sample.image.shape[::-1], time.perf_counter() - t0,
        )
        data_dir = out / "data"
        from gcmoe.training.distributed import is_main_process

        if is_main_process():  # under torchrun the other ranks generate the same tissue and write nothing
            tissue.sample.write(data_dir / f"{tissue.sample.sample_id}.h5ad")
            write_h5ad(tissue.reference, data_dir / "reference.h5ad")
        return [tissue.sample], tissue.reference, config.data.name or tissue.sample.sample_id
    d = config.data
    samples = read_data_samples(d)
    ids = [s.sample_id for s in samples]
    if d.qc:
        from gcmoe.pipeline.qc import qc_samples
        from gcmoe.training.distributed import is_main_process

        qc_samples(samples, out / "qc" if is_main_process() else None)
    reference = None
    if config.data.reference:
        from gcmoe.data.readers.h5ad import read_reference

        path = Path(config.data.reference)
        if not path.is_file():
            raise ConfigError(f"reference file not found: {path}")
        reference = read_reference(path, config.prior.type_key)
    return samples, reference, config.data.name or "+".join(ids)


def pool_cells(samples: list[Sample], name: str, features: list[np.ndarray] | None, targets: TargetConfig,
               feature_dim: int | None = None) -> PooledCells:
    """Concatenate samples over their shared genes; carry cell types and the truth when all samples have them.

    ``features`` None (with ``feature_dim``) pools everything but the features (they stay on disk: train.stream).
    """
    genes = [g for g in samples[0].genes if all(g in set(s.genes) for s in samples[1:])]
    if not genes:
        raise InvalidSampleError(f"the samples {[s.sample_id for s in samples]} share no gene; check the gene panels")
    dropped = {s.sample_id: len(s.genes) - len(genes) for s in samples if len(s.genes) != len(genes)}
    if dropped:
        log.warning("genes not measured in every sample are left out: %s", dropped)
    counts = sp.vstack([sp.csr_matrix(s.adata[:, genes].layers[Key.COUNTS]) for s in samples]).tocsr()
    counts = counts.astype(np.float32)
    has_types = all(Key.CELL_TYPE in s.adata.obs for s in samples)
    cell_type = np.concatenate([s.adata.obs[Key.CELL_TYPE].astype(str).to_numpy() for s in samples]) if has_types else None
    expected = None
    if all(Key.TRUTH_MEAN in s.adata.layers for s in samples):
        from gcmoe.data.virtual_tissue import expected_target

        expected = np.concatenate(
            [expected_target(s.adata[:, genes], targets.transform, targets.normalize_total) for s in samples]
        ).astype(np.float32)
    return PooledCells(
        name=name,
        samples=samples,
        genes=genes,
        counts=counts,
        features=None if features is None else np.concatenate(features).astype(np.float32),
        feature_dim=int(feature_dim if features is None else features[0].shape[1]),
        xy=np.concatenate([s.spatial for s in samples]),
        xy_um=np.concatenate([s.spatial * s.mpp for s in samples]),
        sample_ids=np.concatenate([np.full(s.n_cells, s.sample_id) for s in samples]),
        cell_type=cell_type,
        expected=expected,
    )


def routing_labels(pooled: PooledCells, reference, config: RunConfig) -> Routing:
    """Routing types and labels: ``obs["cell_type"]`` when present (and asked for), else transferred from the
    reference. When both are available the transfer's agreement with the true labels is reported."""
    from gcmoe.data.cell_types import label_agreement, ordered_types, transfer_labels

    mode = config.data.routing_labels
    if mode == "auto":
        mode = "obs" if pooled.cell_type is not None else "transfer"
    report: dict[str, Any] = {"source": mode}
    mapping = type_mapping(reference, config, pooled)
    transferred = None
    if reference is not None and mapping:
        ann = transfer_labels(pooled.counts, pooled.genes, reference, mapping, config.prior.type_key)
        transferred = ann.labels
        if pooled.cell_type is not None:
            report["transfer_agreement"] = label_agreement(transferred, pooled.cell_type)
            log.info("label transfer from the reference agrees with the true cell types on %.1f%% of cells",
                     100 * report["transfer_agreement"]["accuracy"])
    if mode == "obs":
        if pooled.cell_type is None:
            raise InvalidSampleError(f"data.routing_labels is 'obs' but not every sample has obs['{Key.CELL_TYPE}']")
        labels = pooled.cell_type
    else:
        if transferred is None:
            raise ConfigError(
                "routing labels must be transferred from a reference (the samples have no obs['cell_type']): "
                "give data.reference (a labelled scRNA-seq .h5ad) and, if its type names differ from the routing "
                "types, prior.mapping"
            )
        labels = transferred
    types = ordered_types(labels)
    codes = np.array([types.index(t) for t in labels], dtype=np.int64)
    report["types"] = types
    report["cells_per_type"] = {t: int((codes == i).sum()) for i, t in enumerate(types)}
    return Routing(types, codes, mode, report)


def type_mapping(reference, config: RunConfig, pooled: PooledCells) -> dict[str, str]:
    """Reference type name -> routing type (``prior.mapping``, else the reference's own, else the same names
    among the cells' types); empty without a reference."""
    from gcmoe.prior.coexpression import reference_type_mapping

    if reference is None:
        return {}
    targets = None if pooled.cell_type is None else list(dict.fromkeys(pooled.cell_type))
    return reference_type_mapping(reference, config.prior.type_key, config.prior.mapping, targets)


@dataclass
class RunData:
    """Everything the folds share: pooled cells, features, routing labels, neighbours, the reference."""

    pooled: PooledCells
    reference: Any
    routing: Routing | None
    neighbours: Any  # torch (N, M) long or None
    cache_dir: Path
    feature_seconds: float
    store: Any = None  # gcmoe.run_store.RunStore when the cells stream from disk (train.stream)

    def rows(self, idx: np.ndarray) -> np.ndarray:
        """Pooled cell indices as the rows models read: the same in memory, the store's rows when streaming."""
        return np.asarray(idx) if self.store is None else self.store.rows[np.asarray(idx)]


def prepare_run(config: RunConfig, out: Path, inputs: ModelInputs, progress: bool = True, loaded=None,
                encoder=None) -> RunData:
    """Load or generate the data, extract (cached) features, and build the ``inputs`` the models need.

    ``loaded``: what :func:`load_samples` returned, and ``encoder``: the run's encoder, when the caller has them.
    """
    import torch

    from gcmoe.features import create_encoder
    from gcmoe.features.neighbours import cached_window_neighbours

    samples, reference, name = loaded if loaded is not None else load_samples(config, out)
    if inputs.coexpression and reference is None:
        raise ConfigError("GC-MoE's co-expression graphs need a labelled reference scRNA-seq set: set data.reference")
    cache_dir = run_cache_dir(config, out)
    if encoder is None:  # one encoder for every slide: weights are loaded once
        encoder = create_encoder(config.features.encoder, weights=config.features.weights)
    if config.train.stream:
        return _prepare_streaming(config, samples, reference, name, encoder, cache_dir, inputs, progress)
    t0 = time.perf_counter()
    features = [extract_run_features(s, config, encoder, cache_dir, progress) for s in samples]
    feature_seconds = time.perf_counter() - t0
    pooled = pool_cells(samples, name, features, config.targets)
    log.info("features: %d cells x %d dims in %.1f s", *pooled.features.shape, feature_seconds)
    routing = routing_labels(pooled, reference, config) if (inputs.cell_types or reference is not None) else None
    neighbours = None
    if inputs.neighbours:
        parts, start = [], 0
        for s in samples:
            nbr = cached_window_neighbours(s.spatial * s.mpp, config.neighbours.window_um,
                                           config.neighbours.max_neighbours, cache_dir, s.sample_id)
            parts.append(np.where(nbr >= 0, nbr + start, -1))
            start += s.n_cells
        neighbours = torch.from_numpy(np.concatenate(parts))
        log.info("neighbours: %.1f per cell on average (window %.0f um, at most %d)",
                 float((neighbours >= 0).sum(1).float().mean()), config.neighbours.window_um,
                 config.neighbours.max_neighbours)
    return RunData(pooled, reference, routing, neighbours, cache_dir, feature_seconds)


def _prepare_streaming(config: RunConfig, samples: list[Sample], reference, name: str, encoder, cache_dir: Path,
                       inputs: ModelInputs, progress: bool) -> RunData:
    """RunData whose cells stream from a cell store written slide by slide (gcmoe.run_store)."""
    from gcmoe.run_store import build_run_store

    pooled = pool_cells(samples, name, None, config.targets, feature_dim=encoder.config.feature_dim)
    routing = routing_labels(pooled, reference, config) if (inputs.cell_types or reference is not None) else None
    run_store = build_run_store(cache_dir, samples, pooled.genes, pooled.counts,
                                routing.codes if routing is not None else None,
                                list(routing.types) if routing is not None else [], encoder, config, progress)
    return RunData(pooled, reference, routing, None, cache_dir, run_store.seconds, store=run_store)


def extract_sharded(config: RunConfig, samples: list[Sample], out: Path, progress: bool):
    """Under torchrun: every rank encodes its share of each slide's tiles into the run's feature cache, which
    rank 0 assembles (gcmoe.features.partial); the later feature reads are cache hits. Returns the encoder."""
    from gcmoe.features import create_encoder

    encoder = create_encoder(config.features.encoder, weights=config.features.weights)
    for s in samples:
        extract_run_features(s, config, encoder, run_cache_dir(config, out), progress, distributed=True)
    return encoder


def run_cache_dir(config: RunConfig, out: Path) -> Path:
    """The run's cache folder: ``features.cache_dir``, else ``<out>/cache``."""
    return Path(config.features.cache_dir) if config.features.cache_dir else out / "cache"


def extract_run_features(sample: Sample, config: RunConfig, encoder, cache_dir: Path, progress: bool,
                         distributed: bool = False) -> np.ndarray:
    """One slide's cell features with the run's encoder and feature settings (through the cache)."""
    from gcmoe.features import extract_features
    from gcmoe.training.distributed import local_device

    f = config.features
    f = replace(f, cache_dir=str(cache_dir), device=local_device(f.device) if distributed else f.device)
    return extract_features(sample, f, encoder=encoder, progress=progress, distributed=distributed)
