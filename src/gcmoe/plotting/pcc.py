"""Accuracy figures: per-gene PCC bars, and the cross-validation table (per-fold PCC and mean ± std)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from gcmoe.errors import ConfigError
from gcmoe.plotting._style import category_colours, new_figure

CEILING = "ceiling"


def plot_gene_pcc(
    pcc: Mapping[str, Mapping[str, float]],
    *,
    ceiling: Mapping[str, float] | None = None,
    max_genes: int | None = None,
    title: str | None = None,
) -> Figure:
    """Grouped bars of each gene's PCC per model, genes sorted by the last model's PCC (best first).

    ``pcc``: model -> {gene: PCC}; ``ceiling``: {gene: ceiling PCC}, drawn as a black tick per gene;
    ``max_genes``: draw only the best this many (by the last model).
    """
    if not pcc:
        raise ConfigError("plot_gene_pcc needs the PCC of at least one model")
    models = list(pcc)
    last = pcc[models[-1]]
    genes = sorted({g for v in pcc.values() for g in v}, key=lambda g: -np.nan_to_num(last.get(g, np.nan), nan=-2))
    if max_genes is not None:
        genes = genes[:max_genes]
    colours = category_colours(models)
    width = 0.8 / len(models)
    x = np.arange(len(genes))
    fig = new_figure(max(6.0, 0.22 * len(genes) * max(1, len(models) / 2) + 2), 3.8)
    ax = fig.subplots()
    for i, m in enumerate(models):
        values = np.array([pcc[m].get(g, np.nan) for g in genes], dtype=float)
        ax.bar(x - 0.4 + width * (i + 0.5), np.nan_to_num(values), width, color=colours[m],
               label=f"{m} (mean {np.nanmean(values):.3f})")
    if ceiling:
        values = np.array([ceiling.get(g, np.nan) for g in genes], dtype=float)
        ax.scatter(x, values, marker="_", s=60, c="k", label=f"ceiling (mean {np.nanmean(values):.3f})", zorder=3)
    ax.set_xticks(x, genes, rotation=90, fontsize=7)
    ax.set_xlim(-0.6, len(genes) - 0.4)
    ax.set_ylabel("PCC (measured vs predicted)")
    ax.axhline(0, color="k", linewidth=0.5)
    ax.legend(fontsize=7, loc="upper right", frameon=False)
    if title:
        ax.set_title(title, fontsize=10)
    return fig


def cv_rows(results: Mapping[str, Any], dataset: str | None = None) -> tuple[str, list[dict[str, Any]], list[str]]:
    """The rows of a run's cross-validation table: (dataset, [{method, mean, std, folds, share, routing}], folds)."""
    datasets = results.get("datasets", {})
    if not datasets:
        raise ConfigError("results hold no dataset")
    name = dataset or next(iter(datasets))
    if name not in datasets:
        raise ConfigError(f"dataset {name!r} is not in the results; they hold {', '.join(datasets)}")
    d = datasets[name]
    rows = [
        {"method": m, "mean": e.get("mean"), "std": e.get("std"), "folds": list(e.get("folds", [])),
         "share": e.get("share_of_ceiling"), "routing": e.get("routing_accuracy")}
        for m, e in d.get("models", {}).items()
    ]
    if d.get("ceiling") is not None:
        rows.append({"method": CEILING, "mean": d["ceiling"], "std": d.get("ceiling_std"),
                     "folds": list(d.get("ceiling_folds") or []), "share": None, "routing": None})
    return name, rows, list(d.get("fold_names", []))


