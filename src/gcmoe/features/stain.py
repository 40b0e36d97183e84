"""Per-slide stain normalisation (Reinhard et al. 2001) before the encoder: ``features.stain_norm: reinhard``.

Each slide's colours are moved, in CIE Lab (D65, 2 degree observer), so that its tissue pixels have a fixed
target mean and standard deviation per channel::

    lab' = (lab - mean_slide) / std_slide * TARGET_STD + TARGET_MEAN

``mean_slide`` and ``std_slide`` are measured once per slide (:func:`slide_lab_stats`) over tissue pixels
(``L < TISSUE_MAX_L``: not glass) in a fixed, seeded set of small full-resolution windows centred on cells, so
they cost little on a whole slide and never read it whole. :class:`ReinhardImage` wraps a slide so that every
region it reads comes back normalised (uint8 RGB, out-of-gamut colours clipped). Every pixel is mapped on its
own, glass and the white padding beyond the slide's edge included, so tiled extraction still equals one big
tile.

The colour conversions are written in torch float32 rather than taken from ``skimage.color`` (float64,
several times slower): at 2 slide megapixels per second the conversion of every tile must cost little. They
follow skimage's constants (sRGB matrix, D65 white (0.95047, 1, 1.08883), the CIE 0.008856 / 7.787 branches)
and agree with ``rgb2lab`` / ``lab2rgb`` to about 2e-4 in Lab (tested).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from gcmoe.errors import ConfigError, GcmoeError, InvalidSampleError

if TYPE_CHECKING:
    import torch

    from gcmoe.data.image import SlideImage

__all__ = [
    "STAIN_NORMS",
    "TARGET_MEAN",
    "TARGET_STD",
    "LabStats",
    "ReinhardImage",
    "StainNormError",
    "lab_to_rgb",
    "reinhard_normalise",
    "rgb_to_lab",
    "slide_lab_stats",
]

log = logging.getLogger(__name__)

STAIN_NORMS = ("none", "reinhard")  # the values of FeatureConfig.stain_norm

TISSUE_MAX_L = 88.0  # pixels with L* below this are tissue, above it glass (as benchmarks/real_he.py)
N_WINDOWS = 64  # windows per slide for its Lab statistics
WINDOW_PX = 128  # their side, full-resolution pixels
MIN_TISSUE_PIXELS = 2_000  # fewer tissue pixels than this in all windows together: no reliable statistics

# The target: the Lab tissue mean and standard deviation of the package's default virtual tissue, measured
# the way every slide is measured (slide_lab_stats with its defaults, seed 0) on
# simulate_tissue(TissueConfig()).sample (2400 x 2400 px, 10,000 cells, stain preset "standard"; gcmoe 0.1),
# so normalising the default virtual tissue is close to the identity. (Over every tissue pixel of that image
# instead of windows centred on cells: mean (52.10, 29.36, -12.46), std (18.47, 6.41, 8.97); the windows see
# more nuclei, hence darker.) Changing these changes every normalised feature, but cache entries stay keyed
# by "reinhard": delete them.
TARGET_MEAN = (47.55, 29.97, -14.32)
TARGET_STD = (18.49, 5.86, 8.91)

# sRGB (linear) -> XYZ, the matrix of skimage.color.xyz_from_rgb, and the D65 / 2 degree white point
_XYZ_FROM_RGB = ((0.412453, 0.357580, 0.180423), (0.212671, 0.715160, 0.072169), (0.019334, 0.119193, 0.950227))
_WHITE = (0.95047, 1.0, 1.08883)


class StainNormError(GcmoeError, ValueError):
    """A slide's stain statistics cannot be measured (too little tissue where its cells are)."""


class LabStats(NamedTuple):
    """A slide's Lab tissue statistics: per-channel mean and standard deviation (L, a, b), and pixels used."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    tissue_pixels: int


def _matrices(device: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(linear sRGB -> XYZ / white, XYZ / white -> linear sRGB), float32."""
    import torch

    xyz_from_rgb = torch.tensor(_XYZ_FROM_RGB, dtype=torch.float64)
    white = torch.tensor(_WHITE, dtype=torch.float64)
    # white folded into the matrices (float64 inverse, then float32), so each way is one 3 x 3 product
    to_xyz = (xyz_from_rgb / white[:, None]).float().to(device)
    to_rgb = (torch.linalg.inv(xyz_from_rgb) * white[None, :]).float().to(device)
    return to_xyz, to_rgb


# The CIE and sRGB piecewise curves, written as max/min sums rather than torch.where (both branches meet at the
# threshold, so the sum equals the piecewise curve to ~1e-7): fewer passes over the pixels. Inputs are consumed.
_LAB_T, _LAB_F = 0.008856, 0.2068966  # t = (6/29)**3 and f = 6/29, rounded as skimage rounds them
_SRGB_T = 0.0031308


def _lab_f(t: torch.Tensor) -> torch.Tensor:
    return t.clamp(min=_LAB_T).pow_(1.0 / 3.0).add_(t.clamp_(max=_LAB_T).sub_(_LAB_T).mul_(7.787))


