"""Lazy access to H&E images: read a region of the full-resolution level without loading the slide.

Implementations share one small protocol: :class:`ArrayImage` (an RGB array in memory, e.g. a freshly
generated virtual tissue), :class:`TiffImage` (a tiled, possibly pyramidal, TIFF or BigTIFF read through
tifffile's zarr store, so only the tiles a region touches are decoded) and :class:`OpenSlideImage` (vendor
formats through OpenSlide, with the optional ``openslide`` extra).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from gcmoe.errors import ImageReadError
from gcmoe.files import atomic_path

BACKGROUND = 255  # pixels outside the image read as white glass


@runtime_checkable
class SlideImage(Protocol):
    """What every image handle offers."""

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of the full-resolution level, in pixels."""
        ...

    @property
    def path(self) -> Path | None:
        """The file the image is read from, or None for an in-memory image."""
        ...

    def read_region(self, x: int, y: int, width: int, height: int) -> np.ndarray:
        """Pixels [y, y + height) x [x, x + width) as uint8 (height, width, 3); outside the image reads white."""
        ...


def _padded_read(getter, shape: tuple[int, int], x: int, y: int, width: int, height: int) -> np.ndarray:
    """Read the part of a region inside the image through ``getter(y0, y1, x0, x1)``, pad the rest white."""
    if width <= 0 or height <= 0:
        raise ValueError(f"region size must be positive, got width={width}, height={height}")
    out = np.full((height, width, 3), BACKGROUND, dtype=np.uint8)
    h, w = shape
    x0, y0 = max(x, 0), max(y, 0)
    x1, y1 = min(x + width, w), min(y + height, h)
    if x1 > x0 and y1 > y0:
        out[y0 - y : y1 - y, x0 - x : x1 - x] = getter(y0, y1, x0, x1)
    return out


class ArrayImage:
    """An RGB image held in memory."""

    def __init__(self, array: np.ndarray) -> None:
        array = np.asarray(array)
        if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
            raise ImageReadError(
                f"an in-memory H&E image must be uint8 of shape (height, width, 3); got {array.dtype} {array.shape}"
            )
        self.array = array

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.array.shape[0]), int(self.array.shape[1])

    @property
    def path(self) -> Path | None:
        return None

    def read_region(self, x: int, y: int, width: int, height: int) -> np.ndarray:
        return _padded_read(lambda y0, y1, x0, x1: self.array[y0:y1, x0:x1], self.shape, x, y, width, height)


