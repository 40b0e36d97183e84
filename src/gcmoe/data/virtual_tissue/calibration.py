"""The statistics the virtual tissue is calibrated on (docs/virtual_tissue.md, Calibration), for any cells x genes AnnData.

Every statistic reads raw counts (``layers["counts"]``); "log1p" means log1p of raw counts. The top-50 highly
variable genes (HVG) are scanpy's ``highly_variable_genes(flavor="seurat", n_top_genes=50)`` on log1p counts.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from gcmoe._constants import Key

# Measured on the seed paper's 10x Xenium breast crop (5,508 cells, 280 genes, 9 cell types),
# from its public expression (the CSV that GHIST's repository ships).
REAL_XENIUM_BREAST: dict[str, float] = {
    "total_counts_median": 89.0,
    "total_counts_p10": 36.0,
    "total_counts_p90": 330.0,
    "zero_fraction_all": 0.80,
    "zero_fraction_hvg": 0.59,
    "mean_count_hvg": 1.7,
    "variance_share_cell_type": 0.49,
    "type_mean_pcc_routing": 0.57,
    "type_mean_pcc_subtype": 0.61,
    "pairs_abs_r_gt_0.2_all": 0.63,
    "pairs_abs_r_gt_0.2_T_cell": 0.10,
    "pairs_abs_r_gt_0.2_malignant": 0.43,
    "pairs_abs_r_gt_0.2_fibroblast": 0.57,
    "corr_log_area_log_total": 0.53,
}


def _dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64)


def top_hvg(log_counts: np.ndarray, n_top: int = 50) -> np.ndarray:
    """Column indices of the top ``n_top`` HVG (scanpy, flavor "seurat") of a log1p matrix, best first."""
    import scanpy as sc

    if n_top >= log_counts.shape[1]:
        return np.arange(log_counts.shape[1])
    ad = AnnData(X=log_counts.astype(np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.highly_variable_genes(ad, flavor="seurat", n_top_genes=n_top)
    disp = ad.var["dispersions_norm"].fillna(-np.inf).to_numpy()
    hv = np.flatnonzero(ad.var["highly_variable"].to_numpy())
    return hv[np.argsort(-disp[hv], kind="stable")][:n_top]


def variance_share(log_counts: np.ndarray, labels: np.ndarray) -> float:
    """Mean over genes of the share of variance explained by the labels (one-way ANOVA R^2)."""
    total = ((log_counts - log_counts.mean(axis=0)) ** 2).sum(axis=0)
    within = np.zeros(log_counts.shape[1])
    for lab in np.unique(labels):
        block = log_counts[labels == lab]
        within += ((block - block.mean(axis=0)) ** 2).sum(axis=0)
    ok = total > 0
    return float(np.mean(1.0 - within[ok] / total[ok]))


def _pearson_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    den = np.sqrt((a * a).sum(axis=0) * (b * b).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a * b).sum(axis=0) / np.where(den > 0, den, 1.0), np.nan)


def vertical_strips(x: np.ndarray, n_folds: int = 5) -> np.ndarray:
    """Fold of each cell: ``n_folds`` vertical strips of equal cell count by x."""
    ranks = np.argsort(np.argsort(x, kind="stable"), kind="stable")
    return ranks * n_folds // len(x)


def type_mean_pcc(log_counts: np.ndarray, labels: np.ndarray, x: np.ndarray, n_folds: int = 5,
                  n_top: int = 50) -> float:
    """Vertical n-fold PCC of predicting each test cell by its type's mean in the training strips.

    Per fold: top HVG of the training cells, per-gene Pearson r over the test cells, nan-aware mean over
    genes; then the mean over folds.
    """
    fold = vertical_strips(x, n_folds)
    scores = []
    for k in range(n_folds):
        train, test = fold != k, fold == k
        genes = top_hvg(log_counts[train], n_top)
        y = log_counts[:, genes]
        pred = np.tile(y[train].mean(axis=0), (int(test.sum()), 1))
        for lab in np.unique(labels[test]):
            src = train & (labels == lab)
            if src.any():
                pred[labels[test] == lab] = y[src].mean(axis=0)
        scores.append(np.nanmean(_pearson_columns(pred, y[test])))
    return float(np.mean(scores))


def correlated_pair_fraction(log_counts: np.ndarray, threshold: float = 0.2) -> float:
    """Share of gene pairs with |Pearson r| > threshold (pairs with a constant gene count as below)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.corrcoef(log_counts, rowvar=False)
    iu = np.triu_indices(r.shape[0], k=1)
    vals = np.nan_to_num(r[iu], nan=0.0)
    return float(np.mean(np.abs(vals) > threshold))


