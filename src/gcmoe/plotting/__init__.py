"""Figures of a run: t-SNE of expression (Figure 3), gene-vector geometry (Figure 4), spatial maps (Figure 5),
per-gene PCC bars and the cross-validation table; maps of a prediction on a new slide (``plot_prediction``).

Each figure has a function on plain arrays (``plot_tsne``, ``plot_gene_vectors``, ``plot_spatial_maps``,
``plot_gene_pcc``, ``plot_cv_table``) returning a matplotlib Figure, and a function on a run folder
(``plot_run_*``) that reads ``predictions/``, ``models/``, ``per_gene.csv`` and ``results.json``.
``save_figure(fig, stem)`` writes ``stem.png`` and ``stem.svg``. Figures use the Agg canvas; pyplot is
never imported. See docs/figures.md.
"""

from __future__ import annotations

from gcmoe.plotting._run import RunFolderError, read_predictions
from gcmoe.plotting._style import save_figure
from gcmoe.plotting.gene_vectors import correlated_pairs, link_distance_ratio, plot_gene_vectors, plot_run_gene_vectors
from gcmoe.plotting.pcc import plot_cv_table, plot_gene_pcc, plot_run_cv, plot_run_gene_pcc
from gcmoe.plotting.spatial import plot_prediction, plot_run_spatial, plot_spatial_maps, read_downsampled
from gcmoe.plotting.tsne import plot_run_tsne, plot_tsne, tsne_embedding

__all__ = [
    "RunFolderError",
    "correlated_pairs",
    "link_distance_ratio",
    "plot_cv_table",
    "plot_gene_pcc",
    "plot_gene_vectors",
    "plot_prediction",
    "plot_run_cv",
    "plot_run_gene_pcc",
    "plot_run_gene_vectors",
    "plot_run_spatial",
    "plot_run_tsne",
    "plot_spatial_maps",
    "plot_tsne",
    "read_downsampled",
    "read_predictions",
    "save_figure",
    "tsne_embedding",
]