class TiffImage:
    """A (pyramidal) TIFF read lazily: level 0 through tifffile's zarr store."""

    def __init__(self, path: str | os.PathLike) -> None:
        import tifffile
        import zarr

        self._path = Path(path)
        if not self._path.is_file():
            raise ImageReadError(f"image file not found: {self._path}")
        try:
            store = tifffile.imread(self._path, aszarr=True)
            node = zarr.open(store, mode="r")
            level0 = node["0"] if isinstance(node, zarr.Group) else node
        except Exception as exc:  # tifffile raises several types for broken files
            raise ImageReadError(
                f"cannot read {self._path} as a TIFF image ({type(exc).__name__}: {exc}); "
                "check that the file is complete and is a TIFF/BigTIFF"
            ) from exc
        shape = tuple(level0.shape)
        if len(shape) == 3 and shape[0] in (3, 4) and shape[2] not in (3, 4):
            raise ImageReadError(f"{self._path}: planar (channel-first) images are not supported; save it as RGB")
        if len(shape) != 3 or shape[2] not in (3, 4) or level0.dtype != np.uint8:
            raise ImageReadError(
                f"{self._path}: expected an 8-bit RGB image (height, width, 3); got {level0.dtype} {shape}"
            )
        self._level0 = level0
        self._store = store

    @property
    def shape(self) -> tuple[int, int]:
        return int(self._level0.shape[0]), int(self._level0.shape[1])

    @property
    def path(self) -> Path | None:
        return self._path

    def read_region(self, x: int, y: int, width: int, height: int) -> np.ndarray:
        def get(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
            try:
                return np.asarray(self._level0[y0:y1, x0:x1, :3])
            except Exception as exc:
                raise ImageReadError(
                    f"{self._path}: failed to decode region x={x0}..{x1}, y={y0}..{y1} ({exc}); "
                    "the file may be truncated"
                ) from exc

        return _padded_read(get, self.shape, x, y, width, height)


def tiff_mpp(path: str | os.PathLike) -> float | None:
    """Micrometres per pixel from a TIFF's resolution tags, or None when the tags are absent or unitless."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        res, unit = page.tags.get("XResolution"), page.tags.get("ResolutionUnit")
        if res is None or unit is None:
            return None
        num, den = res.value
        if num == 0:
            return None
        pixels_per_unit = num / den
        um_per_unit = {2: 25_400.0, 3: 10_000.0}.get(int(unit.value))  # inch, centimetre
        return None if um_per_unit is None else um_per_unit / pixels_per_unit


def write_tiff(path: str | os.PathLike, array: np.ndarray, mpp: float, tile: int = 256) -> Path:
    """Write an RGB image as a tiled, zlib-compressed pyramidal BigTIFF with its pixel size, atomically."""
    import tifffile

    path = Path(path)
    pixels_per_cm = 1e4 / mpp
    levels = [array]
    while min(levels[-1].shape[:2]) > 2 * tile:
        levels.append(levels[-1][::2, ::2])
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        tw.write(
            array,
            tile=(tile, tile),
            compression="zlib",
            photometric="rgb",
            subifds=len(levels) - 1,
            resolution=(pixels_per_cm, pixels_per_cm),
            resolutionunit="CENTIMETER",
        )
        for level in levels[1:]:
            tw.write(np.ascontiguousarray(level), tile=(tile, tile), compression="zlib", photometric="rgb", subfiletype=1)
    return path


OPENSLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")


def _openslide_module():
    try:
        import openslide
    except ImportError as exc:  # also raised when the module is there but the OpenSlide library is not
        raise ImageReadError(
            "reading .svs/.ndpi/.mrxs slides needs OpenSlide: pip install 'gcmoe[openslide]' "
            f"(openslide-python + openslide-bin), or convert the slide to a pyramidal TIFF ({exc})"
        ) from exc
    return openslide


class OpenSlideImage:
    """A whole-slide image in a vendor format (.svs, .ndpi, .mrxs, ...) read through OpenSlide, level 0."""

    def __init__(self, path: str | os.PathLike) -> None:
        self._path = Path(path)
        if not self._path.exists():
            raise ImageReadError(f"image file not found: {self._path}")
        openslide = _openslide_module()
        try:
            self._slide = openslide.OpenSlide(str(self._path))
        except Exception as exc:  # OpenSlideError / OpenSlideUnsupportedFormatError
            raise ImageReadError(f"cannot read {self._path} with OpenSlide ({type(exc).__name__}: {exc})") from exc

    @property
    def shape(self) -> tuple[int, int]:
        width, height = self._slide.dimensions
        return int(height), int(width)

    @property
    def path(self) -> Path | None:
        return self._path

    def read_region(self, x: int, y: int, width: int, height: int) -> np.ndarray:
        def get(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
            rgba = np.asarray(self._slide.read_region((x0, y0), 0, (x1 - x0, y1 - y0)))
            # OpenSlide returns premultiplied RGBA with alpha 0 outside scanned areas: show those as white glass
            rgb = rgba[..., :3].copy()
            rgb[rgba[..., 3] == 0] = BACKGROUND
            return rgb

        return _padded_read(get, self.shape, x, y, width, height)

    @property
    def mpp(self) -> float | None:
        """The slide's ``openslide.mpp-x`` property, when the scanner wrote one."""
        value = self._slide.properties.get("openslide.mpp-x")
        return float(value) if value else None


def openslide_mpp(path: str | os.PathLike) -> float | None:
    """Micrometres per pixel of an OpenSlide-format slide, or None (also when OpenSlide is not installed)."""
    try:
        return OpenSlideImage(path).mpp
    except ImageReadError:
        return None


def open_image(path: str | os.PathLike) -> SlideImage:
    """Open an image file lazily: TIFF/BigTIFF (tifffile), or .svs/.ndpi/.mrxs/... through OpenSlide."""
    if Path(path).suffix.lower() in OPENSLIDE_SUFFIXES:
        return OpenSlideImage(path)
    return TiffImage(path)