def calibration_statistics(adata: AnnData, routing_key: str = Key.CELL_TYPE, subtype_key: str = "cell_subtype",
                           area_key: str = "nucleus_area_um2", pair_types: tuple[str, ...] = ("T_cell", "malignant",
                                                                                               "fibroblast"),
                           n_top: int = 50, n_folds: int = 5) -> dict[str, float]:
    """The calibration statistics for one slide (keys as in ``REAL_XENIUM_BREAST``).

    Statistics whose inputs are missing (no subtype column, no nucleus areas) are NaN.
    """
    counts = _dense(adata.layers[Key.COUNTS] if Key.COUNTS in adata.layers else adata.X)
    logc = np.log1p(counts)
    total = counts.sum(axis=1)
    hvg = top_hvg(logc, n_top)
    y = logc[:, hvg]
    out: dict[str, float] = {
        "total_counts_median": float(np.median(total)),
        "total_counts_p10": float(np.percentile(total, 10)),
        "total_counts_p90": float(np.percentile(total, 90)),
        "zero_fraction_all": float(np.mean(counts == 0)),
        "zero_fraction_hvg": float(np.mean(counts[:, hvg] == 0)),
        "mean_count_hvg": float(counts[:, hvg].mean()),
    }
    routing = adata.obs[routing_key].astype(str).to_numpy()
    subtype = adata.obs[subtype_key].astype(str).to_numpy() if subtype_key in adata.obs else None
    x = np.asarray(adata.obsm[Key.SPATIAL])[:, 0]
    out["variance_share_cell_type"] = variance_share(y, routing)
    out["variance_share_subtype"] = variance_share(y, subtype) if subtype is not None else np.nan
    out["type_mean_pcc_routing"] = type_mean_pcc(logc, routing, x, n_folds, n_top)
    out["type_mean_pcc_subtype"] = type_mean_pcc(logc, subtype, x, n_folds, n_top) if subtype is not None else np.nan
    out["pairs_abs_r_gt_0.2_all"] = correlated_pair_fraction(y)
    for name in pair_types:
        mask = subtype == name if subtype is not None else np.zeros(len(y), bool)
        out[f"pairs_abs_r_gt_0.2_{name}"] = correlated_pair_fraction(y[mask]) if mask.sum() > 2 else np.nan
    if area_key in adata.obs:
        ok = total > 0
        area = np.asarray(adata.obs[area_key], dtype=float)
        out["corr_log_area_log_total"] = float(np.corrcoef(np.log(area[ok]), np.log(total[ok]))[0, 1])
    else:
        out["corr_log_area_log_total"] = np.nan
    return out


def comparison_table(stats: dict[str, float], real: dict[str, float] | None = None) -> pd.DataFrame:
    """Virtual vs real, one row per statistic."""
    real = REAL_XENIUM_BREAST if real is None else real
    keys = list(dict.fromkeys([*real, *stats]))
    return pd.DataFrame({"virtual": [stats.get(k, np.nan) for k in keys], "real": [real.get(k, np.nan) for k in keys]},
                        index=pd.Index(keys, name="statistic"))
