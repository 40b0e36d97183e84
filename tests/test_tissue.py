"""Tissue detection on a thumbnail (gcmoe.tissue) and the tiles nuclei detection then reads."""

import numpy as np
import pytest

from gcmoe.data.detection import detection_tiles
from gcmoe.data.image import ArrayImage, open_image, write_tiff
from gcmoe.tissue import detect_tissue, slide_thumbnail


def _slide(height=3000, width=4000, seed=0):
    rng = np.random.default_rng(seed)
    a = np.full((height, width, 3), 238, np.uint8) + rng.integers(0, 8, (height, width, 3), dtype=np.uint8)
    tissue = np.zeros((height, width), bool)
    tissue[600:1800, 400:2200] = True  # 1200 x 1800 px
    yy, xx = np.mgrid[:height, :width]
    tissue |= (yy - 2300) ** 2 + (xx - 3200) ** 2 < 500**2
    stain = np.stack([170 + rng.integers(-40, 40, tissue.shape), 90 + rng.integers(-40, 40, tissue.shape),
                      160 + rng.integers(-30, 30, tissue.shape)], -1).clip(0, 255).astype(np.uint8)
    a[tissue] = stain[tissue]
    return a, tissue


def test_tissue_mask_matches_the_tissue():
    a, truth = _slide()
    mask = detect_tissue(ArrayImage(a), mpp=0.25)  # 8 um/px -> 32 px per thumbnail pixel
    assert mask.downsample == pytest.approx((32, 32), rel=0.01)
    assert mask.fraction == pytest.approx(truth.mean(), abs=0.02)
    assert mask.area_mm2 == pytest.approx(truth.sum() * 0.25**2 / 1e6, rel=0.08)
    inside = np.array([[1000, 1000], [3200, 2300]])
    outside = np.array([[100, 100], [3800, 200], [2800, 800]])
    assert mask.contains(inside).all() and not mask.contains(outside).any()
    assert mask.covers(900, 900, 1000, 1000) and not mask.covers(3500, 0, 4000, 400)


def test_a_blank_slide_has_no_tissue_and_no_tiles_are_read():
    rng = np.random.default_rng(1)
    blank = (np.full((2000, 2000, 3), 235, np.uint8) + rng.integers(0, 12, (2000, 2000, 3), dtype=np.uint8))
    mask = detect_tissue(ArrayImage(blank), mpp=0.5)
    assert mask.fraction == 0 and detection_tiles(blank.shape[:2], 512, mask) == []


def test_detection_reads_only_tissue_tiles():
    a, truth = _slide()
    mask = detect_tissue(ArrayImage(a), mpp=0.25)
    every = detection_tiles(a.shape[:2], 500)
    read = detection_tiles(a.shape[:2], 500, mask)
    background = [(x, y) for x, y in every if not truth[y:y + 500, x:x + 500].any()]
    assert len(every) == 48 and set(read).isdisjoint(background)
    assert all(truth[y:y + 500, x:x + 500].any() for x, y in read)


def test_thumbnail_from_a_pyramid_level_agrees_with_full_resolution(tmp_path):
    a, _ = _slide(1500, 2000)
    path = write_tiff(tmp_path / "s.tif", a, mpp=0.25, tile=256)
    tiff = open_image(path)
    assert tiff.level_shapes[0] == (1500, 2000) and len(tiff.level_shapes) >= 3
    from_pyramid, scale = slide_thumbnail(tiff, 16)
    flat, scale_flat = slide_thumbnail(ArrayImage(a), 16)
    assert from_pyramid.shape == flat.shape and scale == pytest.approx(scale_flat)
    # pyramid levels are subsampled (write_tiff), the flat path averages: same picture, pixel noise apart
    assert np.abs(from_pyramid.astype(int) - flat.astype(int)).mean() < 8


def test_openslide_pyramid_levels_are_read_for_the_thumbnail(tmp_path):
    pytest.importorskip("openslide")
    import tifffile

    from gcmoe.data.image import OpenSlideImage

    a, _ = _slide(1024, 1536)
    with tifffile.TiffWriter(tmp_path / "s.tif") as tw:  # a generic tiled TIFF, levels as pages (OpenSlide's layout)
        for step in (1, 2, 4):
            tw.write(np.ascontiguousarray(a[::step, ::step]), tile=(256, 256), photometric="rgb",
                     subfiletype=0 if step == 1 else 1)
    slide = OpenSlideImage(tmp_path / "s.tif")
    assert slide.level_shapes == [(1024, 1536), (512, 768), (256, 384)]
    np.testing.assert_array_equal(slide.read_level(1, 100, 200, 300, 400), a[::2, ::2][100:200, 300:400])
    thumb, scale = slide_thumbnail(slide, 8)
    flat, _ = slide_thumbnail(ArrayImage(a), 8)
    assert thumb.shape == flat.shape == (128, 192, 3) and scale == (8.0, 8.0)
    assert np.abs(thumb.astype(int) - flat.astype(int)).mean() < 8
