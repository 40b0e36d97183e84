"""GHIST's inputs: a cell x gene count CSV, integer cell-type codes and nucleus sizes, and, for a Sample, the nuclei
label TIFF and the H&E on the same pixel grid.

GHIST (SydneyBioX/GHIST) ships the public expression of its breast demo, a 5,508-cell crop of 10x Xenium
breast "In Situ Sample 2" (280 genes, 9 cell types), as ``data_demo/``:

| file | columns |
|---|---|
| ``expr_mat_breast_demo.csv`` | an unnamed index, ``cell_id``, one column per gene (raw counts) |
| ``cell_types_breast_demo.csv`` | ``c_ids`` (cell id), ``ct_idx`` (0-based index into the type names) |
| ``nuclei_sizes_breast_demo.csv`` | the cell id (first column), ``orig_size`` (nucleus area, pixels) |

The type names are not in the CSVs: GHIST's ``configs/config_demo.json`` lists them (``data.cell_types``);
pass that file, or the names, or the breast demo's order (``GHIST_BREAST_TYPES``) is used.
:func:`read_ghist_expression` reads the CSVs alone (``gcmoe.data.virtual_tissue.transplant`` places them in a
rendered tissue); :func:`read_ghist` reads a whole GHIST input set as a Sample, named by a GHIST config's
``data_sources`` (``fp_expr``, ``fp_cell_type``, ``fp_nuc_sizes``, ``fp_nuc_seg``: the nuclei label TIFF whose
pixel values are the cell ids of ``fp_expr``, ``fp_hist``: the H&E, same height and width) or by a folder in the
demo's naming (``nuclei_*.tif``, ``histology_*.tif``; the demo ships them in ``images.zip``: unzip it first).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
from anndata import AnnData

from gcmoe._constants import Key
from gcmoe.data.image import open_image
from gcmoe.data.readers._common import inside_image, resolve_image_mpp
from gcmoe.data.sample import Sample
from gcmoe.errors import InvalidSampleError
from gcmoe.files import plain_values

log = logging.getLogger(__name__)

# configs/config_demo.json of SydneyBioX/GHIST, data.cell_types, in ct_idx order.
GHIST_BREAST_TYPES = ("B", "Myeloid", "Endothelial", "Fibroblast", "Macrophage", "Malignant", "Epithelial",
                      "Plasma", "T")


class GhistFiles:
    """File and column names of GHIST's demo folder."""

    EXPRESSION = "expr_mat_breast_demo.csv"
    CELL_TYPES = "cell_types_breast_demo.csv"
    NUCLEUS_SIZES = "nuclei_sizes_breast_demo.csv"
    CONFIG = "config_demo.json"
    CELL_ID = "cell_id"
    TYPE_ID = "c_ids"
    TYPE_CODE = "ct_idx"
    SIZE = "orig_size"
    NUCLEI_GLOB = "nuclei_*.tif"
    HISTOLOGY_GLOB = "histology_*.tif"
    SOURCES = "data_sources"  # config: the input files, relative to GHIST's folder (where train.py runs)
    FP_EXPR, FP_TYPES, FP_SIZES = "fp_expr", "fp_cell_type", "fp_nuc_sizes"
    FP_NUCLEI, FP_HIST = "fp_nuc_seg", "fp_hist"


def read_ghist_expression(folder: str | os.PathLike, type_names: Sequence[str] | None = None) -> AnnData:
    """Read GHIST's demo expression, cell types and nucleus sizes into an AnnData.

    Parameters
    ----------
    folder
        GHIST's ``data_demo/`` (the three CSVs of the module table; ``config_demo.json`` beside them is
        read for the type names when present).
    type_names
        Names of the ``ct_idx`` codes in order; default: the folder's ``config_demo.json``, else
        ``GHIST_BREAST_TYPES``.

    Returns
    -------
    AnnData (cells x genes) with raw counts in ``X`` and ``layers["counts"]``, ``obs["cell_type"]`` and, when
    the sizes file is present, ``obs["nucleus_size_px"]``. No positions: the CSVs carry none.
    """
    folder = Path(folder)
    expr_path = folder / GhistFiles.EXPRESSION
    types_path = folder / GhistFiles.CELL_TYPES
    for path in (expr_path, types_path):
        if not path.is_file():
            raise InvalidSampleError(f"{path} not found: point to GHIST's data_demo/ folder, which holds "
                                     f"{GhistFiles.EXPRESSION} and {GhistFiles.CELL_TYPES}")
    names = list(type_names) if type_names is not None else _type_names(folder)
    return _expression(expr_path, types_path, folder / GhistFiles.NUCLEUS_SIZES, names)


