import anndata
import numpy as np
import pytest

from gcmoe._constants import Key, UnsKey
from gcmoe.data.image import TiffImage, tiff_mpp
from gcmoe.data.sample import Sample
from gcmoe.errors import ImageReadError, InvalidSampleError


def _args(**over):
    rng = np.random.default_rng(1)
    args = dict(
        counts=rng.poisson(1.0, (10, 3)), spatial=rng.uniform(1, 49, (10, 2)),
        image=np.full((50, 50, 3), 200, np.uint8), mpp=0.5, genes=["a", "b", "c"], sample_id="s",
    )
    args.update(over)
    return args


def test_fields(tiny_sample):
    ad = tiny_sample.adata
    assert ad.obsm[Key.SPATIAL].shape == (40, 2)
    assert Key.COUNTS in ad.layers
    assert set(ad.obs[Key.SAMPLE_ID]) == {"tiny"}
    assert tiny_sample.mpp == 0.5 and tiny_sample.sample_id == "tiny"


def test_write_read_roundtrip(tiny_sample, tmp_path):
    path = tiny_sample.write(tmp_path / "s.h5ad")
    assert (tmp_path / "s.tif").is_file()
    again = Sample.read(path)
    assert isinstance(again.image, TiffImage)
    np.testing.assert_array_equal(again.spatial, tiny_sample.spatial)
    np.testing.assert_array_equal(np.asarray(again.counts), np.asarray(tiny_sample.counts))
    np.testing.assert_array_equal(again.image.read_region(10, 20, 30, 40), tiny_sample.image.read_region(10, 20, 30, 40))
    assert again.fingerprint() == tiny_sample.fingerprint()
    assert tiff_mpp(tmp_path / "s.tif") == pytest.approx(0.5)
    assert not list(tmp_path.glob(".*tmp"))  # no temp file left behind


def test_written_image_is_referenced_not_copied(tiny_sample, tmp_path):
    first = Sample.read(tiny_sample.write(tmp_path / "a" / "s.h5ad"))
    second_path = first.write(tmp_path / "b" / "s.h5ad")
    assert not (tmp_path / "b" / "s.tif").exists()
    assert Sample.read(second_path).image.path == (tmp_path / "a" / "s.tif").resolve()


def test_region_outside_image_is_white(tiny_sample):
    region = tiny_sample.image.read_region(-10, -10, 20, 20)
    assert (region[:10, :10] == 255).all()
    assert (region[15, 15] == tiny_sample.image.read_region(5, 5, 1, 1)[0, 0]).all()


@pytest.mark.parametrize(
    ("over", "message"),
    [
        (dict(spatial=np.array([[1.0, 1.0]] * 9 + [[60.0, 10.0]])), "outside the 50x50 px image"),
        (dict(counts=np.full((10, 3), np.nan)), "NaN or infinite"),
        (dict(counts=-np.ones((10, 3))), "negative"),
        (dict(mpp=0.0), "mpp must be > 0"),
        (dict(mpp=-1.0), "mpp must be > 0"),
        (dict(mpp=250.0), "implausible"),
        (dict(spatial=np.full((10, 2), np.nan)), "NaN or infinite"),
        (dict(counts=np.zeros((0, 3)), spatial=np.zeros((0, 2))), "no cells"),
        (dict(genes=["a", "a", "c"]), "duplicated gene"),
        (dict(counts=np.full((10, 3), np.inf)), "NaN or infinite"),
        (dict(mpp=0.01), "implausible"),
        (dict(sample_id="../../outside"), "cannot be used"),
        (dict(sample_id="a/b"), "cannot be used"),
        (dict(sample_id=".."), "cannot be used"),
        (dict(sample_id=".hidden"), "cannot be used"),
    ],
)
def test_bad_input_is_refused(over, message):
    with pytest.raises(InvalidSampleError, match=message):
        Sample.from_arrays(**_args(**over))


def test_duplicated_cell_ids_refused():
    with pytest.raises(InvalidSampleError, match="duplicated cell ids"):
        Sample.from_arrays(**_args(), cell_ids=["c"] * 10)


def test_missing_counts_layer_refused(tiny_sample):
    del tiny_sample.adata.layers[Key.COUNTS]
    with pytest.raises(InvalidSampleError, match="raw counts missing"):
        Sample(tiny_sample.adata, tiny_sample.image)


def test_read_foreign_h5ad_says_what_to_do(tmp_path):
    anndata.AnnData(np.ones((2, 2))).write_h5ad(tmp_path / "x.h5ad")
    with pytest.raises(InvalidSampleError, match="not written by gcmoe"):
        Sample.read(tmp_path / "x.h5ad")


def test_truncated_image_is_reported(tiny_sample, tmp_path):
    path = tiny_sample.write(tmp_path / "s.h5ad")
    tif = tmp_path / "s.tif"
    tif.write_bytes(tif.read_bytes()[:200])
    with pytest.raises(ImageReadError):
        s = Sample.read(path)
        s.image.read_region(0, 0, 200, 120)


def test_missing_image_is_reported(tiny_sample, tmp_path):
    path = tiny_sample.write(tmp_path / "s.h5ad")
    (tmp_path / "s.tif").unlink()
    with pytest.raises(ImageReadError, match="not found"):
        Sample.read(path)


def test_uns_records_mpp(tiny_sample):
    assert tiny_sample.adata.uns[Key.UNS][UnsKey.MPP] == 0.5


def test_ordinary_sample_ids_are_accepted():
    for sid in ("TENX95", "Xenium_V1_FFPE Human-Breast.rep1", "s", "patient#3 (left)"):
        assert Sample.from_arrays(**_args(sample_id=sid)).sample_id == sid
