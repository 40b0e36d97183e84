"""The geometry of GC-MoE's gene-wise prediction vectors (the paper's Figure 4).

Each gene g of expert k has a vector w_kg (``GCMoE.gene_vectors()``, (K, G, d)). With CAP the vectors come out
of a GCN over the co-expression graph, so genes that are co-expressed should lie close; without CAP they are
free parameters. The figure shows a t-SNE of one expert's G vectors per model, with a link between every gene
pair whose measured correlation (among the held-out cells of that expert's type) exceeds a threshold. Each
panel's title gives the ratio of the mean distance between linked genes to the mean distance between all
genes, measured in the vectors' own d-dimensional space (below 1: co-expressed genes are closer).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure

from gcmoe.errors import ConfigError
from gcmoe.plotting._style import new_figure
from gcmoe.plotting.tsne import tsne_embedding

log = logging.getLogger(__name__)

MIN_CELLS_FOR_CORRELATION = 20


def correlated_pairs(expression: np.ndarray, threshold: float = 0.2) -> np.ndarray:
    """Gene pairs (i < j) whose Pearson correlation across the rows of ``expression`` exceeds ``threshold``,
    (E, 2) int; constant genes link to nothing."""
    x = np.asarray(expression, dtype=np.float64)
    x = x - x.mean(0)
    norm = np.sqrt((x * x).sum(0))
    ok = norm > 0
    r = np.zeros((x.shape[1], x.shape[1]))
    r[np.ix_(ok, ok)] = (x[:, ok].T @ x[:, ok]) / np.outer(norm[ok], norm[ok])
    i, j = np.triu_indices(x.shape[1], k=1)
    keep = r[i, j] > threshold
    return np.stack([i[keep], j[keep]], axis=1).astype(np.int64)


def link_distance_ratio(vectors: np.ndarray, pairs: np.ndarray) -> float:
    """Mean Euclidean distance between linked rows of ``vectors`` over the mean distance between all row
    pairs (NaN without links)."""
    v = np.asarray(vectors, dtype=np.float64)
    if len(pairs) == 0 or len(v) < 2:
        return float("nan")
    d = np.sqrt(np.maximum(((v[:, None, :] - v[None, :, :]) ** 2).sum(-1), 0))
    i, j = np.triu_indices(len(v), k=1)
    return float(d[pairs[:, 0], pairs[:, 1]].mean() / d[i, j].mean())


def plot_gene_vectors(
    vectors: Mapping[str, np.ndarray],
    pairs: np.ndarray,
    genes: Sequence[str],
    *,
    seed: int = 0,
    title: str | None = None,
    label_genes: bool | None = None,
) -> Figure:
    """One panel per model: t-SNE of its (G, d) gene vectors with ``pairs`` (E, 2) drawn as links.

    ``label_genes``: write gene names beside the points (default: when there are at most 30 genes).
    """
    if not vectors:
        raise ConfigError("plot_gene_vectors needs at least one set of gene vectors")
    n_genes = len(genes)
    for name, v in vectors.items():
        if np.asarray(v).shape[0] != n_genes:
            raise ConfigError(f"{name!r}: {np.asarray(v).shape[0]} gene vectors for {n_genes} genes")
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    degree = np.bincount(pairs.ravel(), minlength=n_genes)
    if label_genes is None:
        label_genes = n_genes <= 30
    fig = new_figure(4.2 * len(vectors), 4.4)
    axes = fig.subplots(1, len(vectors), squeeze=False)[0]
    for ax, (name, v) in zip(axes, vectors.items()):
        v = np.asarray(v, dtype=np.float32)
        emb = tsne_embedding(v, seed=seed, perplexity=min(10.0, (n_genes - 1) / 3))
        if len(pairs):
            ax.add_collection(LineCollection(emb[pairs], colors="#888888", linewidths=0.6, alpha=0.6, zorder=1))
        sc = ax.scatter(emb[:, 0], emb[:, 1], c=degree, cmap="viridis", s=28, edgecolors="k", linewidths=0.3, zorder=2)
        if label_genes:
            for g, (x, y) in zip(genes, emb):
                ax.annotate(str(g), (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
        ratio = link_distance_ratio(v, pairs)
        ax.set_title(f"{name}\nlinked / all distance {ratio:.2f}", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.autoscale_view()
    fig.colorbar(sc, ax=list(axes), shrink=0.7, label="correlated partners")
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def plot_run_gene_vectors(
    run_dir: str | os.PathLike,
    *,
    expert: str | int | None = None,
    models: Sequence[str] = ("gcmoe", "gcmoe_no_cap_c2ca"),
    threshold: float = 0.4,
    seed: int = 0,
) -> Figure:
    """Figure 4 of a run folder: one expert's gene vectors with and without CAP, from ``models/<name>/``.

    ``expert``: a routing type name or index (default the first). ``models``: GC-MoE variants saved in the run
    (default GC-MoE and its variant without CAP, whose vectors are free parameters). Links come from the
    measured correlations of the first fold's held-out cells of the expert's type (all held-out cells when the
    type has fewer than 20).
    """
    from gcmoe.plotting._run import RunFolderError, fold_names, read_predictions
    from gcmoe.models.ensemble import first_member
    from gcmoe.training.checkpoint import load_model

    run_dir = Path(run_dir)
    vectors: dict[str, np.ndarray] = {}
    genes: list[str] | None = None
    types: list[str] = []
    for name in models:
        folder = run_dir / "models" / name
        if not folder.is_dir():
            raise RunFolderError(f"{folder} not found: the run did not train {name!r} or was made by an older gcmoe")
        model, meta = load_model(folder)
        model = first_member(model)  # a seed ensemble: its first member's vectors
        if not hasattr(model, "gene_vectors"):
            raise RunFolderError(f"model {name!r} has no gene-wise vectors: choose GC-MoE variants (gcmoe list models)")
        if genes is not None and list(meta["genes"]) != genes:
            raise RunFolderError(f"the models {list(models)} were trained on different genes; choose models of one run")
        genes = list(meta["genes"])
        types = list(meta.get("cell_types") or [])
        w = model.gene_vectors().detach().cpu().numpy()  # (K, G, d)
        k = _expert_index(expert, types, w.shape[0], name)
        vectors[f"{meta['display_name']}" + (" (with CAP)" if getattr(model, "cap", False) else " (without CAP)")] = w[k]
    assert genes is not None  # models is not empty
    fold = fold_names(run_dir)[0]
    adata = read_predictions(run_dir, fold)
    missing = [g for g in genes if g not in set(adata.var_names)]
    if missing:
        raise RunFolderError(f"predictions/{fold}.h5ad lacks the models' genes {missing[:5]}: the run folder is mixed")
    measured = np.asarray(adata[:, genes].X)
    k = _expert_index(expert, types, len(types) or 1, models[0])
    type_name = types[k] if types else "all cells"
    cells = "all held-out cells"
    if types and "routing_label" in adata.obs:
        sel = adata.obs["routing_label"].astype(str).to_numpy() == type_name
        if sel.sum() >= MIN_CELLS_FOR_CORRELATION:
            measured, cells = measured[sel], f"{int(sel.sum())} held-out {type_name} cells"
        else:
            log.warning("only %d held-out %s cells in %s: correlations from all held-out cells", sel.sum(), type_name, fold)
    pairs = correlated_pairs(measured, threshold)
    return plot_gene_vectors(
        vectors, pairs, genes, seed=seed,
        title=f"Expert '{type_name}': {len(genes)} gene vectors; links: measured r > {threshold:g} ({cells}, {fold}; "
              f"{len(pairs)} pairs)",
    )


def _expert_index(expert: str | int | None, types: list[str], n_experts: int, model: str) -> int:
    if n_experts == 1:  # a model without MoE has one shared expert
        return 0
    if expert is None:
        return 0
    if isinstance(expert, str) and not expert.isdigit():
        if expert not in types:
            raise ConfigError(f"unknown expert {expert!r}; the routing types are {', '.join(types)}")
        return types.index(expert)
    k = int(expert)
    if not 0 <= k < n_experts:
        raise ConfigError(f"expert {k} is out of range: {model!r} has {n_experts} experts ({', '.join(types)})")
    return k
