"""10x Visium HD cell segmentation (Space Ranger 4 ``segmented_outputs/``) + the microscope H&E -> :class:`Sample`.

Space Ranger 4 segments nuclei on the H&E given to ``spaceranger count --image``, expands them into cells and
sums the 2 um barcodes of each cell. Files read from ``outs/segmented_outputs/`` (10x's "Segmented Outputs"
page; spatialdata-io's ``visium_hd`` reader reads the same files):

- ``filtered_feature_cell_matrix.h5`` (10x HDF5 feature-barcode matrix; barcodes ``cellid_000000001-1``) or the
  ``filtered_feature_cell_matrix/`` MEX folder: counts per cell; only ``Gene Expression`` features are kept;
- ``cell_segmentations.geojson`` (or ``nucleus_segmentations.geojson`` with ``segmentation="nucleus"``): a
  FeatureCollection, one Polygon per cell in full-resolution pixels of the microscope image,
  ``properties.cell_id`` the integer of the barcode (``cellid_{cell_id:09d}-1``);
- ``spatial/scalefactors_json.json``: ``microns_per_pixel`` of the microscope image.

The H&E itself is the user's input to Space Ranger, not part of ``outs/``: ``image``, else a file in
``outs/microscope_image/`` (where spatialdata-io looks), else an error asking for ``--image``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from gcmoe.data.image import image_mpp, open_image
from gcmoe.data.readers._common import choose_mpp, inside_image
from gcmoe.data.readers.polygons import Polygons, read_polygons
from gcmoe.data.readers.xenium import gene_features, read_feature_matrix
from gcmoe.data.sample import Sample
from gcmoe.errors import InvalidSampleError
from gcmoe.files import plain_values

log = logging.getLogger(__name__)


class VisiumHDKeys:
    """File and field names of Space Ranger 4's Visium HD ``segmented_outputs/``."""

    SEGMENTED = "segmented_outputs"
    MATRIX_H5 = "filtered_feature_cell_matrix.h5"
    MATRIX_MEX = "filtered_feature_cell_matrix"
    CELLS = "cell_segmentations.geojson"
    NUCLEI = "nucleus_segmentations.geojson"
    SCALEFACTORS = ("spatial", "scalefactors_json.json")
    MICRONS_PER_PIXEL = "microns_per_pixel"
    BARCODE = "cellid_{:09d}-1"  # properties.cell_id -> matrix barcode
    MICROSCOPE_IMAGE_DIR = "microscope_image"


def segmented_outputs(path: str | os.PathLike) -> Path | None:
    """The ``segmented_outputs`` folder of a Space Ranger ``outs/`` (or the folder itself), or None."""
    path = Path(path)
    for folder in (path / VisiumHDKeys.SEGMENTED, path):
        if (folder / VisiumHDKeys.CELLS).is_file() and (
                (folder / VisiumHDKeys.MATRIX_H5).is_file() or (folder / VisiumHDKeys.MATRIX_MEX).is_dir()):
            return folder
    return None


def is_visium_hd_folder(path: str | os.PathLike) -> bool:
    """Space Ranger ``outs/`` (or its ``segmented_outputs/``) with a cell matrix and ``cell_segmentations.geojson``."""
    return Path(path).is_dir() and segmented_outputs(path) is not None


def _barcode(cell_id: str) -> str:
    """The matrix barcode of a GeoJSON ``cell_id`` (an integer; a barcode already is one)."""
    return VisiumHDKeys.BARCODE.format(int(cell_id)) if cell_id.isdigit() else cell_id


def _microns_per_pixel(seg: Path) -> tuple[float | None, Path]:
    path = seg.joinpath(*VisiumHDKeys.SCALEFACTORS)
    if not path.is_file():
        return None, path
    try:
        value = json.loads(path.read_text()).get(VisiumHDKeys.MICRONS_PER_PIXEL)
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidSampleError(f"cannot read {path} as JSON ({exc})") from exc
    return (float(value) if value else None), path


def _find_image(outs: Path) -> Path | None:
    folder = outs / VisiumHDKeys.MICROSCOPE_IMAGE_DIR
    files = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    if len(files) > 1:
        raise InvalidSampleError(f"{folder} holds several images {[p.name for p in files]}; choose one with --image")
    return files[0] if files else None


