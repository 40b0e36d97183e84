"""Generic AnnData + image reader, format detection, the dispatcher and polygon parsing."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gcmoe.data.image import write_tiff
from gcmoe.data.readers import detect_format, read_h5ad, read_polygons, read_sample, read_samples
from gcmoe.data.readers.polygons import PolygonIndex, Polygons, wkb_exterior
from gcmoe.errors import ImageReadError, InvalidSampleError



def _anndata_pair(tmp_path: Path, n: int = 30, types=("T cell", "B cell", "Fibroblast", "Tumour", "Endo")):
    rng = np.random.default_rng(1)
    write_tiff(tmp_path / "he.tif", np.full((100, 150, 3), 200, dtype=np.uint8), mpp=0.4)
    ad = anndata.AnnData(X=rng.poisson(2.0, (n, 5)).astype(np.float32),
                         obs=pd.DataFrame({"annot": rng.choice(types, n)}, index=[f"c{i}" for i in range(n)]))
    ad.var_names = [f"G{i}" for i in range(5)]
    ad.obsm["spatial"] = np.column_stack([rng.uniform(0, 149, n), rng.uniform(0, 99, n)])
    ad.write_h5ad(tmp_path / "cells.h5ad")
    return ad


def test_h5ad_with_image_and_any_cell_types(tmp_path):
    ad = _anndata_pair(tmp_path)
    assert detect_format(tmp_path / "cells.h5ad") == "h5ad"
    s = read_sample(tmp_path / "cells.h5ad", image=tmp_path / "he.tif", cell_type_key="annot")
    assert s.mpp == pytest.approx(0.4)  # from the TIFF's resolution tags
    assert list(s.adata.obs["cell_type"]) == list(ad.obs["annot"])
    np.testing.assert_allclose(s.spatial, ad.obsm["spatial"])
    np.testing.assert_array_equal(np.asarray(s.counts), ad.X)
    assert s.adata.uns["gcmoe"]["provenance"]["mpp_source"].endswith("resolution tags")
    assert read_h5ad(tmp_path / "cells.h5ad", image=tmp_path / "he.tif", mpp=0.25).mpp == 0.25
    # written as a Sample, it is detected as one and reads back the same
    s.write(tmp_path / "s.h5ad")
    assert detect_format(tmp_path / "s.h5ad") == "sample"
    back = read_samples([tmp_path / "s.h5ad"])[0]
    assert back.n_cells == s.n_cells and list(back.adata.obs["cell_type"]) == list(ad.obs["annot"])


def test_h5ad_errors_say_what_to_fix(tmp_path):
    ad = _anndata_pair(tmp_path)
    with pytest.raises(InvalidSampleError, match="--image"):
        read_h5ad(tmp_path / "cells.h5ad")
    with pytest.raises(InvalidSampleError, match="no obs column 'celltype'.*annot"):
        read_h5ad(tmp_path / "cells.h5ad", image=tmp_path / "he.tif", cell_type_key="celltype")
    ad.X = np.log1p(ad.X)
    ad.write_h5ad(tmp_path / "norm.h5ad")
    with pytest.raises(InvalidSampleError, match="raw counts are needed"):
        read_h5ad(tmp_path / "norm.h5ad", image=tmp_path / "he.tif")
    ad = _anndata_pair(tmp_path)
    ad.obsm["spatial"] = ad.obsm["spatial"] / 0.4 * 3  # pixels of a 3x larger level
    ad.write_h5ad(tmp_path / "big.h5ad")
    with pytest.raises(InvalidSampleError, match=r"extend to \(\d+, \d+\) px .* but the image is 150 x 100 px"):
        read_h5ad(tmp_path / "big.h5ad", image=tmp_path / "he.tif")
    write_tiff(tmp_path / "nompp.tif", np.full((100, 150, 3), 200, dtype=np.uint8), mpp=40.0)
    with pytest.raises(InvalidSampleError, match="implausible"):
        read_h5ad(tmp_path / "cells.h5ad", image=tmp_path / "nompp.tif")
    (tmp_path / "broken.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(ImageReadError, match="cannot read"):
        read_h5ad(tmp_path / "cells.h5ad", image=tmp_path / "broken.tif", mpp=0.5)
    with pytest.raises(InvalidSampleError, match="unknown data format 'visium'"):
        read_sample(tmp_path / "cells.h5ad", "visium")
    with pytest.raises(InvalidSampleError, match="give --format"):
        detect_format(tmp_path)


def _wkb(ring, order="<", z=False, multi=False) -> bytes:
    pts = np.column_stack([ring, np.zeros(len(ring))]) if z else ring
    code = 1003 if z else 3
    body = struct.pack(order + "I", 1) + struct.pack(order + "I", len(pts)) + pts.astype(order + "f8").tobytes()
    poly = struct.pack("B", 1 if order == "<" else 0) + struct.pack(order + "I", code) + body
    if multi:
        small = struct.pack("<BII", 1, 3, 1) + struct.pack("<I", 3) + np.array([[0, 0], [1, 0], [0, 1.0]]).astype("<f8").tobytes()
        return struct.pack("<BII", 1, 6, 2) + small + poly
    return poly


def test_wkb_variants_and_polygon_files(tmp_path):
    square = np.array([[0, 0], [4, 0], [4, 4], [0, 4], [0, 0.0]])
    for kw in ({}, {"order": ">"}, {"z": True}, {"multi": True}):
        np.testing.assert_allclose(wkb_exterior(_wkb(square, **kw)), square)
    # 10x vertex rows
    rows = pd.DataFrame({"cell_id": [b"a-1"] * 5 + [b"b-1"] * 5,
                         "vertex_x": np.r_[square[:, 0], square[:, 0] + 10], "vertex_y": np.r_[square[:, 1], square[:, 1]]})
    rows.to_parquet(tmp_path / "cell_boundaries.parquet")
    polys = read_polygons(tmp_path / "cell_boundaries.parquet")
    assert polys.ids == ["a-1", "b-1"]
    np.testing.assert_allclose(polys.centroids(), [[2, 2], [12, 2]])
    np.testing.assert_allclose(polys.areas(), [16, 16])
    # GeoJSON
    fc = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "id": "x", "geometry": {"type": "Polygon", "coordinates": [square.tolist()]}}]}
    (tmp_path / "s.geojson").write_text(json.dumps(fc))
    assert read_polygons(tmp_path / "s.geojson").ids == ["x"]
    # GeoParquet with duplicated ids is refused
    t = pa.table({"cell_id": ["a", "a"], "geometry": [_wkb(square), _wkb(square)]})
    pq.write_table(t, tmp_path / "dup.parquet")
    with pytest.raises(InvalidSampleError, match="duplicated cell ids"):
        read_polygons(tmp_path / "dup.parquet")


def test_point_in_polygon_index_matches_brute_force():
    rng = np.random.default_rng(2)
    centres = np.array([[x, y] for x in range(5, 100, 12) for y in range(5, 100, 12)], dtype=float)
    angles = np.linspace(0, 2 * np.pi, 9)[:-1]
    rings = [c + rng.uniform(3, 5) * np.column_stack([np.cos(angles), np.sin(angles)]) for c in centres]
    index = PolygonIndex(Polygons([str(i) for i in range(len(rings))], rings))
    pts = rng.uniform(0, 100, (5000, 2))
    got = index.assign(pts, chunk=777)
    from matplotlib.path import Path as MplPath

    want = np.full(len(pts), -1)
    for i, r in enumerate(rings):
        want[MplPath(r).contains_points(pts)] = i
    assert (got == want).mean() > 0.999 and (want >= 0).sum() > 100


def test_h5ad_pixel_size_sources_must_agree(tmp_path):
    """uns["gcmoe"]["mpp"] and the image's tags 37% apart stop with both values, unless mpp is given."""
    ad = _anndata_pair(tmp_path)  # he.tif's tags say 0.4 um/px
    ad.uns["gcmoe"] = {"mpp": 0.25}
    ad.write_h5ad(tmp_path / "cells.h5ad")
    with pytest.raises(InvalidSampleError, match=r"cells\.h5ad's uns\['gcmoe'\]\['mpp'\] says 0\.25 um/px, he\.tif's "
                                                 r"TIFF resolution tags says 0\.4 um/px.*give it with --mpp"):
        read_h5ad(tmp_path / "cells.h5ad", image=tmp_path / "he.tif")
    assert read_h5ad(tmp_path / "cells.h5ad", image=tmp_path / "he.tif", mpp=0.25).mpp == 0.25


