"""OpenSlide-format slides: read when the `openslide` extra is installed, a clear error when it is not."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import tifffile

from gcmoe.data.image import OpenSlideImage, open_image
from gcmoe.errors import ImageReadError


def _svs(path):
    img = np.zeros((300, 400, 3), np.uint8)
    img[:, :200] = (200, 100, 150)
    img[:, 200:] = (10, 20, 30)
    tifffile.imwrite(path, img, tile=(256, 256), photometric="rgb", compression="zlib",
                     description="Aperio Image Library v10.0.0\n400x300 [0,0 400x300] (256x256)|AppMag = 20|MPP = 0.5")
    return img


def test_missing_openslide_says_how_to_install(tmp_path, monkeypatch):
    _svs(tmp_path / "s.svs")
    monkeypatch.setitem(sys.modules, "openslide", None)  # import fails as when the extra is not installed
    with pytest.raises(ImageReadError, match=r"pip install 'gcmoe\[openslide\]'"):
        open_image(tmp_path / "s.svs")


def test_openslide_reads_level0_regions(tmp_path):
    pytest.importorskip("openslide", reason="the openslide extra is not installed (pip install 'gcmoe[openslide]')")
    img = _svs(tmp_path / "s.svs")
    slide = open_image(tmp_path / "s.svs")
    assert isinstance(slide, OpenSlideImage) and slide.shape == (300, 400)
    region = slide.read_region(190, -5, 20, 10)
    assert (region[:5] == 255).all()  # above the slide: white
    np.testing.assert_array_equal(region[5:], img[0:5, 190:210])
