"""10x Xenium output folders with a registered H&E image -> :class:`Sample`.

Files read from the Xenium output folder (``outs/``), names as 10x writes them:

- ``experiment.xenium`` (JSON): ``pixel_size`` of the morphology image (0.2125 um), ``analysis_sw_version``,
  ``panel_name``;
- ``cells.parquet`` (or ``cells.csv.gz``): ``cell_id``, ``x_centroid``/``y_centroid`` in micrometres;
- ``cell_feature_matrix.h5`` (10x HDF5 feature-barcode matrix: ``matrix/{data,indices,indptr,shape,barcodes,
  features/{id,name,feature_type,genome}}``, genes x cells, CSC) or the ``cell_feature_matrix/`` MEX folder
  (``matrix.mtx.gz``, ``features.tsv.gz``, ``barcodes.tsv.gz``). Counts are Q20 transcripts; only
  ``feature_type == "Gene Expression"`` features that are not controls are kept;
- the H&E image (``*he_image.ome.tif`` or the ``image`` argument) and its alignment: ``*he_imagealignment.csv``,
  a 3x3 affine (no header) that maps H&E pixels (x, y, 1) to morphology-image pixels (10x's knowledge base;
  spatialdata-io and HEST read it the same way), or a Xenium Explorer keypoints CSV (``fixedX``, ``fixedY``,
  ``alignmentX``, ``alignmentY``; fixed = Xenium, alignment = H&E pixels) from which the affine is fitted.

Cell centres: micrometres / ``pixel_size`` = morphology pixels, then the inverse affine gives H&E pixels. The
H&E pixel size is ``pixel_size x sqrt(|det A|)`` (A the affine's linear part), cross-checked with the image's
OME/TIFF pixel size when it has one.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from gcmoe._constants import Key, UnsKey
from gcmoe.data.image import image_mpp, open_image
from gcmoe.data.readers._common import check_mpp, differs, inside_image, plausible_mpp
from gcmoe.data.readers.polygons import as_str_id
from gcmoe.data.readers.transcripts import is_control_feature
from gcmoe.data.sample import Sample
from gcmoe.errors import InvalidSampleError
from gcmoe.files import plain_values

log = logging.getLogger(__name__)


class XeniumKeys:
    """File, column and field names of a 10x Xenium Onboard Analysis output folder."""

    SPECS = "experiment.xenium"
    PIXEL_SIZE = "pixel_size"
    VERSION = "analysis_sw_version"
    PANEL = "panel_name"
    CELLS = ("cells.parquet", "cells.csv.gz", "cells.csv")
    CELL_ID = "cell_id"
    CELL_X = "x_centroid"
    CELL_Y = "y_centroid"
    MATRIX_H5 = "cell_feature_matrix.h5"
    MATRIX_MEX = "cell_feature_matrix"
    GENE_EXPRESSION = "Gene Expression"
    HE_IMAGE_GLOBS = ("*he_image.ome.tif", "*he_image.ome.tiff", "*he_image.tif")
    ALIGNMENT_GLOB = "*imagealignment.csv"
    KEYPOINTS_GLOB = "*keypoints*.csv"
    KEYPOINT_COLUMNS = ("fixedX", "fixedY", "alignmentX", "alignmentY")
    DEFAULT_PIXEL_SIZE = 0.2125
    KNOWN_MAJOR_VERSIONS = (1, 2, 3, 4)


def is_xenium_folder(path: str | os.PathLike) -> bool:
    """A Xenium output folder holds ``experiment.xenium``."""
    return (Path(path) / XeniumKeys.SPECS).is_file()


def read_alignment(path: str | os.PathLike, pixel_size: float = XeniumKeys.DEFAULT_PIXEL_SIZE,
                   keypoint_units: Literal["um", "px"] = "um") -> np.ndarray:
    """The 3x3 affine from H&E pixels to Xenium morphology-image pixels.

    Reads a 10x ``*_imagealignment.csv`` (3 rows of 3 numbers, no header) as is, or fits the affine by least
    squares to a Xenium Explorer keypoints CSV (``alignmentX/Y`` H&E pixels -> ``fixedX/Y`` Xenium
    coordinates, micrometres unless ``keypoint_units="px"``).
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidSampleError(f"alignment file not found: {path}")
    text = path.read_text().strip()
    first = text.splitlines()[0] if text else ""
    if all(c in first for c in XeniumKeys.KEYPOINT_COLUMNS):
        df = pd.read_csv(path)
        if len(df) < 3:
            raise InvalidSampleError(f"{path}: an affine needs at least 3 keypoints, found {len(df)}")
        src = df[["alignmentX", "alignmentY"]].to_numpy(dtype=np.float64)
        dst = df[["fixedX", "fixedY"]].to_numpy(dtype=np.float64)
        if keypoint_units == "um":
            dst = dst / pixel_size
        design = np.column_stack([src, np.ones(len(src))])
        coef, *_ = np.linalg.lstsq(design, dst, rcond=None)
        matrix = np.vstack([coef.T, [0.0, 0.0, 1.0]])
    else:
        try:
            matrix = np.loadtxt(path, delimiter=",", dtype=np.float64)
        except ValueError as exc:
            raise InvalidSampleError(
                f"{path}: expected a 3x3 affine (3 lines of 3 comma-separated numbers) or a keypoints CSV with "
                f"columns {list(XeniumKeys.KEYPOINT_COLUMNS)} ({exc})"
            ) from exc
    if matrix.shape != (3, 3) or not np.allclose(matrix[2], [0, 0, 1], atol=1e-6):
        raise InvalidSampleError(f"{path}: not a 3x3 affine with last row 0, 0, 1: {matrix.tolist()}")
    if abs(np.linalg.det(matrix[:2, :2])) < 1e-12:
        raise InvalidSampleError(f"{path}: the affine is singular; re-export the alignment")
    return matrix