def test_h5ad_with_a_png_image(tmp_path):
    """AnnData + a PNG crop: --mpp is required (PNG states none); the Sample keeps referencing the PNG."""
    from PIL import Image

    from gcmoe.data.sample import Sample

    _anndata_pair(tmp_path)
    Image.fromarray(np.full((100, 150, 3), 200, dtype=np.uint8)).save(tmp_path / "he.png")
    with pytest.raises(InvalidSampleError, match=r"unknown \(not given, not in cells\.h5ad; he\.png is a PNG/JPEG "
                                                 r"image.*give it with --mpp"):
        read_h5ad(tmp_path / "cells.h5ad", image=tmp_path / "he.png")
    s = read_h5ad(tmp_path / "cells.h5ad", image=tmp_path / "he.png", mpp=0.5)
    assert s.mpp == 0.5 and s.image.shape == (100, 150)
    back = Sample.read(s.write(tmp_path / "sample.h5ad"))
    assert back.image.path == (tmp_path / "he.png").resolve() and back.image.shape == (100, 150)


@pytest.mark.slow
def test_cv_on_anndata_with_its_own_cell_types(tmp_path):
    """`gcmoe cv --data cells.h5ad --image he.tif --cell-type-key ...` with 5 types of the data's own names."""
    from typer.testing import CliRunner

    from gcmoe.cli import app
    from gcmoe.config import TissueConfig
    from gcmoe.data.virtual_tissue import simulate_tissue

    t = simulate_tissue(TissueConfig(n_cells=300, height=600, width=600, n_genes=60, n_reference_cells=600, seed=4,
                                     n_cell_types=5))
    names = {"type_0": "Tumour cells", "type_1": "Lymphocytes", "type_2": "Macrophages", "type_3": "Stroma",
             "type_4": "Ducts"}
    s = t.sample
    write_tiff(tmp_path / "he.tif", s.image.read_region(0, 0, 600, 600), mpp=s.mpp)
    ad = anndata.AnnData(X=s.adata.layers["counts"].copy(),
                         obs=pd.DataFrame({"annotation": s.adata.obs["cell_type"].astype(str).map(names).to_numpy()},
                                          index=s.adata.obs_names))
    ad.var_names = s.adata.var_names
    ad.obsm["spatial"] = s.spatial
    ad.write_h5ad(tmp_path / "cells.h5ad")
    ref = t.reference.copy()
    ref.obs["cell_type"] = ref.obs["routing_type"].astype(str).map(names).astype("category")
    del ref.uns["gcmoe"]
    ref.write_h5ad(tmp_path / "ref.h5ad")
    (tmp_path / "run.yaml").write_text("train:\n  max_epochs: 3\n  patience: 3\ntargets:\n  n_top_genes: 20\n")
    result = CliRunner().invoke(app, [
        "cv", "--config", str(tmp_path / "run.yaml"), "--data", str(tmp_path / "cells.h5ad"),
        "--image", str(tmp_path / "he.tif"), "--cell-type-key", "annotation", "--reference", str(tmp_path / "ref.h5ad"),
        "--models", "stnet,gcmoe", "--out", str(tmp_path / "run"),
    ])
    assert result.exit_code == 0, result.output
    (d,) = json.loads((tmp_path / "run" / "results.json").read_text())["datasets"].values()
    assert d["routing"]["source"] == "obs" and sorted(d["routing"]["types"]) == sorted(names.values())
    assert d["prior"]["types"].keys() == set(names.values())
    assert all(np.isfinite(e["mean"]) for e in d["models"].values())