def _expression(expr_path: Path, types_path: Path, sizes_path: Path | None, names: Sequence[str]) -> AnnData:
    """The expression, types and sizes CSVs (module table) as an AnnData; ``names`` name the type codes."""
    for path in (expr_path, types_path):
        if not path.is_file():
            raise InvalidSampleError(f"GHIST input {path} not found")
    if types_path.suffix.lower() != ".csv":
        raise InvalidSampleError(f"{types_path}: GHIST's cell types are read from its CSV form "
                                 f"({GhistFiles.TYPE_ID}, {GhistFiles.TYPE_CODE}); convert the .h5 to that CSV")
    expr = pd.read_csv(expr_path, index_col=0)
    if GhistFiles.CELL_ID not in expr.columns:
        raise InvalidSampleError(f"{expr_path} has no '{GhistFiles.CELL_ID}' column; its columns start "
                                 f"{list(expr.columns[:5])}")
    ids = expr.pop(GhistFiles.CELL_ID).astype(str).to_numpy()
    counts = expr.to_numpy(dtype=np.float32)
    if not np.isfinite(counts).all() or (counts < 0).any() or not np.array_equal(counts, np.round(counts)):
        raise InvalidSampleError(f"{expr_path} must hold raw counts (non-negative whole numbers)")
    types = pd.read_csv(types_path)
    missing_cols = {GhistFiles.TYPE_ID, GhistFiles.TYPE_CODE} - set(types.columns)
    if missing_cols:
        raise InvalidSampleError(f"{types_path} lacks the column(s) {sorted(missing_cols)}")
    code = pd.Series(types[GhistFiles.TYPE_CODE].to_numpy(), index=types[GhistFiles.TYPE_ID].astype(str))
    missing = [i for i in ids if i not in code.index]
    if missing:
        raise InvalidSampleError(f"{len(missing)} cells of {expr_path.name} have no type in {types_path.name}, "
                                 f"e.g. {missing[:3]}")
    names = list(names)
    codes = code.loc[ids].to_numpy()
    if codes.min() < 0 or codes.max() >= len(names):
        raise InvalidSampleError(f"{types_path} holds type codes {codes.min()}..{codes.max()} but {len(names)} "
                                 f"type names were given: {names}")
    obs = pd.DataFrame(index=pd.Index(ids, name=None))
    obs[Key.CELL_TYPE] = pd.Categorical(np.asarray(names, dtype=object)[codes], categories=names)
    if sizes_path is not None and sizes_path.is_file():
        sizes = pd.read_csv(sizes_path)
        size = pd.Series(sizes[GhistFiles.SIZE].to_numpy(dtype=float), index=sizes.iloc[:, 0].astype(str))
        obs["nucleus_size_px"] = size.reindex(ids).to_numpy()
    adata = AnnData(X=counts, obs=obs)
    adata.var_names = pd.Index(expr.columns.astype(str))
    adata.layers[Key.COUNTS] = counts.copy()
    adata.uns[Key.UNS] = {"provenance": {"reader": "ghist", "files": {"expression": str(expr_path),
                                                                      "cell_types": str(types_path)}}}
    return adata


def is_ghist_folder(path: str | os.PathLike) -> bool:
    """A GHIST data folder in the demo's naming: the expression CSV and a nuclei label TIFF."""
    path = Path(path)
    return (path / GhistFiles.EXPRESSION).is_file() and any(path.glob(GhistFiles.NUCLEI_GLOB))


def is_ghist_config(path: str | os.PathLike) -> bool:
    """A GHIST config JSON: ``data_sources`` naming the nuclei label TIFF (``fp_nuc_seg``)."""
    path = Path(path)
    if path.suffix.lower() != ".json" or not path.is_file():
        return False
    try:
        return GhistFiles.FP_NUCLEI in (json.loads(path.read_text()).get(GhistFiles.SOURCES) or {})
    except (ValueError, AttributeError, OSError):
        return False


def _resolve(config: Path, value: str) -> Path:
    """A ``data_sources`` path: relative to GHIST's folder (the config's grandparent: configs/ lies in it), the
    config's folder, or as given."""
    given = Path(value)
    if given.is_absolute():
        return given
    for base in (config.parent.parent, config.parent, Path.cwd()):
        if (base / given).exists():
            return base / given
    raise InvalidSampleError(f"{config}: {value} (data_sources) not found beside GHIST's folder {config.parent.parent}")


def ghist_inputs(source: Path, image: Path | None, nuclei: Path | None) -> tuple[dict[str, Path | None], list[str]]:
    """The input files (expression, types, sizes, nuclei, image) and type names of a GHIST config or folder."""
    if is_ghist_config(source):
        config = json.loads(source.read_text())
        src = config[GhistFiles.SOURCES]
        files = {key: _resolve(source, src[fp]) if src.get(fp) else None for key, fp in (
            ("expression", GhistFiles.FP_EXPR), ("types", GhistFiles.FP_TYPES), ("sizes", GhistFiles.FP_SIZES),
            ("nuclei", GhistFiles.FP_NUCLEI), ("image", GhistFiles.FP_HIST))}
        names = (config.get("data") or {}).get("cell_types") or list(GHIST_BREAST_TYPES)
    elif source.is_dir():
        files = {"expression": source / GhistFiles.EXPRESSION, "types": source / GhistFiles.CELL_TYPES,
                 "sizes": source / GhistFiles.NUCLEUS_SIZES,
                 "nuclei": next(iter(sorted(source.glob(GhistFiles.NUCLEI_GLOB))), None),
                 "image": next(iter(sorted(source.glob(GhistFiles.HISTOLOGY_GLOB))), None)}
        names = _type_names(source)
    else:
        raise InvalidSampleError(f"{source}: give GHIST's config JSON (with data_sources) or its data folder")
    files["nuclei"] = nuclei or files["nuclei"]
    files["image"] = image or files["image"]
    for key, what in (("nuclei", "the nuclei label TIFF (fp_nuc_seg; nuclei_*.tif)"),
                      ("image", "the H&E (fp_hist; histology_*.tif)")):
        if files[key] is None:
            zipped = (source if source.is_dir() else source.parent) / "images.zip"
            hint = f"; GHIST's demo ships it in {zipped.name}: unzip it" if zipped.is_file() else ""
            raise InvalidSampleError(f"{source}: {what} not found{hint}")
    return files, [str(n) for n in names]


