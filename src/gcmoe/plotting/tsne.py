"""t-SNE of measured and predicted expression, coloured by cell type (the paper's Figure 3).

Each matrix (cells x genes) gets its own t-SNE (scikit-learn, Barnes-Hut, PCA initialisation) on the same
seeded subsample of cells; a model whose prediction keeps the cell types apart shows the measured data's
clusters. Each panel's title gives the silhouette of the cell types in the embedding (higher = types more
separated).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from gcmoe.errors import ConfigError
from gcmoe.plotting._style import category_colours, new_figure


def subsample(n: int, max_cells: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of at most ``max_cells`` of ``n`` cells, drawn without replacement with ``seed``."""
    if max_cells < 10:
        raise ConfigError(f"max_cells must be at least 10 for a t-SNE, got {max_cells}")
    if n <= max_cells:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, max_cells, replace=False))


def tsne_embedding(x: np.ndarray, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
    """A 2-D t-SNE of the rows of ``x`` (n x p), (n, 2); perplexity is capped for small n."""
    from sklearn.manifold import TSNE

    x = np.asarray(x, dtype=np.float32)
    n = x.shape[0]
    if n < 4:
        raise ConfigError(f"a t-SNE needs at least 4 points, got {n}")
    x = np.nan_to_num(x)
    if x.shape[1] > 50 and n > 50:  # the usual PCA step before t-SNE on wide data
        from sklearn.decomposition import PCA

        x = PCA(n_components=50, random_state=seed).fit_transform(x)
    perplexity = float(min(perplexity, max(1.0, (n - 1) / 3)))
    init = "pca" if min(x.shape) >= 2 else "random"  # PCA initialisation needs two dimensions
    tsne = TSNE(n_components=2, perplexity=perplexity, init=init, learning_rate="auto", random_state=seed)
    return tsne.fit_transform(x).astype(np.float32)


def plot_tsne(
    matrices: Mapping[str, np.ndarray],
    labels: np.ndarray,
    *,
    categories: Sequence[str] | None = None,
    max_cells: int = 3000,
    seed: int = 0,
    title: str | None = None,
    legend_title: str = "cell type",
) -> Figure:
    """One t-SNE panel per matrix (same cells, e.g. ``{"Measured": y, "ST-Net*": p1, "GC-MoE": p2}``).

    Parameters
    ----------
    matrices
        Panel title -> (cells x genes) matrix; all with the same rows.
    labels
        Each cell's category (colour).
    categories
        Legend order (default: sorted labels).
    max_cells
        Cells drawn (a seeded subsample of the rows); t-SNE cost grows with it.
    """
    from sklearn.metrics import silhouette_score

    if not matrices:
        raise ConfigError("plot_tsne needs at least one matrix")
    labels = np.asarray(labels).astype(str)
    n = len(labels)
    for name, m in matrices.items():
        if np.asarray(m).shape[0] != n:
            raise ConfigError(f"matrix {name!r} has {np.asarray(m).shape[0]} rows, the labels {n}")
    idx = subsample(n, max_cells, seed)
    cats = list(categories) if categories is not None else sorted(set(labels))
    colours = category_colours(cats)
    point = float(np.clip(4000 / len(idx), 1.0, 20.0))
    fig = new_figure(3.6 * len(matrices) + 1.4, 3.9)
    axes = fig.subplots(1, len(matrices), squeeze=False)[0]
    for ax, (name, m) in zip(axes, matrices.items()):
        emb = tsne_embedding(np.asarray(m)[idx], seed=seed)
        sub = labels[idx]
        for c in cats:
            sel = sub == c
            if sel.any():
                ax.scatter(emb[sel, 0], emb[sel, 1], s=point, c=colours[c], label=c, linewidths=0, rasterized=True)
        sil = silhouette_score(emb, sub) if 1 < len(set(sub)) < len(sub) else float("nan")
        ax.set_title(f"{name}\nsilhouette {sil:.2f}", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("t-SNE 1", fontsize=8)
        ax.set_ylabel("t-SNE 2", fontsize=8)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside right center", title=legend_title, fontsize=8, markerscale=max(1.0, 30 / point))
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def plot_run_tsne(
    run_dir: str | os.PathLike,
    *,
    fold: str | None = None,
    models: Sequence[str] | None = None,
    max_cells: int = 3000,
    seed: int = 0,
) -> Figure:
    """Figure 3 of a run folder: t-SNE of the measured and each model's predicted expression of held-out cells.

    ``fold``: one fold's test cells, or None for all folds (each cell predicted by the model that did not see
    it, on the genes evaluated in every fold). ``models``: registry or display names (default ST-Net* and
    GC-MoE).
    """
    from gcmoe._constants import Key
    from gcmoe.plotting._run import RunFolderError, cell_labels, label_order, model_names, read_predictions, resolve_models

    adata = read_predictions(run_dir, fold)
    labels, key = cell_labels(adata)
    if labels is None:
        raise RunFolderError("the run's cells have no cell type or routing label to colour the t-SNE by")
    chosen = resolve_models(adata, models)
    display = model_names(adata)
    matrices = {"Measured": np.asarray(adata.X)} | {display[m]: np.asarray(adata.layers[m]) for m in chosen}
    types = list(adata.uns.get(Key.UNS, {}).get("routing_types", []))
    where = "all folds (held-out predictions)" if fold in (None, "all") else f"fold {fold}"
    return plot_tsne(matrices, labels, categories=label_order(labels, types), max_cells=max_cells, seed=seed,
                     title=f"Expression of {min(adata.n_obs, max_cells)} of {adata.n_obs} held-out cells, {adata.n_vars} genes, {where}",
                     legend_title=key.replace("_", " "))
