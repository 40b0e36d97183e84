"""SpatialData zarr stores written by the spatialdata library the way spatialdata-io's Xenium reader builds them
(cells in micrometres scaled by 1 / pixel_size into "global", the table's obsm["spatial"] the same micrometres,
an aligned H&E with its affine, a 16-bit morphology image beside it), read back as Samples."""

from __future__ import annotations

import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from gcmoe.data.readers import detect_format, read_sample, read_spatialdata
from gcmoe.data.sample import Sample
from gcmoe.errors import InvalidSampleError

pytestmark = pytest.mark.filterwarnings(  # raised while the fixtures are written, by ome-zarr and zarr
    "ignore::DeprecationWarning:ome_zarr.*", "ignore:zarr v3 autosharding:UserWarning")
sd = pytest.importorskip("spatialdata", reason="the spatialdata extra is not installed (pip install 'gcmoe[spatialdata]')")

PIXEL_SIZE = 0.2125
HE_TO_MORPH = np.array([[1.8, -0.3, 40.0], [0.3, 1.8, 25.0], [0.0, 0.0, 1.0]])  # H&E px -> morphology px
N = 60


def write_store(path, annotate: str = "cell_circles", rgb: bool = True, seed: int = 0) -> dict:
    """A Xenium-like SpatialData store written by spatialdata; ``annotate="cell_labels"`` makes the table annotate a
    raster (spatialdata-io's default since 0.6) with the cell outlines in ``cell_boundaries``."""
    from shapely.geometry import Polygon
    from spatialdata.models import Image2DModel, Labels2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Affine, Identity, Scale

    rng = np.random.default_rng(seed)
    he_xy = np.column_stack([rng.uniform(20, 380, N), rng.uniform(20, 280, N)])
    morph = (HE_TO_MORPH @ np.column_stack([he_xy, np.ones(N)]).T).T[:, :2]
    um = morph * PIXEL_SIZE
    ids = [f"aaab{i:04d}-1" for i in range(N)]
    to_global = {"global": Scale([1 / PIXEL_SIZE, 1 / PIXEL_SIZE], axes=("x", "y"))}
    he = rng.integers(0, 255, (3, 300, 400), dtype=np.uint8) if rgb else rng.integers(0, 255, (300, 400, 3)).astype(np.uint16).transpose(2, 0, 1)
    images = {"he_image": Image2DModel.parse(he, dims=("c", "y", "x"), scale_factors=[2], transformations={
                  "global": Affine(HE_TO_MORPH, input_axes=("x", "y"), output_axes=("x", "y"))}),
              "morphology_focus": Image2DModel.parse(rng.integers(0, 4000, (1, 600, 800)).astype(np.uint16),
                                                     dims=("c", "y", "x"), transformations={"global": Identity()})}
    circles = ShapesModel.parse(um, geometry=0, radius=np.full(N, 4.0), transformations=to_global, index=pd.Index(ids))
    square = np.array([[-3, -3], [3, -3], [3, 3], [-3, 3]], dtype=float)
    import geopandas as gpd

    boundaries = ShapesModel.parse(gpd.GeoDataFrame(geometry=[Polygon(c + square) for c in um], index=pd.Index(ids)),
                                   transformations=to_global)
    counts = rng.poisson(2.0, (N, 7)).astype(np.float32)
    obs = pd.DataFrame({"cell_id": ids, "region": pd.Categorical([annotate] * N),
                        "cell_area": np.full(N, 40.0), "celltype": pd.Categorical(rng.choice(["T", "B", "Tumour"], N))},
                       index=[str(i) for i in range(N)])
    table = ad.AnnData(X=counts, obs=obs)
    table.var_names = [f"GENE{j}" for j in range(7)]
    table.obsm["spatial"] = um
    shapes = {"cell_circles": circles, "cell_boundaries": boundaries}
    labels = {}
    if annotate == "cell_labels":
        del shapes["cell_circles"]
        labels["cell_labels"] = Labels2DModel.parse(np.zeros((600, 800), np.uint32), dims=("y", "x"),
                                                    transformations={"global": Identity()})
    tables = {"table": TableModel.parse(table, region=annotate, region_key="region", instance_key="cell_id")}
    sd.SpatialData(images=images, shapes=shapes, labels=labels, tables=tables).write(path)
    return {"he_xy": he_xy, "ids": ids, "counts": counts, "celltype": obs["celltype"].astype(str).to_numpy()}


@pytest.mark.parametrize("annotate", ["cell_circles", "cell_labels"])
def test_spatialdata_store_reads_cells_on_the_he(tmp_path, annotate):
    info = write_store(tmp_path / "xenium.zarr", annotate=annotate)
    assert detect_format(tmp_path / "xenium.zarr") == "spatialdata"
    s = read_sample(tmp_path / "xenium.zarr", cell_type_key="celltype")
    assert list(s.adata.obs_names) == info["ids"]
    np.testing.assert_allclose(s.spatial, info["he_xy"], atol=1e-6)
    assert s.mpp == pytest.approx(PIXEL_SIZE * np.sqrt(np.linalg.det(HE_TO_MORPH[:2, :2])))
    np.testing.assert_array_equal(np.asarray(s.counts), info["counts"])
    assert list(s.adata.obs["cell_type"]) == list(info["celltype"])
    prov = s.adata.uns["gcmoe"]["provenance"]
    assert prov["image"] == "he_image" and prov["coords"] == "um"
    assert prov["shapes"] == ("cell_circles" if annotate == "cell_circles" else "cell_boundaries")
    # the H&E is referenced in the store, not copied, and reads back the same
    back = Sample.read(s.write(tmp_path / "s.h5ad"))
    np.testing.assert_array_equal(back.image.read_region(10, 20, 30, 40), s.image.read_region(10, 20, 30, 40))


def test_spatialdata_store_errors(tmp_path, monkeypatch):
    write_store(tmp_path / "grey.zarr", rgb=False)
    with pytest.raises(InvalidSampleError, match=r"holds 0 8-bit RGB images \[\]"):
        read_spatialdata(tmp_path / "grey.zarr")
    write_store(tmp_path / "x.zarr")
    with pytest.raises(InvalidSampleError, match="no table 'cells'"):
        read_spatialdata(tmp_path / "x.zarr", table="cells")
    s = read_spatialdata(tmp_path / "x.zarr", image=tmp_path / "x.zarr" / "images" / "he_image", mpp=0.5)
    assert s.mpp == 0.5
    monkeypatch.setitem(sys.modules, "spatialdata", None)
    with pytest.raises(InvalidSampleError, match=r"pip install 'gcmoe\[spatialdata\]'"):
        read_spatialdata(tmp_path / "x.zarr")