def read_ghist(
    source: str | os.PathLike,
    image: str | os.PathLike | None = None,
    nuclei: str | os.PathLike | None = None,
    mpp: float | None = None,
    sample_id: str | None = None,
    type_names: Sequence[str] | None = None,
) -> Sample:
    """Read a GHIST input set (config JSON or data folder; module docstring) as a Sample.

    Parameters
    ----------
    source
        GHIST's config JSON (``data_sources``) or its data folder in the demo's naming.
    image, nuclei
        Override the H&E (``fp_hist``) and the nuclei label TIFF (``fp_nuc_seg``).
    mpp
        Micrometres per pixel of the H&E; default: what the image states (else an error asking for it).
    type_names
        Names of the ``ct_idx`` codes; default: the config's ``data.cell_types``.

    Returns
    -------
    A Sample of the cells that are in the expression CSV and the label image: ``obsm["spatial"]`` each nucleus'
    centre of mass, ``obs["cell_type"]``, ``obs["nucleus_size_px"]`` when the sizes CSV is there.
    """
    from gcmoe.data.cells import read_cell_centres  # here: gcmoe.data.cells imports this package's polygons

    source = Path(source)
    files, names = ghist_inputs(source, Path(image) if image else None, Path(nuclei) if nuclei else None)
    adata = _expression(files["expression"], files["types"], files["sizes"], type_names or names)
    sample_id = sample_id or files["expression"].stem
    slide = open_image(files["image"])
    try:
        with tifffile.TiffFile(files["nuclei"]) as tif:
            mask_shape = tuple(tif.series[0].shape[:2])
    except (OSError, ValueError, tifffile.TiffFileError) as exc:
        raise InvalidSampleError(f"cannot read {files['nuclei']} as a label TIFF ({exc})") from exc
    if mask_shape != tuple(slide.shape):
        raise InvalidSampleError(
            f"{files['nuclei'].name} is {mask_shape[1]} x {mask_shape[0]} px but the H&E {files['image'].name} is "
            f"{slide.shape[1]} x {slide.shape[0]} px: GHIST's nuclei labels must lie on the H&E's pixel grid"
        )
    xy, labels = read_cell_centres(files["nuclei"])
    rows = pd.Index(labels).get_indexer(adata.obs_names)
    if not (rows >= 0).any():
        raise InvalidSampleError(
            f"no cell id of {files['expression'].name} (e.g. {list(adata.obs_names[:3])}) is a label of "
            f"{files['nuclei'].name} (e.g. {labels[:3]}): are they from the same GHIST input set?"
        )
    n_missing = int((rows < 0).sum())
    if n_missing:
        log.warning("%d cells of %s have no nucleus in %s and are left out", n_missing, files["expression"].name,
                    files["nuclei"].name)
    adata = adata[rows >= 0]
    xy = xy[rows[rows >= 0]]
    mpp, mpp_source = resolve_image_mpp(files["image"], mpp, sample_id)
    keep = inside_image(xy, slide.shape, sample_id, mpp, files["nuclei"].name)
    adata = adata[keep]
    obs = adata.obs.drop(columns=[Key.CELL_TYPE]).reset_index(drop=True)
    provenance = {"format": "ghist", "source": str(source.resolve()), "mpp_source": mpp_source,
                  "files": {k: str(v) for k, v in files.items() if v is not None}}
    return Sample.from_arrays(
        np.asarray(adata.layers[Key.COUNTS]), xy[keep], slide, mpp, list(adata.var_names), sample_id,
        cell_ids=list(adata.obs_names), cell_type=adata.obs[Key.CELL_TYPE].astype(str).to_numpy(),
        obs=obs if obs.shape[1] else None, provenance=plain_values(provenance, h5ad=True),
    )


def _type_names(folder: Path) -> list[str]:
    config = folder / GhistFiles.CONFIG
    if config.is_file():
        try:
            names = json.loads(config.read_text())["data"]["cell_types"]
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidSampleError(f"{config} has no data.cell_types list: {exc}") from exc
        return [str(n) for n in names]
    return list(GHIST_BREAST_TYPES)