def read_feature_matrix(path: str | os.PathLike) -> tuple[sp.csr_matrix, list[str], pd.DataFrame]:
    """Cells x features counts (CSR), cell barcodes and a features table (id, name, feature_type) from a 10x
    HDF5 feature-barcode matrix (.h5) or a MEX folder."""
    path = Path(path)
    if path.is_dir():
        return _read_mex(path)
    import h5py

    try:
        with h5py.File(path, "r") as f:
            g = f["matrix"]
            shape = tuple(int(v) for v in g["shape"][()])
            mat = sp.csc_matrix((g["data"][()], g["indices"][()], g["indptr"][()]), shape=shape)
            barcodes = [as_str_id(b) for b in g["barcodes"][()]]
            feats = g["features"]
            table = pd.DataFrame({
                k: [as_str_id(v) for v in feats[k][()]] for k in ("id", "name", "feature_type") if k in feats
            })
    except (OSError, KeyError) as exc:
        raise InvalidSampleError(
            f"cannot read {path} as a 10x HDF5 feature-barcode matrix ({exc}); expected groups "
            "matrix/{data,indices,indptr,shape,barcodes,features/{id,name,feature_type}}"
        ) from exc
    return mat.T.tocsr(), barcodes, table


def _open_text(path: Path):
    return gzip.open(path, "rt") if path.suffix == ".gz" else open(path)


def _read_mex(folder: Path) -> tuple[sp.csr_matrix, list[str], pd.DataFrame]:
    import scipy.io

    def pick(stem: str) -> Path:
        for name in (f"{stem}.gz", stem):
            if (folder / name).is_file():
                return folder / name
        raise InvalidSampleError(f"{folder}: MEX folder lacks {stem}(.gz)")

    with _open_text(pick("matrix.mtx")) as fh:
        mat = sp.csr_matrix(scipy.io.mmread(fh)).T.tocsr()
    with _open_text(pick("barcodes.tsv")) as fh:
        barcodes = [line.strip() for line in fh if line.strip()]
    table = pd.read_csv(pick("features.tsv"), sep="\t", header=None, dtype=str)
    table = table.iloc[:, :3].set_axis(["id", "name", "feature_type"][: table.shape[1]], axis=1)
    return mat, barcodes, table


def _version(specs: dict) -> tuple[int, ...] | None:
    text = str(specs.get(XeniumKeys.VERSION, ""))
    m = re.search(r"(\d+)\.(\d+)\.(\d+)", text)
    return tuple(int(v) for v in m.groups()) if m else None


