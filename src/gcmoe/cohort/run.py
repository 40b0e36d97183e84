"""Predict a cohort of whole slides: slide after slide, resumable, shared across processes and jobs.

For each slide of the list (:func:`gcmoe.cohort.slides.list_slides`), under ``OUT/slides/<slide_id>/``:

| file | content |
|---|---|
| ``predicted.h5ad`` | the predictions, as ``gcmoe predict`` writes them (docs/predict.md) |
| ``tissue_mask.png`` | the tissue mask (white = tissue), one pixel per ``mask_mpp`` (:mod:`gcmoe.tissue`) |
| ``qc.png`` | the thumbnail with the mask's outline, and the cells coloured by expert |
| ``cells.geojson`` | the cells for QuPath (File > Import objects), predicted genes as measurements |
| ``summary.json`` | written last: the slide's row of the cohort table, QC numbers, timings, and the fingerprint of the run |

``summary.json`` marks a finished slide: a rerun skips it when its fingerprint (model weights, encoder, slide
file, cell source, pixel size, tissue settings) matches and refuses, naming what differs, when it does not. Every
file is written under a temporary name and renamed, so a run killed at any moment (even ``kill -9``) leaves
finished slides intact and the unfinished one is redone from the start. A slide that fails with a user error
(an unreadable file, no tissue) is recorded in ``OUT/slides/<slide_id>/error.txt`` and the run goes on.

Then ``OUT/cohort.parquet``, ``OUT/cohort.csv`` and ``OUT/index.html`` are (re)written from every finished
slide (:mod:`gcmoe.cohort.table`).

Sharing the work: ``shard=(i, n)`` keeps the slides ``i, i + n, i + 2n, ...`` of the sorted list (a job array);
under ``torchrun`` the unfinished slides of the shard are dealt out round-robin to the ranks; rank 0 writes the
cohort table once every rank is done. Slides are not split between processes.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gcmoe.cohort.slides import SlideJob
from gcmoe.errors import GcmoeError, InvalidSampleError
from gcmoe.files import write_h5ad, write_json, write_text

__all__ = ["CohortResult", "TissueSettings", "predict_cohort", "slide_folder"]

log = logging.getLogger(__name__)

SUMMARY = "summary.json"


@dataclass
class TissueSettings:
    """Tissue detection and nuclei detection settings of a cohort run (part of the resume fingerprint)."""

    mask_mpp: float = 8.0  # micrometres per pixel of the thumbnail the tissue mask is computed on
    min_saturation: float = 0.05  # the saturation threshold never goes below this (a blank slide has no tissue)
    detect_tile: int = 2048  # full-resolution tile side for nuclei detection


@dataclass
class CohortResult:
    """What a call did: slides predicted, skipped as finished, failed (id -> message), and the outputs written."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    others: list[str] = field(default_factory=list)  # slides of the list left to other shards or ranks
    table: Path | None = None
    html: Path | None = None


def slide_folder(out: str | os.PathLike, slide_id: str) -> Path:
    """Where a slide's outputs go."""
    return Path(out) / "slides" / slide_id