def _tissue_um(n: int = 400, width_um: float = 200.0, seed: int = 2) -> np.ndarray:
    """Cell centres in micrometres on a jittered grid ~10 um apart (as in tissue)."""
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n)))
    grid = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)[:n] * (width_um / side)
    return grid + rng.uniform(0, 2.0, grid.shape) + 5.0


def _um_table(tmp_path: Path, um: np.ndarray, spatialdata: bool) -> Path:
    """An AnnData with micrometre centres in obsm["spatial"]; ``spatialdata``: as spatialdata-io's Xenium reader
    writes its table (x_centroid/y_centroid in obsm["spatial"], obs region + cell_id, uns["spatialdata_attrs"])."""
    n = len(um)
    ids = [f"aaa{i:05d}-1" for i in range(n)]
    obs = pd.DataFrame({"cell_id": ids, "region": pd.Categorical(["cell_circles"] * n)}, index=ids)
    ad = anndata.AnnData(X=np.random.default_rng(0).poisson(2.0, (n, 4)).astype(np.float32), obs=obs)
    ad.var_names = [f"G{i}" for i in range(4)]
    ad.obsm["spatial"] = um
    if spatialdata:
        ad.uns["spatialdata_attrs"] = {"region": "cell_circles", "region_key": "region", "instance_key": "cell_id"}
    path = tmp_path / ("sdata_table.h5ad" if spatialdata else "um.h5ad")
    ad.write_h5ad(path)
    return path


