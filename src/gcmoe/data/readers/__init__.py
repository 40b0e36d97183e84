"""Readers: one per technology, each returning a validated :class:`gcmoe.data.sample.Sample`.

``read_sample(path, format=...)`` dispatches; ``detect_format(path)`` says which reader a path needs, by
layout only (never by a name in the path):

| format | what ``path`` is | detected when |
|---|---|---|
| ``sample`` | a Sample .h5ad written by gcmoe | an .h5ad with ``uns["gcmoe"]["image_path"]`` |
| ``h5ad`` | any .h5ad with ``obsm["spatial"]`` + ``image`` (+ ``mpp``) | any other .h5ad |
| ``xenium`` | a 10x Xenium output folder + registered H&E | a folder with ``experiment.xenium`` |
| ``hest`` | a HEST-1k root (``wsis/``, ``metadata/``, ...) + ``sample_id`` | a folder with ``wsis/`` and ``metadata/`` |
| ``ghist`` | GHIST's config JSON (``data_sources``) or data folder: expression CSV, cell types, nuclei label TIFF, H&E | a .json with ``data_sources.fp_nuc_seg``; a folder with ``expr_mat_breast_demo.csv`` and ``nuclei_*.tif`` |
| ``spatialdata`` | a SpatialData zarr store (spatialdata-io's Xenium, ...), with the ``spatialdata`` extra | a zarr folder with ``tables/`` |
| ``visium_hd`` | Space Ranger 4 ``outs/`` with ``segmented_outputs/`` + ``image`` | a folder with ``segmented_outputs/cell_segmentations.geojson`` and the cell matrix |

Details of each layout: docs/data.md.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gcmoe._constants import Key, UnsKey
from gcmoe.data.readers._common import resolve_image_mpp
from gcmoe.data.readers.ghist import is_ghist_config, is_ghist_folder, read_ghist
from gcmoe.data.readers.h5ad import read_h5ad
from gcmoe.data.readers.hest import is_hest_root, list_hest_samples, read_hest
from gcmoe.data.readers.polygons import Polygons, read_polygons
from gcmoe.data.readers.spatialdata_zarr import is_spatialdata_zarr, read_spatialdata
from gcmoe.data.readers.transcripts import TranscriptCounts, aggregate_transcripts, is_control_feature
from gcmoe.data.readers.visium_hd import is_visium_hd_folder, read_visium_hd
from gcmoe.data.readers.xenium import is_xenium_folder, read_alignment, read_feature_matrix, read_xenium
from gcmoe.data.sample import Sample
from gcmoe.errors import InvalidSampleError

__all__ = [
    "FORMATS",
    "Polygons",
    "TranscriptCounts",
    "aggregate_transcripts",
    "detect_format",
    "is_control_feature",
    "list_hest_samples",
    "read_alignment",
    "read_feature_matrix",
    "read_ghist",
    "read_h5ad",
    "read_hest",
    "read_polygons",
    "read_sample",
    "read_samples",
    "read_spatialdata",
    "read_visium_hd",
    "read_xenium",
    "resolve_image_mpp",
]

FORMATS = ("auto", "sample", "hest", "xenium", "visium_hd", "ghist", "spatialdata", "h5ad")


def detect_format(path: str | os.PathLike) -> str:
    """The reader a path needs: "sample", "h5ad", "xenium", "visium_hd", "ghist", "spatialdata" or "hest" (the
    module table)."""
    path = Path(path)
    if not path.exists():
        raise InvalidSampleError(f"data path not found: {path}")
    if path.is_dir():
        if is_spatialdata_zarr(path):
            return "spatialdata"
        if is_xenium_folder(path):
            return "xenium"
        if is_hest_root(path):
            return "hest"
        if is_visium_hd_folder(path):
            return "visium_hd"
        if is_ghist_folder(path):
            return "ghist"
        raise InvalidSampleError(
            f"{path}: cannot tell the layout: a Xenium folder has experiment.xenium, a HEST root has wsis/ and "
            "metadata/, Space Ranger's Visium HD outs/ has segmented_outputs/, a GHIST folder expr_mat_*.csv and "
            "nuclei_*.tif, a SpatialData store tables/; give --format"
        )
    if is_ghist_config(path):
        return "ghist"
    if path.suffix == ".h5ad":
        import h5py

        try:
            with h5py.File(path, "r") as f:
                is_sample = f"uns/{Key.UNS}/{UnsKey.IMAGE_PATH}" in f
        except OSError as exc:
            raise InvalidSampleError(f"cannot read {path} as an .h5ad file ({exc}); is it complete?") from exc
        return "sample" if is_sample else "h5ad"
    raise InvalidSampleError(
        f"{path}: not a known data layout (a Sample or AnnData .h5ad, a Xenium output folder, a HEST-1k root, Space "
        "Ranger's Visium HD outs/, a GHIST config or folder); give --format"
    )


def read_sample(
    path: str | os.PathLike,
    format: str = "auto",
    *,
    sample_id: str | None = None,
    image: str | os.PathLike | None = None,
    mpp: float | None = None,
    cell_type_key: str | None = None,
    **options: Any,
) -> Sample:
    """Read one slide as a Sample with the reader for ``format`` ("auto" detects it from the layout).

    ``sample_id`` picks the HEST sample (and names the sample for the other formats); ``image``, ``mpp`` and
    ``cell_type_key`` serve the generic h5ad reader (``image``/``mpp`` also the image-based ones). Other keyword
    options go to the reader that takes them (e.g. ``coords``, ``xy_columns`` for h5ad; ``min_qv``, ``segmentation``
    for HEST; ``alignment``, ``keypoint_units`` for Xenium; ``table``, ``shapes`` for SpatialData).
    """
    if format not in FORMATS:
        raise InvalidSampleError(f"unknown data format {format!r}; choose one of {list(FORMATS)}")
    fmt = detect_format(path) if format == "auto" else format
    readers = {"h5ad": read_h5ad, "xenium": read_xenium, "hest": read_hest, "visium_hd": read_visium_hd,
               "ghist": read_ghist, "spatialdata": read_spatialdata}
    accepted = {name: set(inspect.signature(f).parameters) for name, f in readers.items()}
    unknown = set(options) - set().union(*accepted.values())
    if unknown:
        raise InvalidSampleError(f"unknown reader option(s) {sorted(unknown)}")
    # an option another reader takes is dropped at its default (the run settings pass all of them), refused otherwise
    defaults = {k: p.default for f in readers.values() for k, p in inspect.signature(f).parameters.items()}
    given = {k: v for k, v in options.items() if k not in accepted.get(fmt, set()) and v is not None and v != defaults[k]}
    if fmt in ("sample", "hest"):  # they find their own image; a Sample file also carries its pixel size
        given |= {k: v for k, v in (("image", image), ("mpp", mpp if fmt == "sample" else None)) if v is not None}
    if given:
        takes = sorted(accepted.get(fmt, set()) - {"path", "folder", "root", "source", "sample_id", "progress"})
        raise InvalidSampleError(
            f"{path} is read as {fmt!r}, whose reader does not use {', '.join(f'{k}={v!r}' for k, v in given.items())}"
            + (f" (it takes {', '.join(takes)})" if takes else " (a Sample file carries its image and pixel size)")
            + "; drop the option, or give --format if the layout was detected wrongly"
        )
    options = {k: v for k, v in options.items() if k in accepted.get(fmt, set())}
    if fmt == "sample":
        sample = Sample.read(path)
    elif fmt == "h5ad":
        sample = read_h5ad(path, image=image, mpp=mpp, cell_type_key=cell_type_key, sample_id=sample_id, **options)
    elif fmt == "xenium":
        sample = read_xenium(path, image=image, mpp=mpp, sample_id=sample_id, **options)
    elif fmt == "visium_hd":
        sample = read_visium_hd(path, image=image, mpp=mpp, sample_id=sample_id, **options)
    elif fmt == "ghist":
        sample = read_ghist(path, image=image, mpp=mpp, sample_id=sample_id, **options)
    elif fmt == "spatialdata":
        sample = read_spatialdata(path, image=image, mpp=mpp, sample_id=sample_id, **options)
    else:
        sample = read_hest(path, sample_id=sample_id, mpp=mpp, **options)
    if cell_type_key is not None and fmt != "h5ad":
        obs = sample.adata.obs
        if cell_type_key not in obs:
            raise InvalidSampleError(f"{path}: no obs column {cell_type_key!r}; obs columns are {list(obs.columns)[:30]}")
        if cell_type_key != Key.CELL_TYPE:
            import pandas as pd

            obs[Key.CELL_TYPE] = pd.Categorical(obs[cell_type_key].astype(str))
    return sample


def read_samples(
    paths: Sequence[str | os.PathLike],
    format: str = "auto",
    sample_ids: Sequence[str] | None = None,
    **options: Any,
) -> list[Sample]:
    """Read every path; a HEST root gives one Sample per id in ``sample_ids`` (or its only sample)."""
    samples: list[Sample] = []
    for path in paths:
        fmt = detect_format(path) if format == "auto" else format
        if fmt == "hest" and sample_ids:
            samples += [read_sample(path, "hest", sample_id=sid, **options) for sid in sample_ids]
        else:
            sid = sample_ids[0] if (sample_ids and len(paths) == 1 and len(sample_ids) == 1) else None
            samples.append(read_sample(path, fmt, sample_id=sid, **options))
    return samples