def plot_cv_table(results: Mapping[str, Any], dataset: str | None = None) -> Figure:
    """Per-fold PCC of every method (dots, mean ± std as a bar) beside the table of the run (the paper's Table 1
    layout: method, PCC mean ± std, share of the ceiling, routing accuracy)."""
    name, rows, folds = cv_rows(results, dataset)
    fig = new_figure(11.0, 0.45 * len(rows) + 1.6)
    ax, tab = fig.subplots(1, 2, width_ratios=[1.0, 1.1])
    y = np.arange(len(rows))[::-1]
    fold_colours = category_colours(folds)
    for yi, row in zip(y, rows):
        colour = "#444444" if row["method"] == CEILING else "#0072B2"
        if row["mean"] is not None:
            ax.barh(yi, row["mean"], xerr=row["std"] or 0, color=colour, alpha=0.35, height=0.6)
        for f, v in zip(folds, row["folds"]):
            if v is not None:
                ax.scatter(v, yi, s=14, color=fold_colours[f], zorder=3, label=f)
    ax.set_yticks(y, [r["method"] for r in rows], fontsize=8)
    ax.set_xlabel("mean per-gene PCC")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0),
              title="fold", title_fontsize=7)
    best = max((r["mean"] for r in rows if r["method"] != CEILING and r["mean"] is not None), default=None)
    cells = []
    for r in rows:
        pcc = "–" if r["mean"] is None else f"{r['mean']:.3f} ± {r['std'] or 0:.3f}"
        cells.append([r["method"], pcc, "–" if r["share"] is None else f"{100 * r['share']:.0f}%",
                      "–" if r["routing"] is None else f"{100 * r['routing']:.1f}%"])
    tab.axis("off")
    table = tab.table(cellText=cells, colLabels=["Method", "PCC (mean ± std)", "share of ceiling", "routing acc."],
                      loc="center", cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.scale(1.0, 1.3)
    table.auto_set_column_width(col=list(range(4)))
    for i, r in enumerate(rows, start=1):
        if best is not None and r["mean"] == best:
            table[i, 1].get_text().set_fontweight("bold")
    fig.suptitle(f"{name}: {len(folds)} folds", fontsize=11)
    return fig


def gene_pcc_table(run_dir: str | os.PathLike) -> Any:
    """per_gene.csv of a run folder as a DataFrame (model, fold, gene, pcc)."""
    import pandas as pd

    from gcmoe.plotting._run import RunFolderError

    path = os.path.join(run_dir, "per_gene.csv")
    if not os.path.isfile(path):
        raise RunFolderError(f"{path} not found: {run_dir} is not a gcmoe run folder")
    return pd.read_csv(path)


def plot_run_gene_pcc(
    run_dir: str | os.PathLike, *, models: Sequence[str] | None = None, max_genes: int | None = None,
) -> Figure:
    """Per-gene PCC of a run folder, averaged over the folds that evaluated each gene.

    ``models``: display or registry names (default ST-Net* and GC-MoE when the run has them, else all).
    """
    from gcmoe.models import get_model_entry
    from gcmoe.plotting._run import RunFolderError

    table = gene_pcc_table(run_dir)
    present = [m for m in dict.fromkeys(table["model"]) if m != CEILING]
    if models:
        chosen = []
        for m in models:
            name = m if m in present else None
            if name is None:
                try:
                    name = get_model_entry(m).display_name
                except Exception:
                    name = None
            if name not in present:
                raise RunFolderError(f"model {m!r} is not in per_gene.csv; it has {', '.join(present)}")
            chosen.append(name)
    else:
        chosen = [m for m in ("ST-Net*", "GC-MoE") if m in present]
        if len(chosen) < min(2, len(present)):
            chosen = present
    mean = table.groupby(["model", "gene"])["pcc"].mean()
    pcc = {m: {str(g): float(v) for g, v in mean[m].items()} for m in chosen}
    ceiling = {str(g): float(v) for g, v in mean[CEILING].items()} if CEILING in mean.index.get_level_values(0) else None
    n_folds = table["fold"].nunique()
    return plot_gene_pcc(pcc, ceiling=ceiling, max_genes=max_genes,
                         title=f"Per-gene PCC, mean over the folds that evaluated the gene ({n_folds} folds)")


def plot_run_cv(run_dir: str | os.PathLike, *, dataset: str | None = None) -> Figure:
    """The cross-validation table of a run folder (results.json) as a figure."""
    from gcmoe.plotting._run import load_results

    return plot_cv_table(load_results(run_dir), dataset)
