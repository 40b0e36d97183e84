"""Registration and pixel-size check of a slide: do the cell centres sit on the nuclei of the H&E?

No reader can tell a misregistered slide from a good one: the cells still lie inside the image, the counts still
look like counts. The image can tell. In a few windows spread over the slide, nuclei are detected on the H&E
(:func:`gcmoe.data.detection.detect_nuclei`) and compared with the cell centres:

- **cells on nuclei**: the fraction of cell centres with a detected nucleus within ``match_um`` (4 um), against
  the same fraction after moving the centres by random shifts of 15-40 um (what chance alone gives in this
  tissue). Registered cells match far above chance; a shift of a nucleus width or more falls to chance.
- **shift** and **scale**: the transform ``s * centre + t`` (about the image origin, in pixels) that puts the most
  centres on nuclei, found by voting: for each scale on a grid fine enough that no window moves by more than
  1 um between steps, the displacements from centres to the nuclei within ``search_um`` are histogrammed and
  the sharpest peak wins. A wrong pixel size on micrometre coordinates is a scale about the origin; a registration
  offset is a shift.
- **density** (cells per mm2 over the occupied area) and **spacing** (median nearest-neighbour distance, um)
  against the range of real tissue, which catch a pixel size off by a large factor whatever the image shows.

Each check gets a verdict: pass, warn, fail or skipped (with the reason: e.g. an image coarser than
``MAX_DETECTION_MPP`` um/px shows no nuclear detail, so the image checks are skipped and only the density and
spacing checks run). Thresholds are module constants, documented in docs/data.md.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np

from gcmoe.data.image import ArrayImage
from gcmoe.data.readers._coords import CELL_SPACING_UM, MIN_SPACING_UM, median_spacing
from gcmoe.data.sample import Sample
from gcmoe.errors import InvalidSampleError

log = logging.getLogger(__name__)

Verdict = Literal["pass", "warn", "fail", "skipped"]

MAX_DETECTION_MPP = 1.0  # um/px; coarser images show no nuclear detail, so the nuclei checks are skipped
MATCH_UM = 4.0  # a cell centre matches a nucleus detected within this distance
SHIFT_UM = (2.0, 4.0)  # best-fit shift: pass up to the first, warn up to the second, fail above
SCALE = (0.02, 0.05)  # best-fit |scale - 1|: pass, warn, fail above
MATCH_MARGIN = 0.15  # registered centres must match at least this much more often than randomly shifted ones
MIN_NUCLEI_PER_CELL = 0.25  # fewer nuclei than this per cell centre in the windows: cells off the tissue
DENSITY_PER_MM2 = (1_000.0, 20_000.0)  # cells per mm2 of tissue in real sections (pass)
DENSITY_FAIL_FACTOR = 4.0  # denser than the upper bound by this factor: a pixel size about 2x too small or worse
OCCUPANCY_UM = 50.0  # grid used to measure the occupied area
MAX_CELLS_PER_WINDOW = 400  # enough for a sharp vote, few enough for a fast one


@dataclass
class Check:
    """One check: its measured value, its verdict and a sentence saying what it means."""

    name: str
    verdict: Verdict
    value: float | None
    detail: str


@dataclass
class QCReport:
    """The checks of one slide, the windows they looked at and what was found in them (for the overlay)."""

    sample_id: str
    mpp: float
    n_cells: int
    checks: list[Check]
    shift_um: tuple[float, float] | None = None
    scale: float | None = None
    matched: float | None = None
    matched_random: float | None = None
    matched_fit: float | None = None
    windows: list[tuple[int, int, int, int]] = field(default_factory=list)  # x, y, width, height in pixels
    nuclei: np.ndarray | None = None  # (n, 2) px, detected in the windows
    cells: np.ndarray | None = None  # (n, 2) px, the centres inside the windows

    @property
    def verdict(self) -> Verdict:
        """fail when any check fails, else warn when any warns, else pass."""
        verdicts = {c.verdict for c in self.checks}
        return "fail" if "fail" in verdicts else "warn" if "warn" in verdicts else "pass"

    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.verdict == "fail"]

    def to_dict(self) -> dict:
        """Plain values (JSON): every field but the point arrays, with their counts."""
        out = {k: v for k, v in asdict(self).items() if k not in ("nuclei", "cells", "checks")}
        out["checks"] = [asdict(c) for c in self.checks]
        out["verdict"] = self.verdict
        out["n_nuclei_detected"] = 0 if self.nuclei is None else int(len(self.nuclei))
        out["n_cells_in_windows"] = 0 if self.cells is None else int(len(self.cells))
        return out

    def markdown(self) -> str:
        """A table of the checks, one row each."""
        lines = [f"# QC of {self.sample_id}: {self.verdict}", "",
                 f"{self.n_cells} cells, {self.mpp:.4g} um/px, {len(self.windows)} windows.", "",
                 "| check | verdict | value | what it means |", "|---|---|---|---|"]
        for c in self.checks:
            value = "–" if c.value is None else f"{c.value:.4g}"
            lines.append(f"| {c.name} | {c.verdict} | {value} | {c.detail} |")
        return "\n".join(lines) + "\n"


def check_slide(sample: Sample, n_windows: int = 4, window_um: float = 200.0, match_um: float = MATCH_UM,
                search_um: float = 30.0, max_scale_error: float = 0.15, seed: int = 0) -> QCReport:
    """Registration and pixel-size checks of ``sample`` (see the module docstring)."""
    xy, mpp = sample.spatial, sample.mpp
    if len(xy) == 0:
        raise InvalidSampleError(f"sample {sample.sample_id}: no cells to check")
    checks = [_density_check(xy, mpp), _spacing_check(xy, mpp)]
    report = QCReport(sample.sample_id, mpp, len(xy), checks)
    if mpp > MAX_DETECTION_MPP:
        why = (f"the image is {mpp:.3g} um/px, coarser than {MAX_DETECTION_MPP:g} um/px: nuclei cannot be resolved, "
               "so registration cannot be checked from it")
        checks += [Check(name, "skipped", None, why) for name in ("cells on nuclei", "shift", "scale")]
        report.cells = xy[np.random.default_rng(seed).permutation(len(xy))[:5_000]]
        return report
    from gcmoe.data.detection import detect_nuclei

    half, margin = window_um / mpp / 2, search_um / mpp
    size, gap = int(round(2 * (half + margin))), int(np.ceil(15.0 / mpp))
    centres = _spread_points(xy, n_windows, min_gap=2 * half)
    # one mosaic of all windows (white gaps wider than the detector's margin), so one threshold serves them all
    mosaic = np.full((size, len(centres) * (size + gap), 3), 255, dtype=np.uint8)
    origins, cells, windows = [], [], []
    for i, (cx, cy) in enumerate(centres):
        x0, y0 = int(round(cx - half - margin)), int(round(cy - half - margin))
        mosaic[:, i * (size + gap): i * (size + gap) + size] = sample.image.read_region(x0, y0, size, size)
        origins.append((x0, y0))
        inside = (np.abs(xy[:, 0] - cx) < half) & (np.abs(xy[:, 1] - cy) < half)
        cells.append(xy[inside][np.random.default_rng(seed).permutation(int(inside.sum()))[:MAX_CELLS_PER_WINDOW]])
        windows.append((int(round(cx - half)), int(round(cy - half)), int(round(2 * half)), int(round(2 * half))))
    found = detect_nuclei(ArrayImage(mosaic), mpp, tile=size + gap)
    slot = (found[:, 0] // (size + gap)).astype(int)
    nuclei = [found[slot == i] - [i * (size + gap), 0] + origins[i] for i in range(len(centres))]
    report.windows, report.cells, report.nuclei = windows, np.concatenate(cells), np.concatenate(nuclei)
    n_cells, n_nuclei = len(report.cells), len(report.nuclei)
    if n_nuclei < MIN_NUCLEI_PER_CELL * n_cells:
        why = (f"{n_nuclei} nuclei detected in {len(windows)} windows holding {n_cells} cell centres: the cells lie "
               "where the image shows no nuclei (off the tissue: a wrong registration, coordinate unit or pixel size), "
               "or the image is not H&E")
        checks.append(Check("cells on nuclei", "fail", 0.0, why))
        checks += [Check(name, "skipped", None, "no nuclei to fit to") for name in ("shift", "scale")]
        return report
    rng = np.random.default_rng(seed)
    radius = match_um / mpp
    per_window = list(zip(cells, nuclei))
    report.matched = _matched(per_window, 1.0, np.zeros(2), radius)
    report.matched_random = float(np.mean([
        _matched(per_window, 1.0, _random_shift(rng, 15 / mpp, 40 / mpp), radius) for _ in range(8)]))
    scale, shift = _fit(per_window, mpp, search_um, max_scale_error)
    report.scale, report.shift_um = scale, (float(shift[0] * mpp), float(shift[1] * mpp))
    report.matched_fit = _matched(per_window, scale, shift, radius)
    checks.append(_match_check(report.matched, report.matched_random, report.matched_fit, match_um))
    fitted = report.matched_fit >= report.matched_random + MATCH_MARGIN
    if not fitted:
        why = (f"no shift within {search_um:g} um and scale within {max_scale_error:.0%} puts the centres on nuclei "
               f"(best {report.matched_fit:.2f} matched vs {report.matched_random:.2f} by chance)")
        checks += [Check("shift", "fail", None, why), Check("scale", "fail", None, why)]
        return report
    checks += [_shift_check(report.shift_um), _scale_check(scale)]
    return report


def _density_check(xy: np.ndarray, mpp: float) -> Check:
    """Cells per mm2 over the area the cells occupy (cells of ``OCCUPANCY_UM`` squares holding any)."""
    um = xy * mpp
    occupied = np.unique(np.floor(um / OCCUPANCY_UM).astype(np.int64), axis=0)
    density = len(xy) / (len(occupied) * (OCCUPANCY_UM / 1000) ** 2)
    lo, hi = DENSITY_PER_MM2
    text = f"{density:,.0f} cells per mm2 of occupied area at {mpp:.4g} um/px; tissue holds about {lo:,.0f}-{hi:,.0f}"
    if density > hi * DENSITY_FAIL_FACTOR:
        return Check("density", "fail", density, f"{text}: far too dense, so the pixel size is too small (or the "
                     "centres are in another unit): check --mpp and --coords")
    if density > hi:
        return Check("density", "warn", density, f"{text}: denser than tissue; check the pixel size")
    if density < lo:
        return Check("density", "warn", density, f"{text}: sparser than tissue; a subsample of the cells, or a "
                     "pixel size too large")
    return Check("density", "pass", density, text)


def _spacing_check(xy: np.ndarray, mpp: float) -> Check:
    spacing = median_spacing(xy)
    if spacing is None:
        return Check("spacing", "skipped", None, "fewer than two cells")
    um = spacing * mpp
    lo, hi = CELL_SPACING_UM
    text = f"median nearest-neighbour distance {um:.3g} um; cells lie about {lo:g}-{hi:g} um apart"
    if um < MIN_SPACING_UM:
        return Check("spacing", "fail", um, f"{text}: too close for cells, so the pixel size is too small (or the "
                     "centres are in another unit): check --mpp and --coords")
    if um < lo or um > hi:
        return Check("spacing", "warn", um, f"{text}: outside that range; check the pixel size (a subsample of the "
                     "cells is sparser)")
    return Check("spacing", "pass", um, text)


def _match_check(matched: float, chance: float, fit: float, match_um: float) -> Check:
    text = (f"{matched:.0%} of the centres have a nucleus within {match_um:g} um ({chance:.0%} after random shifts, "
            f"{fit:.0%} after the best-fit transform)")
    if matched >= chance + MATCH_MARGIN and matched >= fit - MATCH_MARGIN:
        return Check("cells on nuclei", "pass", matched, text)
    return Check("cells on nuclei", "fail", matched, f"{text}: the centres do not sit on the nuclei; see the shift "
                 "and scale that would put them there")


def _shift_check(shift_um: tuple[float, float]) -> Check:
    size = float(np.hypot(*shift_um))
    warn, fail = SHIFT_UM
    text = (f"moving the centres by ({shift_um[0]:+.1f}, {shift_um[1]:+.1f}) um (x, y), {size:.1f} um, puts the most "
            "on nuclei")
    if size > fail:
        return Check("shift", "fail", size, f"{text}: they are offset from their nuclei; fix the registration "
                     "(alignment file, --alignment) or the coordinate origin")
    if size > warn:
        return Check("shift", "warn", size, f"{text}: a small offset (under a nucleus width)")
    return Check("shift", "pass", size, text)


def _scale_check(scale: float) -> Check:
    err = abs(scale - 1)
    warn, fail = SCALE
    stretch = 1 / scale - 1
    text = f"scaling the centres by {scale:.3f} about the image origin puts the most on nuclei"
    if err > fail:
        return Check("scale", "fail", scale, f"{text}: they are stretched by {stretch:+.1%} against the nuclei, so the "
                     "pixel size used to place them is off by about that much (check --mpp and the alignment)")
    if err > warn:
        return Check("scale", "warn", scale, f"{text}: stretched by {stretch:+.1%}; check the pixel size")
    return Check("scale", "pass", scale, text)


def _spread_points(xy: np.ndarray, n: int, min_gap: float, seed: int = 0) -> np.ndarray:
    """Up to ``n`` window centres spread over the cells (farthest-point sampling), at least ``min_gap`` apart."""
    rng = np.random.default_rng(seed)
    pool = xy[rng.choice(len(xy), min(len(xy), 20_000), replace=False)]
    chosen = [pool[np.argmin(np.linalg.norm(pool - np.median(pool, axis=0), axis=1))]]
    dist = np.linalg.norm(pool - chosen[0], axis=1)
    while len(chosen) < n and dist.max() >= min_gap:
        chosen.append(pool[int(np.argmax(dist))])
        dist = np.minimum(dist, np.linalg.norm(pool - chosen[-1], axis=1))
    # pulled in from the tissue's edge so that a window is full of cells where the tissue allows it
    lo, hi = pool.min(axis=0) + min_gap / 2, pool.max(axis=0) - min_gap / 2
    return np.clip(np.asarray(chosen), np.minimum(lo, hi), np.maximum(lo, hi))


def _random_shift(rng: np.random.Generator, lo: float, hi: float) -> np.ndarray:
    angle, length = rng.uniform(0, 2 * np.pi), rng.uniform(lo, hi)
    return np.array([np.cos(angle), np.sin(angle)]) * length


def _matched(per_window: list[tuple[np.ndarray, np.ndarray]], scale: float, shift: np.ndarray,
             radius: float) -> float:
    """Fraction of the centres, moved to ``scale * centre + shift``, with a detected nucleus within ``radius``."""
    from scipy.spatial import cKDTree

    hits = total = 0
    for cells, nuclei in per_window:
        if len(cells) == 0:
            continue
        total += len(cells)
        if len(nuclei):
            dist, _ = cKDTree(nuclei).query(cells * scale + shift, distance_upper_bound=radius)
            hits += int(np.isfinite(dist).sum())
    return hits / total if total else 0.0


def _fit(per_window: list[tuple[np.ndarray, np.ndarray]], mpp: float, search_um: float,
         max_scale_error: float) -> tuple[float, np.ndarray]:
    """Scale and shift (pixels) of ``scale * centre + shift`` that put the most centres on nuclei (voting).

    A coarse pass over scales moves the farthest centre 4 px per step; a fine pass around its best, 0.5 px.
    """
    from scipy.spatial import cKDTree

    windows = [(c, cKDTree(n)) for c, n in per_window if len(c) and len(n)]
    reach = max(float(np.abs(c).max()) for c, _ in windows)  # px: the farthest centre from the origin
    radius, bin_px = search_um / mpp, max(1.0 / mpp, 1.0)  # 1 um bins
    k = min(32, min(len(t.data) for _, t in windows))

    def vote(scale: float) -> tuple[float, np.ndarray]:
        vectors = []
        for cells, tree in windows:
            moved = cells * scale
            dist, idx = tree.query(moved, k=k, distance_upper_bound=radius)
            dist, idx = dist.reshape(len(moved), -1), idx.reshape(len(moved), -1)
            ok = np.isfinite(dist)
            vectors.append(tree.data[idx[ok]] - np.repeat(moved, ok.sum(axis=1), axis=0))
        return _peak(np.concatenate(vectors), radius, bin_px)

    coarse = min(4.0 / reach, max_scale_error)
    scales = 1 + np.arange(-max_scale_error, max_scale_error + coarse / 2, coarse)
    votes = [vote(s) for s in scales]
    best = int(np.argmax([v[0] for v in votes]))
    fine = 1 + np.arange(scales[best] - 1 - coarse, scales[best] - 1 + coarse, 0.5 / reach)
    votes = [(*vote(s), s) for s in fine] + [(*votes[best], scales[best])]
    peak, shift, scale = max(votes, key=lambda v: v[0])
    return float(scale), shift


def _peak(vectors: np.ndarray, radius: float, bin_px: float) -> tuple[float, np.ndarray]:
    """Height of the sharpest peak of the displacement histogram and its position (refined by a local mean)."""
    from scipy.ndimage import gaussian_filter

    if len(vectors) == 0:
        return 0.0, np.zeros(2)
    edges = np.arange(-radius, radius + bin_px, bin_px)
    hist, _, _ = np.histogram2d(vectors[:, 0], vectors[:, 1], bins=[edges, edges])
    smooth = gaussian_filter(hist, sigma=1.0)
    ix, iy = np.unravel_index(int(np.argmax(smooth)), smooth.shape)
    centre = np.array([edges[ix], edges[iy]]) + bin_px / 2
    near = np.linalg.norm(vectors - centre, axis=1) < 2 * bin_px
    return float(smooth[ix, iy]), vectors[near].mean(axis=0) if near.any() else centre
