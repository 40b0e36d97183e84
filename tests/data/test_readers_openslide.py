"""OpenSlide-format slides, read through openslide-python + openslide-bin (both in the ``test`` extra, so these
tests run rather than skip), and a clear error when the ``openslide`` extra is not installed."""

from __future__ import annotations

import sys

import numpy as np
import openslide
import pytest
import tifffile

from gcmoe.data.image import OpenSlideImage, image_mpp, open_image
from gcmoe.data.readers import resolve_image_mpp
from gcmoe.errors import ImageReadError


def _svs(path, compression: str = "zlib", levels: int = 1):
    """An Aperio-style slide: tiled RGB, the ImageDescription OpenSlide's aperio driver parses (MPP, AppMag),
    reduced levels as further pages (as Aperio's scanners write them)."""
    img = np.zeros((600, 800, 3), np.uint8)
    img[:, :400] = (200, 100, 150)
    img[:, 400:] = (10, 20, 30)
    with tifffile.TiffWriter(path) as tw:
        level = img
        for i in range(levels):
            desc = f"Aperio Image Library v10.0.0\n{level.shape[1]}x{level.shape[0]} [0,0 {level.shape[1]}x{level.shape[0]}] (256x256)"
            if i == 0:
                desc += "|AppMag = 20|MPP = 0.4990"
            tw.write(level, tile=(256, 256), photometric="rgb", compression=compression, description=desc,
                     metadata=None, subfiletype=0 if i == 0 else 1)
            level = np.ascontiguousarray(level[::2, ::2])
    return img


def test_missing_openslide_says_how_to_install(tmp_path, monkeypatch):
    _svs(tmp_path / "s.svs")
    monkeypatch.setitem(sys.modules, "openslide", None)  # import fails as when the extra is not installed
    with pytest.raises(ImageReadError, match=r"pip install 'gcmoe\[openslide\]'"):
        open_image(tmp_path / "s.svs")


@pytest.mark.parametrize("compression,levels", [("zlib", 1), ("jpeg", 3)])
def test_openslide_reads_level0_regions(tmp_path, compression, levels):
    """An .svs written as Aperio writes it opens through OpenSlide (its aperio driver), level 0, with its pixel size."""
    img = _svs(tmp_path / "s.svs", compression, levels)
    assert openslide.OpenSlide.detect_format(str(tmp_path / "s.svs")) == "aperio"
    slide = open_image(tmp_path / "s.svs")
    assert isinstance(slide, OpenSlideImage) and slide.shape == (600, 800)
    x0 = 390 if compression == "zlib" else 300  # JPEG rings at the colour edge at x = 400
    region = slide.read_region(x0, -5, 20, 10)
    assert (region[:5] == 255).all()  # above the slide: white
    tol = 0 if compression == "zlib" else 6  # JPEG is lossy
    np.testing.assert_allclose(region[5:].astype(int), img[0:5, x0:x0 + 20].astype(int), atol=tol)
    assert slide.mpp == pytest.approx(0.499)
    assert image_mpp(tmp_path / "s.svs") == (pytest.approx(0.499), "s.svs's openslide.mpp-x")
    assert resolve_image_mpp(tmp_path / "s.svs", None, "s")[0] == pytest.approx(0.499)


def test_openslide_reads_a_generic_tiled_tiff(tmp_path):
    """A generic tiled TIFF (what libvips and HEST write) through OpenSlide's generic-tiff driver: the same pixels
    as tifffile gives."""
    img = _svs(tmp_path / "g.tif")
    tifffile.imwrite(tmp_path / "generic.tif", img, tile=(256, 256), photometric="rgb", compression="zlib",
                     metadata=None)
    assert openslide.OpenSlide.detect_format(str(tmp_path / "generic.tif")) == "generic-tiff"
    slide = OpenSlideImage(tmp_path / "generic.tif")
    np.testing.assert_array_equal(slide.read_region(100, 200, 300, 50), img[200:250, 100:400])
    np.testing.assert_array_equal(slide.read_region(100, 200, 300, 50),
                                  open_image(tmp_path / "generic.tif").read_region(100, 200, 300, 50))
