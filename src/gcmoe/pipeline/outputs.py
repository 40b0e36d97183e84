"""Outputs of a run: the model card, saved models, per-fold predictions, resumable fold states, results files.

Layout of a run folder: see :mod:`gcmoe.pipeline` (and docs/results.md). Every file goes through
:mod:`gcmoe.files`, so an interrupted run leaves no half file.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gcmoe import __version__
from gcmoe._constants import Key
from gcmoe.config import RunConfig
from gcmoe.files import atomic_path, claim_file, file_sha256, write_h5ad, write_json, write_text

if TYPE_CHECKING:
    from gcmoe.models.registry import ModelEntry
    from gcmoe.pipeline.data import RunData
    from gcmoe.training.trainer import FitResult


# --- the model card: everything prediction needs beside the weights ---


def model_card(entry: ModelEntry, genes: list[str], run: RunData, config: RunConfig, training_data: dict[str, Any],
               res: FitResult) -> dict[str, Any]:
    """The card saved with a trained model (``gcmoe.training.checkpoint.save_model``'s metadata): genes,
    routing types, encoder and its pixel size, neighbour and target settings, training data (with each slide's
    pixel size), validation metrics, version and time."""
    from gcmoe.config import to_dict

    return {
        "genes": list(genes),
        "cell_types": list(run.routing.types) if run.routing is not None else [],
        "encoder": _encoder_card(config.features.encoder, config.features.weights, run.pooled.feature_dim,
                                 config.features.tile_size, config.features.stain_norm),
        "neighbours": to_dict(config.neighbours) if entry.inputs.neighbours else None,
        "targets": to_dict(config.targets) | {"genes": list(genes)},
        "training_data": training_data | {"mpp": {s.sample_id: s.mpp for s in run.pooled.samples}},
        "metrics": {"val_pcc": res.best_val_pcc, "best_epoch": res.best_epoch, "epochs_run": res.epochs_run},
        **({"ensemble": {"members": len(res.members), "each": res.members}} if res.members else {}),
        "gcmoe_version": __version__,
        "created": now(),
    }


def now() -> str:
    """The current UTC time, ISO 8601 to the second (``created`` fields)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


_ENCODER_CARDS: dict[tuple, dict[str, Any]] = {}


def _encoder_card(name: str, weights: str | None, feature_dim: int, tile_size: int | None = None,
                  stain_norm: str = "none") -> dict[str, Any]:
    """The encoder as the features were made: name, pixel size, weights file and its SHA-256, tile size, stain
    normalisation and the hash of its full config (what ``gcmoe predict`` checks before it trusts an encoder to
    give the same features, and how it rebuilds the feature settings)."""
    key = (name, weights, feature_dim, tile_size, stain_norm)
    if key not in _ENCODER_CARDS:  # creating an encoder may load weights: once per run, not once per model
        from gcmoe.config import FeatureConfig
        from gcmoe.features import create_encoder
        from gcmoe.features.extract import run_encoder_config

        encoder = create_encoder(name, weights=weights)
        config = run_encoder_config(encoder.config, FeatureConfig(tile_size=tile_size, stain_norm=stain_norm))
        _ENCODER_CARDS[key] = {"name": name, "target_mpp": config.target_mpp, "feature_dim": feature_dim,
                               "weights": weights, "weights_sha256": config.weights_sha256,
                               "tile_size": config.tile_size, "stain_norm": config.stain_norm,
                               "config_hash": config.hash()}
    return _ENCODER_CARDS[key]


# --- what a finished (model, fold) leaves for a resumed run: predictions + numbers, no pickles ---


def save_fold_state(path: Path, done: dict[str, Any], fingerprint: dict[str, Any]) -> None:
    """``<path>.npz`` (prediction, routing) then ``<path>.json`` (numbers, fingerprint): the JSON marks it complete."""
    arrays = {"prediction": done["prediction"]} | ({"routing": done["routing"]} if done["routing"] is not None else {})
    with atomic_path(path.with_suffix(".npz"), suffix=".npz") as tmp:
        np.savez(tmp, **arrays)
    meta = {k: done[k] for k in ("best_epoch", "seconds", "train_cells_per_s")} | {"fingerprint": fingerprint}
    write_json(path.with_suffix(".json"), meta | {"npz_sha256": file_sha256(path.with_suffix(".npz"))})


def load_fold_state(path: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """A finished (model, fold) of an earlier run, or None; refused when it was made with other settings or data."""
    from gcmoe.training.checkpoint import CheckpointError

    meta_path = path.with_suffix(".json")
    if not meta_path.is_file():
        return None
    npz_path = path.with_suffix(".npz")
    redo = f"delete {meta_path} and {npz_path} to train this (model, fold) again"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        saved = meta["fingerprint"]
        numbers = {k: meta[k] for k in ("best_epoch", "seconds", "train_cells_per_s")}
        if not isinstance(saved, dict) or not isinstance(meta.get("npz_sha256"), str):
            raise ValueError("no fingerprint or checksum")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, AttributeError) as exc:
        raise CheckpointError(f"cannot resume: {meta_path} is not a complete fold state ({type(exc).__name__}: "
                              f"{exc}); the file is truncated or damaged: {redo}") from None
    differs = [k for k in sorted(set(saved) | set(fingerprint)) if saved.get(k) != fingerprint.get(k)]
    if differs:
        raise CheckpointError(f"cannot resume: {meta_path} was made by a different run (it differs in "
                              f"{', '.join(differs)}); resume with the same settings and data, or use a new output folder")
    if not npz_path.is_file() or file_sha256(npz_path) != meta["npz_sha256"]:
        raise CheckpointError(f"cannot resume: {npz_path} is missing or does not match its checksum in {meta_path.name}: "
                              f"the predictions were damaged or replaced; {redo}")
    with np.load(npz_path, allow_pickle=False) as arrays:
        return {"prediction": arrays["prediction"], "routing": arrays["routing"] if "routing" in arrays else None,
                **numbers}


# --- per-fold predictions and first-fold models, kept for figures and the report (docs/results.md) ---


def write_fold_predictions(path: Path, fold_name: str, test: np.ndarray, genes: list[str], measured: np.ndarray,
                           preds: dict[str, np.ndarray], routing_probs: dict[str, np.ndarray], run: RunData,
                           entries: list[ModelEntry]) -> None:
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


def save_fold_model(model, entry: ModelEntry, params: dict[str, Any], genes: list[str], fold_name: str, res: FitResult,
                    run: RunData, config: RunConfig, folder: Path) -> None:
    """``models/<name>/``: the model trained on the first fold, loadable with ``checkpoint.load_model``."""
    from gcmoe.training.checkpoint import save_model

    training_data = {"samples": sorted(set(run.pooled.sample_ids)), "fold": fold_name,
                     "note": "trained on this fold's training cells (cross-validation)"}
    save_model(model, folder, entry.name, params, model_card(entry, genes, run, config, training_data, res))


# --- results.json, results.md, per_gene.csv ---


def empty_entry(entry: ModelEntry) -> dict[str, Any]:
    """A model's record in results.json before its folds; ``raw_pixels`` marks models that skip the features."""
    return {"folds": [], "mean": None, "std": None, "best_epochs": [], "seconds": [], "train_cells_per_s": [],
            "excluded_genes": [], "raw_pixels": entry.inputs.pixels}


def gene_rows(model: str, fold: str, scores) -> list[dict[str, Any]]:
    """Rows of per_gene.csv for one model and fold (NaN PCC as empty)."""
    return [{"model": model, "fold": fold, "gene": g, "pcc": (None if np.isnan(r) else float(r))}
            for g, r in zip(scores.genes, scores.pcc)]


def write_results(results: dict[str, Any], per_gene_rows: list[dict[str, Any]], out: Path) -> None:
    """Write results.json, results.md and per_gene.csv atomically into ``out``."""
    import pandas as pd

    from gcmoe.evaluation.tables import results_markdown

    write_json(out / "results.json", results, indent=2)
    write_text(out / "results.md", results_markdown(results))
    write_text(out / "per_gene.csv", pd.DataFrame(per_gene_rows).to_csv(index=False))


def plain_params(params: dict[str, Any]) -> dict[str, Any]:
    """Model parameters without tensors (those are data: hashed with the features elsewhere)."""
    import torch

    return {k: (list(v.shape) if isinstance(v, torch.Tensor) else v) for k, v in params.items()}


def attach_log_file(path: Path) -> logging.Handler:
    """Log the package's INFO messages to ``path`` too (the run's log.txt); remove the handler when done."""
    claim_file(path)  # a log.txt gcmoe did not write is not appended to
    handler = logging.FileHandler(path, mode="a")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    root = logging.getLogger("gcmoe")
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)
    return handler


def detach_log_file(handler: logging.Handler) -> None:
    """Undo :func:`attach_log_file`."""
    logging.getLogger("gcmoe").removeHandler(handler)
    handler.close()

