"""Images written the way others write them: HEST's LZW pyramids, scanners' JPEG tiles, BigTIFF, OME-TIFF,
PNG/JPEG crops (written by Pillow, and real ones from ../shared/realdata); the pixel size each one states.

The fixtures are written with tifffile + imagecodecs (the libraries HEST's and 10x's files are read with),
using the layouts of the writers' own code: HEST's ``tiff_save`` (libvips: tiled 256 px, LZW with the
horizontal predictor, pyramid levels as reduced-resolution pages, resolution in pixels per centimetre),
Aperio-style scanners (JPEG tiles in YCbCr, BigTIFF) and 10x's OME-TIFFs (channel-first planes, SubIFD pyramid,
``PhysicalSizeX``).
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tifffile

from gcmoe.data.image import PillowImage, TiffImage, image_mpp, open_image
from gcmoe.data.readers import resolve_image_mpp
from gcmoe.data.readers._common import choose_mpp
from gcmoe.errors import ImageReadError, InvalidSampleError


@pytest.fixture(scope="module")
def image(writers) -> np.ndarray:
    return writers.he_like()


def _region(img, x=250, y=100, w=300, h=200) -> np.ndarray:
    return img.read_region(x, y, w, h)


def test_hest_lzw_pyramid_reads_exactly(tmp_path, image, writers):
    slide = open_image(writers.write_hest_wsi(tmp_path / "TENX95.tif", image, mpp=0.2738))
    assert isinstance(slide, TiffImage) and slide.compression == "LZW"
    assert slide.shape == (600, 700)
    np.testing.assert_array_equal(_region(slide), image[100:300, 250:550])


def test_hest_lzw_bigtiff_reads_exactly(tmp_path, image, writers):
    path = writers.write_hest_wsi(tmp_path / "big.tif", image, mpp=0.5, bigtiff=True)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_bigtiff
    np.testing.assert_array_equal(_region(open_image(path)), image[100:300, 250:550])


def test_scanner_jpeg_pyramid_reads_within_jpeg_loss(tmp_path, image, writers):
    slide = open_image(writers.write_scanner_jpeg(tmp_path / "scan.tif", image))
    assert slide.compression == "JPEG" and slide.shape == (600, 700)
    region = _region(slide).astype(int)
    assert np.abs(region - image[100:300, 250:550]).mean() < 3


def test_channel_first_ome_tiff_reads_as_rgb(tmp_path, image, writers):
    slide = open_image(writers.write_ome_channel_first(tmp_path / "he_image.ome.tif", image, mpp=0.2125))
    assert slide.shape == (600, 700)
    np.testing.assert_array_equal(_region(slide), image[100:300, 250:550])
    # a region across the border pads white, as for interleaved files
    edge = slide.read_region(650, 580, 100, 40)
    np.testing.assert_array_equal(edge[:20, :50], image[580:, 650:])
    assert (edge[20:] == 255).all() and (edge[:, 50:] == 255).all()


def test_planar_rgb_tiff_reads_as_rgb(tmp_path, image):
    path = tmp_path / "planar.tif"
    tifffile.imwrite(path, np.ascontiguousarray(np.moveaxis(image, 2, 0)), photometric="rgb",
                     planarconfig="separate", compression="lzw")
    np.testing.assert_array_equal(_region(open_image(path)), image[100:300, 250:550])


def test_images_that_are_not_rgb_he_are_refused(tmp_path, image):
    grey = tmp_path / "grey.tif"
    tifffile.imwrite(grey, image[..., 0])
    with pytest.raises(ImageReadError, match=r"grey\.tif: expected one RGB H&E image.*found axes 'YX'"):
        open_image(grey)
    fluo = tmp_path / "morphology.ome.tif"
    tifffile.imwrite(fluo, np.zeros((5, 64, 64), np.uint16), ome=True, metadata={"axes": "CYX"})
    with pytest.raises(ImageReadError, match=r"morphology\.ome\.tif: expected one RGB H&E image.*shape \(5, 64, 64\)"):
        open_image(fluo)
    deep = tmp_path / "deep.tif"
    tifffile.imwrite(deep, image.astype(np.uint16) * 256, photometric="rgb")
    with pytest.raises(ImageReadError, match=r"deep\.tif: expected 8-bit RGB pixels.*uint16.*convert it to 8 bits"):
        open_image(deep)


def test_missing_codec_is_reported_at_open(tmp_path, image, writers):
    """Without imagecodecs, tifffile cannot decode LZW: the error comes at open, with the file, codec and fix."""
    path = writers.write_hest_wsi(tmp_path / "TENX95.tif", image, mpp=0.2738)
    script = textwrap.dedent(f"""
        import sys
        sys.modules["imagecodecs"] = None  # as in an environment where imagecodecs is not installed
        from gcmoe.data.image import open_image
        from gcmoe.errors import ImageReadError
        try:
            open_image({str(path)!r})
        except ImageReadError as exc:
            print(exc)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    message = result.stdout
    assert "TENX95.tif: cannot decode its LZW-compressed pixels" in message
    assert "pip install imagecodecs" in message


