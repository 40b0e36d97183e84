"""Which slides a cohort run predicts: a folder, a glob pattern or a manifest CSV -> a list of :class:`SlideJob`.

A manifest is a CSV with one row per slide and the columns

| column | content |
|---|---|
| ``slide`` (required) | the slide file; a relative path is relative to the manifest's folder |
| ``slide_id`` | the name of its outputs and its row of the cohort table (default: the file name without suffixes) |
| ``cells`` | a cell file for that slide (CSV/parquet centres, CellViT/QuPath GeoJSON, HoVer-Net JSON, label mask; docs/predict.md); empty: nuclei are detected |
| ``coords`` | ``px`` (default) or ``um``: the unit of the cell file's centres |
| ``mpp`` | micrometres per pixel, overriding what the slide file states |

Other columns (clinical variables, ...) are allowed and ignored.
"""

from __future__ import annotations

import glob
import math
import os
from dataclasses import dataclass
from pathlib import Path

from gcmoe.data.image import OPENSLIDE_SUFFIXES
from gcmoe.errors import InvalidSampleError

__all__ = ["SLIDE_SUFFIXES", "SlideJob", "list_slides", "slide_id_of"]

SLIDE_SUFFIXES = (*OPENSLIDE_SUFFIXES, ".tif", ".tiff", ".btf", ".qptiff")
MANIFEST_COLUMNS = ("slide", "slide_id", "cells", "coords", "mpp")


@dataclass(frozen=True)
class SlideJob:
    """One slide of a cohort: its id, file, optional cell file (``coords`` its unit) and pixel-size override."""

    slide_id: str
    slide: Path
    cells: Path | None = None
    coords: str = "px"
    mpp: float | None = None


def slide_id_of(path: str | os.PathLike) -> str:
    """A slide's default id: its file name without the image suffixes (``a.ome.tif`` -> ``a``)."""
    name = Path(path).name
    for suffix in (".ome.tiff", ".ome.tif", *SLIDE_SUFFIXES):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def list_slides(spec: str | os.PathLike) -> list[SlideJob]:
    """The slides ``spec`` names, sorted by id: a folder (its slide files, by suffix: .svs, .ndpi, .tif, ...), a
    glob pattern (``'archive/*.svs'``) or a manifest ``.csv`` (see the module docstring)."""
    text = str(spec)
    path = Path(text)
    if path.suffix.lower() == ".csv":
        if not path.is_file():
            raise InvalidSampleError(f"slide manifest not found: {path}")
        jobs = _read_manifest(path)
        where = str(path)
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(SLIDE_SUFFIXES))
        jobs = [SlideJob(slide_id_of(p), p) for p in files]
        where = f"the folder {path}"
        if not jobs:
            raise InvalidSampleError(
                f"no slide files in {path} (looked for {', '.join(SLIDE_SUFFIXES)}); name the files with a glob "
                "pattern ('DIR/*.ext') or list them in a manifest CSV")
    elif glob.has_magic(text):
        files = sorted(Path(p) for p in glob.glob(text) if Path(p).is_file())
        jobs = [SlideJob(slide_id_of(p), p) for p in files]
        where = f"the pattern {text!r}"
        if not jobs:
            raise InvalidSampleError(f"no file matches the slide pattern {text!r}; check the path and quote the pattern")
    else:
        raise InvalidSampleError(
            f"--slides {text}: not a folder, a glob pattern or a manifest .csv; for a single slide use --slide")
    seen: dict[str, Path] = {}
    for job in jobs:
        if job.slide_id in seen:
            raise InvalidSampleError(
                f"two slides of {where} have the id {job.slide_id!r} ({seen[job.slide_id]} and {job.slide}); "
                "give them distinct ids (a manifest's slide_id column)")
        seen[job.slide_id] = job.slide
    return sorted(jobs, key=lambda j: j.slide_id)


def _read_manifest(path: Path) -> list[SlideJob]:
    import pandas as pd

    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InvalidSampleError(f"cannot read the slide manifest {path} as CSV ({exc})") from exc
    if "slide" not in table.columns:
        raise InvalidSampleError(
            f"the slide manifest {path} has no 'slide' column (columns: {list(table.columns)}); it needs one row "
            f"per slide with the columns {', '.join(MANIFEST_COLUMNS)} (only 'slide' is required)")
    jobs = []
    for line, row in enumerate(table.to_dict("records"), start=2):
        where = f"{path}, line {line}"

        def resolve(value: str) -> Path:
            p = Path(value)
            return p if p.is_absolute() else path.parent / p

        if not row["slide"].strip():
            raise InvalidSampleError(f"{where}: the 'slide' column is empty; every row names a slide file")
        slide = resolve(row["slide"].strip())
        if not slide.exists():
            raise InvalidSampleError(f"{where}: slide file not found: {slide}")
        cells_text = row.get("cells", "").strip()
        cells = resolve(cells_text) if cells_text else None
        if cells is not None and not cells.exists():
            raise InvalidSampleError(f"{where}: cell file not found: {cells}")
        coords = row.get("coords", "").strip() or "px"
        if coords not in ("px", "um"):
            raise InvalidSampleError(f"{where}: coords {coords!r} is not px or um")
        mpp_text = row.get("mpp", "").strip()
        mpp = None
        if mpp_text:
            try:
                mpp = float(mpp_text)
            except ValueError:
                mpp = math.nan
            if not (mpp > 0 and math.isfinite(mpp)):
                raise InvalidSampleError(f"{where}: mpp {mpp_text!r} is not a positive number of micrometres per pixel")
        slide_id = row.get("slide_id", "").strip() or slide_id_of(slide)
        if "/" in slide_id or "\\" in slide_id or slide_id.startswith("."):
            raise InvalidSampleError(f"{where}: slide_id {slide_id!r} names a folder of the output; drop slashes and leading dots")
        jobs.append(SlideJob(slide_id, slide, cells, coords, mpp))
    if not jobs:
        raise InvalidSampleError(f"the slide manifest {path} lists no slides")
    return jobs