def _lab_f_inverse(f: torch.Tensor) -> torch.Tensor:
    g = f.clamp(min=_LAB_F)
    return (g * g).mul_(g).add_(f.clamp_(max=_LAB_F).sub_(_LAB_F).div_(7.787))


def _srgb_encode(linear: torch.Tensor) -> torch.Tensor:
    """Gamma-encoded sRGB in [0, 1] (clipped) of linear values."""
    encoded = linear.clamp(min=_SRGB_T).pow_(1.0 / 2.4).mul_(1.055).sub_(0.055)
    return encoded.add_(linear.clamp_(max=_SRGB_T).sub_(_SRGB_T).mul_(12.92)).clamp_(0.0, 1.0)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """CIE Lab (D65) of sRGB in [0, 1], channels last: ``(..., 3)`` float32 -> ``(..., 3)`` float32."""
    import torch

    to_xyz, _ = _matrices(rgb.device)
    rgb = rgb.float()
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055).pow(2.4), rgb / 12.92)
    fx, fy, fz = _lab_f(linear @ to_xyz.T).unbind(-1)  # to_xyz is already divided by the white point
    return torch.stack((116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)), dim=-1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1] (clipped) of CIE Lab (D65), channels last: ``(..., 3)`` float32 -> ``(..., 3)`` float32.

    As ``skimage.color.lab2rgb``: a negative ``z`` (a very blue Lab colour) is set to 0, and out-of-gamut
    colours are clipped to [0, 1].
    """
    import torch

    _, to_rgb = _matrices(lab.device)
    L, a, b = lab.float().unbind(-1)
    fy = (L + 16.0) / 116.0
    f = torch.stack((a / 500.0 + fy, fy, (fy - b / 200.0).clamp(min=0.0)), dim=-1)
    return _srgb_encode(_lab_f_inverse(f) @ to_rgb.T)


def reinhard_normalise(rgb: np.ndarray, stats: LabStats, target_mean: tuple[float, float, float] = TARGET_MEAN,
                       target_std: tuple[float, float, float] = TARGET_STD) -> np.ndarray:
    """``rgb`` (uint8, ``(..., 3)``) with its Lab moved from ``stats`` to the target: uint8 RGB, same shape.

    The same maths as ``lab_to_rgb(rgb_to_lab(rgb) * scale + shift)``, fused for speed: the gamma decoding is a
    256-entry table, and since Lab is linear in the cube-rooted XYZ ``f`` and Reinhard's transfer is affine in
    Lab, the whole transfer is one 3 x 3 affine map of ``f``.
    """
    import torch

    shape = np.shape(rgb)
    pixels = np.ascontiguousarray(rgb, dtype=np.uint8).reshape(-1, 3)
    to_xyz, to_rgb = _matrices()
    matrix, offset = _reinhard_affine(stats, target_mean, target_std)
    f = (_lab_f(torch.from_numpy(_linear_table()[pixels]) @ to_xyz.T) @ matrix.T).add_(offset)
    f[:, 2].clamp_(min=0.0)  # as lab_to_rgb: z >= 0
    srgb = _srgb_encode(_lab_f_inverse(f) @ to_rgb.T)
    return srgb.mul_(255.0).round_().to(torch.uint8).numpy().reshape(shape)


@functools.cache
def _linear_table() -> np.ndarray:
    """Linear sRGB of each uint8 value, float32 (256,)."""
    c = np.arange(256, dtype=np.float64) / 255.0
    return np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92).astype(np.float32)


def _reinhard_affine(stats: LabStats, target_mean: tuple[float, float, float],
                     target_std: tuple[float, float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(M, v)`` with ``f' = M f + v`` the Reinhard transfer in cube-rooted XYZ ``f`` (float64 maths, float32)."""
    import torch

    lab_from_f = torch.tensor([[0.0, 116.0, 0.0], [500.0, -500.0, 0.0], [0.0, 200.0, -200.0]], dtype=torch.float64)
    lab_offset = torch.tensor([-16.0, 0.0, 0.0], dtype=torch.float64)
    f_from_lab = torch.linalg.inv(lab_from_f)
    scale = torch.tensor(target_std, dtype=torch.float64) / torch.tensor(stats.std, dtype=torch.float64)
    shift = torch.tensor(target_mean, dtype=torch.float64) - torch.tensor(stats.mean, dtype=torch.float64) * scale
    # f' = F (S (P f + c) + t - c), with F = P^-1
    matrix = f_from_lab @ torch.diag(scale) @ lab_from_f
    offset = f_from_lab @ (scale * lab_offset + shift - lab_offset)
    return matrix.float(), offset.float()