# --- PNG and JPEG through Pillow -------------------------------------------------------------------------------

def test_png_and_jpeg_open_as_slides(tmp_path, image):
    from PIL import Image

    Image.fromarray(image).save(tmp_path / "crop.png")
    Image.fromarray(image).save(tmp_path / "crop.jpg", quality=95)
    png, jpg = open_image(tmp_path / "crop.png"), open_image(tmp_path / "crop.jpg")
    assert isinstance(png, PillowImage) and isinstance(jpg, PillowImage)
    assert png.shape == jpg.shape == (600, 700) and png.path == tmp_path / "crop.png"
    np.testing.assert_array_equal(_region(png), image[100:300, 250:550])
    assert np.abs(_region(jpg).astype(int) - image[100:300, 250:550]).mean() < 3
    assert (png.read_region(690, 590, 20, 20)[10:, 10:] == 255).all()  # outside reads white, as for TIFFs
    # the format comes from the file's signature, not its name
    (tmp_path / "crop.tif").write_bytes((tmp_path / "crop.png").read_bytes())
    assert isinstance(open_image(tmp_path / "crop.tif"), PillowImage)


def test_png_alpha_is_composited_over_white(tmp_path, image):
    from PIL import Image

    rgba = np.dstack([image, np.full(image.shape[:2], 255, np.uint8)])
    rgba[:50, :50, 3] = 0  # transparent corner = glass
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    region = open_image(tmp_path / "rgba.png").read_region(0, 0, 100, 100)
    assert (region[:50, :50] == 255).all()
    np.testing.assert_array_equal(region[50:, 50:], image[50:100, 50:100])


