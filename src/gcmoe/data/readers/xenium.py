"""10x Xenium output folders with a registered H&E image -> :class:`Sample`.

Files read from the Xenium output folder (``outs/``), names as 10x writes them:

- ``experiment.xenium`` (JSON): ``pixel_size`` of the morphology image (0.2125 um), ``analysis_sw_version``,
  ``panel_name``;
- ``cells.parquet`` (or ``cells.csv.gz``): ``cell_id``, ``x_centroid``/``y_centroid`` in micrometres;
- ``cell_feature_matrix.h5`` (10x HDF5 feature-barcode matrix: ``matrix/{data,indices,indptr,shape,barcodes,
  features/{id,name,feature_type,genome}}``, genes x cells, CSC) or the ``cell_feature_matrix/`` MEX folder
  (``matrix.mtx.gz``, ``features.tsv.gz``, ``barcodes.tsv.gz``). Counts are Q20 transcripts; only
  ``feature_type == "Gene Expression"`` features that are not controls are kept;
- the H&E image (``*he_image.ome.tif`` or the ``image`` argument) and its alignment, found in this order:
  10x's ``*he_imagealignment.csv``; Xenium Explorer's "Download Alignment File" exports: the transformation matrix
  alone (``<image>_matrix.csv``), both boxes ticked (``*_alignment_files.zip`` holding ``matrix.csv`` and the
  keypoints CSV), the keypoints alone (``*keypoints*.csv``: ``fixedX``, ``fixedY`` on the Xenium side,
  ``alignmentX``, ``alignmentY`` in H&E pixels). A matrix is a 3x3 affine (no header) mapping H&E pixels
  (x, y, 1) to morphology-image pixels (10x's knowledge base; spatialdata-io and HEST read it the same way); an
  affine is fitted to keypoints, whose Xenium-side unit is settled from the data (docs/data.md). Without any,
  the read stops unless ``alignment="identity"`` (the H&E is the morphology image's pixel grid), which is refused
  when the H&E's own pixel size is not Xenium's.

Cell centres: micrometres / ``pixel_size`` = morphology pixels, then the inverse affine gives H&E pixels. The
H&E pixel size is ``pixel_size x sqrt(|det A|)`` (A the affine's linear part), cross-checked with the image's
OME/TIFF pixel size when it has one.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import re
import warnings
import zipfile
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

KeypointUnits = Literal["auto", "um", "px"]
HE_SCAN_MPP = (0.12, 1.0)  # um/px of H&E scans (40x ~0.25, 20x ~0.5, 10x ~1.0); settles keypoint units when nothing else does


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
    ALIGNMENT_GLOB = "*imagealignment.csv"  # 10x's H&E alignment (a 3x3 matrix)
    EXPLORER_MATRIX_GLOB = "*matrix.csv"  # Xenium Explorer, "Transformation Matrix" only: <image>_matrix.csv
    EXPLORER_ZIP_GLOB = "*alignment_files.zip"  # Xenium Explorer, matrix + keypoints
    KEYPOINTS_GLOB = "*keypoints*.csv"  # Xenium Explorer, keypoints only
    NOT_ALIGNMENT = ("cell_feature_matrix",)  # file names the globs above must not pick up
    KEYPOINT_COLUMNS = ("fixedX", "fixedY", "alignmentX", "alignmentY")
    IDENTITY = "identity"  # alignment="identity": the H&E is the morphology image's pixel grid
    DEFAULT_PIXEL_SIZE = 0.2125
    KNOWN_MAJOR_VERSIONS = (1, 2, 3, 4)


def is_xenium_folder(path: str | os.PathLike) -> bool:
    """A Xenium output folder holds ``experiment.xenium``."""
    return (Path(path) / XeniumKeys.SPECS).is_file()


def read_alignment(path: str | os.PathLike, pixel_size: float = XeniumKeys.DEFAULT_PIXEL_SIZE,
                   keypoint_units: KeypointUnits = "auto", he_mpp: float | None = None) -> np.ndarray:
    """The 3x3 affine from H&E pixels to Xenium morphology-image pixels.

    Reads a 3x3 matrix CSV (10x's ``*_imagealignment.csv``, Xenium Explorer's ``<image>_matrix.csv``; 3 rows of
    3 numbers, no header) as is; a Xenium Explorer ``*_alignment_files.zip`` through its ``matrix.csv`` (its
    keypoints, when present, are checked against the matrix); a keypoints CSV (``alignmentX/Y`` H&E pixels ->
    ``fixedX/Y``) by a least-squares fit over all points, with ``fixedX/Y`` read as ``keypoint_units``: ``um``,
    ``px`` (morphology pixels) or ``auto`` (:func:`keypoint_units_of`, using ``he_mpp`` when known).
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidSampleError(f"alignment file not found: {path}")
    if zipfile.is_zipfile(path):
        return _read_explorer_zip(path, pixel_size, keypoint_units, he_mpp)
    text = path.read_text().strip()
    first = text.splitlines()[0] if text else ""
    if all(c in first for c in XeniumKeys.KEYPOINT_COLUMNS):
        src, dst = _keypoints(pd.read_csv(path), path)
        units = keypoint_units if keypoint_units != "auto" else keypoint_units_of(src, dst, pixel_size, he_mpp, path)
        return _fit_affine(src, dst / pixel_size if units == "um" else dst, path)
    return _parse_matrix(text, path)


