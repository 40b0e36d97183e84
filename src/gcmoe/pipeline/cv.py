"""Cross-validation: every model trained and scored on every fold, the ceiling beside them, one results mapping.

Per fold: the evaluated genes are chosen from the fold's training cells, the co-expression graphs built for
them, each model trained (early stopping on the fold's validation cells) and scored on the test cells by
per-gene PCC. A finished (model, fold) is kept under ``cv_state`` so a resumed run skips it.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from functools import reduce
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gcmoe import __version__
from gcmoe.config import RunConfig, save_config
from gcmoe.files import remove_owned
from gcmoe.models.inputs import ModelInputs
from gcmoe.pipeline.data import RunData, prepare_run
from gcmoe.pipeline.inputs import build_model, build_prior, check_streamable
from gcmoe.pipeline.outputs import (
    attach_log_file,
    detach_log_file,
    empty_entry,
    gene_rows,
    load_fold_state,
    now,
    plain_params,
    save_fold_model,
    save_fold_state,
    write_fold_predictions,
    write_results,
)

if TYPE_CHECKING:
    from gcmoe.data.splits import Fold
    from gcmoe.models.registry import ModelEntry

log = logging.getLogger(__name__)

MIN_EXPERT_CELLS = 50  # training cells of a routing type below which its expert is flagged


def run_cv(config: RunConfig, progress: bool = True, resume: bool = False) -> dict[str, Any]:
    """Run the cross-validated comparison described by ``config``; write and return the results mapping.

    Each finished (model, fold) is kept in ``<out>/cv_state`` and each training is checkpointed under
    ``<out>/checkpoints/<model>/<fold>``; ``resume`` reuses both, so a crashed run continues where it stopped
    (refused, naming what differs, when the settings or data changed).
    """
    from gcmoe.data.genes import select_genes
    from gcmoe.data.splits import make_folds
    from gcmoe.evaluation.metrics import score_genes
    from gcmoe.models.registry import get_model_entry, models_in_table_order
    from gcmoe.training.ensemble import member_seeds
    from gcmoe.training.trainer import check_train_config

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    handler = attach_log_file(out / "log.txt")
    try:
        names = models_in_table_order() if config.models == ["all"] else config.models
        entries = [get_model_entry(m) for m in names]  # fail early on an unknown name
        check_streamable(entries, config)
        member_seeds(config.train)  # a bad train.ensemble fails before the features are made
        check_train_config(config.train)  # so do a batch size of 0, a negative lr, a missing GPU
        inputs = reduce(lambda a, b: a | b, (e.inputs for e in entries), ModelInputs())
        save_config(config, out / "config.yaml")
        started = time.perf_counter()
        run = prepare_run(config, out, inputs, progress)
        pooled = run.pooled
        folds = make_folds(pooled.sample_ids, pooled.xy, config.cv.scheme, config.cv.n_folds,
                           config.train.val_fraction, config.train.seed)
        if not resume:
            remove_owned(out / "cv_state")  # only what gcmoe wrote there (gcmoe.files.OutputFolder)
            remove_owned(out / "checkpoints")
        targets = _RunTargets.of(run, config)
        tally = _Tally({e.display_name: empty_entry(e) for e in entries})
        prior_summary = None
        for k, fold in enumerate(folds):
            genes = select_genes(pooled.counts, pooled.genes, fold.train, config.targets)
            tally.n_genes_eval.append(len(genes))
            prior = build_prior(run.reference, genes, run.routing, config, pooled) if inputs.coexpression else None
            if k == 0 and prior is not None:
                prior_summary = prior.summary()
            targets_t, true_test = targets.of_fold(fold, genes, pooled, config)
            tally.few_cells(run, fold, entries)
            if pooled.expected is not None:
                cols = [pooled.genes.index(g) for g in genes]
                tally.ceiling(fold.name, score_genes(pooled.expected[np.ix_(fold.test, cols)], true_test, genes))
            fold_preds: dict[str, np.ndarray] = {}  # model name -> test predictions (predictions/<fold>.h5ad)
            fold_routing: dict[str, np.ndarray] = {}
            for entry in entries:
                done = _train_fold(entry, k, fold, len(folds), genes, run, config, targets_t, prior,
                                   targets.digest, out, resume, progress)
                fold_preds[entry.name] = done["prediction"]
                if done["routing"] is not None:
                    fold_routing[entry.name] = done["routing"]
                tally.model(entry, fold, genes, done, true_test, run)
            write_fold_predictions(out / "predictions" / f"{fold.name}.h5ad", fold.name, fold.test, genes, true_test,
                                   fold_preds, fold_routing, run, entries)
        results = {
            "datasets": {pooled.name: tally.dataset(run, folds, config, prior_summary)},
            "gcmoe_version": __version__,
            "created": now(),
            "seconds": {"features": round(run.feature_seconds, 2), "total": round(time.perf_counter() - started, 2)},
        }
        write_results(results, tally.per_gene_rows, out)
        return results
    finally:
        detach_log_file(handler)


@dataclass
class _RunTargets:
    """The targets of all cells (in memory) or None (streaming: a fold's test targets come from its counts),
    and their digest for the fold fingerprints."""

    all: np.ndarray | None
    digest: dict[str, str]

    @classmethod
    def of(cls, run: RunData, config: RunConfig) -> _RunTargets:
        from gcmoe.data.normalisation import compute_targets
        from gcmoe.training.state import tensor_digest

        if run.store is not None:  # streaming: all targets live in the store
            return cls(None, {"store": str(run.store.store.meta["digest"])})
        targets = compute_targets(run.pooled.counts, config.targets)
        return cls(targets, {"features": tensor_digest(run.pooled.features), "targets": tensor_digest(targets)})

    def of_fold(self, fold: Fold, genes: list[str], pooled, config: RunConfig):
        """(training targets of ``genes`` as a tensor, or None when streaming; the test cells' targets)."""
        import torch

        from gcmoe.data.normalisation import sparse_targets

        cols = np.array([pooled.genes.index(g) for g in genes])
        if self.all is None:
            return None, sparse_targets(pooled.counts[fold.test], config.targets)[:, cols].toarray()
        return torch.from_numpy(np.ascontiguousarray(self.all[:, cols])), self.all[np.ix_(fold.test, cols)]


def _train_fold(entry: ModelEntry, k: int, fold: Fold, n_folds: int, genes: list[str], run: RunData,
                config: RunConfig, targets_t, prior, data_digest: dict[str, str], out: Path, resume: bool,
                progress: bool) -> dict[str, Any]:
    """Train ``entry`` on fold ``k`` and predict its test cells, or take both from ``cv_state`` (resume).

    Returns ``{"prediction", "routing" (or None), "best_epoch", "seconds", "train_cells_per_s"}``.
    """
    from gcmoe.config import to_dict
    from gcmoe.training.state import tensor_digest
    from gcmoe.models import create_model
    from gcmoe.training.ensemble import fit_ensemble
    from gcmoe.training.trainer import collect, predict, seed_everything

    fold_config = replace(config.train, seed=config.train.seed + k)
    state_path = out / "cv_state" / entry.name / fold.name
    fingerprint = data_digest | {
        "model": entry.name, "params": json.dumps(plain_params(config.model_params.get(entry.name, {})), sort_keys=True),
        "genes": ",".join(genes), "test": tensor_digest(np.asarray(fold.test)),
        "train": json.dumps(to_dict(fold_config) | {"device": None, "num_threads": None}, sort_keys=True),
    }
    done = load_fold_state(state_path, fingerprint) if resume else None
    if done is not None:
        log.info("%s %s: taken from %s (resume)", entry.display_name, fold.name, state_path)
        return done
    seed_everything(config.train.seed + k)
    model, params, data = build_model(entry, run, genes, config, targets_t, prior)
    checkpoints = out / "checkpoints" / entry.name / fold.name
    model, res = fit_ensemble(
        model, lambda: create_model(entry.name, run.pooled.feature_dim, len(genes), **params), data,
        run.rows(fold.train), run.rows(fold.val), fold_config, progress=progress,
        description=f"{entry.display_name} {fold.name} ({k + 1}/{n_folds})", checkpoint_dir=checkpoints,
        resume=resume, fingerprint={"model": entry.name, "genes": ",".join(genes), "params": fingerprint["params"]})
    pred = predict(model, data, run.rows(fold.test))
    pi = None
    if model.routes and run.routing is not None:
        pi = collect(model, data, run.rows(fold.test), lambda m, b: m.routing(**b))
    if k == 0:
        save_fold_model(model, entry, params, genes, fold.name, res, run, config, out / "models" / entry.name)
    done = {"prediction": pred, "routing": pi, "best_epoch": res.best_epoch,
            "seconds": round(res.seconds, 3), "train_cells_per_s": round(res.train_cells_per_s, 1)}
    save_fold_state(state_path, done, fingerprint)
    remove_owned(checkpoints)  # kept in cv_state now
    return done


@dataclass
class _Tally:
    """The scores gathered fold by fold: each model's record, the ceiling, per-gene rows."""

    per_model: dict[str, dict[str, Any]]
    ceiling_folds: list[float] = field(default_factory=list)
    per_gene_rows: list[dict[str, Any]] = field(default_factory=list)
    n_genes_eval: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def few_cells(self, run: RunData, fold: Fold, entries: list[ModelEntry]) -> None:
        """Warn about routing types with too few training cells for an expert of their own."""
        if run.routing is None or not any(e.inputs.cell_types for e in entries):
            return
        counts = np.bincount(run.routing.codes[fold.train][run.routing.codes[fold.train] >= 0],
                             minlength=len(run.routing.types))
        for t, n in zip(run.routing.types, counts):
            if n < MIN_EXPERT_CELLS:
                message = (f"{fold.name}: routing type {t!r} has {n} training cells (< {MIN_EXPERT_CELLS}); its "
                           "expert is fit on too few cells: merge it into a related type (prior.mapping) or add data")
                log.warning(message)
                self.warnings.append(message)

    def ceiling(self, fold_name: str, scores) -> None:
        self.ceiling_folds.append(scores.mean)
        self.per_gene_rows += gene_rows("ceiling", fold_name, scores)

    def model(self, entry: ModelEntry, fold: Fold, genes: list[str], done: dict[str, Any], true_test: np.ndarray,
              run: RunData) -> None:
        from gcmoe.evaluation.metrics import score_genes

        scores = score_genes(done["prediction"], true_test, genes)
        rec = self.per_model[entry.display_name]
        rec["folds"].append(scores.mean)
        rec["best_epochs"].append(done["best_epoch"])
        rec["seconds"].append(done["seconds"])
        rec["train_cells_per_s"].append(done["train_cells_per_s"])
        rec["excluded_genes"].append(scores.excluded)
        if done["routing"] is not None:
            rec.setdefault("routing_accuracy_folds", []).append(
                float((done["routing"].argmax(1) == run.routing.codes[fold.test]).mean()))
        if run.routing is not None:  # PCC within each routing type's test cells (labels, not the router's guess)
            from gcmoe.evaluation.metrics import score_by_type

            codes = run.routing.codes[fold.test]
            known = codes >= 0
            labels = np.asarray(run.routing.types, dtype=object)[codes[known]]
            rec.setdefault("per_type_folds", []).append(
                score_by_type(done["prediction"][known], true_test[known], labels))
        self.per_gene_rows += gene_rows(entry.display_name, fold.name, scores)
        log.info("%s %s: mean PCC %.4f over %d genes (best epoch %d, %.1f s)", entry.display_name, fold.name,
                 scores.mean, len(genes) - len(scores.excluded), done["best_epoch"], done["seconds"])

    def dataset(self, run: RunData, folds: list[Fold], config: RunConfig, prior_summary: dict | None) -> dict[str, Any]:
        """The data set's entry of results.json (schema: docs/results.md)."""
        from gcmoe.evaluation.metrics import summarize_folds

        ceiling, ceiling_std = summarize_folds(self.ceiling_folds) if self.ceiling_folds else (None, None)
        for rec in self.per_model.values():
            rec["mean"], rec["std"] = summarize_folds(rec["folds"])
            if "routing_accuracy_folds" in rec:
                rec["routing_accuracy"] = float(np.mean(rec["routing_accuracy_folds"]))
            if "per_type_folds" in rec:
                types = sorted({t for f in rec["per_type_folds"] for t in f})
                rec["per_type"] = {t: float(np.mean([f[t] for f in rec["per_type_folds"] if t in f])) for t in types}
            if ceiling:
                rec["share_of_ceiling"] = rec["mean"] / ceiling
        dataset = {
            "ceiling": ceiling,
            "ceiling_std": ceiling_std,
            "ceiling_folds": self.ceiling_folds or None,
            "n_cells": int(len(run.pooled.sample_ids)),
            "n_genes_eval": int(max(self.n_genes_eval)),
            "scheme": "strips" if folds[0].name.startswith("strip") else "leave_one_slide_out",
            "fold_names": [f.name for f in folds],
            "encoder": config.features.encoder,
            "feature_dim": run.pooled.feature_dim,
            "streamed": run.store is not None,
            "models": self.per_model,
        }
        if run.routing is not None:
            dataset["routing"] = run.routing.report
        if self.warnings:
            dataset["warnings"] = self.warnings
        if prior_summary is not None:
            dataset["prior"] = prior_summary | {"note": "co-expression graphs of fold 1's genes"}
        return dataset