def test_micrometre_centres_are_told_from_pixels(tmp_path):
    """um read as px crowd into the image's corner, 2 um apart: refused with --coords um; px read as um overflow
    the image: refused with --coords px; --coords um reads micrometres at um / mpp."""
    mpp = 0.2125
    um = _tissue_um()
    write_tiff(tmp_path / "he.tif", np.full((1100, 1100, 3), 200, dtype=np.uint8), mpp=mpp)
    path = _um_table(tmp_path, um, spatialdata=False)
    with pytest.raises(InvalidSampleError, match=r"too close together for cells.*they look like micrometres, give "
                                                 r"--coords um"):
        read_h5ad(path, image=tmp_path / "he.tif")
    s = read_h5ad(path, image=tmp_path / "he.tif", coords="um")
    np.testing.assert_allclose(s.spatial, um / mpp)
    assert s.adata.uns["gcmoe"]["provenance"]["coords"] == "um"
    # pixels given as micrometres: 1/mpp = 4.7x too far out
    px = um / mpp
    ad = anndata.read_h5ad(path)
    ad.obsm["spatial"] = px
    ad.write_h5ad(tmp_path / "px.h5ad")
    with pytest.raises(InvalidSampleError, match=r"fit the image when read another way: as pixels \(--coords px\)"):
        read_h5ad(tmp_path / "px.h5ad", image=tmp_path / "he.tif", coords="um")
    np.testing.assert_allclose(read_h5ad(tmp_path / "px.h5ad", image=tmp_path / "he.tif").spatial, px)
    # pixels of a 10x downsampled level on the full-resolution image: 10x too close
    ad.obsm["spatial"] = px / 10
    ad.write_h5ad(tmp_path / "level.h5ad")
    with pytest.raises(InvalidSampleError, match=r"pixels of an image about \d+x smaller"):
        read_h5ad(tmp_path / "level.h5ad", image=tmp_path / "he.tif")
    with pytest.raises(InvalidSampleError, match="unknown unit of the cell centres"):
        read_h5ad(path, image=tmp_path / "he.tif", coords="mm")


def test_spatialdata_io_table_is_read_as_micrometres(tmp_path):
    """A table as spatialdata-io's Xenium reader writes it: obsm["spatial"] in micrometres, read as such by default."""
    mpp = 0.2125
    um = _tissue_um()
    write_tiff(tmp_path / "he.tif", np.full((1100, 1100, 3), 200, dtype=np.uint8), mpp=mpp)
    path = _um_table(tmp_path, um, spatialdata=True)
    s = read_sample(path, image=tmp_path / "he.tif")
    np.testing.assert_allclose(s.spatial, um / mpp)
    assert s.adata.uns["gcmoe"]["provenance"]["coords"] == "um"
    with pytest.raises(InvalidSampleError, match="--coords um"):  # forced to pixels, the spacing check objects
        read_sample(path, image=tmp_path / "he.tif", coords="px")


def test_real_xenium_crop_names_its_columns(realdata):
    """NCBI858 (a real Xenium crop, DeepSpot's layout): no obsm, obs x_pixel = image ROW, y_pixel = COLUMN; each
    wrong call is refused with what to change, the right one places every cell on the 1431 x 1249 JPEG."""
    folder = realdata("xenium_lung_ncbi858")
    h5ad, jpg = folder / "NCBI858.h5ad", folder / "NCBI858.jpg"
    with pytest.raises(InvalidSampleError, match=r"obs has \['x_pixel', 'y_pixel'\].*--xy-columns X,Y"):
        read_h5ad(h5ad, image=jpg, mpp=2.125)
    with pytest.raises(InvalidSampleError, match="give it with --mpp"):
        read_h5ad(h5ad, image=jpg, xy_columns=["y_pixel", "x_pixel"])
    with pytest.raises(InvalidSampleError, match=r"x and y swapped \(--xy-columns y_pixel,x_pixel\)"):
        read_h5ad(h5ad, image=jpg, mpp=2.125, xy_columns=["x_pixel", "y_pixel"])
    s = read_h5ad(h5ad, image=jpg, mpp=2.125, xy_columns=["y_pixel", "x_pixel"])
    ad = anndata.read_h5ad(h5ad)
    assert s.n_cells == ad.n_obs == 200 and s.image.shape == (1249, 1431)
    np.testing.assert_allclose(s.spatial, ad.obs[["y_pixel", "x_pixel"]].to_numpy())