def predict_cohort(
    model_dir: str | os.PathLike,
    jobs: list[SlideJob],
    out: str | os.PathLike,
    *,
    shard: tuple[int, int] = (0, 1),
    tissue: TissueSettings | None = None,
    geojson: bool = True,
    device: str = "cpu",
    batch_size: int = 4,
    encoder_weights: str | os.PathLike | None = None,
    progress: bool = True,
    distributed: bool = False,
) -> CohortResult:
    """Predict every slide of ``jobs`` not yet finished in ``out`` (this shard's, this rank's share), then write
    the cohort table and page. See the module docstring for the files and the sharing."""
    from gcmoe.inference import load_predictor
    from gcmoe.training.streaming import release_memory

    index, count = shard
    if not (isinstance(index, int) and isinstance(count, int) and count >= 1 and 0 <= index < count):
        raise InvalidSampleError(f"--shard {index}/{count}: give i/n with 0 <= i < n (e.g. 0/4 ... 3/4)")
    tissue = tissue or TissueSettings()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rank, world = _rank_world(distributed)
    predictor = load_predictor(model_dir, device=device, weights=encoder_weights)
    result = CohortResult()
    mine = jobs[index::count]
    result.others = [j.slide_id for j in jobs if j not in mine]
    todo = []
    for job in mine:
        fingerprint = _fingerprint(job, predictor, tissue)
        if _finished(out, job, fingerprint):
            result.skipped.append(job.slide_id)
        else:
            todo.append((job, fingerprint))
    _barrier(world)  # every rank has looked at the finished slides before any writes a new one
    own = todo[rank::world]
    result.others += [j.slide_id for k, (j, _) in enumerate(todo) if k % world != rank]
    if result.skipped and rank == 0:
        log.info("%d of %d slides already finished in %s: skipped", len(result.skipped), len(mine), out)
    with _progress(progress and rank == 0) as bar:
        task = bar.add_task("slides", total=len(own))
        for job, fingerprint in own:
            bar.update(task, description=f"slide {job.slide_id}")
            folder = slide_folder(out, job.slide_id)
            try:
                _predict_one(predictor, job, folder, fingerprint, tissue, geojson, batch_size, progress and rank == 0)
            except GcmoeError as exc:
                log.error("slide %s failed: %s", job.slide_id, exc)
                write_text(folder / "error.txt", f"{type(exc).__name__}: {exc}\n")
                result.failed[job.slide_id] = str(exc)
            except Exception as exc:  # a bug or a system error: record it, keep the other slides going
                log.exception("slide %s failed", job.slide_id)
                write_text(folder / "error.txt", traceback.format_exc())
                result.failed[job.slide_id] = f"{type(exc).__name__}: {exc}"
            else:
                result.done.append(job.slide_id)
            release_memory()  # the slide's arrays are freed: hand the pages back (glibc keeps them fragmented)
            bar.advance(task)
    _barrier(world)
    if rank == 0:
        from gcmoe.cohort.table import write_cohort_html, write_cohort_table

        result.table = write_cohort_table(out, jobs)
        result.html = write_cohort_html(out, jobs)
    return result