def _parse_matrix(text: str, where: Path | str) -> np.ndarray:
    """A 3x3 affine from CSV text, checked (last row 0 0 1, not singular)."""
    try:
        matrix = np.loadtxt(io.StringIO(text), delimiter=",", dtype=np.float64)
    except ValueError as exc:
        raise InvalidSampleError(
            f"{where}: expected a 3x3 affine (3 lines of 3 comma-separated numbers) or a keypoints CSV with "
            f"columns {list(XeniumKeys.KEYPOINT_COLUMNS)} ({exc})"
        ) from exc
    if matrix.shape != (3, 3) or not np.allclose(matrix[2], [0, 0, 1], atol=1e-6):
        raise InvalidSampleError(f"{where}: not a 3x3 affine with last row 0, 0, 1: {matrix.tolist()}")
    if abs(np.linalg.det(matrix[:2, :2])) < 1e-12:
        raise InvalidSampleError(f"{where}: the affine is singular; re-export the alignment")
    return matrix


def _keypoints(df: pd.DataFrame, where: Path | str) -> tuple[np.ndarray, np.ndarray]:
    """(H&E pixels, Xenium side) of a keypoints table, at least 3 of them."""
    missing = [c for c in XeniumKeys.KEYPOINT_COLUMNS if c not in df.columns]
    if missing:
        raise InvalidSampleError(f"{where}: keypoints CSV without columns {missing}")
    if len(df) < 3:
        raise InvalidSampleError(f"{where}: an affine needs at least 3 keypoints, found {len(df)}")
    return df[["alignmentX", "alignmentY"]].to_numpy(np.float64), df[["fixedX", "fixedY"]].to_numpy(np.float64)


def _fit_affine(src: np.ndarray, dst: np.ndarray, where: Path | str) -> np.ndarray:
    """Least-squares affine (3x3) taking ``src`` to ``dst``."""
    design = np.column_stack([src, np.ones(len(src))])
    coef, *_ = np.linalg.lstsq(design, dst, rcond=None)
    matrix = np.vstack([coef.T, [0.0, 0.0, 1.0]])
    if abs(np.linalg.det(matrix[:2, :2])) < 1e-12:
        raise InvalidSampleError(f"{where}: the keypoints are collinear (singular affine); place them apart")
    return matrix


def alignment_mpp(matrix: np.ndarray, pixel_size: float) -> float:
    """The H&E pixel size an H&E -> morphology-pixel affine implies: ``pixel_size x sqrt(|det A|)``."""
    return pixel_size * float(np.sqrt(abs(np.linalg.det(matrix[:2, :2]))))


