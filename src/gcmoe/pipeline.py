"""The whole job: data -> cell features -> folds -> train every model -> score -> tables.

``run_cv`` is what ``gcmoe cv`` and ``gcmoe demo`` call. A run folder holds:

- ``results.json``: ``{"datasets": {NAME: {"ceiling", "n_cells", "n_genes_eval", "models": {MODEL: {"folds",
  "mean", "std", ...}}, ...}}, ...}`` (the schema is documented in docs/results.md);
- ``results.md``: Table 1 (methods), Table 2 (GC-MoE ablations) and per-fold detail; ``per_gene.csv``;
- ``config.yaml``: the resolved settings; ``log.txt``: the run's log;
- ``data/``: the virtual tissue and its reference, when the data were generated; ``cache/``: cell features,
  neighbour indices and, with ``train.stream``, the run's cell store (gcmoe.run_store);
- ``predictions/<fold>.h5ad``: each fold's test cells, measured targets and every model's prediction;
  ``models/<name>/``: each model as trained on the first fold (for figures: gcmoe.plotting, gcmoe.report).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from gcmoe import __version__
from gcmoe._constants import Key
from gcmoe.config import RunConfig, TargetConfig, TissueConfig, save_config
from gcmoe.data.sample import Sample
from gcmoe.errors import ConfigError, InvalidSampleError

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


def load_samples(config: RunConfig, out: Path):
    """The run's Samples and reference: a generated virtual tissue (written under ``out/data``) or files."""
    import anndata

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
    if not config.data.samples:
        raise ConfigError("data.source is 'samples' but data.samples lists no data path")
    from gcmoe.data.readers import read_samples

    d = config.data
    samples = read_samples(d.samples, d.format, d.sample_ids, image=d.image, mpp=d.mpp,
                           cell_type_key=d.cell_type_key, min_qv=d.min_qv, coords=d.coords, xy_columns=d.xy_columns,
                           alignment=d.alignment, keypoint_units=d.keypoint_units, segmentation=d.segmentation)
    ids = [s.sample_id for s in samples]
    if len(set(ids)) != len(ids):
        raise InvalidSampleError(f"sample ids must be unique across the run, got {ids}")
    reference = None
    if config.data.reference:
        path = Path(config.data.reference)
        if not path.is_file():
            raise ConfigError(f"reference file not found: {path}")
        reference = anndata.read_h5ad(path)
    return samples, reference, config.data.name or "+".join(ids)


