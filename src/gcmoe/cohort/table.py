"""The cohort's table and page, built from the finished slides' ``summary.json`` (no h5ad is read).

``cohort.parquet`` and ``cohort.csv``: one row per finished slide, ready to join with clinical data on
``slide_id``:

| column | content |
|---|---|
| ``slide_id``, ``slide`` | the slide's id and file |
| ``n_cells`` | cells predicted |
| ``tissue_mm2``, ``cells_per_mm2`` | tissue area and cell density on it |
| ``n_cells[<type>]`` | cells whose most probable expert is ``<type>`` (GC-MoE) |
| ``<gene>`` | mean predicted expression of the gene over all cells (the model's target scale, default log1p) |
| ``<gene>[<type>]`` | the same over the cells of that predicted type (empty when there are none) |

``index.html``: one row per slide of the list: the QC figure, cells, tissue, QC flags and the top genes; slides
not finished (or failed) are listed with their state.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any

from gcmoe.cohort.slides import SlideJob
from gcmoe.files import atomic_path, write_text

__all__ = ["cohort_rows", "write_cohort_html", "write_cohort_table"]

TOP_GENES = 5
MIN_CELLS_PER_MM2 = 200  # a denser tissue is usual; fewer cells flags the slide for a look


def _summaries(out: Path, jobs: list[SlideJob]) -> dict[str, dict[str, Any]]:
    found = {}
    for job in jobs:
        path = out / "slides" / job.slide_id / "summary.json"
        if path.is_file():
            found[job.slide_id] = json.loads(path.read_text())
    return found


def cohort_rows(out: str | os.PathLike, jobs: list[SlideJob]) -> list[dict[str, Any]]:
    """The table's rows (see the module docstring), one per finished slide of ``jobs``, in their order."""
    rows = []
    for slide_id, s in _summaries(Path(out), jobs).items():
        qc = s.get("qc", {})
        row: dict[str, Any] = {"slide_id": slide_id, "slide": s["slide"], "n_cells": s["n_cells"],
                               "tissue_mm2": qc.get("tissue_mm2"), "cells_per_mm2": qc.get("cells_per_mm2")}
        for name, n in s.get("n_cells_by_type", {}).items():
            row[f"n_cells[{name}]"] = n
        row.update(s.get("mean", {}))
        for name, means in s.get("mean_by_type", {}).items():
            for gene in s.get("mean", {}):
                row[f"{gene}[{name}]"] = means.get(gene)
        rows.append(row)
    return rows


def write_cohort_table(out: str | os.PathLike, jobs: list[SlideJob]) -> Path:
    """Write ``OUT/cohort.parquet`` (pyarrow) and ``OUT/cohort.csv``; returns the parquet path."""
    import pandas as pd

    out = Path(out)
    table = pd.DataFrame(cohort_rows(out, jobs))
    if table.empty:
        table = pd.DataFrame(columns=["slide_id", "slide", "n_cells", "tissue_mm2", "cells_per_mm2"])
    path = out / "cohort.parquet"
    with atomic_path(path, suffix=".parquet") as tmp:
        table.to_parquet(tmp, engine="pyarrow", index=False)
    with atomic_path(out / "cohort.csv", suffix=".csv") as tmp:
        table.to_csv(tmp, index=False)
    return path


def _flags(s: dict[str, Any]) -> list[str]:
    qc, flags = s.get("qc", {}), []
    if s["n_cells"] == 0:
        flags.append("no cells")
    density = qc.get("cells_per_mm2")
    if density is not None and s["n_cells"] and density < MIN_CELLS_PER_MM2:
        flags.append(f"few cells ({density:.0f}/mm2)")
    if qc.get("tissue_fraction", 1.0) < 0.01:
        flags.append("tissue < 1% of the slide")
    if qc.get("cells_off_tissue", 0.0) > 0.1:
        flags.append(f"{100 * qc['cells_off_tissue']:.0f}% of the cells off the tissue mask")
    return flags


def write_cohort_html(out: str | os.PathLike, jobs: list[SlideJob]) -> Path:
    """Write ``OUT/index.html``: one row per slide (QC figure, cells, tissue, QC flags, top genes); images are
    linked from the slides' folders, so the page is read beside them."""
    out = Path(out)
    summaries = _summaries(out, jobs)
    e = html.escape
    rows = []
    for job in jobs:
        folder = Path("slides") / job.slide_id
        s = summaries.get(job.slide_id)
        if s is None:
            error = out / folder / "error.txt"
            state = f"failed: {e(error.read_text().strip().splitlines()[-1])}" if error.is_file() else "not finished"
            rows.append(f"<tr><td>{e(job.slide_id)}</td><td colspan=5>{state}</td></tr>")
            continue
        qc = s.get("qc", {})
        types = "<br>".join(f"{e(k)}: {v}" for k, v in s.get("n_cells_by_type", {}).items())
        top = sorted(s.get("mean", {}).items(), key=lambda kv: -(kv[1] if kv[1] is not None else float("-inf")))
        genes = "<br>".join(f"{e(g)} {v:.2f}" for g, v in top[:TOP_GENES])
        flags = _flags(s)
        density = qc.get("cells_per_mm2")
        qc_cell = (f"tissue {qc.get('tissue_mm2', 0):.3g} mm2 ({100 * qc.get('tissue_fraction', 0):.0f}%)<br>"
                   f"{'' if density is None else f'{density:.0f} cells/mm2<br>'}"
                   f"{s.get('mpp', 0):g} um/px, {s['seconds']['total']:.0f} s<br>"
                   + (f"<b>{e('; '.join(flags))}</b>" if flags else "ok"))
        link = lambda name: e((folder / name).as_posix())  # noqa: E731
        rows.append(
            f"<tr><td><b>{e(job.slide_id)}</b><br><a href='{link('predicted.h5ad')}'>h5ad</a> "
            + (f"<a href='{link('cells.geojson')}'>geojson</a> " if (out / folder / "cells.geojson").is_file() else "")
            + f"<a href='{link('tissue_mask.png')}'>mask</a></td>"
            f"<td><a href='{link('qc.png')}'><img src='{link('qc.png')}' width=360></a></td>"
            f"<td>{s['n_cells']}</td><td>{types}</td><td>{qc_cell}</td><td>{genes}</td></tr>")
    done = len(summaries)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>gcmoe cohort</title>
<style>body{{font-family:sans-serif;font-size:13px}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px;vertical-align:top}}</style></head>
<body><h1>gcmoe cohort: {done} of {len(jobs)} slides finished</h1>
<p>Table: <a href="cohort.csv">cohort.csv</a>, <a href="cohort.parquet">cohort.parquet</a>
(mean predicted expression per slide and gene, over all cells and per predicted type).</p>
<table><tr><th>slide</th><th>QC: tissue outline, cells by expert</th><th>cells</th><th>cells per type</th>
<th>QC</th><th>top {TOP_GENES} genes (mean)</th></tr>
{chr(10).join(rows)}
</table></body></html>
"""
    return write_text(out / "index.html", page)