def keypoint_units_of(src: np.ndarray, dst: np.ndarray, pixel_size: float, he_mpp: float | None,
                      where: Path | str) -> Literal["um", "px"]:
    """Whether keypoints' ``fixedX/Y`` are micrometres or morphology pixels, from the pixel size each reading implies.

    Read in the wrong unit, the fitted scale is off by ``pixel_size`` (0.2125), so the H&E pixel size it implies
    is 4.7x too small or too large. The reading that agrees within 10% with ``he_mpp`` (the image's own or
    ``--mpp``) wins; without it, the one inside the range of H&E scans (:data:`HE_SCAN_MPP`); else an error.
    """
    implied = {units: alignment_mpp(_fit_affine(src, dst / pixel_size if units == "um" else dst, where), pixel_size)
               for units in ("um", "px")}
    if he_mpp is not None:
        fitting = [u for u, v in implied.items() if not differs(v, he_mpp, 0.1)]
    else:
        lo, hi = HE_SCAN_MPP
        fitting = [u for u, v in implied.items() if lo <= v <= hi]
    if len(fitting) == 1:
        log.info("%s: fixedX/fixedY read as %s (the H&E would be %.4g um/px; as %s, %.4g)", Path(where).name,
                 fitting[0], implied[fitting[0]], *[(u, v) for u, v in implied.items() if u != fitting[0]][0])
        return fitting[0]  # type: ignore[return-value]
    raise InvalidSampleError(
        f"{where}: cannot tell whether fixedX/fixedY are micrometres or morphology pixels: as micrometres the H&E "
        f"would be {implied['um']:.4g} um/px, as pixels {implied['px']:.4g} um/px"
        + (f", and the H&E's pixel size is {he_mpp:.4g}" if he_mpp is not None else "")
        + "; give --keypoint-units um or px (or --mpp, the H&E's pixel size)"
    )


def _read_explorer_zip(path: Path, pixel_size: float, keypoint_units: KeypointUnits, he_mpp: float | None) -> np.ndarray:
    """The matrix of a Xenium Explorer ``*_alignment_files.zip``; its keypoints, when present, must agree with it."""
    with zipfile.ZipFile(path) as zf:
        names = [n for n in zf.namelist() if n.lower().endswith(".csv")]
        matrices = [n for n in names if n.lower().endswith("matrix.csv")]
        keypoints = [n for n in names if "keypoint" in n.lower()]
        if not matrices and not keypoints:
            raise InvalidSampleError(f"{path}: holds no matrix.csv nor keypoints CSV (found {zf.namelist()})")
        texts = {n: zf.read(n).decode("utf-8-sig") for n in matrices[:1] + keypoints[:1]}
    if not matrices:
        src, dst = _keypoints(pd.read_csv(io.StringIO(texts[keypoints[0]])), f"{path}:{keypoints[0]}")
        units = keypoint_units if keypoint_units != "auto" else \
            keypoint_units_of(src, dst, pixel_size, he_mpp, f"{path}:{keypoints[0]}")
        return _fit_affine(src, dst / pixel_size if units == "um" else dst, path)
    matrix = _parse_matrix(texts[matrices[0]], f"{path}:{matrices[0]}")
    if keypoints:
        src, dst = _keypoints(pd.read_csv(io.StringIO(texts[keypoints[0]])), f"{path}:{keypoints[0]}")
        agree = [u for u in ("um", "px") if _agrees(_fit_affine(src, dst / pixel_size if u == "um" else dst, path),
                                                    matrix, src)]
        if agree:
            log.info("%s: its keypoints agree with its matrix when fixedX/fixedY are read as %s", path.name, agree[0])
        else:
            log.warning("%s: its keypoints agree with its matrix in no unit (micrometres or pixels); the matrix is "
                        "used", path.name)
    return matrix


def _agrees(a: np.ndarray, b: np.ndarray, points: np.ndarray, tolerance_px: float = 2.0) -> bool:
    """True when two affines place ``points`` within ``tolerance_px`` morphology pixels of each other."""
    homog = np.column_stack([points, np.ones(len(points))])
    return bool(np.max(np.abs((a @ homog.T) - (b @ homog.T))) <= tolerance_px)


def find_alignment(folder: Path, image_path: Path) -> Path | None:
    """The H&E alignment file of a Xenium folder (order in the module docstring), or None."""
    stem = image_path.name.split(".")[0]
    places = [folder] + ([image_path.parent] if image_path.parent.resolve() != folder.resolve() else [])
    globs = (f"{stem}alignment.csv", XeniumKeys.ALIGNMENT_GLOB, f"{stem}*matrix.csv", XeniumKeys.EXPLORER_MATRIX_GLOB,
             XeniumKeys.EXPLORER_ZIP_GLOB, XeniumKeys.KEYPOINTS_GLOB)
    for pattern in globs:
        for place in places:
            found = [p for p in sorted(place.glob(pattern)) if not p.name.startswith(XeniumKeys.NOT_ALIGNMENT)]
            if found:
                if len(found) > 1:
                    log.warning("%s: several alignment files match %s %s; using %s (give --alignment to choose)",
                                place, pattern, [p.name for p in found], found[0].name)
                return found[0]
    return None


