"""Maps on the H&E (the paper's Figure 5): the tissue, the cell types, the expert each cell is routed to, and
measured vs predicted expression of chosen genes, cells drawn as points at their centres.

The slide is read downsampled (from the TIFF's pyramid level closest to the display size, then strided), over
the bounding box of the drawn cells. Each expression panel has its own colour scale (1st-99th percentile of
its values): PCC, the metric, ignores scale, and predictions are usually shrunk towards the mean.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from gcmoe.errors import ConfigError
from gcmoe.plotting._style import category_colours, new_figure, pearson, robust_limits

log = logging.getLogger(__name__)

Region = tuple[int, int, int, int]  # x, y, width, height in full-resolution pixels


def cells_region(xy: np.ndarray, image_shape: tuple[int, int], margin: int = 40) -> Region:
    """The bounding box of the cells plus ``margin`` pixels, clipped to the image (height, width)."""
    xy = np.asarray(xy, dtype=float)
    h, w = image_shape
    x0 = int(max(0, math.floor(xy[:, 0].min()) - margin))
    y0 = int(max(0, math.floor(xy[:, 1].min()) - margin))
    x1 = int(min(w, math.ceil(xy[:, 0].max()) + margin + 1))
    y1 = int(min(h, math.ceil(xy[:, 1].max()) + margin + 1))
    return x0, y0, max(1, x1 - x0), max(1, y1 - y0)


def read_downsampled(image, region: Region, max_side: int = 1200) -> np.ndarray:
    """RGB pixels of ``region`` of a slide image with the longer side at most about ``max_side`` pixels.

    A TIFF with a pyramid is read from the coarsest level that is still at least as fine as needed, only the
    tiles the region touches; other images through ``read_region``.
    """
    x, y, w, h = region
    factor = max(1, math.ceil(max(w, h) / max_side))
    path = getattr(image, "path", None)
    if path is not None and Path(path).suffix.lower() in (".tif", ".tiff", ".btf") and factor > 1:
        try:
            return _read_pyramid(Path(path), region, factor, tuple(image.shape))
        except Exception as exc:  # an odd pyramid is not worth failing a figure over: fall back to level 0
            log.debug("pyramid read of %s failed (%s); reading level 0", path, exc)
    return np.asarray(image.read_region(x, y, w, h))[::factor, ::factor, :3]


def _read_pyramid(path: Path, region: Region, factor: int, shape: tuple[int, int]) -> np.ndarray:
    import tifffile
    import zarr

    x, y, w, h = region
    store = tifffile.imread(path, aszarr=True)
    node = zarr.open(store, mode="r")
    levels = [node[k] for k in sorted(node.keys(), key=int)] if isinstance(node, zarr.Group) else [node]
    best, best_ds = levels[0], 1
    for level in levels[1:]:
        ds = shape[1] / level.shape[1]
        if ds <= factor + 1e-6 and ds > best_ds:
            best, best_ds = level, ds
    lx0, ly0 = int(x / best_ds), int(y / best_ds)
    lx1, ly1 = int(math.ceil((x + w) / best_ds)), int(math.ceil((y + h) / best_ds))
    step = max(1, int(round(factor / best_ds)))
    return np.asarray(best[ly0:ly1, lx0:lx1, :3])[::step, ::step]


def plot_spatial_maps(
    tissue: np.ndarray,
    region: Region,
    xy: np.ndarray,
    genes: Sequence[str],
    measured: np.ndarray | None,
    predictions: Mapping[str, np.ndarray],
    *,
    cell_type: np.ndarray | None = None,
    expert: np.ndarray | None = None,
    categories: Sequence[str] | None = None,
    expert_title: str = "expert assignment",
    point_size: float | None = None,
    title: str | None = None,
) -> Figure:
    """The tissue, the cell-type mask, the expert assignment, then per gene its measured and predicted maps.

    Parameters
    ----------
    tissue
        RGB image of ``region`` (any resolution; drawn stretched over the region).
    region
        (x, y, width, height) of the tissue in full-resolution pixels, the frame of ``xy``.
    xy
        (N, 2) cell centres, full-resolution pixels.
    genes
        Names of the columns of ``measured`` and of every prediction.
    measured, predictions
        (N, len(genes)) measured values (None on a slide without them) and, per model (panel title), predicted
        values.
    cell_type, expert
        Each cell's type and the expert it is routed to (argmax of the router); a panel each when given.

    Layout: row 1 = tissue, cell types, experts; one row per gene = measured (when given), then each model.
    With no measurements and one model (a prediction on a new slide) the gene maps follow the first panels
    in one grid of at most 4 columns instead, with as few empty slots as possible.
    """
    xy = np.asarray(xy, dtype=float)
    n = len(xy)
    expected = (n, len(genes))
    if measured is not None and np.asarray(measured).shape != expected:
        raise ConfigError(f"measured has shape {np.asarray(measured).shape}; expected {expected} for the cells and genes")
    for name, p in predictions.items():
        if np.asarray(p).shape != expected:
            raise ConfigError(f"prediction {name!r} has shape {np.asarray(p).shape}; expected {expected}")
    x, y, w, h = region
    extent = (x, x + w, y + h, y)
    top = 1 + (cell_type is not None) + (expert is not None)
    flat = measured is None and len(predictions) == 1
    if flat:
        total = top + len(genes)
        # at most 4 columns: as few rows as possible, then as few empty slots
        ncols = min(range(min(4, total), 0, -1), key=lambda c: (-(-total // c), -(-total // c) * c - total))
        nrows = -(-total // ncols)
    else:
        ncols = max(top, (measured is not None) + len(predictions))
        nrows = 1 + len(genes)
    panel = 3.2
    aspect = h / max(w, 1)
    fig = new_figure(panel * ncols + 1.2, (panel * aspect + 0.5) * nrows + (0.4 if title else 0))
    grid = fig.subplots(nrows, ncols, squeeze=False)
    # slot (row, column) of the layout -> its axes; flat: the slots are filled in reading order
    slots = grid.ravel()
    axes = (lambda r, c: slots[c if r == 0 else top + (r - 1)]) if flat else (lambda r, c: grid[r, c])
    if point_size is None:
        # about one cell diameter: the panel's area in points^2 shared among the cells
        point_size = float(np.clip(0.3 * (panel * 72) ** 2 * aspect / max(n, 1), 0.5, 40.0))

    def frame(ax, name: str) -> None:
        ax.imshow(tissue, extent=extent, alpha=1.0 if name == "H&E" else 0.35, interpolation="antialiased")
        ax.set_xlim(x, x + w)
        ax.set_ylim(y + h, y)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(name, fontsize=9)

    frame(axes(0, 0), "H&E")
    col = 1
    colours = category_colours(categories if categories is not None else sorted(
        set(np.asarray(cell_type if cell_type is not None else expert if expert is not None else []).astype(str))))
    for values, name in ((cell_type, "cell types"), (expert, expert_title)):
        if values is None:
            continue
        ax = axes(0, col)
        frame(ax, name)
        values = np.asarray(values).astype(str)
        for c, colour in colours.items():
            sel = values == c
            if sel.any():
                ax.scatter(xy[sel, 0], xy[sel, 1], s=point_size, c=colour, label=c, linewidths=0, rasterized=True)
        col += 1
    if top > 1:
        handles, labels = axes(0, 1).get_legend_handles_labels()
        # beside the panel; in the flat layout another panel is there, so below it
        where = dict(loc="upper left", bbox_to_anchor=(0, -0.02), ncol=2) if flat else dict(
            loc="upper left", bbox_to_anchor=(1.02, 1))
        axes(0, top - 1).legend(handles, labels, fontsize=7, frameon=False,
                                markerscale=max(1.0, 4 / math.sqrt(point_size)), **where)
    if not flat:
        for c in range(top, ncols):
            fig.delaxes(grid[0, c])
    for r, gene in enumerate(genes, start=1):
        panels = {"measured": np.asarray(measured)[:, r - 1]} if measured is not None else {}
        panels |= {m: np.asarray(p)[:, r - 1] for m, p in predictions.items()}
        for c, (name, values) in enumerate(panels.items()):
            ax = axes(r, c)
            label = f"{gene}: {name}"
            if name != "measured" and "measured" in panels:
                label += f" (r = {pearson(values, panels['measured']):.2f})"
            frame(ax, label)
            vmin, vmax = robust_limits(values)
            sc = ax.scatter(xy[:, 0], xy[:, 1], c=values, s=point_size, cmap="magma", vmin=vmin, vmax=vmax,
                            linewidths=0, rasterized=True)
            if c == len(panels) - 1:
                fig.colorbar(sc, ax=ax, shrink=0.8, label="expression (panel scale)")
        if not flat:
            for c in range(len(panels), ncols):
                fig.delaxes(grid[r, c])
    if flat:
        for ax in slots[top + len(genes):]:
            fig.delaxes(ax)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def _known_genes(genes: Sequence[str], var: list[str], problem: str) -> list[str]:
    """``genes`` as a list, or RunFolderError naming the unknown ones (``problem``) and the first known ones."""
    from gcmoe.plotting._run import RunFolderError

    unknown = [g for g in genes if g not in var]
    if unknown:
        raise RunFolderError(f"genes {unknown} {problem} {', '.join(var[:20])}{' ...' if len(var) > 20 else ''}")
    return list(genes)


def plot_run_spatial(
    run_dir: str | os.PathLike,
    *,
    genes: Sequence[str] | None = None,
    models: Sequence[str] | None = None,
    fold: str | None = None,
    sample: str | None = None,
    n_genes: int = 2,
    max_side: int = 1200,
) -> Figure:
    """Figure 5 of a run folder: maps of one slide's held-out cells on its H&E.

    ``fold``: one fold's test cells, or None for all folds (every cell with its held-out prediction).
    ``sample``: the slide (default the first). ``genes``: default the ``n_genes`` genes the last of ``models``
    predicts best on these cells. ``models``: two by default (ST-Net* and GC-MoE); the expert panel shows the
    last MoE model's routing.
    """
    from gcmoe._constants import Key
    from gcmoe.plotting._run import RunFolderError, label_order, model_names, open_sample_image, read_predictions, resolve_models

    adata = read_predictions(run_dir, fold)
    samples = list(dict.fromkeys(adata.obs[Key.SAMPLE_ID].astype(str)))
    sample = sample or samples[0]
    if sample not in samples:
        raise RunFolderError(f"sample {sample!r} has no held-out cells in these predictions; they hold {samples}")
    adata = adata[adata.obs[Key.SAMPLE_ID].astype(str).to_numpy() == sample]
    chosen = resolve_models(adata, models)
    display = model_names(adata)
    var = list(map(str, adata.var_names))
    if genes:
        genes = _known_genes(genes, var, "were not evaluated here; evaluated genes:")
    else:
        best = np.asarray(adata.layers[chosen[-1]])
        measured_all = np.asarray(adata.X)
        r = np.array([pearson(best[:, j], measured_all[:, j]) for j in range(len(var))])
        genes = [var[j] for j in np.argsort(np.nan_to_num(r, nan=-2))[::-1][:n_genes]]
    cols = [var.index(g) for g in genes]
    image = open_sample_image(run_dir, sample, dict(adata.uns.get(Key.UNS, {}).get("images", {})))
    xy = np.asarray(adata.obsm[Key.SPATIAL], dtype=float)
    region = cells_region(xy, tuple(image.shape))
    tissue = read_downsampled(image, region, max_side)
    types = list(adata.uns.get(Key.UNS, {}).get("routing_types", []))
    cell_type = adata.obs[Key.CELL_TYPE].astype(str).to_numpy() if Key.CELL_TYPE in adata.obs else (
        adata.obs["routing_label"].astype(str).to_numpy() if "routing_label" in adata.obs else None)
    moe = [m for m in chosen if f"expert_{m}" in adata.obs] or [m[len("expert_"):] for m in adata.obs if m.startswith("expert_")]
    expert = adata.obs[f"expert_{moe[-1]}"].astype(str).to_numpy() if moe else None
    cats = label_order(np.concatenate([a for a in (cell_type, expert) if a is not None]), types) if (
        cell_type is not None or expert is not None) else None
    where = "all folds" if fold in (None, "all") else f"fold {fold}"
    return plot_spatial_maps(
        tissue, region, xy, genes, np.asarray(adata.X)[:, cols],
        {display[m]: np.asarray(adata.layers[m])[:, cols] for m in chosen},
        cell_type=cell_type, expert=expert, categories=cats,
        expert_title=f"experts ({display.get(moe[-1], moe[-1])})" if moe else "experts",
        title=f"{sample}: {adata.n_obs} held-out cells ({where})",
    )


def plot_prediction(
    prediction: str | os.PathLike,
    *,
    genes: Sequence[str] | None = None,
    n_genes: int = 3,
    image: str | os.PathLike | None = None,
    max_side: int = 1200,
) -> Figure:
    """Maps of a `gcmoe predict` output on its slide: the H&E, the expert assignment (GC-MoE) and the
    predicted expression of ``genes`` (default: the ``n_genes`` with the largest spread across cells).

    ``image``: the slide, when it has moved since the prediction (default ``uns["gcmoe"]["slide"]``).
    """
    import anndata

    from gcmoe._constants import Key
    from gcmoe.data.image import open_image
    from gcmoe.plotting._run import RunFolderError

    path = Path(prediction)
    if not path.is_file():
        raise RunFolderError(f"prediction file not found: {path}")
    adata = anndata.read_h5ad(path)
    meta = dict(adata.uns.get(Key.UNS, {}))
    if "slide" not in meta and image is None:
        raise RunFolderError(f"{path} was not written by `gcmoe predict` (no uns['gcmoe']['slide']); give --image")
    var = list(map(str, adata.var_names))
    values = np.asarray(adata.X, dtype=np.float32)
    if genes:
        genes = _known_genes(genes, var, "are not predicted by this model; it predicts")
    else:
        genes = [var[j] for j in np.argsort(values.std(axis=0))[::-1][:n_genes]]
    cols = [var.index(g) for g in genes]
    slide = open_image(Path(image) if image is not None else Path(str(meta["slide"])))
    xy = np.asarray(adata.obsm[Key.SPATIAL], dtype=float)
    region = cells_region(xy, tuple(slide.shape))
    expert = adata.obs["expert"].astype(str).to_numpy() if "expert" in adata.obs else None
    types = [str(t) for t in meta.get("routing_types", [])] or None
    model = dict(meta.get("model", {})).get("display_name", "model")
    return plot_spatial_maps(
        read_downsampled(slide, region, max_side), region, xy, genes, None, {f"predicted ({model})": values[:, cols]},
        expert=expert, categories=types, expert_title=f"experts ({model})",
        title=f"{Path(str(meta.get('slide', image))).name}: {adata.n_obs} cells predicted",
    )
