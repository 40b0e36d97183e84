"""The evaluated genes: the top highly variable genes (scanpy ``highly_variable_genes``) of the training cells
of each fold, on their targets (gcmoe.data.normalisation), unless a list is given.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp

from gcmoe.config import TargetConfig
from gcmoe.data.normalisation import sparse_targets
from gcmoe.errors import InvalidSampleError

log = logging.getLogger(__name__)


def select_genes(
    counts: np.ndarray | sp.spmatrix, genes: Sequence[str], cells: np.ndarray, config: TargetConfig
) -> list[str]:
    """The evaluated genes: ``config.genes`` when given (all must exist), else the top HVGs of ``cells``."""
    import anndata
    import scanpy as sc

    genes = [str(g) for g in genes]
    if config.genes is not None:
        if not config.genes:
            raise InvalidSampleError("targets.genes is an empty list: name the genes to predict, or leave it out "
                                     "to use the top highly variable genes (targets.n_top_genes)")
        repeated = sorted({g for g in config.genes if list(config.genes).count(g) > 1})
        if repeated:
            raise InvalidSampleError(f"targets.genes names {repeated[:10]} more than once: list each gene once")
        missing = [g for g in config.genes if g not in set(genes)]
        if missing:
            raise InvalidSampleError(
                f"targets.genes names {len(missing)} gene(s) absent from the data, e.g. {missing[:10]}; "
                f"the data hold {len(genes)} genes, e.g. {genes[:10]}"
            )
        return list(config.genes)
    if config.n_top_genes < 1:
        raise InvalidSampleError(f"targets.n_top_genes must be at least 1, got {config.n_top_genes}")
    if config.n_top_genes >= len(genes):
        warnings.warn(
            f"n_top_genes={config.n_top_genes} >= the {len(genes)} genes in the data: evaluating all of them",
            stacklevel=2,
        )
        return genes
    sub = counts[cells]
    hvg_targets = TargetConfig(transform="log1p", normalize_total=config.normalize_total)
    # sparse all the way: a dense copy of the training cells x genes would grow with the data (GBs at 2M cells)
    ad = anndata.AnnData(X=sparse_targets(sp.csr_matrix(sub), hvg_targets))
    ad.var_names = genes
    if not (ad.X.max(axis=0).toarray().ravel() > ad.X.min(axis=0).toarray().ravel()).any():
        raise InvalidSampleError(f"no gene varies across the {len(cells)} training cells (every gene has the same "
                                 "count in every cell): check that the expression matrix holds the real counts")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.highly_variable_genes(ad, n_top_genes=config.n_top_genes, flavor=config.hvg_flavor)
    hv = ad.var["highly_variable"].to_numpy()
    disp = ad.var["dispersions_norm"].fillna(-np.inf).to_numpy()
    chosen = [genes[i] for i in np.argsort(-disp, kind="stable") if hv[i]][: config.n_top_genes]
    log.debug("selected %d highly variable genes from %d cells", len(chosen), len(cells))
    return chosen
