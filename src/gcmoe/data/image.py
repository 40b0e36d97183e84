"""Lazy access to H&E images: read a region of the full-resolution level without loading the slide.

Implementations share one small protocol: :class:`ArrayImage` (an RGB array in memory, e.g. a freshly
generated virtual tissue), :class:`TiffImage` (a tiled, possibly pyramidal, TIFF, BigTIFF or OME-TIFF read
through tifffile's zarr store, so only the tiles a region touches are decoded), :class:`PillowImage` (a PNG or
JPEG crop, decoded whole by Pillow), :class:`OpenSlideImage` (vendor formats through OpenSlide, with the
optional ``openslide`` extra) and :class:`OmeZarrImage` (an OME-Zarr image folder, as SpatialData stores its
images). :func:`open_image` picks one by the file's signature (its first bytes), or by the folder's zarr metadata.
"""

from __future__ import annotations

import os
import warnings
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
    """A TIFF, BigTIFF or OME-TIFF read lazily: the full-resolution level through tifffile's zarr store.

    Pixels may be interleaved (height, width, 3|4) or channel-first (3, height, width), as OME-TIFFs and
    planar TIFFs store them; any compression imagecodecs decodes (LZW, JPEG, JPEG 2000, deflate, ...). One
    pixel is decoded at open, so a missing codec is reported here rather than in the middle of a run.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        import tifffile
        import zarr

        self._path = Path(path)
        if not self._path.is_file():
            raise ImageReadError(f"image file not found: {self._path}")
        try:
            self._tif = tifffile.TiffFile(self._path)
            series = max(self._tif.series, key=lambda s: _plane_size(s.shape, s.axes))
            self._level0 = zarr.open(series.aszarr(level=0), mode="r")
        except Exception as exc:  # tifffile raises several types for broken files
            self.close()
            raise ImageReadError(
                f"cannot read {self._path} as a TIFF image ({type(exc).__name__}: {exc}); check that the file is "
                "complete and is a TIFF/BigTIFF, PNG or JPEG (.svs/.ndpi/.mrxs through the openslide extra)"
            ) from exc
        self._axes = series.axes
        self._series = series
        self._compression = _compression_name(series)
        try:
            self._channel_axis = _rgb_channel_axis(self._path, series.axes, tuple(series.shape), series.dtype)
            self._check_decodes()
        except ImageReadError:
            self.close()
            raise

    def close(self) -> None:
        """Close the file (a refused or finished image); reading afterwards fails."""
        tif = getattr(self, "_tif", None)
        if tif is not None:
            tif.close()

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self._level0.shape[self._axes.index("Y")]), int(self._level0.shape[self._axes.index("X")]))

    @property
    def path(self) -> Path | None:
        return self._path

    @property
    def compression(self) -> str:
        """The TIFF compression of the full-resolution level (e.g. "LZW", "JPEG", "NONE")."""
        return self._compression

    @property
    def level_shapes(self) -> list[tuple[int, int]]:
        """(height, width) of each pyramid level, full resolution first (one entry for a flat TIFF)."""
        y, x = self._axes.index("Y"), self._axes.index("X")
        return [(int(level.shape[y]), int(level.shape[x])) for level in self._series.levels]

    def read_level(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pixels [y0, y1) x [x0, x1) of pyramid ``level`` (inside it) as uint8 (height, width, 3)."""
        import zarr

        if level == 0:
            return self._pixels(y0, y1, x0, x1)
        array = zarr.open(self._series.aszarr(level=level), mode="r")
        y, x = self._axes.index("Y"), self._axes.index("X")
        index: list[int | slice] = [0] * len(self._axes)
        index[y], index[x], index[self._channel_axis] = slice(y0, y1), slice(x0, x1), slice(0, 3)
        block = np.asarray(array[tuple(index)])
        kept = sorted((y, x, self._channel_axis))
        order = [kept.index(y), kept.index(x), kept.index(self._channel_axis)]
        return block if order == [0, 1, 2] else np.transpose(block, order)

    def _pixels(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pixels [y0, y1) x [x0, x1) as (height, width, 3), whatever the file's axis order."""
        y, x = self._axes.index("Y"), self._axes.index("X")
        index: list[int | slice] = [0] * len(self._axes)  # other axes are single planes
        index[y], index[x], index[self._channel_axis] = slice(y0, y1), slice(x0, x1), slice(0, 3)
        block = np.asarray(self._level0[tuple(index)])
        kept = sorted((y, x, self._channel_axis))
        order = [kept.index(y), kept.index(x), kept.index(self._channel_axis)]
        return block if order == [0, 1, 2] else np.transpose(block, order)

    def _check_decodes(self) -> None:
        """Decode one pixel; a missing or failing codec becomes an error naming the file, codec and fix."""
        try:
            self._pixels(0, 1, 0, 1)
        except Exception as exc:
            if "imagecodecs" in str(exc):
                fix = ("install imagecodecs (pip install imagecodecs; it is a gcmoe dependency, so reinstalling "
                       "gcmoe also brings it)")
            else:
                fix = ("the file may be damaged; if it opens elsewhere, re-save it with a common compression, e.g. "
                       "vips tiffsave in.tif out.tif --tile --pyramid --compression jpeg")
            raise ImageReadError(
                f"{self._path}: cannot decode its {self._compression}-compressed pixels ({type(exc).__name__}: "
                f"{exc}); {fix}"
            ) from exc

    def read_region(self, x: int, y: int, width: int, height: int) -> np.ndarray:
        def get(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
            try:
                return self._pixels(y0, y1, x0, x1)
            except Exception as exc:
                raise ImageReadError(
                    f"{self._path}: failed to decode region x={x0}..{x1}, y={y0}..{y1} ({exc}); "
                    "the file may be truncated"
                ) from exc

        return _padded_read(get, self.shape, x, y, width, height)


def _plane_size(shape: tuple[int, ...], axes: str) -> int:
    """Height x width of a tifffile series (0 without Y and X axes): the largest one is the slide."""
    return shape[axes.index("Y")] * shape[axes.index("X")] if "Y" in axes and "X" in axes else 0


def _rgb_channel_axis(path: Path, axes: str, shape: tuple[int, ...], dtype: np.dtype) -> int:
    """The position of the colour axis of an 8-bit RGB(A) series, interleaved ("YXS") or channel-first
    ("SYX", OME's "CYX"); anything else is refused with what was found."""
    found = f"axes {axes!r}, shape {shape}, {np.dtype(dtype)}"
    extra = [a for a, n in zip(axes, shape) if a not in "YXSC" and n > 1]
    colour = [i for i, a in enumerate(axes) if a in "SC"]
    if "Y" not in axes or "X" not in axes or extra or len(colour) != 1 or shape[colour[0]] not in (3, 4):
        raise ImageReadError(
            f"{path}: expected one RGB H&E image, interleaved (height, width, 3) or channel-first (3, height, width); "
            f"found {found}: a fluorescence or multi-plane image is not an H&E; export the H&E alone as RGB"
        )
    if np.dtype(dtype) != np.uint8:
        raise ImageReadError(f"{path}: expected 8-bit RGB pixels; found {found}; convert it to 8 bits per channel")
    return colour[0]


def _compression_name(series) -> str:
    """The compression of a tifffile series' first page, as its TIFF name."""
    try:
        return str(series.keyframe.compression.name)
    except (AttributeError, ValueError):
        return "unknown"


class PillowImage:
    """A PNG or JPEG image (how most public H&E crops come), decoded whole by Pillow at open.

    These formats are not tiled, so the pixels are held in memory (3 bytes per pixel); an image larger than
    Pillow's decompression-bomb limit is refused with the advice to convert it to a pyramidal TIFF. An alpha
    channel is composited over white (transparent = glass). They carry no microscope pixel size: the caller
    gives ``mpp``.
    """

    MODES = ("RGB", "RGBA", "P")

    def __init__(self, path: str | os.PathLike) -> None:
        from PIL import Image

        self._path = Path(path)
        if not self._path.is_file():
            raise ImageReadError(f"image file not found: {self._path}")
        try:
            with Image.open(self._path) as img:
                img.load()
                self.format = str(img.format)
                rgb = _pillow_rgb(self._path, img)
                orientation = img.getexif().get(0x0112, 1)
        except Image.DecompressionBombError as exc:
            raise ImageReadError(
                f"{self._path}: {exc}; an image this large should be a tiled pyramidal TIFF: "
                "vips tiffsave in.jpg out.tif --tile --pyramid --compression jpeg"
            ) from exc
        except (OSError, SyntaxError, ValueError) as exc:  # Pillow's errors for broken or truncated files
            raise ImageReadError(
                f"cannot read {self._path} as a PNG/JPEG image ({type(exc).__name__}: {exc}); "
                "check that the file is complete"
            ) from exc
        if orientation != 1:
            warnings.warn(
                f"{self._path}: EXIF orientation {orientation} is not applied; pixels and cell coordinates are "
                "taken as stored", stacklevel=2,
            )
        self._array = ArrayImage(rgb)

    @property
    def shape(self) -> tuple[int, int]:
        return self._array.shape

    @property
    def path(self) -> Path | None:
        return self._path

    def read_region(self, x: int, y: int, width: int, height: int) -> np.ndarray:
        return self._array.read_region(x, y, width, height)


def _pillow_rgb(path: Path, img) -> np.ndarray:
    """An opened Pillow image as uint8 (height, width, 3); alpha composited over white; others refused."""
    if img.mode not in PillowImage.MODES:
        raise ImageReadError(
            f"{path}: expected an 8-bit RGB H&E image; found Pillow mode {img.mode!r} ({img.format}); "
            "export the H&E as RGB"
        )
    if img.mode == "RGB":
        return np.asarray(img, dtype=np.uint8)
    rgba = np.asarray(img.convert("RGBA"), dtype=np.float32)
    alpha = rgba[..., 3:] / 255.0
    return np.round(rgba[..., :3] * alpha + BACKGROUND * (1 - alpha)).astype(np.uint8)


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


OME_LENGTH_UNITS_UM = {"µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}


def ome_mpp(path: str | os.PathLike) -> float | None:
    """``PhysicalSizeX`` of an OME-TIFF's first image in micrometres, or None (not OME, absent, unknown unit)."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        xml = tif.ome_metadata
    if not xml:
        return None
    images = tifffile.xml2dict(xml).get("OME", {}).get("Image", {})
    pixels = (images[0] if isinstance(images, list) and images else images).get("Pixels", {})
    size = pixels.get("PhysicalSizeX")
    scale = OME_LENGTH_UNITS_UM.get(str(pixels.get("PhysicalSizeXUnit", "µm")))
    try:
        return None if size is None or scale is None else float(size) * scale
    except (TypeError, ValueError):
        return None


def image_mpp(path: str | os.PathLike) -> tuple[float, str] | None:
    """The pixel size an image file states, with where it was read, or None.

    OME ``PhysicalSizeX``, else the TIFF resolution tags, else OpenSlide's ``openslide.mpp-x``. PNG and JPEG
    give None: their dpi fields (pHYs, JFIF density) hold a display resolution set by the exporting program,
    not the microscope's pixel size. The value is not checked here: callers pass it through the readers'
    plausibility check (``gcmoe.data.readers.resolve_image_mpp``).
    """
    path = Path(path)
    if path.is_dir():  # an OME-Zarr image: its scale is in the SpatialData coordinate system, not the file
        return None
    if path.suffix.lower() in OPENSLIDE_SUFFIXES:
        mpp = openslide_mpp(path)
        return None if mpp is None else (mpp, f"{path.name}'s openslide.mpp-x")
    if file_signature(path)[:4] not in TIFF_SIGNATURES:
        return None
    try:
        mpp = ome_mpp(path)
        if mpp is not None:
            return mpp, f"{path.name}'s OME PhysicalSizeX"
        mpp = tiff_mpp(path)
    except Exception:  # unreadable tags: the image itself is checked when it is opened
        return None
    return None if mpp is None else (mpp, f"{path.name}'s TIFF resolution tags")


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
    def level_shapes(self) -> list[tuple[int, int]]:
        """(height, width) of each pyramid level, full resolution first."""
        return [(int(h), int(w)) for w, h in self._slide.level_dimensions]

    def read_level(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pixels [y0, y1) x [x0, x1) of pyramid ``level`` as uint8 (height, width, 3); unscanned areas white."""
        scale = self._slide.level_downsamples[level]
        origin = (int(round(x0 * scale)), int(round(y0 * scale)))  # OpenSlide places regions in level-0 pixels
        rgba = np.asarray(self._slide.read_region(origin, level, (x1 - x0, y1 - y0)))
        rgb = rgba[..., :3].copy()
        rgb[rgba[..., 3] == 0] = BACKGROUND
        return rgb

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


TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # TIFF, BigTIFF; either byte order
PILLOW_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")  # PNG, JPEG


def file_signature(path: Path) -> bytes:
    """The first 8 bytes of a file (empty when it cannot be read; the reader then says why)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(8)
    except OSError:
        return b""


class OmeZarrImage:
    """An OME-Zarr (NGFF 0.4 or 0.5) image folder, as SpatialData writes ``images/<name>``: level 0 of its
    multiscale, read lazily through zarr; axes (c, y, x) or (y, x, c) from the metadata, 8-bit RGB(A)."""

    def __init__(self, path: str | os.PathLike) -> None:
        import zarr

        self._path = Path(path)
        try:
            group = zarr.open_group(str(self._path), mode="r")
            attrs = dict(group.attrs)
            multiscales = (attrs.get("ome") or attrs).get("multiscales") or []
            level = multiscales[0]
            axes = "".join((a["name"] if isinstance(a, dict) else str(a)).lower() for a in level["axes"])
            self._array = group[level["datasets"][0]["path"]]
        except (KeyError, IndexError, TypeError, ValueError, OSError) as exc:
            raise ImageReadError(f"cannot read {self._path} as an OME-Zarr image (multiscales level 0): {exc}") from exc
        if sorted(axes) != sorted("cyx") or self._array.shape[axes.index("c")] not in (3, 4) \
                or np.dtype(self._array.dtype) != np.uint8:
            raise ImageReadError(
                f"{self._path}: expected one 8-bit RGB H&E image with axes c, y, x; found axes {axes!r}, shape "
                f"{tuple(self._array.shape)}, type {self._array.dtype} (a fluorescence or label image?)"
            )
        self._order = [axes.index(a) for a in "yxc"]

    @property
    def shape(self) -> tuple[int, int]:
        full = self._array.shape
        return int(full[self._order[0]]), int(full[self._order[1]])

    @property
    def path(self) -> Path | None:
        return self._path

    def read_region(self, x: int, y: int, width: int, height: int) -> np.ndarray:
        def get(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
            index = [slice(None)] * 3
            index[self._order[0]], index[self._order[1]] = slice(y0, y1), slice(x0, x1)
            return np.transpose(np.asarray(self._array[tuple(index)]), self._order)[..., :3]

        return _padded_read(get, self.shape, x, y, width, height)


def is_ome_zarr(path: Path) -> bool:
    """A folder with zarr metadata (``zarr.json``, or ``.zattrs`` for zarr v2)."""
    return path.is_dir() and ((path / "zarr.json").is_file() or (path / ".zattrs").is_file())


def open_image(path: str | os.PathLike) -> SlideImage:
    """Open an image: .svs/.ndpi/.mrxs/... through OpenSlide, PNG and JPEG (by their signature) through Pillow, an
    OME-Zarr folder through zarr, anything else as TIFF/BigTIFF/OME-TIFF through tifffile."""
    path = Path(path)
    if is_ome_zarr(path):
        return OmeZarrImage(path)
    if path.suffix.lower() in OPENSLIDE_SUFFIXES:
        return OpenSlideImage(path)
    if file_signature(path).startswith(PILLOW_SIGNATURES):
        return PillowImage(path)
    return TiffImage(path)
