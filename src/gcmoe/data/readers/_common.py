"""Checks and helpers the readers share: centres against the image, pixel sizes, uns-safe provenance."""

from __future__ import annotations

import logging
import math

import numpy as np

from gcmoe.data.sample import MPP_PLAUSIBLE
from gcmoe.errors import InvalidSampleError

log = logging.getLogger(__name__)

MAX_OUTSIDE_FRACTION = 0.01  # up to 1% of cells (segmentation edge effects) are dropped with a warning


def inside_image(xy: np.ndarray, shape: tuple[int, int], sample_id: str, mpp: float | None, source: str) -> np.ndarray:
    """Boolean mask of centres inside the image; raise when more than 1% fall outside (wrong units/alignment).

    ``shape`` is (height, width) of the full-resolution image; ``source`` names where the centres came from.
    """
    height, width = shape
    ok = np.isfinite(xy).all(axis=1) & (xy[:, 0] >= 0) & (xy[:, 0] < width) & (xy[:, 1] >= 0) & (xy[:, 1] < height)
    n_out = int((~ok).sum())
    if n_out == 0:
        return ok
    if n_out <= MAX_OUTSIDE_FRACTION * len(xy):
        log.warning("sample %s: %d of %d cell centres lie outside the image and are dropped", sample_id, n_out, len(xy))
        return ok
    finite = xy[np.isfinite(xy).all(axis=1)]
    hi = finite.max(axis=0) if len(finite) else np.array([np.nan, np.nan])
    lo = finite.min(axis=0) if len(finite) else np.array([np.nan, np.nan])
    hint = "are they micrometres? give --mpp or the alignment"
    if mpp and len(finite) and np.all(hi * mpp < [width, height]) and np.all(lo >= 0):
        hint = f"they would fit if they were scaled by mpp={mpp:g}: are they pixels of another image level?"
    raise InvalidSampleError(
        f"sample {sample_id}: cell centres from {source} extend to ({hi[0]:.0f}, {hi[1]:.0f}) px (from "
        f"({lo[0]:.0f}, {lo[1]:.0f})) but the image is {width} x {height} px; {n_out} of {len(xy)} lie outside; "
        f"{hint}"
    )


def check_mpp(mpp: float | None, sample_id: str, where: str) -> float:
    """A usable micrometres-per-pixel value, or an error that says how to give one."""
    if mpp is None:
        raise InvalidSampleError(
            f"sample {sample_id}: the pixel size of the H&E image is unknown ({where}); give it with --mpp "
            "(micrometres per pixel, e.g. 0.2125 or 0.5)"
        )
    mpp = float(mpp)
    lo, hi = MPP_PLAUSIBLE
    if not math.isfinite(mpp) or not lo <= mpp <= hi:
        raise InvalidSampleError(
            f"sample {sample_id}: mpp={mpp} um/px ({where}) is implausible for an H&E image (expected {lo}-{hi}); "
            "check the units (micrometres per pixel) or give --mpp"
        )
    return mpp


def differs(a: float | None, b: float | None, tolerance: float = 0.05) -> bool:
    """True when both values are known and differ by more than ``tolerance`` (relative)."""
    return a is not None and b is not None and abs(a - b) > tolerance * max(abs(a), abs(b))
