"""Where the tissue is on a whole slide: a thumbnail and a tissue mask, so that only tissue is read.

The method is the usual one of whole-slide pipelines (CLAM, Lu et al. 2021; HistoQC), built from
scikit-image: the slide is read at about ``mask_mpp`` micrometres per pixel (default 8; from the coarsest
pyramid level that is fine enough, averaged in blocks, one strip at a time), converted to HSV; the saturation
is median-filtered and thresholded with Otsu's method (never below ``min_saturation``, so a blank slide has no
tissue); the mask is closed with a disk of ``closing_um``, holes smaller than ``max_hole_um2`` are filled and
pieces smaller than ``min_area_um2`` removed. Glass is unsaturated (white or grey), stained tissue is not; pen
marks are saturated too and count as tissue.

Memory: the thumbnail (3 bytes per ``mask_mpp``-sized pixel: 6 MB for a 20 x 20 mm slide at 8 um/px) and one
strip of the level it is read from.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from gcmoe.data.image import BACKGROUND, SlideImage
from gcmoe.errors import InvalidSampleError

__all__ = ["TissueMask", "detect_tissue", "slide_thumbnail"]

log = logging.getLogger(__name__)

STRIP_BYTES = 64 << 20  # one strip of the source level read at a time for the thumbnail


@dataclass
class TissueMask:
    """A tissue mask on a thumbnail of the slide.

    Attributes
    ----------
    mask
        (h, w) bool, True on tissue.
    thumbnail
        (h, w, 3) uint8 RGB thumbnail the mask was computed on.
    downsample
        Full-resolution pixels per thumbnail pixel (x, y).
    mpp
        Micrometres per full-resolution pixel.
    threshold
        The saturation threshold used (Otsu's, or ``min_saturation`` when that was higher).
    """

    mask: np.ndarray
    thumbnail: np.ndarray
    downsample: tuple[float, float]
    mpp: float
    threshold: float

    @property
    def fraction(self) -> float:
        """Share of the slide's area that is tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    @property
    def area_mm2(self) -> float:
        """Tissue area in square millimetres."""
        px_um2 = self.downsample[0] * self.downsample[1] * self.mpp**2
        return float(self.mask.sum()) * px_um2 / 1e6

    def covers(self, x0: float, y0: float, x1: float, y1: float) -> bool:
        """Whether the full-resolution box [x0, x1) x [y0, y1) touches tissue."""
        dx, dy = self.downsample
        h, w = self.mask.shape
        c0, r0 = max(int(math.floor(x0 / dx)), 0), max(int(math.floor(y0 / dy)), 0)
        c1, r1 = min(int(math.ceil(x1 / dx)), w), min(int(math.ceil(y1 / dy)), h)
        return bool(c1 > c0 and r1 > r0 and self.mask[r0:r1, c0:c1].any())

    def contains(self, xy: np.ndarray) -> np.ndarray:
        """For each full-resolution point (x, y), whether it lies on tissue."""
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        h, w = self.mask.shape
        cols = np.clip((xy[:, 0] / self.downsample[0]).astype(np.int64), 0, w - 1)
        rows = np.clip((xy[:, 1] / self.downsample[1]).astype(np.int64), 0, h - 1)
        return self.mask[rows, cols]


def slide_thumbnail(image: SlideImage, downsample: float) -> tuple[np.ndarray, tuple[float, float]]:
    """The slide reduced about ``downsample`` times, as uint8 (h, w, 3), and the exact full-resolution pixels per
    thumbnail pixel (x, y).

    Reads the coarsest pyramid level at most ``downsample`` times smaller than full resolution (images with
    ``level_shapes`` and ``read_level``: TIFF, OpenSlide), one strip at a time, and averages blocks of it; other
    images are read at full resolution, strip by strip.
    """
    height, width = image.shape
    levels = list(getattr(image, "level_shapes", [(height, width)]))
    scales = [width / w for _, w in levels]
    level = max((i for i, s in enumerate(scales) if s <= downsample * 1.01), key=lambda i: scales[i], default=0)
    lh, lw = levels[level]
    if level == 0:
        def read(y0: int, y1: int) -> np.ndarray:
            return image.read_region(0, y0, lw, y1 - y0)
    else:
        def read(y0: int, y1: int) -> np.ndarray:
            return image.read_level(level, y0, y1, 0, lw)  # type: ignore[attr-defined]
    factor = max(int(round(downsample / scales[level])), 1)
    th, tw = math.ceil(lh / factor), math.ceil(lw / factor)
    out = np.empty((th, tw, 3), dtype=np.uint8)
    rows_per_strip = max(STRIP_BYTES // (3 * lw * factor), 1) * factor
    for y0 in range(0, lh, rows_per_strip):
        y1 = min(y0 + rows_per_strip, lh)
        strip = read(y0, y1)
        pad_y, pad_x = (-strip.shape[0]) % factor, (-lw) % factor
        if pad_y or pad_x:
            strip = np.pad(strip, ((0, pad_y), (0, pad_x), (0, 0)), constant_values=BACKGROUND)
        blocks = strip.reshape(strip.shape[0] // factor, factor, strip.shape[1] // factor, factor, 3)
        out[y0 // factor : y0 // factor + blocks.shape[0]] = blocks.mean(axis=(1, 3)).round().astype(np.uint8)
    return out, (width / tw, height / th)


def detect_tissue(
    image: SlideImage,
    mpp: float,
    mask_mpp: float = 8.0,
    max_side: int = 8192,
    min_saturation: float = 0.05,
    median_um: float = 48.0,
    closing_um: float = 64.0,
    max_hole_um2: float = 20_000.0,
    min_area_um2: float = 5_000.0,
) -> TissueMask:
    """The tissue of ``image`` (pixel size ``mpp``) on a thumbnail at about ``mask_mpp`` um/px (coarser when its
    longer side would pass ``max_side``): Otsu's threshold on the median-filtered HSV saturation, then closing,
    hole filling and removal of small pieces (sizes in micrometres; see the module's docstring)."""
    from skimage.color import rgb2hsv
    from skimage.filters import median, threshold_otsu
    from skimage.morphology import closing, disk, remove_small_holes, remove_small_objects

    if not mpp > 0:
        raise InvalidSampleError(f"tissue detection needs the slide's pixel size; got mpp={mpp} (give --mpp)")
    height, width = image.shape
    downsample = max(mask_mpp / mpp, max(height, width) / max_side, 1.0)
    thumb, scale = slide_thumbnail(image, downsample)
    um = scale[0] * mpp  # micrometres per thumbnail pixel
    saturation = rgb2hsv(thumb)[..., 1]
    radius = max(int(round(median_um / 2 / um)), 1)
    smooth = median((saturation * 255).astype(np.uint8), disk(radius)) / 255.0
    otsu = float(threshold_otsu(smooth)) if np.ptp(smooth) > 0 else 1.0
    threshold = max(otsu, min_saturation)
    mask = smooth > threshold
    mask = closing(mask, disk(max(int(round(closing_um / 2 / um)), 1)))
    mask = remove_small_holes(mask, max_size=max(int(max_hole_um2 / um**2), 1))
    mask = remove_small_objects(mask, max_size=max(int(min_area_um2 / um**2), 1))
    result = TissueMask(mask=mask, thumbnail=thumb, downsample=scale, mpp=float(mpp), threshold=threshold)
    log.info("tissue: %.1f%% of %s (%.2f mm2), saturation threshold %.3f on a %dx%d thumbnail",
             100 * result.fraction, getattr(image, "path", None) or "the image", result.area_mm2, threshold,
             thumb.shape[1], thumb.shape[0])
    return result
