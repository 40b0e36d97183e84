"""Any AnnData with cell centres + an H&E image -> :class:`Sample`.

Reads an ``.h5ad`` whose ``obsm["spatial"]`` (or another key, or two ``obs`` columns) holds (x, y) cell centres
in full-resolution pixels of the given image, or in micrometres (``coords="um"``; the default for a table written
by spatialdata-io, whose Xenium ``obsm["spatial"]`` is 10x's ``x_centroid``/``y_centroid`` in micrometres); raw
counts from ``layers["counts"]`` or ``X`` (non-negative and integer-valued);
cell types from any ``obs`` column, with any names and any number of types. The pixel size comes from the
argument, else ``uns["gcmoe"]["mpp"]``, else what the image states (OME ``PhysicalSizeX``, TIFF resolution tags,
OpenSlide's mpp-x); when both of the latter are known they must agree within 5%.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from gcmoe._constants import Key, UnsKey
from gcmoe.data.image import image_mpp, open_image
from gcmoe.data.readers._common import choose_mpp, inside_image, no_mpp_reason
from gcmoe.data.readers._coords import COORDS, Coords, check_spacing, to_pixels
from gcmoe.data.sample import Sample
from gcmoe.errors import InvalidSampleError
from gcmoe.files import plain_values

log = logging.getLogger(__name__)


class AnnDataKeys:
    """Fields of AnnData tables written by others that the reader recognises."""

    SPATIALDATA_ATTRS = "spatialdata_attrs"  # uns: spatialdata's TableModel (region, region_key, instance_key)
    COORDINATE_TOKENS = ("x", "y", "row", "col", "column")  # obs column names holding centres, split at _ . -
    COORDINATE_WORDS = ("pixel", "pxl", "centroid", "coord", "imagerow", "imagecol")


def is_spatialdata_table(adata) -> bool:
    """True for a table written by spatialdata / spatialdata-io (``uns["spatialdata_attrs"]``)."""
    return AnnDataKeys.SPATIALDATA_ATTRS in adata.uns


def _coordinate_columns(obs: pd.DataFrame) -> list[str]:
    """Numeric ``obs`` columns whose names look like coordinates, for the error that asks for them."""
    found = []
    for name in obs.columns:
        low = str(name).lower()
        tokens = set(re.split(r"[^a-z0-9]+", low))
        if obs[name].dtype.kind in "fiu" and (tokens & set(AnnDataKeys.COORDINATE_TOKENS)
                                              or any(w in low for w in AnnDataKeys.COORDINATE_WORDS)):
            found.append(str(name))
    return found


def cell_centres(adata, path: Path, spatial_key: str, xy_columns: Sequence[str] | None) -> tuple[np.ndarray, str]:
    """The (x, y) centres as the file gives them and where they came from: ``obs[xy_columns]`` when given (x =
    image column, y = image row), else ``obsm[spatial_key]``; an error that names the candidates otherwise."""
    if xy_columns:
        if len(xy_columns) != 2:
            raise InvalidSampleError(f"--xy-columns takes two obs columns, x (image column) then y (image row); got {list(xy_columns)}")
        missing = [c for c in xy_columns if c not in adata.obs]
        if missing:
            raise InvalidSampleError(f"{path}: no obs column(s) {missing} for the centres; obs columns are {list(adata.obs.columns)[:30]}")
        try:
            xy = adata.obs[list(xy_columns)].to_numpy(dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise InvalidSampleError(f"{path}: obs columns {list(xy_columns)} are not numeric ({exc})") from exc
        return _finite_centres(xy, path, f"obs{list(xy_columns)}"), f"{path.name} obs[{list(xy_columns)}]"
    if spatial_key not in adata.obsm:
        candidates = _coordinate_columns(adata.obs)
        advice = (f"obs has {candidates}: if they are the centres, name them with --xy-columns X,Y (x = the image "
                  "column, y = the image row, in that order)") if candidates else "put them in obsm['spatial'] as (x, y)"
        raise InvalidSampleError(
            f"{path}: no obsm['{spatial_key}'] with cell centres (obsm keys: {list(adata.obsm.keys())}); {advice}"
        )
    try:
        xy = np.asarray(adata.obsm[spatial_key], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InvalidSampleError(f"{path}: obsm['{spatial_key}'] must hold numbers, the (x, y) centres, but it cannot "
                                 f"be read as numbers ({exc}); store them as a float array") from None
    if xy.ndim != 2 or xy.shape[1] < 2:
        raise InvalidSampleError(f"{path}: obsm['{spatial_key}'] must be (n_cells, 2) x, y pixels, got {xy.shape}")
    return _finite_centres(xy[:, :2], path, f"obsm['{spatial_key}']"), f"{path.name} obsm['{spatial_key}']"


def _finite_centres(xy: np.ndarray, path: Path, where: str) -> np.ndarray:
    """``xy``, or InvalidSampleError naming how many centres are NaN or infinite (before any unit or fit check)."""
    bad = ~np.isfinite(xy).all(axis=1)
    if bad.any():
        raise InvalidSampleError(
            f"{path}: {int(bad.sum())} of {len(xy)} cell centres in {where} are NaN or infinite (e.g. cell "
            f"{int(np.flatnonzero(bad)[0])}); drop those cells or give their centres")
    return xy


def resolve_coords(coords: Coords, adata, path: Path) -> str:
    """``px`` or ``um``: as given, else ``um`` for a spatialdata-io table (its centres are micrometres), else ``px``."""
    if coords not in COORDS:
        raise InvalidSampleError(f"unknown unit of the cell centres coords={coords!r}; choose one of {list(COORDS)}")
    if coords != "auto":
        return coords
    if is_spatialdata_table(adata):
        log.info("%s is a spatialdata table: its centres are read as micrometres (give --coords px if they are "
                 "pixels)", path.name)
        return "um"
    return "px"


def check_raw_counts(values: np.ndarray, where: str, source: str = "X") -> None:
    """Raise InvalidSampleError unless ``values`` are finite, non-negative whole numbers (raw counts).

    Every path that takes counts (readers, Sample files, references) calls this: log1p or normalised values
    would otherwise be log-normalised a second time without a word. Rounded CPM cannot be told from counts.
    """
    values = np.asarray(values)
    if not np.issubdtype(values.dtype, np.number) or np.issubdtype(values.dtype, np.complexfloating):
        raise InvalidSampleError(f"{where}: {source} is not numeric ({values.dtype}); raw counts are needed")
    if np.issubdtype(values.dtype, np.integer) or values.size == 0:
        if values.size and values.min() < 0:
            raise InvalidSampleError(f"{where}: {source} holds negative values (min {values.min()}); give raw counts")
        return
    flat = values.ravel()
    finite = np.isfinite(flat)
    if not finite.all():
        raise InvalidSampleError(f"{where}: {source} holds {int(flat.size - finite.sum())} NaN or infinite values; "
                                 "raw counts must be finite whole numbers")
    if flat.min() < 0:
        raise InvalidSampleError(f"{where}: {source} holds negative values (min {flat.min()}, e.g. "
                                 f"{flat[flat < 0][:3].tolist()}); give raw counts")
    fractional = np.abs(flat - np.round(flat)) > 1e-6
    if fractional.any():
        raise InvalidSampleError(
            f"{where}: {source} does not hold raw counts ({int(fractional.sum())} values are not whole numbers, e.g. "
            f"{flat[fractional][:3].tolist()}: normalised or log1p values?); raw counts are needed: put them in "
            f"layers['{Key.COUNTS}'] (gcmoe log-normalises them itself)")


def read_reference(path: str | os.PathLike, type_key: str = "cell_type"):
    """A labelled reference scRNA-seq .h5ad, checked: cells, the cell-type column, raw counts."""
    import anndata

    path = Path(path)
    if not path.is_file():
        raise InvalidSampleError(f"reference file not found: {path}")
    try:
        ref = anndata.read_h5ad(path)
    except Exception as exc:  # h5py/anndata raise many types for a file that is not an AnnData
        raise InvalidSampleError(f"reference {path} cannot be read as an AnnData .h5ad ({type(exc).__name__}: {exc})") from None
    check_reference(ref, str(path), type_key)
    return ref


def check_reference(ref, where: str, type_key: str = "cell_type") -> None:
    """Raise InvalidSampleError unless ``ref`` has cells, genes, a ``type_key`` column and raw counts."""
    if ref.n_obs == 0 or ref.n_vars == 0:
        raise InvalidSampleError(f"reference {where} holds {ref.n_obs} cells x {ref.n_vars} genes; a labelled "
                                 "reference with cells and genes is needed")
    if type_key not in ref.obs:
        raise InvalidSampleError(f"reference {where} has no obs column {type_key!r} with cell types (its obs columns: "
                                 f"{list(map(str, ref.obs.columns))[:10]}); name the column with prior.type_key")
    counts = ref.layers[Key.COUNTS] if Key.COUNTS in ref.layers else ref.X
    source = f"layers['{Key.COUNTS}']" if Key.COUNTS in ref.layers else "X"
    check_raw_counts(counts.data if sp.issparse(counts) else np.asarray(counts), f"reference {where}", source)


def raw_counts(adata, where: str) -> np.ndarray | sp.spmatrix:
    """``layers["counts"]`` or ``X``, checked to be non-negative integer counts (else a clear error)."""
    source = f"layers['{Key.COUNTS}']" if Key.COUNTS in adata.layers else "X"
    counts = adata.layers[Key.COUNTS] if Key.COUNTS in adata.layers else adata.X
    if counts is None:
        raise InvalidSampleError(f"{where}: no expression matrix (X and layers['counts'] are empty)")
    if not sp.issparse(counts):
        counts = np.asarray(counts)
    check_raw_counts(counts.data if sp.issparse(counts) else counts, where, source)
    return counts


def read_h5ad(
    path: str | os.PathLike,
    image: str | os.PathLike | None = None,
    mpp: float | None = None,
    cell_type_key: str | None = None,
    sample_id: str | None = None,
    spatial_key: str = Key.SPATIAL,
    coords: Coords = "auto",
    xy_columns: Sequence[str] | None = None,
) -> Sample:
    """Read an AnnData + image pair as a Sample.

    Parameters
    ----------
    path
        The .h5ad (cells x genes).
    image
        The H&E image (TIFF/BigTIFF/OME-TIFF, PNG, JPEG; .svs/.ndpi/.mrxs with the ``openslide`` extra); default:
        ``uns["gcmoe"]["image_path"]`` when the file has one.
    mpp
        Micrometres per pixel of the image; default from ``uns["gcmoe"]["mpp"]`` or the image's tags (which must
        agree within 5% when both are known).
    cell_type_key
        An ``obs`` column with cell types, copied to ``obs["cell_type"]`` (routing types follow its names).
    spatial_key
        The ``obsm`` key of the (x, y) centres.
    coords
        Unit of the centres: ``px`` (pixels of ``image``), ``um`` (micrometres from the image's top-left corner,
        divided by the pixel size), ``auto``: ``um`` for a spatialdata-io table, else ``px``. Either way, the
        centres must fit the image and lie at least 2.5 um apart (median nearest neighbour), else an error
        says which unit they look like.
    xy_columns
        Two ``obs`` columns holding x (the image column) and y (the image row), instead of ``obsm``.
    """
    import anndata

    path = Path(path)
    if not path.is_file():
        raise InvalidSampleError(f"AnnData file not found: {path}")
    try:
        adata = anndata.read_h5ad(path)
    except Exception as exc:
        raise InvalidSampleError(f"cannot read {path} as an .h5ad file ({exc}); is it complete?") from exc
    meta = dict(adata.uns.get(Key.UNS, {}) or {})
    if sample_id is None:
        if UnsKey.SAMPLE_ID in meta:
            sample_id = str(meta[UnsKey.SAMPLE_ID])
        elif Key.SAMPLE_ID in adata.obs and adata.obs[Key.SAMPLE_ID].nunique() == 1:
            sample_id = str(adata.obs[Key.SAMPLE_ID].iloc[0])
        else:
            sample_id = path.stem
    if image is None and UnsKey.IMAGE_PATH in meta:
        image = Path(str(meta[UnsKey.IMAGE_PATH]))
        image = image if image.is_absolute() else path.parent / image
    if image is None:
        raise InvalidSampleError(f"{path}: which H&E image do the cells lie on? give it with --image (data.image)")
    raw, where = cell_centres(adata, path, spatial_key, xy_columns)
    slide = open_image(image)
    sources: dict[str, float | None] = {}
    if mpp is None:
        if UnsKey.MPP in meta:
            try:
                stated_mpp = float(meta[UnsKey.MPP])
            except (TypeError, ValueError):
                raise InvalidSampleError(
                    f"{path}: uns['{Key.UNS}']['{UnsKey.MPP}'] must be the pixel size in micrometres per pixel, got "
                    f"{meta[UnsKey.MPP]!r}; correct it, or give the pixel size with --mpp") from None
            sources[f"{path.name}'s uns['{Key.UNS}']['{UnsKey.MPP}']"] = stated_mpp
        stated = image_mpp(image)
        if stated is not None:
            sources[stated[1]] = stated[0]
    mpp, source = choose_mpp(mpp, sources, sample_id, f"not given, not in {path.name}; {no_mpp_reason(Path(image))}")

    unit = resolve_coords(coords, adata, path)
    xy = to_pixels(raw, unit, mpp)
    counts = raw_counts(adata, str(path))
    cell_type = None
    if cell_type_key is None and Key.CELL_TYPE in adata.obs:  # the conventional column: used, and said so
        cell_type_key = Key.CELL_TYPE
        log.info("%s: cell types taken from obs['%s'] (--cell-type-key names another column)", path.name, Key.CELL_TYPE)
    if cell_type_key is not None:
        if cell_type_key not in adata.obs:
            raise InvalidSampleError(
                f"{path}: no obs column {cell_type_key!r} for cell types; obs columns are {list(adata.obs.columns)[:30]}"
            )
        cell_type = adata.obs[cell_type_key].astype(str).to_numpy()
    other = "px" if unit == "um" else "um"
    swap = f"--xy-columns {xy_columns[1]},{xy_columns[0]}" if xy_columns else "swap x and y"
    alternatives = {f"x and y swapped ({swap})": xy[:, ::-1],
                    f"as {'pixels' if other == 'px' else 'micrometres'} (--coords {other})": to_pixels(raw, other, mpp)}
    keep = inside_image(xy, slide.shape, sample_id, mpp, f"{where} ({'micrometres' if unit == 'um' else 'pixels'})",
                        alternatives)
    check_spacing(raw[keep], unit, mpp, sample_id, where)
    obs = adata.obs.drop(columns=[c for c in (Key.SAMPLE_ID, Key.CELL_TYPE) if c in adata.obs]).iloc[np.flatnonzero(keep)]
    obs = obs.reset_index(drop=True)
    if not adata.obs_names.is_unique:
        dup = adata.obs_names[adata.obs_names.duplicated()][:5].tolist()
        raise InvalidSampleError(f"{path}: duplicated cell ids (obs_names), e.g. {dup}; make them unique")
    if not adata.var_names.is_unique:
        dup = adata.var_names[adata.var_names.duplicated()][:5].tolist()
        raise InvalidSampleError(f"{path}: duplicated gene names, e.g. {dup}")
    rows = np.flatnonzero(keep)
    provenance = {"format": "h5ad", "file": str(path.resolve()), "image": str(slide.path), "mpp_source": source,
                  "centres": where, "coords": unit, "cell_type_key": cell_type_key}
    sample = Sample.from_arrays(
        counts[rows], xy[rows], slide, mpp, list(map(str, adata.var_names)), sample_id,
        cell_ids=list(adata.obs_names[rows]), cell_type=None if cell_type is None else cell_type[rows],
        obs=obs if obs.shape[1] else None, provenance=plain_values(provenance, h5ad=True),
    )
    if len(adata.var.columns):
        sample.adata.var = pd.concat([sample.adata.var, adata.var.set_axis(sample.adata.var_names)], axis=1)
    return sample