def read_visium_hd(
    folder: str | os.PathLike,
    image: str | os.PathLike | None = None,
    mpp: float | None = None,
    sample_id: str | None = None,
    segmentation: Literal["cell", "nucleus"] = "cell",
) -> Sample:
    """Read Space Ranger's Visium HD cell segmentation and its microscope H&E as a Sample (files in the module
    docstring).

    Parameters
    ----------
    folder
        Space Ranger's ``outs/`` or its ``segmented_outputs/``.
    image
        The full-resolution microscope H&E given to ``spaceranger count --image``; default: the one file in
        ``outs/microscope_image/``.
    mpp
        Overrides ``microns_per_pixel`` of ``scalefactors_json.json`` (which must otherwise agree within 5% with
        what the image states, when it states one).
    segmentation
        Which polygons give the centres: the cells (nucleus expanded) or the nuclei. Counts are the cells' either way.

    Returns
    -------
    A Sample with the cells' counts (Gene Expression features), ``obsm["spatial"]`` the polygon centroids in
    microscope-image pixels, ``obs["area_um2"]`` and the files in ``uns["gcmoe"]["provenance"]``.
    """
    folder = Path(folder)
    seg = segmented_outputs(folder)
    if seg is None:
        raise InvalidSampleError(
            f"{folder}: no Visium HD cell segmentation: expected {VisiumHDKeys.SEGMENTED}/{VisiumHDKeys.CELLS} and "
            f"{VisiumHDKeys.MATRIX_H5} (Space Ranger 4 with segmentation); binned outputs are squares, not cells"
        )
    if segmentation not in ("cell", "nucleus"):
        raise InvalidSampleError(f"unknown Visium HD segmentation {segmentation!r}; choose cell or nucleus")
    outs = seg.parent if seg.name == VisiumHDKeys.SEGMENTED else seg
    if sample_id is None:  # Space Ranger writes <sample>/outs/
        sample_id = outs.parent.name if outs.name == "outs" else outs.name
    matrix_path = seg / VisiumHDKeys.MATRIX_H5
    if not matrix_path.is_file():
        matrix_path = seg / VisiumHDKeys.MATRIX_MEX
    counts, barcodes, features = read_feature_matrix(matrix_path)
    names, is_gene = gene_features(features, matrix_path)

    poly_path = seg / (VisiumHDKeys.NUCLEI if segmentation == "nucleus" else VisiumHDKeys.CELLS)
    polygons = read_polygons(poly_path)
    poly_barcodes = [_barcode(i) for i in polygons.ids]
    rows = pd.Index(barcodes).get_indexer(poly_barcodes)
    found = rows >= 0
    if not found.any():
        raise InvalidSampleError(
            f"the cell ids of {poly_path.name} (e.g. {poly_barcodes[:3]}) and {matrix_path.name} (e.g. {barcodes[:3]}) "
            "do not match: are both from the same Space Ranger run?"
        )
    if (~found).any():
        log.info("%s: %d polygons without a cell in %s (filtered cells only) are left out", poly_path.name,
                 int((~found).sum()), matrix_path.name)
    n_unplaced = len(barcodes) - int(found.sum())
    if n_unplaced:
        log.warning("%d cells of %s have no polygon in %s and are left out", n_unplaced, matrix_path.name, poly_path.name)
    kept = Polygons([polygons.ids[i] for i in np.flatnonzero(found)], [polygons.rings[i] for i in np.flatnonzero(found)])

    image_path = Path(image) if image else _find_image(outs)
    if image_path is None:
        raise InvalidSampleError(
            f"{outs}: which H&E were the cells segmented on? Space Ranger does not copy the full-resolution "
            "microscope image into outs/: give it with --image (the file passed to spaceranger count --image)"
        )
    slide = open_image(image_path)
    scale_mpp, scale_path = _microns_per_pixel(seg)
    stated = image_mpp(image_path) if mpp is None else None
    sources = {f"{seg.name}/{'/'.join(VisiumHDKeys.SCALEFACTORS)}'s {VisiumHDKeys.MICRONS_PER_PIXEL}": scale_mpp}
    if stated is not None:
        sources[stated[1]] = stated[0]
    used, source = choose_mpp(mpp, sources, sample_id, unknown=f"{scale_path} not found and {image_path.name} states none")

    xy = kept.centroids()
    keep = inside_image(xy, slide.shape, sample_id, used, poly_path.name)
    idx = np.flatnonzero(keep)
    obs = pd.DataFrame({"area_um2": kept.areas()[idx] * used**2})
    provenance = {"format": "visium_hd", "folder": str(outs.resolve()), "segmentation": segmentation,
                  "files": {"matrix": str(matrix_path), "polygons": str(poly_path), "image": str(image_path),
                            "scalefactors": str(scale_path) if scale_mpp is not None else None},
                  "mpp_source": source, "features_dropped": int((~is_gene).sum())}
    return Sample.from_arrays(
        counts[rows[found][idx]][:, np.flatnonzero(is_gene)], xy[idx], slide, used, list(names[is_gene]), sample_id,
        cell_ids=[_barcode(kept.ids[i]) for i in idx], obs=obs, provenance=plain_values(provenance, h5ad=True),
    )
