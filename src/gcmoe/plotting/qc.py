"""The QC overlay: each window of a slide check, its H&E with the cell centres and the nuclei found on it."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from gcmoe.data.image import SlideImage
from gcmoe.data.qc import QCReport
from gcmoe.plotting._style import new_figure

_VERDICT_COLOUR = {"pass": "#009E73", "warn": "#E69F00", "fail": "#D55E00", "skipped": "#777777"}


def plot_qc(report: QCReport, image: SlideImage) -> Figure:
    """Windows of ``report`` side by side: H&E, cell centres (rings), detected nuclei (dots); the verdicts below.

    Without windows (an image too coarse for nuclei), one panel shows the whole slide, downsampled, with the centres.
    """
    from gcmoe.plotting.spatial import cells_region, read_downsampled

    windows = report.windows
    if not windows:
        windows = [cells_region(report.cells, image.shape)] if report.cells is not None and len(report.cells) \
            else [(0, 0, image.shape[1], image.shape[0])]
    n = len(windows)
    fig = new_figure(max(3.2 * n, 6.4), 3.6 + 0.16 * len(report.checks))
    axes = fig.subplots(1, n, squeeze=False)[0]
    for i, (ax, (x, y, w, h)) in enumerate(zip(axes, windows)):
        ax.imshow(read_downsampled(image, (x, y, w, h), max_side=1000), extent=(x, x + w, y + h, y))
        cells = report.cells if report.cells is not None else np.zeros((0, 2))
        for pts, style in ((cells, {"s": 28, "facecolors": "none", "edgecolors": "#56B4E9", "linewidths": 0.8,
                                    "label": "cell centres"}),
                           (report.nuclei, {"s": 5, "c": "#F0E442", "label": "nuclei detected"})):
            if pts is None or len(pts) == 0:
                continue
            inside = (pts[:, 0] >= x) & (pts[:, 0] < x + w) & (pts[:, 1] >= y) & (pts[:, 1] < y + h)
            ax.scatter(pts[inside, 0], pts[inside, 1], **style)
        ax.set_xlim(x, x + w)
        ax.set_ylim(y + h, y)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"window {i + 1}: x {x}, y {y} px" if report.windows else "cells on the slide (no nuclei "
                     "check)", fontsize=8)
    if report.cells is not None and len(report.cells):
        axes[0].legend(loc="upper left", fontsize=6, framealpha=0.8)
    lines = [f"{c.name}: {c.verdict}" + (f" ({c.value:.3g})" if c.value is not None else "") for c in report.checks]
    fig.suptitle(f"QC of {report.sample_id} ({report.mpp:.4g} um/px): {report.verdict}", fontsize=10,
                 color=_VERDICT_COLOUR[report.verdict])
    fig.supxlabel("\n".join(lines), fontsize=7)
    return fig
