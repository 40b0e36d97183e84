"""Figure plumbing shared by the plots: Agg figures, colours, atomic PNG + SVG writes, PNG bytes for the report.

Figures are built as ``matplotlib.figure.Figure`` objects on an Agg canvas, never through pyplot's global
state, so plotting works without a display and from several threads.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from gcmoe.files import atomic_path

# colours of cell types / experts (colour-blind-safe Okabe-Ito first, then tab20 for many types)
_OKABE_ITO = ["#E69F00", "#56B4E9", "#009E73", "#CC79A7", "#0072B2", "#D55E00", "#F0E442", "#000000"]
DPI = 150


def new_figure(width: float, height: float) -> Figure:
    """A figure of ``width`` x ``height`` inches on an Agg canvas."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def category_colours(categories: Sequence[str]) -> dict[str, str]:
    """A stable colour per category, in the order given."""
    import matplotlib

    extra = [matplotlib.colors.to_hex(c) for c in matplotlib.colormaps["tab20"].colors]
    palette = _OKABE_ITO + extra
    return {str(c): palette[i % len(palette)] for i, c in enumerate(categories)}


def save_figure(fig: Figure, stem: str | os.PathLike, formats: Sequence[str] = ("png", "svg")) -> list[Path]:
    """Write ``fig`` as ``<stem>.png`` and ``<stem>.svg`` (each to a temporary name, then renamed).

    A ``.png``/``.svg`` suffix on ``stem`` is dropped. Returns the paths written.
    """
    stem = Path(stem)
    if stem.suffix.lower() in (".png", ".svg", ".pdf"):
        stem = stem.with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in formats:
        path = stem.with_name(f"{stem.name}.{fmt}")
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=DPI)
        written.append(path)
    return written


def figure_png(fig: Figure, dpi: int = 110) -> bytes:
    """The figure as PNG bytes (for embedding in the HTML report)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def robust_limits(values: np.ndarray, low: float = 1.0, high: float = 99.0) -> tuple[float, float]:
    """Colour limits from the ``low``-``high`` percentiles of the finite values (never an empty range)."""
    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, [low, high])
    if hi <= lo:
        hi = lo + 1e-6
    return float(lo), float(hi)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two vectors; NaN when either is constant."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else float("nan")