def test_bad_png_and_jpeg_are_refused(tmp_path, image, monkeypatch):
    from PIL import Image

    Image.fromarray(image[..., 0]).save(tmp_path / "grey.png")
    with pytest.raises(ImageReadError, match=r"grey\.png: expected an 8-bit RGB H&E image; found Pillow mode 'L'"):
        open_image(tmp_path / "grey.png")
    Image.fromarray(image).save(tmp_path / "cut.jpg")
    data = (tmp_path / "cut.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 3])
    with pytest.raises(ImageReadError, match=r"cannot read .*cut\.jpg as a PNG/JPEG image .*complete"):
        open_image(tmp_path / "cut.jpg")
    Image.fromarray(image).save(tmp_path / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)  # as if the crop were a whole slide
    with pytest.raises(ImageReadError, match=r"huge\.png: .*should be a tiled pyramidal TIFF: vips tiffsave"):
        open_image(tmp_path / "huge.png")


# --- pixel size stated by the file -------------------------------------------------------------------------------

def test_pixel_size_stated_by_each_format(tmp_path, image, writers):
    from PIL import Image

    assert image_mpp(writers.write_ome_channel_first(tmp_path / "he.ome.tif", image, mpp=0.2125)) == (
        pytest.approx(0.2125), "he.ome.tif's OME PhysicalSizeX")
    tifffile.imwrite(tmp_path / "nm.ome.tif", image, photometric="rgb",
                     metadata={"axes": "YXS", "PhysicalSizeX": 263.0, "PhysicalSizeXUnit": "nm"})
    assert image_mpp(tmp_path / "nm.ome.tif")[0] == pytest.approx(0.263)
    assert image_mpp(writers.write_hest_wsi(tmp_path / "h.tif", image, mpp=0.2738)) == (
        pytest.approx(0.02738), "h.tif's TIFF resolution tags")  # HEST's tags: 10x too small (HEST #106)
    Image.fromarray(image).save(tmp_path / "dpi.png", dpi=(300, 300))
    assert image_mpp(tmp_path / "dpi.png") is None  # a display dpi is not a pixel size


def test_pixel_size_of_a_bare_image_is_checked(tmp_path, image, writers):
    from PIL import Image

    hest = writers.write_hest_wsi(tmp_path / "TENX95.tif", image, mpp=0.2738)
    with pytest.raises(InvalidSampleError, match=r"mpp=0\.02738 um/px \(TENX95\.tif's TIFF resolution tags\) is "
                                                 r"implausible.*give --mpp"):
        resolve_image_mpp(hest, None, "TENX95")
    assert resolve_image_mpp(hest, 0.2738, "TENX95") == (0.2738, "argument")
    Image.fromarray(image).save(tmp_path / "patch.jpg")
    with pytest.raises(InvalidSampleError, match=r"patch\.jpg is a PNG/JPEG image, and PNG and JPEG files do not "
                                                 r"record the microscope's pixel size\); give it with --mpp"):
        resolve_image_mpp(tmp_path / "patch.jpg", None, "patch")
    assert resolve_image_mpp(tmp_path / "patch.jpg", 0.5, "patch") == (0.5, "argument")


def test_disagreeing_pixel_sizes_stop_unless_mpp_is_given(tmp_path, caplog):
    with pytest.raises(InvalidSampleError, match=r"sample s: the pixel size sources disagree: uns says 0\.5 um/px, "
                                                 r"tags says 0\.25 um/px \(50% apart\).*give it with --mpp"):
        choose_mpp(None, {"uns": 0.5, "tags": 0.25}, "s", "unknown")
    assert choose_mpp(None, {"uns": 0.5, "tags": 0.51}, "s", "unknown") == (0.5, "uns")  # within 5%
    assert choose_mpp(0.3, {"uns": 0.5, "tags": 0.25}, "s", "unknown") == (0.3, "argument")
    assert choose_mpp(None, {"uns": 0.5, "tags": 0.005}, "s", "unknown") == (0.5, "uns")  # implausible: ignored
    assert "tags gives 0.005 um/px, implausible" in caplog.text
    with pytest.raises(InvalidSampleError, match=r"pixel size of the H&E image is unknown \(nothing here\)"):
        choose_mpp(None, {"uns": None}, "s", "nothing here")


# --- real files written by others (../shared/realdata) -------------------------------------------------------------

@pytest.mark.parametrize("name", ["he_patches/tiatoolbox_target_image.png", "he_patches/stardist_histo.jpg",
                                  "he_patches/torchstain_source.png", "he_patches/torchstain_target.png",
                                  "xenium_lung_ncbi858/NCBI858.jpg"])
def test_real_png_and_jpeg_patches_open_as_slides(realdata, name):
    from PIL import Image

    path = realdata(name)
    slide = open_image(path)
    with Image.open(path) as img:
        expected = np.asarray(img.convert("RGB"))  # the RGBA patches are fully opaque
    assert isinstance(slide, PillowImage) and slide.shape == expected.shape[:2]
    np.testing.assert_array_equal(slide.read_region(0, 0, slide.shape[1], slide.shape[0]), expected)
    assert image_mpp(path) is None
    with pytest.raises(InvalidSampleError, match=rf"{re.escape(path.name)} is a PNG/JPEG image.*give it with --mpp"):
        resolve_image_mpp(path, None, path.stem)
