"""Checks and helpers the readers share: centres against the image, pixel sizes, uns-safe provenance."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from gcmoe.data.image import PILLOW_SIGNATURES, file_signature, image_mpp
from gcmoe.data.sample import MPP_PLAUSIBLE
from gcmoe.errors import InvalidSampleError

log = logging.getLogger(__name__)

MAX_OUTSIDE_FRACTION = 0.01  # up to 1% of cells (segmentation edge effects) are dropped with a warning


def fits(xy: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Boolean mask of the finite centres (x, y) that lie inside an image of ``shape`` (height, width)."""
    height, width = shape
    return np.isfinite(xy).all(axis=1) & (xy[:, 0] >= 0) & (xy[:, 0] < width) & (xy[:, 1] >= 0) & (xy[:, 1] < height)


def inside_image(xy: np.ndarray, shape: tuple[int, int], sample_id: str, mpp: float | None, source: str,
                 alternatives: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
    """Boolean mask of centres inside the image; raise when more than 1% fall outside (wrong units/alignment).

    ``shape`` is (height, width) of the full-resolution image; ``source`` names where the centres came from;
    ``alternatives`` maps the advice for another reading of the same centres (other unit, x and y swapped) to the
    pixels that reading gives: when all of those fit the image, the error gives that advice.
    """
    height, width = shape
    not_finite = ~np.isfinite(xy).all(axis=1)
    if not_finite.any():  # never "outside the image": a NaN centre is missing, not misplaced
        raise InvalidSampleError(f"sample {sample_id}: {int(not_finite.sum())} of {len(xy)} cell centres from {source} "
                                 "are NaN or infinite; drop those cells or give their centres")
    ok = fits(xy, shape)
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
    fitting = [advice for advice, other in (alternatives or {}).items() if fits(other, shape).mean() > 1 - MAX_OUTSIDE_FRACTION]
    if fitting:
        hint = f"they fit the image when read another way: {fitting[0]}"
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
            f"sample {sample_id}: mpp={mpp:.4g} um/px ({where}) is implausible for an H&E image (expected {lo}-{hi}); "
            "check the units (micrometres per pixel) or give --mpp"
        )
    return mpp


def plausible_mpp(mpp: float) -> bool:
    """True when ``mpp`` lies in the range of H&E scans (:data:`gcmoe.data.sample.MPP_PLAUSIBLE`)."""
    lo, hi = MPP_PLAUSIBLE
    return math.isfinite(mpp) and lo <= mpp <= hi


def choose_mpp(
    given: float | None, sources: Mapping[str, float | None], sample_id: str, unknown: str
) -> tuple[float, str]:
    """The pixel size to use and where it came from: ``given`` (``--mpp``) when set, else the first known value
    of ``sources`` (in order of preference) after every other known source has agreed with it.

    Every value passes the plausibility check (:func:`check_mpp`); an implausible secondary source is ignored
    with a warning. Two plausible sources more than 5% apart stop with both values: which one is right cannot
    be told from the files, and a wrong pixel size scales every micrometre-based step (windows, neighbours,
    the encoder's resampling). ``unknown`` says why no source is known, for the error that asks for ``--mpp``.
    """
    if given is not None:
        return check_mpp(given, sample_id, "--mpp"), "argument"
    known = [(name, float(value)) for name, value in sources.items() if value is not None]
    if not known:
        check_mpp(None, sample_id, unknown)  # raises: asks for --mpp
    (first, value), others = known[0], known[1:]
    value = check_mpp(value, sample_id, first)
    for name, other in others:
        if not plausible_mpp(other):
            log.warning("sample %s: %s gives %.4g um/px, implausible for an H&E image; ignored", sample_id, name, other)
        elif differs(value, other):
            raise InvalidSampleError(
                f"sample {sample_id}: the pixel size sources disagree: {first} says {value:.4g} um/px, {name} says "
                f"{other:.4g} um/px ({abs(value - other) / max(value, other):.0%} apart); the files cannot tell which "
                "is right: measure it (e.g. a scale bar, or the scanner's magnification: 0.25 um/px at 40x, 0.5 at "
                "20x) and give it with --mpp"
            )
    return value, first


def resolve_image_mpp(path: str | os.PathLike, given: float | None, sample_id: str) -> tuple[float, str]:
    """The pixel size of a bare image: ``given`` (``--mpp``), else what the file states (OME, TIFF tags,
    OpenSlide; :func:`gcmoe.data.image.image_mpp`) through the plausibility check, else an error asking for
    ``--mpp`` that says when the format cannot carry one (PNG, JPEG)."""
    stated = image_mpp(path) if given is None else None
    sources = {} if stated is None else {stated[1]: stated[0]}
    return choose_mpp(given, sources, sample_id, unknown=no_mpp_reason(Path(path)))


def no_mpp_reason(path: Path) -> str:
    """Why an image states no pixel size, for the error that asks for ``--mpp``."""
    if file_signature(path).startswith(PILLOW_SIGNATURES):
        return f"{path.name} is a PNG/JPEG image, and PNG and JPEG files do not record the microscope's pixel size"
    return f"{path.name} has no OME PhysicalSizeX nor TIFF resolution tags"


def differs(a: float | None, b: float | None, tolerance: float = 0.05) -> bool:
    """True when both values are known and differ by more than ``tolerance`` (relative)."""
    return a is not None and b is not None and abs(a - b) > tolerance * max(abs(a), abs(b))
