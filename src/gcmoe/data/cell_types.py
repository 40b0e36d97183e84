"""Routing labels from expression when a Sample has none: transfer from a labelled reference scRNA-seq set.

Method (centroid correlation): both data sets are restricted to their shared genes, library-size normalised
and log1p-transformed; each reference type gets its mean profile (centroid); every cell is given the reference
type whose centroid correlates best (Pearson, over genes) with its profile, and that type's routing type
through the mapping. Fine reference types are scored separately before mapping, so a routing type made of
distinct subtypes (T cells and macrophages, say) is still recognised by either.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from gcmoe.data.normalisation import log_normalised, median_total
from gcmoe.errors import InvalidSampleError


@dataclass
class Annotation:
    labels: np.ndarray  # (N,) routing type per cell
    reference_labels: np.ndarray  # (N,) best reference type per cell
    score: np.ndarray  # (N,) correlation with the chosen centroid
    n_genes: int  # shared genes used


def ordered_types(names) -> list[str]:
    """Routing types in a stable order: the paper's four first (in its order), then the others alphabetically."""
    from gcmoe.config import PAPER_CELL_TYPES

    present = list(dict.fromkeys(str(n) for n in names))
    return [t for t in PAPER_CELL_TYPES if t in present] + sorted(t for t in present if t not in PAPER_CELL_TYPES)


def transfer_labels(
    counts: np.ndarray | sp.spmatrix,
    genes: Sequence[str],
    reference,
    mapping: Mapping[str, str],
    type_key: str = "cell_type",
    layer: str | None = "counts",
) -> Annotation:
    """Routing label of every cell of ``counts`` (cells x ``genes``) by correlation to reference centroids."""
    ref_genes = [str(g) for g in reference.var_names]
    shared = [g for g in genes if g in set(ref_genes)]
    if len(shared) < 5:
        raise InvalidSampleError(
            f"label transfer needs genes shared with the reference; only {len(shared)} of {len(genes)} are"
        )
    q_idx = np.array([list(genes).index(g) for g in shared])
    r_idx = np.array([ref_genes.index(g) for g in shared])
    ref_counts = reference.layers[layer] if layer and layer in reference.layers else reference.X
    ref_types = reference.obs[type_key].astype(str).to_numpy()
    mapped = np.array([t in mapping for t in ref_types])
    if not mapped.any():
        raise InvalidSampleError(f"no reference type is mapped to a routing type; mapping keys: {sorted(mapping)}")
    # scRNA-seq and in situ panels differ in depth: profiles are compared by correlation after each set is
    # normalised to its own median library size
    ref_expr = log_normalised(ref_counts, r_idx)[mapped]
    ref_types = ref_types[mapped]
    names = sorted(set(ref_types))
    centroids = np.stack([ref_expr[ref_types == t].mean(axis=0) for t in names])
    cc = centroids - centroids.mean(axis=1, keepdims=True)
    cc_norm = np.linalg.norm(cc, axis=1)[None, :]
    counts = sp.csr_matrix(counts) if sp.issparse(counts) else np.asarray(counts)
    target = median_total(counts)
    n = counts.shape[0]
    best, score = np.zeros(n, np.int64), np.zeros(n)
    for a in range(0, n, _BLOCK):  # cells in blocks: memory stays (block x genes), whatever the number of cells
        q = log_normalised(counts[a:a + _BLOCK], q_idx, target)
        qc = q - q.mean(axis=1, keepdims=True)
        denom = np.linalg.norm(qc, axis=1, keepdims=True) * cc_norm
        corr = np.divide(qc @ cc.T, denom, out=np.full((len(q), len(names)), -1.0), where=denom > 0)
        best[a:a + _BLOCK] = corr.argmax(axis=1)
        score[a:a + _BLOCK] = corr[np.arange(len(q)), best[a:a + _BLOCK]]
    ref_label = np.asarray(names)[best]
    return Annotation(np.array([mapping[t] for t in ref_label]), ref_label, score, len(shared))


_BLOCK = 65_536


def label_agreement(predicted: Sequence[str], truth: Sequence[str]) -> dict:
    """Accuracy, per-type recall and the confusion table (truth in rows) of predicted against true labels."""
    predicted, truth = np.asarray(predicted).astype(str), np.asarray(truth).astype(str)
    confusion = pd.crosstab(pd.Series(truth, name="true"), pd.Series(predicted, name="predicted"))
    recall = {t: float((predicted[truth == t] == t).mean()) for t in sorted(set(truth))}
    return {"accuracy": float((predicted == truth).mean()), "recall": recall,
            "confusion": {str(r): {str(c): int(v) for c, v in row.items()} for r, row in confusion.iterrows()}}
