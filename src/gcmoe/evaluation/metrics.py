"""Per-gene Pearson correlation across cells, and its fold summaries (docs/evaluation.md).

Genes that are constant in the test cells (measured or predicted) have no correlation: they are reported
and excluded from the mean, never turned into NaN means or crashes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


def pearson_per_gene(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Pearson r per column between ``pred`` and ``true`` (cells x genes); NaN where either is constant."""
    pred = np.asarray(pred, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    if pred.shape != true.shape or pred.ndim != 2:
        raise ValueError(f"pred and true must be matching (cells, genes) arrays, got {pred.shape} and {true.shape}")
    pc = pred - pred.mean(axis=0)
    tc = true - true.mean(axis=0)
    num = (pc * tc).sum(axis=0)
    den = np.sqrt((pc * pc).sum(axis=0) * (tc * tc).sum(axis=0))
    scale = np.maximum(np.abs(pred).max(axis=0, initial=0), np.abs(true).max(axis=0, initial=0)) + 1.0
    constant = den <= 1e-12 * scale * scale * max(len(pred), 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(constant, np.nan, num / np.where(constant, 1.0, den))
    return np.clip(r, -1.0, 1.0)


@dataclass
class GeneScores:
    """Per-gene PCC on one fold, and the mean over the genes that have one."""

    genes: list[str]
    pcc: np.ndarray  # per gene, NaN for excluded genes
    excluded: list[str] = field(default_factory=list)  # constant in the test cells

    @property
    def mean(self) -> float:
        valid = ~np.isnan(self.pcc)
        return float(self.pcc[valid].mean()) if valid.any() else float("nan")


def score_genes(pred: np.ndarray, true: np.ndarray, genes: Sequence[str]) -> GeneScores:
    """Per-gene PCC of ``pred`` against ``true`` over the test cells."""
    r = pearson_per_gene(pred, true)
    genes = list(genes)
    return GeneScores(genes=genes, pcc=r, excluded=[g for g, v in zip(genes, r) if np.isnan(v)])


def summarize_folds(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1) over folds, ignoring NaN folds."""
    v = np.asarray([x for x in values if x is not None and not np.isnan(x)], dtype=np.float64)
    if len(v) == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def score_by_type(pred: np.ndarray, true: np.ndarray, cell_type: np.ndarray, min_cells: int = 10) -> dict[str, float]:
    """Mean per-gene PCC within each cell type's test cells: how well a model orders the cells of one type.

    Types with fewer than ``min_cells`` test cells get no score (a correlation over a handful of cells is
    noise); genes constant within a type are excluded from its mean, as in :func:`score_genes`.
    """
    cell_type = np.asarray(cell_type).astype(str)
    out: dict[str, float] = {}
    for t in sorted(set(cell_type)):
        rows = cell_type == t
        if rows.sum() < min_cells:
            continue
        r = pearson_per_gene(pred[rows], true[rows])
        if (~np.isnan(r)).any():
            out[t] = float(np.nanmean(r))
    return out
