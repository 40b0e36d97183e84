"""Normalising counts, once for the package: the regression targets and the log-normalised expression.

- Targets of a cell (:func:`sparse_targets`): log1p of its raw counts by default; with ``normalize_total``
  set, counts are first scaled to that library size (scanpy's normalize_total), then log1p.
- Log-normalised expression (:func:`log_normalised`), for label transfer and the co-expression graphs: log1p
  of counts scaled by each cell's total over all genes to the median total (:func:`median_total`).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from gcmoe.config import TargetConfig
from gcmoe.errors import ConfigError

__all__ = ["compute_targets", "log_normalised", "median_total", "sparse_targets"]


def compute_targets(counts: np.ndarray | sp.spmatrix, config: TargetConfig) -> np.ndarray:
    """Targets for every cell and gene of ``counts`` (cells x genes), float32 (:func:`sparse_targets`, dense)."""
    return sparse_targets(counts, config).toarray()


def sparse_targets(counts: np.ndarray | sp.spmatrix, config: TargetConfig) -> sp.csr_matrix:
    """Targets as a sparse matrix (both transforms map 0 to 0), float32: no dense copy of cells x genes."""
    x = sp.csr_matrix(counts, dtype=np.float64, copy=True)
    if config.normalize_total is not None:
        if config.normalize_total <= 0:
            raise ConfigError(f"targets.normalize_total must be > 0 or null, got {config.normalize_total}")
        total = np.repeat(np.asarray(x.sum(axis=1)).ravel(), np.diff(x.indptr))
        x.data = np.divide(x.data * config.normalize_total, total, out=np.zeros_like(x.data), where=total > 0)
    if config.transform == "log1p":
        x.data = np.log1p(x.data)
    elif config.transform != "none":
        raise ConfigError(f"targets.transform must be 'log1p' or 'none', got {config.transform!r}")
    return x.astype(np.float32)


def median_total(counts: np.ndarray | sp.spmatrix) -> float:
    """The median library size (total over all genes) of the cells with any count; 1 when none has."""
    total = np.asarray(counts.sum(axis=1)).ravel()
    return float(np.median(total[total > 0])) if (total > 0).any() else 1.0


def log_normalised(counts: np.ndarray | sp.spmatrix, columns: np.ndarray, target: float | None = None) -> np.ndarray:
    """log1p of ``counts[:, columns]`` scaled by each cell's total over ALL genes to the median total.

    Totals come from the whole panel, so a handful of target genes does not create compositional
    (anti-)correlations among themselves. ``target``: the library size to scale to (default: this set's
    median; give the whole set's when normalising it block by block).
    """
    total = np.asarray(counts.sum(axis=1)).reshape(-1, 1).astype(np.float64)
    x = sp.csr_matrix(counts)[:, columns].toarray() if sp.issparse(counts) else np.asarray(counts)[:, columns]
    x = x.astype(np.float64, copy=False)
    target = median_total(counts) if target is None else float(target)
    return np.log1p(np.divide(x * target, total, out=np.zeros_like(x), where=total > 0))
