"""Cell-centre units: pixels or micrometres, and the checks that tell them apart.

A reader turns the centres it finds into full-resolution H&E pixels (``obsm["spatial"]``): pixels are taken as
they are, micrometres are divided by the pixel size. A wrong unit does not fail by itself: micrometres read as
pixels at 0.2125 um/px crowd every cell into the image's top-left fifth, where they still lie "inside" it. Two
measures catch it: the extent (every centre must fit the image; :func:`gcmoe.data.readers._common.inside_image`)
and the median nearest-neighbour distance, which for cells is about 5-30 um (nuclei are 5-10 um wide, so no
two cell centres lie closer than about 3 um in any tissue). A subsample of cells is sparser than the tissue,
so only a spacing that is too small is refused; one that is too large is reported in the log.
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np

from gcmoe.errors import InvalidSampleError

log = logging.getLogger(__name__)

Coords = Literal["auto", "px", "um"]
COORDS = ("auto", "px", "um")

CELL_SPACING_UM = (5.0, 30.0)  # typical median nearest-neighbour distance between cell centres
MIN_SPACING_UM = 2.5  # closer than this, the centres cannot be cells at this pixel size
SPACING_SAMPLE = 50_000  # centres used to measure the spacing (enough for a stable median)


def median_spacing(xy: np.ndarray, seed: int = 0) -> float | None:
    """Median distance from each centre to its nearest neighbour (duplicates ignored), or None for < 2 centres.

    Uses at most :data:`SPACING_SAMPLE` centres as queries against all of them.
    """
    from scipy.spatial import cKDTree

    xy = np.unique(xy[np.isfinite(xy).all(axis=1)], axis=0)
    if len(xy) < 2:
        return None
    queries = xy
    if len(xy) > SPACING_SAMPLE:
        queries = xy[np.random.default_rng(seed).choice(len(xy), SPACING_SAMPLE, replace=False)]
    dist, _ = cKDTree(xy).query(queries, k=2)
    return float(np.median(dist[:, 1]))


def to_pixels(raw: np.ndarray, coords: Literal["px", "um"], mpp: float) -> np.ndarray:
    """Centres in full-resolution pixels: ``raw`` as is (``px``) or divided by ``mpp`` (``um``)."""
    return raw / mpp if coords == "um" else raw


def check_spacing(raw: np.ndarray, coords: Literal["px", "um"], mpp: float, sample_id: str, source: str) -> None:
    """Refuse centres that lie too close together to be cells at this pixel size, saying which unit they look like.

    Parameters
    ----------
    raw
        The centres as the file gives them, (n, 2).
    coords
        Their unit as read: ``px`` (pixels of the image) or ``um`` (micrometres).
    mpp
        Micrometres per pixel of the image.
    source
        Where the centres came from (file and field), for the message.
    """
    spacing = median_spacing(raw)
    if spacing is None or spacing == 0:
        return
    unit = "px" if coords == "px" else "um"
    spacing_um = spacing * mpp if coords == "px" else spacing
    lo, hi = CELL_SPACING_UM
    measured = f"a median {spacing:.3g} {unit} apart ({spacing_um:.3g} um at {mpp:.4g} um/px)" if coords == "px" \
        else f"a median {spacing:.3g} um apart"
    if spacing_um >= MIN_SPACING_UM:
        if spacing_um > hi:
            log.warning("sample %s: the cell centres from %s are %s, sparser than cells in tissue (%g-%g um apart): "
                        "a subsample of the cells, or a pixel size too large by about %.0fx", sample_id, source,
                        measured, lo, hi, spacing_um / ((lo + hi) / 2))
        return
    raise InvalidSampleError(
        f"sample {sample_id}: the cell centres from {source} are {measured}: too close together for cells, which "
        f"lie about {lo:g}-{hi:g} um apart; {_unit_hint(spacing, coords, mpp)}"
    )


def _unit_hint(spacing: float, coords: Literal["px", "um"], mpp: float) -> str:
    """Which unit centres ``spacing`` apart look like, and what to give."""
    lo, hi = CELL_SPACING_UM
    if coords == "px" and lo <= spacing <= hi:
        return f"read as micrometres they would be {spacing:.3g} um apart: they look like micrometres, give --coords um"
    factor = (lo + hi) / 2 / (spacing * mpp if coords == "px" else spacing)
    if coords == "px":
        return (f"they look like pixels of an image about {factor:.0f}x smaller than this one (a downsampled level: "
                f"give that image, or scale the centres), or the pixel size is about {factor:.0f}x too small: "
                "check --mpp and --coords")
    return (f"read as pixels they would be {spacing * mpp:.3g} um apart: check --coords (px or um) and the pixel size "
            f"(--mpp {mpp:.4g})")
