"""What a cohort run writes for one slide beside its h5ad: the tissue mask, a QC figure, a QuPath GeoJSON of the
cells with their predictions, and the slide's summary (a row of the cohort table). Every file is atomic."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from gcmoe.files import atomic_path
from gcmoe.tissue import TissueMask

__all__ = ["slide_summary", "write_cells_geojson", "write_qc_figure", "write_tissue_mask"]

QC_MAX_CELLS = 100_000  # cells drawn in the QC figure (a random subset beyond this)


def write_tissue_mask(mask: TissueMask, path: str | os.PathLike) -> Path:
    """The tissue mask as a black (glass) and white (tissue) PNG, one pixel per thumbnail pixel."""
    from PIL import Image

    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(mask.mask.astype(np.uint8) * 255).save(tmp, format="PNG")
    return path


def write_cells_geojson(adata: Any, path: str | os.PathLike, chunk: int = 20_000) -> Path:
    """The cells as a GeoJSON FeatureCollection QuPath (0.4+) imports (File > Import objects): one Point detection
    per cell at its centre (full-resolution pixels), classified by its expert when the model routes, with the
    predicted genes (and the routing probabilities, ``p(<type>)``) as measurements. Written in chunks of cells."""
    path = Path(path)
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    genes = [str(g) for g in adata.var_names]
    routing = adata.obsm["routing"] if "routing" in adata.obsm else None
    types = list(adata.uns.get("gcmoe", {}).get("routing_types", [])) if routing is not None else []
    expert = np.asarray(adata.obs["expert"].astype(str)) if "expert" in adata.obs else None
    names = genes + [f"p({t})" for t in types]
    ids = np.asarray(adata.obs_names, dtype=str)
    with atomic_path(path, suffix=".geojson") as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write('{"type": "FeatureCollection", "features": [\n')
        for start in range(0, adata.n_obs, chunk):
            stop = min(start + chunk, adata.n_obs)
            values = np.asarray(adata.X[start:stop], dtype=np.float64)
            if routing is not None:
                values = np.hstack([values, np.asarray(routing[start:stop], dtype=np.float64)])
            lines = []
            for i in range(start, stop):
                props: dict[str, Any] = {"objectType": "detection", "name": ids[i],
                                         "measurements": dict(zip(names, np.round(values[i - start], 5).tolist()))}
                if expert is not None:
                    props["classification"] = {"name": expert[i]}
                feature = {"type": "Feature", "geometry": {"type": "Point", "coordinates": [round(xy[i, 0], 2),
                                                                                           round(xy[i, 1], 2)]},
                           "properties": props}
                lines.append(json.dumps(feature, separators=(",", ":")))
            fh.write(",\n".join(lines))
            if stop < adata.n_obs:
                fh.write(",\n")
        fh.write("\n]}\n")
    return path


def write_qc_figure(adata: Any, mask: TissueMask, path: str | os.PathLike, title: str, seed: int = 0) -> Path:
    """A PNG of two panels on the slide's thumbnail: the tissue mask's outline, and the cells coloured by expert
    (or in one colour when the model does not route; at most :data:`QC_MAX_CELLS`, a random subset)."""
    from gcmoe.plotting._style import category_colours, new_figure

    path = Path(path)
    thumb = mask.thumbnail
    aspect = thumb.shape[0] / max(thumb.shape[1], 1)
    fig = new_figure(10, 5 * min(max(aspect, 0.4), 2.0) + 0.8)
    left, right = fig.subplots(1, 2)
    for ax in (left, right):
        ax.set_axis_off()
    left.imshow(thumb)
    if mask.mask.any():
        left.contour(mask.mask.astype(float), levels=[0.5], colors="#00a000", linewidths=0.8)
    left.set_title(f"tissue {mask.area_mm2:.3g} mm2 ({100 * mask.fraction:.0f}% of the slide)", fontsize=9)
    right.imshow((thumb.astype(np.float32) * 0.35 + 255 * 0.65).astype(np.uint8))
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    keep = np.arange(len(xy))
    if len(keep) > QC_MAX_CELLS:
        keep = np.sort(np.random.default_rng(seed).choice(len(xy), QC_MAX_CELLS, replace=False))
    px = xy[keep] / np.asarray(mask.downsample)
    size = max(0.2, min(4.0, 2e4 / max(len(keep), 1)))
    if "expert" in adata.obs and len(keep):
        labels = np.asarray(adata.obs["expert"].astype(str))[keep]
        colours = category_colours(list(adata.obs["expert"].cat.categories))
        for name, colour in colours.items():
            sel = labels == name
            if sel.any():
                right.scatter(px[sel, 0], px[sel, 1], s=size, c=colour, linewidths=0, label=f"{name} ({int(sel.sum())})")
        right.legend(loc="upper right", fontsize=7, markerscale=max(2.0, 3 / size), frameon=True)
        right.set_title(f"{adata.n_obs} cells by expert", fontsize=9)
    else:
        right.scatter(px[:, 0], px[:, 1], s=size, c="#3050c0", linewidths=0)
        right.set_title(f"{adata.n_obs} cells", fontsize=9)
    right.set_xlim(left.get_xlim())
    right.set_ylim(left.get_ylim())
    fig.suptitle(title, fontsize=10)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path


def slide_summary(adata: Any) -> dict[str, Any]:
    """The slide's row of the cohort table: its cell count, the mean prediction of each gene over all cells and
    per predicted cell type (the expert), and the cells per type."""
    genes = [str(g) for g in adata.var_names]
    out: dict[str, Any] = {"n_cells": int(adata.n_obs), "mean": {}, "n_cells_by_type": {}, "mean_by_type": {}}
    if adata.n_obs:
        means = _column_means(adata.X, np.ones(adata.n_obs, dtype=bool))
        out["mean"] = dict(zip(genes, means))
    if "expert" in adata.obs:
        labels = np.asarray(adata.obs["expert"].astype(str))
        for name in adata.obs["expert"].cat.categories:
            sel = labels == str(name)
            out["n_cells_by_type"][str(name)] = int(sel.sum())
            out["mean_by_type"][str(name)] = dict(zip(genes, _column_means(adata.X, sel))) if sel.any() else {}
    return out


def _column_means(x: Any, rows: np.ndarray, block: int = 65_536) -> list[float]:
    """Column means of the selected rows of ``x``, in float64, a block of rows at a time."""
    total = np.zeros(x.shape[1], dtype=np.float64)
    for start in range(0, x.shape[0], block):
        sel = rows[start : start + block]
        if sel.any():
            total += np.asarray(x[start : start + block][sel], dtype=np.float64).sum(axis=0)
    return (total / max(int(rows.sum()), 1)).tolist()