def _window_origins(xy_px: np.ndarray, n_windows: int, window: int, seed: int) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(len(xy_px), size=min(n_windows, len(xy_px)), replace=False))
    return [(int(np.floor(x)) - window // 2, int(np.floor(y)) - window // 2) for x, y in xy_px[chosen]]


def slide_lab_stats(image: SlideImage, xy_px: np.ndarray, *, n_windows: int = N_WINDOWS, window: int = WINDOW_PX,
                    seed: int = 0, name: str | None = None) -> LabStats:
    """The Lab mean and standard deviation of a slide's tissue pixels (``L < TISSUE_MAX_L``).

    Measured at full resolution in up to ``n_windows`` windows of ``window`` pixels centred on cells drawn
    with ``seed`` from ``xy_px`` (cell centres (x, y), full-resolution pixels), so the same slide and cells
    always give the same statistics.

    Raises
    ------
    StainNormError
        When the windows hold fewer than ``MIN_TISSUE_PIXELS`` tissue pixels (glass, a blank or non-H&E
        image, or cell centres that miss the tissue).
    """
    import torch

    xy_px = np.asarray(xy_px, dtype=np.float64).reshape(-1, 2)
    where = name or (str(image.path) if image.path is not None else "the slide")
    if len(xy_px) == 0:
        raise InvalidSampleError(f"{where}: no cells, so no tissue to measure the stain on; give its cell centres")
    total = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    count = 0
    for x0, y0 in _window_origins(xy_px, n_windows, window, seed):
        region = torch.from_numpy(np.ascontiguousarray(image.read_region(x0, y0, window, window)))
        lab = rgb_to_lab(region.float().div_(255.0)).reshape(-1, 3)
        tissue = lab[lab[:, 0] < TISSUE_MAX_L].double()
        total += tissue.sum(0)
        squares += tissue.square().sum(0)
        count += len(tissue)
    if count < MIN_TISSUE_PIXELS:
        raise StainNormError(
            f"{where}: only {count} tissue pixels (CIE L* < {TISSUE_MAX_L:g}) in {min(n_windows, len(xy_px))} "
            f"windows of {window} px around its cells, fewer than the {MIN_TISSUE_PIXELS} that stain "
            "normalisation needs: the image looks like glass or is not an H&E (check the image and that the cell "
            "centres lie on its tissue, in pixels), or set features.stain_norm: none")
    mean = total / count
    std = (squares / count - mean.square()).clamp(min=0.0).sqrt()
    if float(std.min()) < 1e-3:
        raise StainNormError(
            f"{where}: its tissue pixels have one flat colour (Lab standard deviation {std.tolist()}): not an H&E "
            "image to normalise; check the image, or set features.stain_norm: none")
    return LabStats(tuple(float(v) for v in mean), tuple(float(v) for v in std), count)


class ReinhardImage:
    """A slide whose regions read Reinhard-normalised to the target (:func:`reinhard_normalise`).

    Every attribute other than ``read_region`` (``shape``, ``path``, ``mpp``, pyramid levels...) is the
    wrapped image's; ``read_level`` (a lower pyramid level) is not normalised.
    """

    def __init__(self, image: SlideImage, stats: LabStats,
                 target_mean: tuple[float, float, float] = TARGET_MEAN,
                 target_std: tuple[float, float, float] = TARGET_STD) -> None:
        self.image = image
        self.stats = stats
        self.target_mean = tuple(float(v) for v in target_mean)
        self.target_std = tuple(float(v) for v in target_std)

    @property
    def shape(self) -> tuple[int, int]:
        return self.image.shape

    @property
    def path(self) -> Path | None:
        return self.image.path

    def read_region(self, x: int, y: int, width: int, height: int) -> np.ndarray:
        """Pixels [y, y + height) x [x, x + width), normalised, uint8 (height, width, 3)."""
        return reinhard_normalise(self.image.read_region(x, y, width, height), self.stats, self.target_mean,
                                  self.target_std)

    def __getattr__(self, name: str) -> Any:
        if name == "image":  # not set yet (e.g. while unpickling): do not recurse
            raise AttributeError(name)
        return getattr(self.image, name)

    def __repr__(self) -> str:
        return f"ReinhardImage({self.image!r}, mean={self.stats.mean}, std={self.stats.std})"


def stain_normalised(image: SlideImage, xy_px: np.ndarray, method: str, name: str | None = None) -> SlideImage:
    """``image`` as the encoder should read it under ``features.stain_norm = method``: itself for ``none``, a
    :class:`ReinhardImage` with the slide's statistics (:func:`slide_lab_stats` at ``xy_px``) for ``reinhard``."""
    if method == "none":
        return image
    if method == "reinhard":
        stats = slide_lab_stats(image, xy_px, name=name)
        log.info("stain of %s: Lab tissue mean %s, std %s (%d pixels) -> target %s, %s", name or "the slide",
                 _fmt(stats.mean), _fmt(stats.std), stats.tissue_pixels, _fmt(TARGET_MEAN), _fmt(TARGET_STD))
        return ReinhardImage(image, stats)
    raise ConfigError(f"unknown stain normalisation {method!r}; choose one of {', '.join(STAIN_NORMS)}")


def _fmt(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:.1f}" for v in values) + ")"