def _predict_one(predictor, job: SlideJob, folder: Path, fingerprint: dict[str, Any], settings: TissueSettings,
                 geojson: bool, batch_size: int, progress: bool) -> None:
    """One slide: tissue, cells, predictions, outputs; ``summary.json`` last."""
    from gcmoe.cohort.slide_outputs import slide_summary, write_cells_geojson, write_qc_figure, write_tissue_mask
    from gcmoe.data.detection import detect_nuclei, detection_tiles
    from gcmoe.data.image import open_image
    from gcmoe.data.readers import resolve_image_mpp
    from gcmoe.inference import centres_on_slide
    from gcmoe.tissue import detect_tissue

    start = time.perf_counter()
    (folder / "error.txt").unlink(missing_ok=True)
    image = open_image(job.slide)
    mpp, mpp_source = resolve_image_mpp(job.slide, job.mpp, job.slide_id)
    predictor.check_pixel_size(mpp, job.slide)
    predictor.check_slide_size(image.shape, mpp, job.slide)
    mask = detect_tissue(image, mpp, mask_mpp=settings.mask_mpp, min_saturation=settings.min_saturation)
    seconds = {"tissue": time.perf_counter() - start}
    write_tissue_mask(mask, folder / "tissue_mask.png")
    tiles_total = len(detection_tiles(image.shape, settings.detect_tile))
    qc: dict[str, Any] = {"tissue_mm2": mask.area_mm2, "tissue_fraction": mask.fraction,
                          "tissue_threshold": mask.threshold, "detection_tiles_total": tiles_total}
    t = time.perf_counter()
    if job.cells is None:
        tiles = detection_tiles(image.shape, settings.detect_tile, mask)
        qc["detection_tiles_read"] = len(tiles)
        if not tiles:
            raise InvalidSampleError(
                f"{job.slide}: no tissue found (saturation threshold {mask.threshold:.3f}); check the slide, or give "
                "its cells in the manifest's cells column")
        xy = detect_nuclei(image, mpp, tile=settings.detect_tile, progress=progress, tissue=mask)
        ids = [f"cell_{i}" for i in range(len(xy))]
        source = "detect_nuclei"
        if len(xy) == 0:
            raise InvalidSampleError(
                f"{job.slide}: no nuclei were detected on its {mask.area_mm2:.2f} mm2 of tissue; check the slide (an "
                "H&E?), or give its cells in the manifest's cells column")
    else:
        xy, ids = centres_on_slide(job.cells, job.coords, image.shape, mpp, job.slide_id)
        qc["cells_off_tissue"] = float((~mask.contains(xy)).mean()) if len(xy) else 0.0
        source = str(job.cells)
    seconds["cells"] = time.perf_counter() - t
    t = time.perf_counter()
    stats: dict[str, Any] = {}
    adata = predictor.predict(image, mpp, xy, ids, job.slide_id,
                              {"slide": str(Path(job.slide).resolve()), "slide_id": job.slide_id, "cells": source,
                               "mpp_source": mpp_source},
                              batch_size=batch_size, progress=progress, stats=stats)
    seconds["predict"] = time.perf_counter() - t
    qc["feature_tiles_total"] = stats.get("tiles_total", 0)
    qc["feature_tiles_read"] = stats.get("tiles_run", 0)
    qc["cells_per_mm2"] = len(xy) / mask.area_mm2 if mask.area_mm2 > 0 else None
    t = time.perf_counter()
    write_h5ad(adata, folder / "predicted.h5ad")
    write_qc_figure(adata, mask, folder / "qc.png", f"{job.slide_id}: {adata.n_obs} cells, {mpp:g} um/px")
    if geojson:
        write_cells_geojson(adata, folder / "cells.geojson")
    seconds["write"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - start
    summary = {"slide_id": job.slide_id, "slide": str(job.slide), "mpp": mpp, "shape": list(image.shape),
               "cells_source": source, "qc": qc, "seconds": seconds, "fingerprint": fingerprint,
               "model": predictor.meta.get("display_name", predictor.meta["model"])} | slide_summary(adata)
    write_json(folder / SUMMARY, summary, indent=1)
    log.info("slide %s: %d cells on %.1f mm2 of tissue in %.1f s", job.slide_id, adata.n_obs, mask.area_mm2,
             seconds["total"])


def _fingerprint(job: SlideJob, predictor, tissue: TissueSettings) -> dict[str, Any]:
    slide = Path(job.slide)
    return predictor.fingerprint | {
        "slide": str(slide.resolve()),
        "slide_bytes": slide.stat().st_size if slide.is_file() else None,
        "cells": None if job.cells is None else str(Path(job.cells).resolve()),
        "coords": job.coords,
        "mpp": job.mpp,
        "tissue": asdict(tissue),
    }


def _finished(out: Path, job: SlideJob, fingerprint: dict[str, Any]) -> bool:
    """Whether the slide has a summary from a run with the same fingerprint; refused when the fingerprint differs."""
    import json

    from gcmoe.files import plain_values

    path = slide_folder(out, job.slide_id) / SUMMARY
    if not path.is_file():
        return False
    try:
        saved = json.loads(path.read_text()).get("fingerprint", {})
    except json.JSONDecodeError:
        return False  # cannot happen with atomic writes; redo the slide
    want = plain_values(fingerprint)
    differ = sorted(k for k in set(saved) | set(want) if saved.get(k) != want.get(k))
    if differ:
        details = "; ".join(f"{k}: {saved.get(k)!r} then, {want.get(k)!r} now" for k in differ)
        raise InvalidSampleError(
            f"{path.parent} was predicted with other inputs or settings ({details}); use another --out, or delete "
            f"that folder to predict the slide again")
    return True


def _rank_world(distributed: bool) -> tuple[int, int]:
    if not distributed:
        return 0, 1
    from gcmoe.training.distributed import rank_world

    return rank_world()


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed

        torch.distributed.barrier()


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    disable=not enabled)
