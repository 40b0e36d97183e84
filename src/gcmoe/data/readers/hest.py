"""HEST-1k Xenium samples -> single-cell :class:`Sample`.

HEST's ``st/{id}.h5ad`` for Xenium holds 100 um pseudo-spots, not cells, so cells are rebuilt here from the
transcripts (already registered to the H&E by HEST: ``he_x``/``he_y`` in full-resolution H&E pixels) and the
10x cell segmentation that HEST warped onto the H&E (``xenium_seg/``). Files read, for sample ``{id}``:

- ``wsis/{id}.tif``: the pyramidal H&E (generic TIFF/BigTIFF);
- ``metadata/{id}.json``: ``pixel_size_um_estimated`` (what HEST itself uses, preferred here) and
  ``pixel_size_um_embedded`` (from the TIFF tags, which HEST writes 10x off: recorded, never used);
  ``st_technology`` must be Xenium;
- ``st/{id}.h5ad`` (optional): HEST's 100 um pseudo-spots; only ``obsm["spatial"]`` is read, to measure the
  pixel size from the spot spacing and cross-check ``pixel_size_um_estimated`` with it;
- ``transcripts/{id}_transcripts.parquet``: one row per transcript, ``feature_name``, ``qv``, ``cell_id``,
  ``he_x``/``he_y``;
- ``xenium_seg/{id}_xenium_cell_seg.parquet`` (or ``_nucleus_seg``): GeoParquet, one polygon per cell in
  H&E pixels, the cell id as a column or as the stored index. Optional: without it, cells are the transcripts'
  ``cell_id`` groups and their centres the mean transcript position;
- ``cellvit_seg/{id}_cellvit_seg.parquet`` (or ``.geojson``), with ``segmentation="cellvit"``: CellViT's nuclei
  segmented on the H&E by HEST (GeoParquet: ``geometry``, ``class`` = PanNuke type, ``cell_id`` = running
  number; the GeoJSON holds one MultiPolygon per class, parts numbered the same way). Cells are the nuclei,
  transcripts are assigned to the nucleus that contains them (their ``cell_id`` belongs to the 10x
  segmentation, not to CellViT's), and ``obs["cellvit_class"]`` keeps the class.

HEST's zipped GeoJSON (``*.geojson.zip``; for ``xenium_seg`` the cells dealt into 10 chunks without their ids)
is never read: the parquet of the same segmentation is, and a folder that only has the zip is refused with that
advice.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from gcmoe._constants import Key, UnsKey
from gcmoe.data.image import open_image
from gcmoe.data.readers._common import choose_mpp, differs, inside_image
from gcmoe.data.readers.polygons import read_polygons
from gcmoe.data.readers.transcripts import MIN_QV, aggregate_transcripts
from gcmoe.data.sample import Sample
from gcmoe.errors import InvalidSampleError
from gcmoe.files import plain_values

log = logging.getLogger(__name__)

MIN_SPOTS = 4  # spots needed to measure their spacing (a 300 um wide crop holds a 3 x 3 grid)


class HestKeys:
    """File and field names of a HEST-1k download (github.com/mahmoodlab/HEST, huggingface MahmoodLab/hest)."""

    WSI_DIR = "wsis"
    META_DIR = "metadata"
    TRANSCRIPTS_DIR = "transcripts"
    SEG_DIR = "xenium_seg"
    CELLVIT_DIR = "cellvit_seg"
    CELLVIT = "{id}_cellvit_seg"  # + .parquet (or .geojson; HEST zips it: .geojson.zip)
    CELLVIT_CLASS = "cellvit_class"  # obs column of the CellViT (PanNuke) nucleus class
    ST_DIR = "st"
    ST = "{id}.h5ad"
    SPOT_SPACING = "inter_spot_dist"  # metadata: centre-to-centre distance of the (pseudo-)spots, um
    XENIUM_SPOT_UM = 100.0  # HEST pools Xenium transcripts into square 100 um pseudo-spots
    WSI = "{id}.tif"
    META = "{id}.json"
    TRANSCRIPTS = "{id}_transcripts.parquet"
    SEG = "{id}_xenium_{kind}_seg"  # + .parquet (or .geojson)
    MPP_ESTIMATED = "pixel_size_um_estimated"
    MPP_EMBEDDED = "pixel_size_um_embedded"
    TECHNOLOGY = "st_technology"
    X = "he_x"
    Y = "he_y"
    KEPT_META = ("st_technology", "species", "organ", "oncotree_code", "disease_state", "dataset_title", "tissue",
                 "preservation_method", "fullres_px_width", "fullres_px_height", "magnification")


def is_hest_root(path: str | os.PathLike) -> bool:
    """A HEST root holds ``wsis/`` and ``metadata/`` folders."""
    path = Path(path)
    return path.is_dir() and (path / HestKeys.WSI_DIR).is_dir() and (path / HestKeys.META_DIR).is_dir()


def list_hest_samples(root: str | os.PathLike) -> list[str]:
    """Sample ids of a HEST root that have both a WSI and a metadata file, sorted."""
    root = Path(root)
    wsis = {p.name[: -len(".tif")] for p in (root / HestKeys.WSI_DIR).glob("*.tif")}
    metas = {p.stem for p in (root / HestKeys.META_DIR).glob("*.json")}
    return sorted(wsis & metas)


def _find(folder: Path, name: str) -> Path | None:
    exact = folder / name
    if exact.is_file():
        return exact
    found = sorted(folder.glob(f"*{name}")) if folder.is_dir() else []
    return found[0] if found else None


def read_hest(
    root: str | os.PathLike,
    sample_id: str | None = None,
    mpp: float | None = None,
    segmentation: Literal["cell", "nucleus", "cellvit", "none"] = "cell",
    assign: Literal["auto", "cell_id", "polygons"] = "auto",
    min_qv: float = MIN_QV,
    progress: bool = True,
) -> Sample:
    """Read one HEST-1k Xenium sample as a single-cell Sample (files listed in the module docstring).

    Parameters
    ----------
    root
        The HEST folder holding ``wsis/``, ``metadata/``, ``transcripts/`` and ``xenium_seg/``.
    sample_id
        The HEST id (e.g. ``TENX95``); may be omitted when the root holds a single sample.
    mpp
        Overrides the pixel size. Without it, ``pixel_size_um_estimated`` is used after a cross-check with the
        spot spacing of ``st/{id}.h5ad`` (when present): more than 5% apart stops with both values.
    segmentation
        Which segmentation gives the cells and their centres: 10x's whole cells or nuclei, CellViT's nuclei
        segmented on the H&E (``cellvit_seg/``; transcripts assigned by polygon); "none" uses the transcripts'
        cell_id groups and their mean positions.
    assign
        How transcripts find their cell: the file's ``cell_id`` ("auto" when present) or the polygons.

    Returns
    -------
    A Sample whose ``layers["counts"]`` are Q``min_qv`` transcripts per cell (controls dropped),
    ``obsm["spatial"]`` polygon centroids in H&E pixels, ``obs["n_transcripts"]``, ``obs["area_um2"]`` (with a
    segmentation), and ``uns["gcmoe"]["provenance"]`` with the files, both pixel sizes and the filter tallies.
    """
    root = Path(root)
    if not is_hest_root(root):
        raise InvalidSampleError(f"{root} is not a HEST-1k folder: it needs wsis/ and metadata/ sub-folders")
    ids = list_hest_samples(root)
    if sample_id is None:
        if len(ids) != 1:
            raise InvalidSampleError(
                f"{root} holds {len(ids)} HEST samples {ids[:10]}; choose one with --sample-id (or data.sample_ids)"
            )
        sample_id = ids[0]
    if sample_id not in ids:
        raise InvalidSampleError(f"HEST sample {sample_id!r} not found in {root} (wsis/ + metadata/); available: {ids[:20]}")

    meta_path = root / HestKeys.META_DIR / HestKeys.META.format(id=sample_id)
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidSampleError(f"cannot read HEST metadata {meta_path} ({exc})") from exc
    tech = str(meta.get(HestKeys.TECHNOLOGY, "Xenium"))
    if "xenium" not in tech.lower():
        raise InvalidSampleError(
            f"HEST sample {sample_id} is {tech}, not Xenium: only Xenium samples have single-cell transcripts; "
            "spot data (Visium, ST) cannot give per-cell expression"
        )
    estimated = _float_or_none(meta.get(HestKeys.MPP_ESTIMATED))
    embedded = _float_or_none(meta.get(HestKeys.MPP_EMBEDDED))
    st_path = root / HestKeys.ST_DIR / HestKeys.ST.format(id=sample_id)
    spacing_um = _float_or_none(meta.get(HestKeys.SPOT_SPACING)) or HestKeys.XENIUM_SPOT_UM
    from_spots = spot_spacing_mpp(st_path, spacing_um) if mpp is None else None
    mpp, mpp_source = choose_mpp(
        mpp,
        {f"{meta_path.name}'s {HestKeys.MPP_ESTIMATED}": estimated,
         f"the {spacing_um:g} um spot spacing of {HestKeys.ST_DIR}/{st_path.name}": from_spots},
        sample_id,
        unknown=(f"{meta_path.name} has no {HestKeys.MPP_ESTIMATED} and there is no {HestKeys.ST_DIR}/{st_path.name} "
                 f"to measure it from; {HestKeys.MPP_EMBEDDED} (the TIFF tags, which HEST writes 10x off: HEST issue "
                 "#106) is never used"),
    )
    if differs(embedded, mpp):
        log.warning(
            "HEST %s: %s=%.4g differs from the pixel size used, %.4g um/px (%s); the embedded value comes from the "
            "TIFF tags (HEST writes them 10x off, HEST issue #106) and is only recorded",
            sample_id, HestKeys.MPP_EMBEDDED, embedded, mpp, mpp_source,
        )

    image = open_image(root / HestKeys.WSI_DIR / HestKeys.WSI.format(id=sample_id))
    tx_path = _find(root / HestKeys.TRANSCRIPTS_DIR, HestKeys.TRANSCRIPTS.format(id=sample_id))
    if tx_path is None:
        raise InvalidSampleError(
            f"HEST sample {sample_id}: {HestKeys.TRANSCRIPTS_DIR}/{HestKeys.TRANSCRIPTS.format(id=sample_id)} not "
            f"found under {root}; download HEST's transcripts/ folder for this sample (cells are built from it)"
        )
    polygons = seg_path = None
    if segmentation not in ("cell", "nucleus", "cellvit", "none"):
        raise InvalidSampleError(f"unknown HEST segmentation {segmentation!r}; choose cell, nucleus, cellvit or none")
    if segmentation == "cellvit":
        if assign == "cell_id":
            raise InvalidSampleError("CellViT's nuclei have their own ids, not the transcripts' cell_id: use "
                                     "assign='polygons' (or 'auto') with segmentation='cellvit'")
        assign = "polygons"
    if segmentation != "none":
        cellvit = segmentation == "cellvit"
        stem = HestKeys.CELLVIT.format(id=sample_id) if cellvit else HestKeys.SEG.format(id=sample_id, kind=segmentation)
        seg_dir = root / (HestKeys.CELLVIT_DIR if cellvit else HestKeys.SEG_DIR)
        seg_path = _find(seg_dir, stem + ".parquet") or _find(seg_dir, stem + ".geojson")
        zipped = _find(seg_dir, stem + ".geojson.zip")
        if seg_path is None and zipped is not None:
            raise InvalidSampleError(
                f"HEST sample {sample_id}: {seg_dir.name}/ holds only {zipped.name}, HEST's zipped GeoJSON"
                + ("" if cellvit else " (the cells dealt into 10 chunks without their cell ids)")
                + f", which is not read; download {seg_dir.name}/{stem}.parquet (the same polygons, with their ids)"
            )
        if seg_path is None and cellvit:
            raise InvalidSampleError(f"HEST sample {sample_id}: no {seg_dir.name}/{stem}.parquet under {root}; "
                                     "download HEST's cellvit_seg/ folder for this sample, or use another segmentation")
        if seg_path is None:
            log.warning("HEST %s: no %s/%s.parquet; cell centres are the mean transcript positions",
                        sample_id, HestKeys.SEG_DIR, stem)
        else:
            polygons = read_polygons(seg_path)

    tc = aggregate_transcripts(
        tx_path, HestKeys.X, HestKeys.Y, cell_ids=polygons.ids if polygons is not None else None,
        polygons=polygons, assign=assign, min_qv=min_qv, progress=progress,
    )
    n_per_cell = np.asarray(tc.counts.sum(axis=1)).ravel()
    if polygons is not None and tc.stats["counted"] == 0:
        raise InvalidSampleError(
            f"HEST sample {sample_id}: no transcript matched a cell of {seg_path.name} "
            f"(segmentation ids e.g. {polygons.ids[:3]}); the transcripts' cell_id and the segmentation's ids do "
            "not match: use --assign polygons, or check that both files belong to the same sample"
        )
    if polygons is not None:
        xy = polygons.centroids()  # same order as tc.cell_ids (the polygons' ids)
        area_um2 = polygons.areas() * mpp**2
        centre_source = seg_path.name
    else:
        xy, area_um2, centre_source = tc.mean_xy, None, "mean transcript position"
    keep = n_per_cell > 0
    n_empty = int((~keep).sum())
    if n_empty:
        log.info("HEST %s: %d cells without counted transcripts are left out", sample_id, n_empty)
    keep &= inside_image(np.where(keep[:, None], xy, 0.0), image.shape, sample_id, mpp, centre_source)
    rows = np.flatnonzero(keep)
    obs = pd.DataFrame({"n_transcripts": n_per_cell[rows].astype(np.int64)})
    if area_um2 is not None:
        obs["area_um2"] = area_um2[rows]
    if polygons is not None and polygons.classes is not None:
        classes = dict(zip(polygons.ids, polygons.classes))
        obs[HestKeys.CELLVIT_CLASS if segmentation == "cellvit" else "segmentation_class"] = pd.Categorical(
            [classes[tc.cell_ids[i]] for i in rows])
    provenance = {
        "format": "hest",
        "root": str(root.resolve()),
        "files": {"image": str(image.path), "metadata": str(meta_path), "transcripts": str(tx_path),
                  "segmentation": str(seg_path) if seg_path else None},
        "mpp_source": mpp_source,
        "mpp_estimated": estimated,
        "mpp_embedded": embedded,
        "mpp_spot_spacing": from_spots,
        "centres": centre_source,
        "assignment": assign,
        "min_qv": min_qv,
        "transcripts": tc.stats,
        "cells_without_transcripts": n_empty,
        "metadata": {k: meta[k] for k in HestKeys.KEPT_META if k in meta},
    }
    sample = Sample.from_arrays(
        tc.counts[rows], xy[rows], image, mpp, tc.genes, sample_id,
        cell_ids=[tc.cell_ids[i] for i in rows], obs=obs, provenance=plain_values(provenance, h5ad=True),
    )
    if embedded is not None and differs(embedded, mpp):
        sample.adata.uns[Key.UNS][UnsKey.MPP_EMBEDDED] = float(embedded)
    return sample


def spot_spacing_mpp(st_path: Path, spacing_um: float) -> float | None:
    """Micrometres per pixel measured from HEST's ``st/{id}.h5ad``: ``spacing_um`` over the median distance, in
    pixels, from each spot centre (``obsm["spatial"]``, full-resolution pixels) to its nearest neighbour.

    None when the file is absent; a file that is there but cannot be read, or holds fewer than 4 spots,
    gives None with a warning (the cross-check is then skipped, not the read).
    """
    if not st_path.is_file():
        return None
    import h5py
    from scipy.spatial import cKDTree

    try:
        with h5py.File(st_path, "r") as f:
            node = f.get("obsm/spatial")
            xy = np.asarray(node[()], dtype=np.float64) if isinstance(node, h5py.Dataset) else None
    except OSError as exc:
        log.warning("%s cannot be read (%s); the pixel size is not cross-checked with its spot spacing", st_path, exc)
        return None
    if xy is None or xy.ndim != 2 or xy.shape[1] < 2 or len(xy) < MIN_SPOTS:
        log.warning("%s holds no obsm['spatial'] with %d or more spots; the pixel size is not cross-checked",
                    st_path, MIN_SPOTS)
        return None
    distance, _ = cKDTree(xy[:, :2]).query(xy[:, :2], k=2)
    step = float(np.median(distance[:, 1]))
    return spacing_um / step if step > 0 else None


def _float_or_none(value) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) and v > 0 else None