def write_h5ad(adata, path: Path) -> None:
    """Write an AnnData atomically (temporary name, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    adata.write_h5ad(tmp)
    os.replace(tmp, path)


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
    mapping = _type_mapping(reference, config, pooled)
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


def _type_mapping(reference, config: RunConfig, pooled: PooledCells) -> dict[str, str]:
    if reference is None:
        return {}
    if config.prior.mapping is not None:
        return dict(config.prior.mapping)
    own = reference.uns.get("gcmoe", {}).get("type_mapping")
    if own:
        return {str(k): str(v) for k, v in dict(own).items()}
    ref_types = set(reference.obs[config.prior.type_key].astype(str)) if config.prior.type_key in reference.obs else set()
    targets = set(pooled.cell_type) if pooled.cell_type is not None else ref_types
    return {t: t for t in ref_types if t in targets}


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


def prepare_run(config: RunConfig, out: Path, needs: set[str], progress: bool = True, loaded=None,
                encoder=None) -> RunData:
    """Load or generate the data, extract (cached) features, and build what the models need.

    ``loaded``: what :func:`load_samples` returned, and ``encoder``: the run's encoder, when the caller has them.
    """
    import torch

    from gcmoe.features import create_encoder, extract_features
    from gcmoe.features.neighbours import cached_window_neighbours

    samples, reference, name = loaded if loaded is not None else load_samples(config, out)
    if "coexpression" in needs and reference is None:
        raise ConfigError("GC-MoE's co-expression graphs need a labelled reference scRNA-seq set: set data.reference")
    cache_dir = Path(config.features.cache_dir) if config.features.cache_dir else out / "cache"
    if encoder is None:  # one encoder for every slide: weights are loaded once
        encoder = create_encoder(config.features.encoder, weights=config.features.weights)
    if config.train.stream:
        return _prepare_streaming(config, samples, reference, name, encoder, cache_dir, needs, progress)
    t0 = time.perf_counter()
    features = [
        extract_features(s, encoder, cache_dir=cache_dir, batch_size=config.features.batch_size,
                         device=config.features.device, progress=progress, tile_size=config.features.tile_size)
        for s in samples
    ]
    feature_seconds = time.perf_counter() - t0
    pooled = pool_cells(samples, name, features, config.targets)
    log.info("features: %d cells x %d dims in %.1f s", *pooled.features.shape, feature_seconds)
    routing = routing_labels(pooled, reference, config) if ("cell_types" in needs or reference is not None) else None
    neighbours = None
    if "neighbours" in needs:
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
                       needs: set[str], progress: bool) -> RunData:
    """RunData whose cells stream from a cell store written slide by slide (gcmoe.run_store)."""
    from gcmoe.run_store import build_run_store

    pooled = pool_cells(samples, name, None, config.targets, feature_dim=encoder.config.feature_dim)
    routing = routing_labels(pooled, reference, config) if ("cell_types" in needs or reference is not None) else None
    run_store = build_run_store(cache_dir, samples, pooled.genes, pooled.counts,
                                routing.codes if routing is not None else None,
                                list(routing.types) if routing is not None else [], encoder, config, progress)
    return RunData(pooled, reference, routing, None, cache_dir, run_store.seconds, store=run_store)


def check_streamable(entries: list, config: RunConfig) -> None:
    """Refuse, before any work, models that cannot train from a cell store when ``train.stream`` is on."""
    from gcmoe.run_store import STREAMABLE_NEEDS

    if not config.train.stream:
        return
    bad = {e.display_name: sorted(e.needs - STREAMABLE_NEEDS) for e in entries if e.needs - STREAMABLE_NEEDS}
    if bad:
        detail = "; ".join(f"{k} needs {', '.join(v)} of all cells in memory" for k, v in bad.items())
        raise ConfigError(f"train.stream: {detail}. Models that stream: ST-Net* and the GC-MoE family; train the "
                          "others without --stream")


def build_model(entry, run: RunData, genes: list[str], config: RunConfig, targets_t, prior=None):
    """Create a registered model for ``genes`` with what it needs from the run; returns (model, params, data).

    ``prior``: the co-expression graphs of ``genes`` when the caller already built them (built here otherwise).
    """
    import torch

    from gcmoe.models import create_model
    from gcmoe.training.trainer import CellData

    params = dict(config.model_params.get(entry.name, {}))
    if "cell_types" in entry.needs:
        params.setdefault("n_types", len(run.routing.types))
    if "coexpression" in entry.needs:
        if prior is None:
            prior = _build_prior(run.reference, genes, run.routing, config, run.pooled)
        params.setdefault("adjacency", torch.from_numpy(prior.adjacency))
    if "neighbours" in entry.needs:
        params.setdefault("window_um", config.neighbours.window_um)
    pooled = run.pooled
    model = create_model(entry.name, pooled.feature_dim, len(genes), **params)
    if run.store is not None:
        from gcmoe.training.streaming import StreamingCells

        check_streamable([entry], config)
        cols = np.array([pooled.genes.index(g) for g in genes])
        data = StreamingCells(run.store.store, config.train.buffer_chunks, neighbours="neighbours" in entry.needs,
                              cell_types="cell_types" in entry.needs, target_columns=cols)
        return model, params, data
    # wider contexts are built with the model's own geometry (its settings or their defaults), per slide
    windows = context = None
    if "windows" in entry.needs:
        from gcmoe.features.context import tile_windows

        windows = tile_windows(pooled.xy_um, model.window_um, model.max_window_cells, pooled.sample_ids)
    if "context" in entry.needs:
        from gcmoe.features.context import context_grid

        context = context_grid(pooled.xy_um, model.context_um, model.context_size, pooled.sample_ids)
    pixels = None
    if "pixels" in entry.needs:  # raw H&E tiles (GHIST*), in the pooled cell order: slide after slide
        from gcmoe.features.pixel_tiles import build_pixel_tiles

        s_all = pooled.samples
        pixels = build_pixel_tiles([s.image for s in s_all], [s.mpp for s in s_all], [s.spatial for s in s_all],
                                   **model.tile_geometry())
    spatial = bool(entry.needs & {"neighbours", "windows", "context"})
    data = CellData(
        torch.from_numpy(pooled.features), targets_t,
        cell_type=torch.from_numpy(run.routing.codes) if "cell_types" in entry.needs else None,
        neighbours=run.neighbours if "neighbours" in entry.needs else None,
        positions=torch.from_numpy(pooled.xy_um.astype(np.float32)) if spatial else None,
        windows=windows,
        context=context,
        targets_as_input="targets" in entry.needs,
        pixels=pixels,
    )
    return model, params, data


def run_cv(config: RunConfig, progress: bool = True, resume: bool = False) -> dict[str, Any]:
    """Run the cross-validated comparison described by ``config``; write and return the results mapping.

    Each finished (model, fold) is kept in ``<out>/cv_state`` and each training is checkpointed under
    ``<out>/checkpoints/<model>/<fold>``; ``resume`` reuses both, so a crashed run continues where it stopped
    (refused, naming what differs, when the settings or data changed).
    """
    import shutil

    import torch

    from gcmoe.config import to_dict
    from gcmoe.training.state import tensor_digest

    from gcmoe.data.genes import compute_targets, select_genes, sparse_targets
    from gcmoe.data.splits import make_folds
    from gcmoe.evaluation.metrics import score_genes, summarize_folds
    from gcmoe.models.registry import get_model_entry, models_in_table_order
    from gcmoe.training.trainer import collect, fit, predict, seed_everything

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    handler = _attach_log_file(out / "log.txt")
    try:
        names = models_in_table_order() if config.models == ["all"] else config.models
        entries = [get_model_entry(m) for m in names]  # fail early on an unknown name
        check_streamable(entries, config)
        needs = set().union(*(e.needs for e in entries)) if entries else set()
        save_config(config, out / "config.yaml")
        started = time.perf_counter()
        run = prepare_run(config, out, needs, progress)
        pooled, routing = run.pooled, run.routing
        folds = make_folds(pooled.sample_ids, pooled.xy, config.cv.scheme, config.cv.n_folds,
                           config.train.val_fraction, config.train.seed)
        if not resume:
            shutil.rmtree(out / "cv_state", ignore_errors=True)
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
        if run.store is None:
            targets_all = compute_targets(pooled.counts, config.targets)
            data_digest = {"features": tensor_digest(pooled.features), "targets": tensor_digest(targets_all)}
        else:  # streaming: all targets live in the store; a fold's test targets are computed from its counts
            targets_all = None
            data_digest = {"store": str(run.store.store.meta["digest"])}
        per_model: dict[str, dict[str, Any]] = {e.display_name: _empty_entry() for e in entries}
        ceiling_folds: list[float] = []
        per_gene_rows: list[dict[str, Any]] = []
        n_genes_eval = []
        for k, fold in enumerate(folds):
            genes = select_genes(pooled.counts, pooled.genes, fold.train, config.targets)
            n_genes_eval.append(len(genes))
            prior = _build_prior(run.reference, genes, routing, config, pooled) if "coexpression" in needs else None
            if k == 0 and prior is not None:
                prior_summary = prior.summary()
            cols = np.array([pooled.genes.index(g) for g in genes])
            if targets_all is not None:
                targets_t = torch.from_numpy(np.ascontiguousarray(targets_all[:, cols]))
                true_test = targets_all[np.ix_(fold.test, cols)]
            else:
                targets_t = None
                true_test = sparse_targets(pooled.counts[fold.test], config.targets)[:, cols].toarray()
            if pooled.expected is not None:
                cs = score_genes(pooled.expected[np.ix_(fold.test, cols)], true_test, genes)
                ceiling_folds.append(cs.mean)
                per_gene_rows += _gene_rows("ceiling", fold.name, cs)
            fold_preds: dict[str, np.ndarray] = {}  # model name -> test predictions (predictions/<fold>.h5ad)
            fold_routing: dict[str, np.ndarray] = {}
            for entry in entries:
                fold_config = replace(config.train, seed=config.train.seed + k)
                state_path = out / "cv_state" / entry.name / fold.name
                fingerprint = data_digest | {
                    "model": entry.name, "params": json.dumps(_plain(config.model_params.get(entry.name, {})), sort_keys=True),
                    "genes": ",".join(genes), "test": tensor_digest(np.asarray(fold.test)),
                    "train": json.dumps(to_dict(fold_config) | {"device": None, "num_threads": None}, sort_keys=True),
                }
                done = _load_fold_state(state_path, fingerprint) if resume else None
                if done is None:
                    seed_everything(config.train.seed + k)
                    model, params, data = build_model(entry, run, genes, config, targets_t, prior)
                    res = fit(model, data, run.rows(fold.train), run.rows(fold.val), fold_config, progress=progress,
                              description=f"{entry.display_name} {fold.name} ({k + 1}/{len(folds)})",
                              checkpoint_dir=out / "checkpoints" / entry.name / fold.name, resume=resume,
                              fingerprint={"model": entry.name, "genes": ",".join(genes)})
                    pred = predict(model, data, run.rows(fold.test))
                    pi = None
                    if getattr(model, "moe", False) and routing is not None:
                        pi = collect(model, data, run.rows(fold.test), lambda m, b: m.compute(**b).routing)
                    if k == 0:
                        _save_fold_model(model, entry, params, genes, fold.name, res, run, config, out / "models" / entry.name)
                    done = {"prediction": pred, "routing": pi, "best_epoch": res.best_epoch,
                            "seconds": round(res.seconds, 3), "train_cells_per_s": round(res.train_cells_per_s, 1)}
                    _save_fold_state(state_path, done, fingerprint)
                    shutil.rmtree(out / "checkpoints" / entry.name / fold.name, ignore_errors=True)  # kept in cv_state now
                else:
                    log.info("%s %s: taken from %s (resume)", entry.display_name, fold.name, state_path)
                fold_preds[entry.name] = done["prediction"]
                scores = score_genes(fold_preds[entry.name], true_test, genes)
                rec = per_model[entry.display_name]
                rec["folds"].append(scores.mean)
                rec["best_epochs"].append(done["best_epoch"])
                rec["seconds"].append(done["seconds"])
                rec["train_cells_per_s"].append(done["train_cells_per_s"])
                rec["excluded_genes"].append(scores.excluded)
                if done["routing"] is not None:
                    fold_routing[entry.name] = done["routing"]
                    rec.setdefault("routing_accuracy_folds", []).append(
                        float((done["routing"].argmax(1) == routing.codes[fold.test]).mean()))
                per_gene_rows += _gene_rows(entry.display_name, fold.name, scores)
                log.info("%s %s: mean PCC %.4f over %d genes (best epoch %d, %.1f s)", entry.display_name, fold.name,
                         scores.mean, len(genes) - len(scores.excluded), done["best_epoch"], done["seconds"])
            _write_fold_predictions(out / "predictions" / f"{fold.name}.h5ad", fold.name, fold.test, genes, true_test,
                                    fold_preds, fold_routing, run, entries)
        ceiling, ceiling_std = summarize_folds(ceiling_folds) if ceiling_folds else (None, None)
        for rec in per_model.values():
            rec["mean"], rec["std"] = summarize_folds(rec["folds"])
            if "routing_accuracy_folds" in rec:
                rec["routing_accuracy"] = float(np.mean(rec["routing_accuracy_folds"]))
            if ceiling:
                rec["share_of_ceiling"] = rec["mean"] / ceiling
        dataset = {
            "ceiling": ceiling,
            "ceiling_std": ceiling_std,
            "ceiling_folds": ceiling_folds or None,
            "n_cells": int(len(pooled.sample_ids)),
            "n_genes_eval": int(max(n_genes_eval)),
            "scheme": "strips" if folds[0].name.startswith("strip") else "leave_one_slide_out",
            "fold_names": [f.name for f in folds],
            "encoder": config.features.encoder,
            "feature_dim": pooled.feature_dim,
            "streamed": run.store is not None,
            "models": per_model,
        }
        if routing is not None:
            dataset["routing"] = routing.report
        if "coexpression" in needs:
            dataset["prior"] = prior_summary | {"note": "co-expression graphs of fold 1's genes"}
        results = {
            "datasets": {pooled.name: dataset},
            "gcmoe_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "seconds": {"features": round(run.feature_seconds, 2), "total": round(time.perf_counter() - started, 2)},
        }
        write_results(results, per_gene_rows, out)
        return results
    finally:
        logging.getLogger("gcmoe").removeHandler(handler)
        handler.close()


# --- what a finished (model, fold) leaves for a resumed run: predictions + numbers, no pickles ---


def _save_fold_state(path: Path, done: dict[str, Any], fingerprint: dict[str, Any]) -> None:
    """``<path>.npz`` (prediction, routing) then ``<path>.json`` (numbers, fingerprint): the JSON marks it complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"prediction": done["prediction"]} | ({"routing": done["routing"]} if done["routing"] is not None else {})
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path.with_suffix(".npz"))
    meta = {k: done[k] for k in ("best_epoch", "seconds", "train_cells_per_s")} | {"fingerprint": fingerprint}
    tmp = path.with_name(f".{path.name}.tmp.json")
    tmp.write_text(json.dumps(_jsonable(meta)))
    os.replace(tmp, path.with_suffix(".json"))