def read_xenium(
    folder: str | os.PathLike,
    image: str | os.PathLike | None = None,
    alignment: str | os.PathLike | None = None,
    mpp: float | None = None,
    sample_id: str | None = None,
    keypoint_units: Literal["um", "px"] = "um",
) -> Sample:
    """Read a Xenium output folder and its registered H&E as a Sample (files in the module docstring).

    Parameters
    ----------
    folder
        The Xenium output folder (holding ``experiment.xenium``).
    image
        The H&E image; default: the folder's ``*he_image.ome.tif``.
    alignment
        The H&E -> morphology affine CSV or keypoints CSV; default: the folder's ``*he_imagealignment.csv``
        (then ``*keypoints*.csv``). Without one, the H&E is taken to be registered to the morphology image
        pixel for pixel (a warning says so).
    mpp
        Overrides the H&E pixel size derived from the alignment.

    Returns
    -------
    A Sample with the matrix's counts (Gene Expression features), ``obsm["spatial"]`` in H&E pixels,
    ``obsm["spatial_um"]`` the Xenium micrometre centres, the cells.parquet columns in ``obs`` and the files,
    version and pixel sizes in ``uns["gcmoe"]["provenance"]``.
    """
    folder = Path(folder)
    if not is_xenium_folder(folder):
        raise InvalidSampleError(f"{folder} is not a Xenium output folder: it has no {XeniumKeys.SPECS}")
    try:
        specs = json.loads((folder / XeniumKeys.SPECS).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidSampleError(f"cannot read {folder / XeniumKeys.SPECS} as JSON ({exc})") from exc
    version = _version(specs)
    if version is None or version[0] not in XeniumKeys.KNOWN_MAJOR_VERSIONS:
        warnings.warn(
            f"{folder}: Xenium analysis version {specs.get(XeniumKeys.VERSION)!r} is not one this reader was "
            "checked against (1.x-4.x); reading it as the latest known layout", stacklevel=2,
        )
    pixel_size = float(specs.get(XeniumKeys.PIXEL_SIZE, XeniumKeys.DEFAULT_PIXEL_SIZE))
    sample_id = sample_id or str(specs.get("region_name") or specs.get("run_name") or folder.name)

    cells_path = next((folder / n for n in XeniumKeys.CELLS if (folder / n).is_file()), None)
    if cells_path is None:
        raise InvalidSampleError(f"{folder}: no {' / '.join(XeniumKeys.CELLS)} (cell centroids in micrometres)")
    cells = pd.read_parquet(cells_path) if cells_path.suffix == ".parquet" else pd.read_csv(cells_path)
    missing = [c for c in (XeniumKeys.CELL_ID, XeniumKeys.CELL_X, XeniumKeys.CELL_Y) if c not in cells.columns]
    if missing:
        raise InvalidSampleError(f"{cells_path}: missing columns {missing}")
    cells[XeniumKeys.CELL_ID] = [as_str_id(v) for v in cells[XeniumKeys.CELL_ID]]
    if cells[XeniumKeys.CELL_ID].duplicated().any():
        dup = cells.loc[cells[XeniumKeys.CELL_ID].duplicated(), XeniumKeys.CELL_ID].head(5).tolist()
        raise InvalidSampleError(f"{cells_path}: duplicated cell ids, e.g. {dup}")

    matrix_path = folder / XeniumKeys.MATRIX_H5
    if not matrix_path.is_file():
        matrix_path = folder / XeniumKeys.MATRIX_MEX
        if not matrix_path.is_dir():
            raise InvalidSampleError(
                f"{folder}: no {XeniumKeys.MATRIX_H5} or {XeniumKeys.MATRIX_MEX}/ (MEX); the zarr matrix is not "
                "read: export the .h5 or MEX matrix"
            )
    counts, barcodes, features = read_feature_matrix(matrix_path)
    names = features["name"].astype(str).to_numpy() if "name" in features else features["id"].astype(str).to_numpy()
    is_gene = np.array([not is_control_feature(n) for n in names])
    if "feature_type" in features:
        is_gene &= features["feature_type"].astype(str).to_numpy() == XeniumKeys.GENE_EXPRESSION
    if not is_gene.any():
        raise InvalidSampleError(f"{matrix_path}: no Gene Expression feature left after dropping controls")

    # cross-check the cell ids of the two files and put the matrix in cells.parquet's order
    pos = pd.Index(barcodes)
    if not pos.is_unique:
        raise InvalidSampleError(f"{matrix_path}: duplicated cell barcodes")
    rows = pos.get_indexer(cells[XeniumKeys.CELL_ID])
    n_missing = int((rows < 0).sum())
    if n_missing:
        example = cells.loc[rows < 0, XeniumKeys.CELL_ID].head(3).tolist()
        if n_missing == len(rows):
            raise InvalidSampleError(
                f"the cell ids of {cells_path.name} (e.g. {example}) and {matrix_path.name} (e.g. {barcodes[:3]}) do "
                "not match: are both from the same Xenium run?"
            )
        log.warning("%d cells of %s are not in %s and are left out (e.g. %s)", n_missing, cells_path.name,
                    matrix_path.name, example)
    cells = cells.loc[rows >= 0].reset_index(drop=True)
    counts = counts[rows[rows >= 0]][:, np.flatnonzero(is_gene)]

    image_path = Path(image) if image else next(
        (p for g in XeniumKeys.HE_IMAGE_GLOBS for p in sorted(folder.glob(g))), None)
    if image_path is None:
        raise InvalidSampleError(
            f"{folder}: no H&E image found (*he_image.ome.tif); give it with --image (and its alignment CSV)"
        )
    slide = open_image(image_path)
    if alignment is None:
        stem = image_path.name.split(".")[0]
        candidates = sorted(folder.glob(f"{stem}alignment.csv")) + sorted(folder.glob(XeniumKeys.ALIGNMENT_GLOB)) \
            + sorted(image_path.parent.glob(XeniumKeys.ALIGNMENT_GLOB)) + sorted(folder.glob(XeniumKeys.KEYPOINTS_GLOB))
        alignment = candidates[0] if candidates else None
    if alignment is None:
        log.warning("%s: no H&E alignment file; the H&E is taken to be registered to the morphology image "
                    "(1 H&E px = 1 morphology px = %g um)", folder, pixel_size)
        matrix = np.eye(3)
    else:
        matrix = read_alignment(alignment, pixel_size, keypoint_units)

    um = cells[[XeniumKeys.CELL_X, XeniumKeys.CELL_Y]].to_numpy(dtype=np.float64)
    morph = np.column_stack([um / pixel_size, np.ones(len(um))])
    he_xy = (np.linalg.inv(matrix) @ morph.T).T[:, :2]

    mpp_alignment = pixel_size * float(np.sqrt(abs(np.linalg.det(matrix[:2, :2]))))
    stated = image_mpp(image_path)
    mpp_image = stated[0] if stated is not None and plausible_mpp(stated[0]) else None
    if stated is not None and mpp_image is None:
        log.warning("%s: %s gives %.4g um/px, implausible for an H&E image; ignored", image_path.name, stated[1], stated[0])
    if differs(mpp_alignment, mpp_image, 0.1):
        log.warning("%s: the H&E pixel size from the alignment (%.4f um) and from the image's tags (%.4f um) "
                    "differ; using the alignment's (give --mpp to override)", image_path.name, mpp_alignment, mpp_image)
    used = check_mpp(mpp if mpp is not None else mpp_alignment, sample_id,
                     "given" if mpp is not None else "alignment scale x pixel_size")
    keep = inside_image(he_xy, slide.shape, sample_id, used, f"{cells_path.name} through the alignment")
    obs = cells.loc[keep].drop(columns=[XeniumKeys.CELL_ID, XeniumKeys.CELL_X, XeniumKeys.CELL_Y]).reset_index(drop=True)
    obs = obs.loc[:, [c for c in obs.columns if obs[c].dtype.kind in "biufO" or str(obs[c].dtype) == "category"]]
    for c in obs.columns:
        if obs[c].dtype.kind == "O":
            obs[c] = obs[c].map(as_str_id)
    provenance = {
        "format": "xenium",
        "folder": str(folder.resolve()),
        "files": {"cells": str(cells_path), "matrix": str(matrix_path), "image": str(image_path),
                  "alignment": str(alignment) if alignment else None},
        "analysis_sw_version": specs.get(XeniumKeys.VERSION),
        "panel_name": specs.get(XeniumKeys.PANEL),
        "xenium_pixel_size_um": pixel_size,
        "alignment_he_to_morphology_px": matrix,
        "mpp_alignment": mpp_alignment,
        "mpp_image_tags": mpp_image,
        "features_dropped": int((~is_gene).sum()),
    }
    sample = Sample.from_arrays(
        counts[np.flatnonzero(keep)], he_xy[keep], slide, used, list(names[is_gene]), sample_id,
        cell_ids=cells.loc[keep, XeniumKeys.CELL_ID].tolist(), obs=obs, provenance=plain_values(provenance, h5ad=True),
    )
    sample.adata.obsm["spatial_um"] = um[keep]
    if mpp_image is not None and differs(mpp_image, used):
        sample.adata.uns[Key.UNS][UnsKey.MPP_EMBEDDED] = float(mpp_image)
    return sample