@pytest.mark.slow
def test_cv_on_the_real_xenium_crop(realdata, tmp_path):
    """The command of docs/data.md: `gcmoe cv` on NCBI858 runs end to end (ST-Net*, short training)."""
    from typer.testing import CliRunner

    from gcmoe.cli import app

    folder = realdata("xenium_lung_ncbi858")
    (tmp_path / "run.yaml").write_text("train:\n  max_epochs: 5\n  patience: 3\ntargets:\n  n_top_genes: 20\n")
    result = CliRunner().invoke(app, [
        "cv", "--config", str(tmp_path / "run.yaml"), "--data", str(folder / "NCBI858.h5ad"),
        "--image", str(folder / "NCBI858.jpg"), "--mpp", "2.125", "--xy-columns", "y_pixel,x_pixel",
        "--models", "stnet", "--out", str(tmp_path / "run"),
    ])
    assert result.exit_code == 0, result.output
    (d,) = json.loads((tmp_path / "run" / "results.json").read_text())["datasets"].values()
    assert d["n_cells"] == 200 and np.isfinite(d["models"]["ST-Net*"]["mean"])
    qc = json.loads((tmp_path / "run" / "qc" / "NCBI858.json").read_text())  # the slide check ran first
    verdicts = {c["name"]: c["verdict"] for c in qc["checks"]}
    assert verdicts["cells on nuclei"] == "skipped" and verdicts["spacing"] == "warn"  # 2.1 um/px; 200 cells, 75 um apart
    # the model cv saved was trained at 2.1 um/px: predict takes a slide like its training slides (a model trained
    # at the encoder's 0.5 um/px refuses it: tests/test_inference_images.py)
    cells = anndata.read_h5ad(folder / "NCBI858.h5ad").obs
    pd.DataFrame({"x": cells["y_pixel"], "y": cells["x_pixel"]}).to_csv(tmp_path / "cells.csv", index=False)
    result = CliRunner().invoke(app, [
        "predict", "--model", str(tmp_path / "run" / "models" / "stnet"), "--slide", str(folder / "NCBI858.jpg"),
        "--mpp", "2.125", "--cells", str(tmp_path / "cells.csv"), "--out", str(tmp_path / "lung.h5ad")])
    assert result.exit_code == 0, result.output
    predicted = anndata.read_h5ad(tmp_path / "lung.h5ad")
    assert predicted.n_obs == 200 and np.isfinite(predicted.X).all()


def test_an_option_the_reader_does_not_use_is_refused(tmp_path, tiny_sample):
    """--coords / --xy-columns / --mpp given for a layout that does not use them: an error, not silence."""
    path = tiny_sample.write(tmp_path / "tiny.h5ad")
    with pytest.raises(InvalidSampleError, match=r"read as 'sample', whose reader does not use coords='um'.*drop the"):
        read_sample(path, "auto", coords="um")
    with pytest.raises(InvalidSampleError, match=r"does not use mpp=0.25 \(a Sample file carries its image"):
        read_sample(path, "auto", mpp=0.25)
    with pytest.raises(InvalidSampleError, match=r"does not use xy_columns=\['a', 'b'\]"):
        read_sample(path, "auto", xy_columns=["a", "b"])
    # the run settings pass every option at its default: those are dropped quietly
    assert read_sample(path, "auto", coords="auto", xy_columns=None, min_qv=20.0, segmentation="cell").n_cells == 40


def test_segmentation_geojson_names_the_features_it_skips(tmp_path, caplog):
    """Points and empty polygons among cell polygons are skipped, and the log says how many of which kind."""
    square = [[[0, 0], [4, 0], [4, 4], [0, 4], [0, 0]]]
    features = [{"type": "Feature", "id": "c1", "geometry": {"type": "Polygon", "coordinates": square}},
                {"type": "Feature", "id": "p1", "geometry": {"type": "Point", "coordinates": [1, 1]}},
                {"type": "Feature", "id": "e1", "geometry": {"type": "Polygon", "coordinates": [[]]}}]
    (tmp_path / "cells.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    with caplog.at_level("WARNING"):
        polys = read_polygons(tmp_path / "cells.geojson")
    assert polys.ids == ["c1"]
    assert "2 features are not cell polygons and were skipped (1 Point, 1 Polygon without a ring)" in caplog.text