def _load_fold_state(path: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """A finished (model, fold) of an earlier run, or None; refused when it was made with other settings or data."""
    from gcmoe.training.checkpoint import CheckpointError

    meta_path = path.with_suffix(".json")
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    saved = meta.get("fingerprint", {})
    differs = [k for k in sorted(set(saved) | set(fingerprint)) if saved.get(k) != fingerprint.get(k)]
    if differs:
        raise CheckpointError(f"cannot resume: {meta_path} was made by a different run (it differs in "
                              f"{', '.join(differs)}); resume with the same settings and data, or use a new output folder")
    with np.load(path.with_suffix(".npz"), allow_pickle=False) as arrays:
        return {"prediction": arrays["prediction"], "routing": arrays["routing"] if "routing" in arrays else None,
                "best_epoch": meta["best_epoch"], "seconds": meta["seconds"], "train_cells_per_s": meta["train_cells_per_s"]}


# --- per-fold predictions and first-fold models, kept for figures and the report (docs/results.md) ---


def _write_fold_predictions(path: Path, fold_name: str, test: np.ndarray, genes: list[str], measured: np.ndarray,
                            preds: dict[str, np.ndarray], routing_probs: dict[str, np.ndarray], run: RunData,
                            entries: list) -> None:
    """``predictions/<fold>.h5ad``: the fold's test cells, X = measured targets, one layer per model."""
    import anndata
    import pandas as pd

    pooled, routing = run.pooled, run.routing
    ids = np.concatenate([np.asarray(s.adata.obs_names, dtype=str) for s in pooled.samples])
    if len(set(ids)) != len(ids):
        ids = np.char.add(np.char.add(pooled.sample_ids.astype(str), ":"), ids)
    obs = pd.DataFrame({Key.SAMPLE_ID: pd.Categorical(pooled.sample_ids[test])}, index=pd.Index(ids[test], dtype=str))
    if pooled.cell_type is not None:
        obs[Key.CELL_TYPE] = pd.Categorical(pooled.cell_type[test])
    types = list(routing.types) if routing is not None else []
    if routing is not None:
        obs["routing_label"] = pd.Categorical.from_codes(routing.codes[test], categories=types)
    adata = anndata.AnnData(X=np.asarray(measured, dtype=np.float32), obs=obs)
    adata.var_names = pd.Index(genes, dtype=str)
    adata.obsm[Key.SPATIAL] = np.asarray(pooled.xy[test], dtype=np.float64)
    for name, pred in preds.items():
        adata.layers[name] = np.asarray(pred, dtype=np.float32)
    for name, pi in routing_probs.items():
        adata.obsm[f"routing_{name}"] = np.asarray(pi, dtype=np.float32)
        adata.obs[f"expert_{name}"] = pd.Categorical.from_codes(pi.argmax(1), categories=types)
    adata.uns[Key.UNS] = {
        "fold": fold_name,
        "genes": list(genes),
        "models": {e.name: e.display_name for e in entries if e.name in preds},
        "routing_types": types,
        # each slide's image file, so figures can draw any input format (in-memory images are written to data/)
        "images": {s.sample_id: str(Path(s.image.path).resolve()) for s in pooled.samples if s.image.path is not None},
    }
    write_h5ad(adata, path)


def _save_fold_model(model, entry, params: dict[str, Any], genes: list[str], fold_name: str, res, run: RunData,
                     config: RunConfig, folder: Path) -> None:
    """``models/<name>/``: the model trained on the first fold, loadable with ``checkpoint.load_model``."""
    from gcmoe.config import to_dict
    from gcmoe.training.checkpoint import save_model

    meta = {
        "genes": list(genes),
        "cell_types": list(run.routing.types) if run.routing is not None else [],
        "encoder": _encoder_card(config.features.encoder, config.features.weights, run.pooled.feature_dim),
        "neighbours": to_dict(config.neighbours) if "neighbours" in entry.needs else None,
        "targets": to_dict(config.targets) | {"genes": list(genes)},
        "training_data": {"samples": sorted(set(run.pooled.sample_ids)), "fold": fold_name,
                          "note": "trained on this fold's training cells (cross-validation)"},
        "metrics": {"val_pcc": res.best_val_pcc, "best_epoch": res.best_epoch, "epochs_run": res.epochs_run},
        "gcmoe_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    save_model(model, folder, entry.name, params, meta)


_ENCODER_CARDS: dict[tuple, dict[str, Any]] = {}


def _encoder_card(name: str, weights: str | None, feature_dim: int) -> dict[str, Any]:
    key = (name, weights, feature_dim)
    if key not in _ENCODER_CARDS:  # creating an encoder may load weights: once per run, not once per model
        from gcmoe.features import create_encoder

        encoder = create_encoder(name, weights=weights)
        _ENCODER_CARDS[key] = {"name": name, "target_mpp": encoder.config.target_mpp, "feature_dim": feature_dim,
                               "weights": weights}
    return _ENCODER_CARDS[key]


def _build_prior(reference, genes: list[str], routing: Routing, config: RunConfig, pooled: PooledCells):
    from gcmoe.prior.coexpression import build_coexpression_prior

    return build_coexpression_prior(
        reference, genes, routing.types, type_key=config.prior.type_key,
        mapping=_type_mapping(reference, config, pooled) or None, tau=config.prior.tau,
    )


def _empty_entry() -> dict[str, Any]:
    return {"folds": [], "mean": None, "std": None, "best_epochs": [], "seconds": [], "train_cells_per_s": [],
            "excluded_genes": []}


def _gene_rows(model: str, fold: str, scores) -> list[dict[str, Any]]:
    return [{"model": model, "fold": fold, "gene": g, "pcc": (None if np.isnan(r) else float(r))}
            for g, r in zip(scores.genes, scores.pcc)]


def write_results(results: dict[str, Any], per_gene_rows: list[dict[str, Any]], out: Path) -> None:
    """Write results.json, results.md and per_gene.csv atomically into ``out``."""
    import pandas as pd

    from gcmoe.evaluation.tables import results_markdown

    def atomic(path: Path, text: str) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)

    atomic(out / "results.json", json.dumps(_jsonable(results), indent=2))
    atomic(out / "results.md", results_markdown(results))
    atomic(out / "per_gene.csv", pd.DataFrame(per_gene_rows).to_csv(index=False))


def _plain(params: dict[str, Any]) -> dict[str, Any]:
    """Model parameters without tensors (those are data: hashed with the features elsewhere)."""
    import torch

    return {k: (list(v.shape) if isinstance(v, torch.Tensor) else v) for k, v in params.items()}


def _jsonable(obj: Any) -> Any:
    """NaN -> null, numpy scalars -> Python, recursively (results.json stays valid JSON)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if not np.isfinite(obj) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def _attach_log_file(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path, mode="a")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    root = logging.getLogger("gcmoe")
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)
    return handler


DEMO_MODELS = ["stnet", "gcmoe_no_moe_cap_c2ca", "gcmoe_no_cap_c2ca", "gcmoe_no_c2ca", "gcmoe"]


def demo_config(out: str | os.PathLike = "gcmoe_demo", quick: bool = False) -> RunConfig:
    """Settings of ``gcmoe demo``: the default virtual tissue (or a tiny one with ``quick``), ST-Net* and GC-MoE
    with its ablations, 5 vertical strips. The training budget is shorter than the paper's (docs/index.md)."""
    config = RunConfig(out=str(out), models=list(DEMO_MODELS))
    if quick:
        config.data.tissue = TissueConfig(n_cells=1_200, height=800, width=800, n_genes=80, n_reference_cells=500)
        config.train.max_epochs = 30
        config.train.patience = 5
    else:
        config.train.max_epochs = 400
        config.train.patience = 30
    return config


def _extract_sharded(config: RunConfig, samples: list[Sample], out: Path, progress: bool):
    """Under torchrun: every rank encodes its share of each slide's tiles into the run's feature cache, which
    rank 0 assembles (gcmoe.features.partial); the later feature reads are cache hits. Returns the encoder."""
    from gcmoe.features import create_encoder, extract_features
    from gcmoe.training.distributed import local_device

    f = config.features
    cache_dir = Path(f.cache_dir) if f.cache_dir else out / "cache"
    encoder = create_encoder(f.encoder, weights=f.weights)
    for s in samples:
        extract_features(s, encoder, cache_dir=cache_dir, batch_size=f.batch_size, device=local_device(f.device),
                         progress=progress, tile_size=f.tile_size, distributed=True)
    return encoder


def train_model(config: RunConfig, model_name: str, progress: bool = True, resume: bool = False) -> Path:
    """Train one model on all cells of the run (validation carved in spatial blocks) and save its folder.

    The training state is checkpointed under ``<out>/checkpoints/<model>`` (``train.checkpoint_every``);
    ``resume`` continues from the newest checkpoint there (refused if the settings or data differ).

    The folder (``<out>/model``) holds safetensors weights and a JSON card with everything prediction needs:
    genes, routing types, encoder and its pixel size, target transform, training data and validation PCC.

    Under torchrun every process encodes its share of each slide's tiles and trains its share of each batch
    (:mod:`gcmoe.training.distributed`); rank 0 prepares the rest of the data first (the others then read its
    caches) and alone writes the outputs.
    """
    import torch

    from gcmoe.training.distributed import rank_world

    from gcmoe.config import to_dict
    from gcmoe.data.genes import compute_targets, select_genes
    from gcmoe.data.splits import carve_validation
    from gcmoe.models import get_model_entry
    from gcmoe.training.checkpoint import save_model
    from gcmoe.training.trainer import fit, seed_everything

    out = Path(config.out)
    rank, world = rank_world()
    main = rank == 0
    if main:
        out.mkdir(parents=True, exist_ok=True)
    handler = _attach_log_file(out / "log.txt") if main else None
    try:
        entry = get_model_entry(model_name)
        check_streamable([entry], config)
        if main:
            save_config(config, out / "config.yaml")
        loaded = encoder = None
        if world > 1:
            loaded = load_samples(config, out)
            encoder = _extract_sharded(config, loaded[0], out, progress and main)
        if main:
            run = prepare_run(config, out, set(entry.needs), progress, loaded, encoder)
        if world > 1:
            torch.distributed.barrier()  # rank 0 has written the data and caches the others now read
        if not main:
            run = prepare_run(config, out, set(entry.needs), progress=False, loaded=loaded, encoder=encoder)
        pooled = run.pooled
        all_idx = np.arange(len(pooled.sample_ids))
        train_parts, val_parts = [], []
        for sid in dict.fromkeys(pooled.sample_ids):
            tr, va = carve_validation(pooled.xy, all_idx[pooled.sample_ids == sid], config.train.val_fraction, config.train.seed)
            train_parts.append(tr)
            val_parts.append(va)
        train_idx, val_idx = np.concatenate(train_parts), np.concatenate(val_parts)
        genes = select_genes(pooled.counts, pooled.genes, train_idx, config.targets)
        cols = np.array([pooled.genes.index(g) for g in genes])
        targets_t = None
        if run.store is None:
            targets_t = torch.from_numpy(np.ascontiguousarray(compute_targets(pooled.counts, config.targets)[:, cols]))
        seed_everything(config.train.seed)
        model, params, data = build_model(entry, run, genes, config, targets_t)
        fingerprint = {"model": entry.name, "params": json.dumps(_plain(params), sort_keys=True), "genes": ",".join(genes)}
        res = fit(model, data, run.rows(train_idx), run.rows(val_idx), config.train, progress=progress,
                  description=entry.display_name,
                  checkpoint_dir=out / "checkpoints" / entry.name, resume=resume, fingerprint=fingerprint)
        meta = {
            "genes": genes,
            "cell_types": run.routing.types if run.routing is not None else [],
            "encoder": _encoder_card(config.features.encoder, config.features.weights, pooled.feature_dim),
            "neighbours": to_dict(config.neighbours) if "neighbours" in entry.needs else None,
            "targets": to_dict(config.targets) | {"genes": genes},
            "training_data": {"samples": sorted(set(pooled.sample_ids)), "n_cells": int(len(all_idx)),
                              "n_train": int(len(train_idx)), "n_val": int(len(val_idx))},
            "metrics": {"val_pcc": res.best_val_pcc, "best_epoch": res.best_epoch, "epochs_run": res.epochs_run},
            "gcmoe_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        if world > 1:
            torch.distributed.barrier()
        return save_model(model, out / "model", entry.name, params, meta) if main else out / "model"
    finally:
        if handler is not None:
            logging.getLogger("gcmoe").removeHandler(handler)
            handler.close()
