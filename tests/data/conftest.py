"""Files as others write them: real ones (``../shared/realdata`` beside the project root) and TIFFs written
with tifffile + imagecodecs in the layouts of the real writers' own code (:func:`writers`)."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tifffile

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def realdata_dir() -> Path:
    """``$GCMOE_REALDATA``, else ``../shared/realdata`` relative to the project root (never inside the repo)."""
    return Path(os.environ.get("GCMOE_REALDATA", PROJECT_ROOT.parent / "shared" / "realdata"))


@pytest.fixture
def realdata():
    """A function giving a real-data file or folder by its relative path, skipping the test when it is absent."""

    def get(relative: str) -> Path:
        path = realdata_dir() / relative
        if not path.exists():
            pytest.skip(f"real data {relative} not found under {realdata_dir()} (set GCMOE_REALDATA to its folder)")
        return path

    return get


def he_like(height: int = 600, width: int = 700) -> np.ndarray:
    """A smooth pink image with dark blobs: lossy codecs keep it close to the original."""
    yy, xx = np.mgrid[0:height, 0:width]
    image = np.empty((height, width, 3), dtype=np.float64)
    image[..., 0] = 220 - 30 * np.sin(xx / 40.0)
    image[..., 1] = 160 + 30 * np.cos(yy / 55.0)
    image[..., 2] = 200 - 20 * np.sin((xx + yy) / 70.0)
    for cy, cx in [(100, 120), (300, 420), (500, 640), (450, 200)]:
        blob = ((yy - cy) ** 2 + (xx - cx) ** 2) < 18**2
        image[blob] = (90, 60, 140)
    return image.astype(np.uint8)


def write_hest_wsi(path: Path, image: np.ndarray, mpp: float, bigtiff: bool = False) -> Path:
    """HEST's ``wsis/{id}.tif``: libvips tiffsave(pyramid, tile 256, lzw), levels as reduced pages; HEST passes
    pixels per centimetre where libvips expects pixels per millimetre, so the tags say mpp / 10 (HEST #106)."""
    pixels_per_cm = 10 * 1e4 / mpp
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tw:
        level = image
        tw.write(level, tile=(256, 256), compression="lzw", predictor=True, photometric="rgb", metadata=None,
                 resolution=(pixels_per_cm, pixels_per_cm), resolutionunit="CENTIMETER")
        while min(level.shape[:2]) > 256:
            level = np.ascontiguousarray(level[::2, ::2])
            tw.write(level, tile=(256, 256), compression="lzw", predictor=True, photometric="rgb", metadata=None,
                     subfiletype=1)
    return path


def write_scanner_jpeg(path: Path, image: np.ndarray) -> Path:
    """A scanner-style slide: BigTIFF, JPEG tiles (YCbCr), a SubIFD pyramid."""
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(image, tile=(256, 256), compression="jpeg", photometric="rgb", subifds=1, metadata=None)
        tw.write(np.ascontiguousarray(image[::2, ::2]), tile=(256, 256), compression="jpeg", photometric="rgb",
                 subfiletype=1, metadata=None)
    return path


def write_ome_channel_first(path: Path, image: np.ndarray, mpp: float) -> Path:
    """An OME-TIFF H&E stored as three grey planes (C, Y, X), tiled, with a SubIFD pyramid and PhysicalSizeX."""
    planes = np.ascontiguousarray(np.moveaxis(image, 2, 0))
    meta = {"axes": "CYX", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp, "PhysicalSizeXUnit": "µm",
            "PhysicalSizeYUnit": "µm"}
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tw:
        tw.write(planes, tile=(256, 256), compression="zlib", photometric="minisblack", subifds=1, metadata=meta)
        tw.write(np.ascontiguousarray(planes[:, ::2, ::2]), tile=(256, 256), compression="zlib",
                 photometric="minisblack", subfiletype=1)
    return path


@pytest.fixture(scope="session")
def writers() -> SimpleNamespace:
    """The image writers above, for tests in any module of tests/data."""
    return SimpleNamespace(he_like=he_like, write_hest_wsi=write_hest_wsi, write_scanner_jpeg=write_scanner_jpeg,
                           write_ome_channel_first=write_ome_channel_first)