def check_identity(he_mpp: float | None, source: str, pixel_size: float, image_path: Path) -> None:
    """Refuse ``alignment="identity"`` when the H&E's physical pixel size is not Xenium's (more than 5% apart)."""
    if he_mpp is not None and differs(he_mpp, pixel_size):
        raise InvalidSampleError(
            f"{image_path.name}: --alignment identity maps one H&E pixel onto one morphology-image pixel "
            f"({pixel_size:g} um), but the H&E's pixel size is {he_mpp:.4g} um/px ({source}): it is not on the "
            "morphology image's pixel grid; align it in Xenium Explorer and give the exported file with --alignment"
        )


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


def gene_features(features: pd.DataFrame, where: Path) -> tuple[np.ndarray, np.ndarray]:
    """Feature names and a mask of the genes among them: ``feature_type == "Gene Expression"`` (when the table has
    types) and not a control (:func:`gcmoe.data.readers.transcripts.is_control_feature`); an error when none is."""
    names = features["name"].astype(str).to_numpy() if "name" in features else features["id"].astype(str).to_numpy()
    is_gene = np.array([not is_control_feature(n) for n in names])
    if "feature_type" in features:
        is_gene &= features["feature_type"].astype(str).to_numpy() == XeniumKeys.GENE_EXPRESSION
    if not is_gene.any():
        raise InvalidSampleError(f"{where}: no Gene Expression feature left after dropping controls")
    return names, is_gene


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
    keypoint_units: KeypointUnits = "auto",
) -> Sample:
    """Read a Xenium output folder and its registered H&E as a Sample (files in the module docstring).

    Parameters
    ----------
    folder
        The Xenium output folder (holding ``experiment.xenium``).
    image
        The H&E image; default: the folder's ``*he_image.ome.tif``.
    alignment
        The H&E -> morphology alignment: a matrix CSV, a Xenium Explorer ``*_alignment_files.zip`` or keypoints
        CSV; default: found in the folder (:func:`find_alignment`). ``"identity"``: the H&E is the morphology
        image's pixel grid (refused when the H&E states another pixel size). Neither given nor found: an error.
    mpp
        Overrides the H&E pixel size derived from the alignment.
    keypoint_units
        Unit of a keypoints CSV's ``fixedX``/``fixedY``: ``um``, ``px`` (morphology pixels) or ``auto``
        (:func:`keypoint_units_of`).

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
    names, is_gene = gene_features(features, matrix_path)

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
    stated = image_mpp(image_path)
    mpp_image = stated[0] if stated is not None and plausible_mpp(stated[0]) else None
    if stated is not None and mpp_image is None:
        log.warning("%s: %s gives %.4g um/px, implausible for an H&E image; ignored", image_path.name, stated[1], stated[0])
    he_mpp, he_source = (mpp, "--mpp") if mpp is not None else (mpp_image, stated[1] if mpp_image else "")
    if alignment is None:
        alignment = find_alignment(folder, image_path)
        if alignment is None:
            raise InvalidSampleError(
                f"{folder}: no alignment of the H&E {image_path.name} to the Xenium data found (looked for 10x's "
                "*he_imagealignment.csv and Xenium Explorer's *_matrix.csv, *_alignment_files.zip, *keypoints*.csv); "
                "give it with --alignment FILE, or --alignment identity if the H&E is the morphology image's pixel grid"
            )
    if str(alignment) == XeniumKeys.IDENTITY:
        check_identity(he_mpp, he_source, pixel_size, image_path)
        log.warning("%s: --alignment identity: the H&E is taken as the morphology image's pixel grid "
                    "(1 H&E px = 1 morphology px = %g um)", image_path.name, pixel_size)
        matrix, alignment = np.eye(3), XeniumKeys.IDENTITY
    else:
        matrix = read_alignment(alignment, pixel_size, keypoint_units, he_mpp)

    um = cells[[XeniumKeys.CELL_X, XeniumKeys.CELL_Y]].to_numpy(dtype=np.float64)
    morph = np.column_stack([um / pixel_size, np.ones(len(um))])
    he_xy = (np.linalg.inv(matrix) @ morph.T).T[:, :2]

    mpp_alignment = alignment_mpp(matrix, pixel_size)
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
