"""Reading a run folder (written by ``gcmoe cv`` / ``gcmoe demo``) for the figures and the report."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gcmoe._constants import Key, UnsKey
from gcmoe.errors import GcmoeError

log = logging.getLogger(__name__)

# the pair the paper compares in its Figures 3 and 5
DEFAULT_MODELS = ("stnet", "gcmoe")


class RunFolderError(GcmoeError, FileNotFoundError):
    """A run folder lacks a file a figure needs, or a figure was asked for something the run does not hold."""


def load_results(run_dir: str | os.PathLike) -> dict[str, Any]:
    """results.json of a run folder."""
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise RunFolderError(f"{path} not found: {run_dir} is not a gcmoe run folder (run `gcmoe cv` or `gcmoe demo`)")
    return json.loads(path.read_text())


def fold_names(run_dir: str | os.PathLike) -> list[str]:
    """The folds whose predictions the run kept (``predictions/<fold>.h5ad``), in results.json's order."""
    run_dir = Path(run_dir)
    pred_dir = run_dir / "predictions"
    found = {p.stem for p in pred_dir.glob("*.h5ad")} if pred_dir.is_dir() else set()
    if not found:
        raise RunFolderError(
            f"{pred_dir} holds no per-fold predictions: the run was made by an older gcmoe; rerun it to get figures"
        )
    order: list[str] = []
    if (run_dir / "results.json").is_file():
        for d in load_results(run_dir)["datasets"].values():
            order += [f for f in d.get("fold_names", []) if f in found]
    return order + sorted(found - set(order))


def read_predictions(run_dir: str | os.PathLike, fold: str | None = None):
    """The kept predictions of one fold, or (``fold`` None or ``"all"``) of every fold, as one AnnData.

    With all folds, every cell carries its held-out prediction and the genes are those evaluated in every fold
    (folds choose their genes from their own training cells, docs/index.md).
    """
    import anndata

    run_dir = Path(run_dir)
    names = fold_names(run_dir)
    if fold not in (None, "all"):
        if fold not in names:
            raise RunFolderError(f"fold {fold!r} is not in {run_dir / 'predictions'}; the run has {', '.join(names)}")
        names = [fold]
    parts = [anndata.read_h5ad(run_dir / "predictions" / f"{n}.h5ad") for n in names]
    if len(parts) == 1:
        return parts[0]
    genes = [g for g in parts[0].var_names if all(g in set(p.var_names) for p in parts[1:])]
    if not genes:
        raise RunFolderError(f"the folds of {run_dir} share no evaluated gene: choose one fold (--fold)")
    layers = set.intersection(*(set(p.layers) for p in parts))
    obsm = set.intersection(*(set(p.obsm) for p in parts))
    trimmed = []
    for p in parts:
        q = p[:, genes].copy()
        for name in set(q.layers) - layers:
            del q.layers[name]
        for name in set(q.obsm) - obsm:
            del q.obsm[name]
        q.obs["fold"] = p.uns[Key.UNS]["fold"]
        trimmed.append(q)
    merged = anndata.concat(trimmed, join="inner", merge="first")
    merged.uns[Key.UNS] = dict(parts[0].uns[Key.UNS]) | {"fold": "all", "genes": genes}
    return merged


def model_names(adata) -> dict[str, str]:
    """Registry name -> display name of the models whose predictions ``adata`` holds."""
    names = dict(adata.uns.get(Key.UNS, {}).get("models", {}))
    return {str(k): str(v) for k, v in names.items() if k in adata.layers}


def resolve_models(adata, models: Sequence[str] | None, default: Sequence[str] = DEFAULT_MODELS) -> list[str]:
    """Registry names of the models to draw: ``models`` (registry or display names), else ``default`` where
    present, else every model of the run."""
    known = model_names(adata)
    if not known:
        raise RunFolderError("the predictions hold no model layer")
    by_display = {v: k for k, v in known.items()}
    if models:
        out = []
        for m in models:
            name = m if m in known else by_display.get(m)
            if name is None:
                raise RunFolderError(f"model {m!r} is not in this run; it has {', '.join(known)}")
            out.append(name)
        return out
    chosen = [m for m in default if m in known]
    return chosen if len(chosen) >= min(2, len(known)) else list(known)


def cell_labels(adata) -> tuple[np.ndarray | None, str]:
    """Each cell's type (``obs["cell_type"]``, else the routing label) and the column it came from."""
    for key in (Key.CELL_TYPE, "routing_label"):
        if key in adata.obs:
            return adata.obs[key].astype(str).to_numpy(), key
    return None, ""


def label_order(labels: np.ndarray, preferred: Sequence[str] = ()) -> list[str]:
    """Categories of ``labels``: ``preferred`` first (e.g. the routing types), then the rest alphabetically."""
    present = set(map(str, labels))
    return [t for t in preferred if t in present] + sorted(present - set(preferred))


def open_sample_image(run_dir: str | os.PathLike, sample_id: str, images: dict | None = None):
    """The H&E image of ``sample_id``: the path the predictions recorded (``images``), else from ``data/`` of
    the run, else from the Sample files its config.yaml lists."""
    import anndata
    import yaml

    from gcmoe.data.image import open_image

    recorded = (images or {}).get(str(sample_id))
    if recorded and Path(str(recorded)).is_file():
        return open_image(Path(str(recorded)))
    run_dir = Path(run_dir)
    candidates = sorted((run_dir / "data").glob("*.h5ad")) if (run_dir / "data").is_dir() else []
    config = run_dir / "config.yaml"
    if config.is_file():
        data = (yaml.safe_load(config.read_text()) or {}).get("data", {}) or {}
        for p in data.get("samples") or []:  # relative paths were relative to where the run was started
            candidates += [Path(p)] if Path(p).is_absolute() else [Path(p), run_dir / p]
    for path in candidates:
        if not path.is_file() or path.name == "reference.h5ad":
            continue
        adata = anndata.read_h5ad(path, backed="r")
        try:
            meta = dict(adata.uns.get(Key.UNS, {}))
        finally:
            adata.file.close()
        if str(meta.get(UnsKey.SAMPLE_ID)) != str(sample_id) or UnsKey.IMAGE_PATH not in meta:
            continue
        image_path = Path(str(meta[UnsKey.IMAGE_PATH]))
        return open_image(image_path if image_path.is_absolute() else path.parent / image_path)
    raise RunFolderError(
        f"no image of sample {sample_id!r} found: looked in {run_dir / 'data'} and the samples of {config}"
    )
