"""The slide check before a run: each slide's QC (gcmoe.data.qc) written to ``OUT/qc/`` and a failed one refused."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from gcmoe.data.qc import QCReport, check_slide
from gcmoe.data.sample import Sample
from gcmoe.errors import InvalidSampleError
from gcmoe.files import write_text

log = logging.getLogger(__name__)


def write_qc(report: QCReport, sample: Sample, out_dir: Path) -> list[Path]:
    """``<sample_id>.json``, ``.md`` and the overlay ``.png`` + ``.svg`` under ``out_dir``, each written atomically."""
    from gcmoe.plotting._style import save_figure
    from gcmoe.plotting.qc import plot_qc

    stem = out_dir / report.sample_id
    paths = [write_text(stem.with_suffix(".json"), json.dumps(report.to_dict(), indent=2) + "\n"),
             write_text(stem.with_suffix(".md"), report.markdown())]
    return paths + save_figure(plot_qc(report, sample.image), stem)


def qc_samples(samples: list[Sample], out_dir: Path | None) -> list[QCReport]:
    """Check every slide, write its report under ``out_dir`` (when given) and refuse the run when one fails."""
    reports = []
    for sample in samples:
        report = check_slide(sample)
        reports.append(report)
        if out_dir is not None:
            write_qc(report, sample, out_dir)
        for check in report.checks:
            if check.verdict in ("warn", "fail"):
                log.warning("QC %s, %s (%s): %s", sample.sample_id, check.name, check.verdict, check.detail)
        log.info("QC %s: %s (%s)", sample.sample_id, report.verdict,
                 ", ".join(f"{c.name} {c.verdict}" for c in report.checks))
    failed = [r for r in reports if r.verdict == "fail"]
    if failed:
        where = f" (reports and overlays in {out_dir})" if out_dir is not None else ""
        lines = [f"{r.sample_id}: " + "; ".join(f"{c.name}: {c.detail}" for c in r.failed()) for r in failed]
        raise InvalidSampleError(
            "the slide check failed" + where + ":\n  " + "\n  ".join(lines)
            + "\nFix the registration or pixel size named above; to run anyway, give --no-qc (data.qc: false)."
        )
    return reports
