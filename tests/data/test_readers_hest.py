"""HEST-1k Xenium reader: a HEST-layout folder written from a small virtual tissue, read back."""

from __future__ import annotations

import json
import logging
import os
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp

from gcmoe._constants import Key, UnsKey
from gcmoe.config import TissueConfig
from gcmoe.data.image import write_tiff
from gcmoe.data.readers import aggregate_transcripts, detect_format, read_hest, read_sample
from gcmoe.errors import InvalidSampleError

SID = "TENX00"
RADIUS = 3.0  # polygon radius, px; transcripts fall within RADIUS / 2 of the centre


def _wkb_polygon(ring: np.ndarray) -> bytes:
    closed = np.vstack([ring, ring[:1]])
    return struct.pack("<BII", 1, 3, 1) + struct.pack("<I", len(closed)) + closed.astype("<f8").tobytes()


def _octagon(centre: np.ndarray) -> np.ndarray:
    angles = np.arange(8) * np.pi / 4
    return centre + RADIUS * np.column_stack([np.cos(angles), np.sin(angles)])


def write_hest_folder(root: Path, sample, sample_id: str = SID, cell_id_column: bool = True,
                      bytes_names: bool = False, seg: bool = True, meta: dict | None = None, seed: int = 0) -> dict:
    """Write ``sample`` in HEST-1k's layout: wsis/, metadata/, transcripts/, xenium_seg/ (GeoParquet)."""
    rng = np.random.default_rng(seed)
    for d in ("wsis", "metadata", "transcripts", "xenium_seg"):
        (root / d).mkdir(parents=True, exist_ok=True)
    img = sample.image.read_region(0, 0, sample.image.shape[1], sample.image.shape[0])
    write_tiff(root / "wsis" / f"{sample_id}.tif", img, sample.mpp)
    metadata = {"pixel_size_um_estimated": sample.mpp, "pixel_size_um_embedded": sample.mpp, "st_technology": "Xenium",
                "organ": "Breast"}
    metadata.update(meta or {})
    (root / "metadata" / f"{sample_id}.json").write_text(json.dumps(metadata))
    counts = sp.coo_matrix(sample.counts)
    cell_ids = np.array([f"cell{i:05d}-1" for i in range(sample.n_cells)])
    genes = np.array(sample.genes)
    rows = np.repeat(counts.row, counts.data.astype(int))
    cols = np.repeat(counts.col, counts.data.astype(int))
    xy = sample.spatial[rows]
    r = rng.uniform(0, RADIUS / 2, len(rows))
    a = rng.uniform(0, 2 * np.pi, len(rows))
    frame = pd.DataFrame({
        "transcript_id": np.arange(len(rows)),
        "cell_id": cell_ids[rows],
        "feature_name": genes[cols],
        "qv": rng.uniform(20, 40, len(rows)),
        "he_x": xy[:, 0] + r * np.cos(a),
        "he_y": xy[:, 1] + r * np.sin(a),
    })
    n_extra = 300
    pick = rng.integers(0, sample.n_cells, n_extra)
    extra = pd.DataFrame({  # each must be dropped: low quality, control features, unassigned
        "transcript_id": np.arange(n_extra) + len(rows),
        "cell_id": np.where(np.arange(n_extra) < 200, cell_ids[pick], "UNASSIGNED"),
        "feature_name": np.select([np.arange(n_extra) < 100, np.arange(n_extra) < 150, np.arange(n_extra) < 200],
                                  [genes[0], "NegControlProbe_00042", "BLANK_0006"], genes[1]),
        "qv": np.where(np.arange(n_extra) < 100, 10.0, 35.0),
        "he_x": sample.spatial[pick, 0],
        "he_y": sample.spatial[pick, 1],
    })
    extra.loc[200:, "he_x"] = 1.0  # unassigned transcripts lie away from cells (for polygon assignment)
    extra.loc[200:, "he_y"] = 1.0
    tx = pd.concat([frame, extra], ignore_index=True).sample(frac=1.0, random_state=seed)
    if not cell_id_column:
        tx = tx.drop(columns="cell_id")
    table = pa.Table.from_pandas(tx, preserve_index=False)
    if bytes_names:
        table = table.set_column(table.schema.get_field_index("feature_name"), "feature_name",
                                 pa.array([s.encode() for s in tx["feature_name"]], pa.binary()))
    pq.write_table(table, root / "transcripts" / f"{sample_id}_transcripts.parquet", row_group_size=2_000)
    if seg:
        polys = [_wkb_polygon(_octagon(c)) for c in sample.spatial]
        gdf = pd.DataFrame({"geometry": polys}, index=pd.Index(cell_ids))  # geopandas stores the id as the index
        t = pa.Table.from_pandas(gdf)
        geo = {"version": "1.0.0", "primary_column": "geometry",
               "columns": {"geometry": {"encoding": "WKB", "geometry_types": ["Polygon"]}}}
        t = t.replace_schema_metadata({**t.schema.metadata, b"geo": json.dumps(geo).encode()})
        pq.write_table(t, root / "xenium_seg" / f"{sample_id}_xenium_cell_seg.parquet")
    return {"cell_ids": cell_ids, "n_tx": len(rows)}


@pytest.fixture(scope="module")
def tissue():
    from gcmoe.data.virtual_tissue import simulate_tissue

    return simulate_tissue(TissueConfig(n_cells=400, height=600, width=600, n_genes=60, n_reference_cells=800, seed=3))


def _truth(sample, cell_ids):
    """Counts of the cells that have any, keyed like the reader's cell ids."""
    dense = np.asarray(sp.csr_matrix(sample.counts).todense())
    keep = dense.sum(1) > 0
    return pd.DataFrame(dense[keep], index=cell_ids[keep], columns=sample.genes), sample.spatial[keep]


def test_hest_reads_cells_from_transcripts_and_polygons(tmp_path, tissue, caplog):
    info = write_hest_folder(tmp_path, tissue.sample)
    assert detect_format(tmp_path) == "hest"
    with caplog.at_level(logging.INFO):
        s = read_hest(tmp_path, progress=False)  # the only sample of the root
    truth, xy = _truth(tissue.sample, info["cell_ids"])
    got = pd.DataFrame(np.asarray(s.counts.todense()), index=s.adata.obs_names, columns=s.genes)
    assert set(got.index) == set(truth.index)
    pd.testing.assert_frame_equal(got.loc[truth.index, truth.columns], truth, check_dtype=False)
    # centres are the polygons' centroids, which are the cells' centres
    np.testing.assert_allclose(s.spatial[got.index.get_indexer(truth.index)], xy, atol=1e-6)
    assert s.mpp == tissue.sample.mpp and s.sample_id == SID
    prov = s.adata.uns[Key.UNS][UnsKey.PROVENANCE]
    assert prov["format"] == "hest" and prov["mpp_source"] == f"{SID}.json's pixel_size_um_estimated"
    assert prov["transcripts"]["low_quality"] == 100 and prov["transcripts"]["control"] == 100
    assert prov["transcripts"]["unassigned"] == 100 and prov["transcripts"]["counted"] == info["n_tx"]
    assert "area_um2" in s.adata.obs and np.allclose(s.adata.obs["area_um2"], 2 * np.sqrt(2) * RADIUS**2 * s.mpp**2)
    assert not any(g.startswith(("NegControl", "BLANK")) for g in s.genes)


def test_hest_polygon_assignment_matches_cell_ids(tmp_path, tissue):
    info = write_hest_folder(tmp_path, tissue.sample, cell_id_column=False, bytes_names=True)
    s = read_sample(tmp_path, "hest", sample_id=SID, progress=False)
    truth, _ = _truth(tissue.sample, info["cell_ids"])
    got = pd.DataFrame(np.asarray(s.counts.todense()), index=s.adata.obs_names, columns=s.genes)
    pd.testing.assert_frame_equal(got.loc[truth.index, truth.columns], truth, check_dtype=False)
    assert s.adata.uns[Key.UNS][UnsKey.PROVENANCE]["assignment"] == "auto"


def test_hest_without_segmentation_uses_mean_transcript_position(tmp_path, tissue):
    write_hest_folder(tmp_path, tissue.sample, seg=False)
    s = read_hest(tmp_path, SID, progress=False)
    truth_xy = tissue.sample.spatial[np.asarray(tissue.sample.counts.sum(1)).ravel() > 0]
    assert s.n_cells == len(truth_xy)
    idx = np.array([int(c[4:9]) for c in s.adata.obs_names])
    assert np.abs(s.spatial - tissue.sample.spatial[idx]).max() < RADIUS / 2 + 1e-9
    assert s.adata.uns[Key.UNS][UnsKey.PROVENANCE]["centres"] == "mean transcript position"


def test_hest_prefers_estimated_pixel_size_and_records_embedded(tmp_path, tissue, caplog):
    write_hest_folder(tmp_path, tissue.sample, meta={"pixel_size_um_embedded": 2.5})
    with caplog.at_level(logging.WARNING):
        s = read_hest(tmp_path, SID, progress=False)
    assert s.mpp == tissue.sample.mpp
    assert s.adata.uns[Key.UNS][UnsKey.MPP_EMBEDDED] == 2.5
    assert "differ" in caplog.text


def write_hest_st(root: Path, sample, pool_mpp: float, sample_id: str = SID) -> Path:
    """HEST's ``st/{id}.h5ad`` for Xenium: transcripts pooled into 100 um square pseudo-spots on a grid starting at
    the smallest coordinates, centres in ``obsm["spatial"]`` (H&E pixels, spacing 100 / ``pool_mpp``), empty
    spots dropped; written with anndata as HEST does."""
    import anndata

    step = 100.0 / pool_mpp
    lo = sample.spatial.min(axis=0)
    cells = np.unique(np.floor((sample.spatial - lo) / step).astype(int), axis=0)
    st = anndata.AnnData(X=np.ones((len(cells), 1), dtype=np.float32))
    st.obsm["spatial"] = lo + (cells + 0.5) * step
    path = root / "st" / f"{sample_id}.h5ad"
    path.parent.mkdir(parents=True, exist_ok=True)
    st.write_h5ad(path)
    return path


def test_hest_pixel_size_is_cross_checked_with_the_pseudo_spots(tmp_path, tissue):
    """pixel_size_um_estimated agrees with the 100 um pseudo-spot spacing of st/{id}.h5ad: read, both recorded."""
    write_hest_folder(tmp_path, tissue.sample)
    write_hest_st(tmp_path, tissue.sample, pool_mpp=tissue.sample.mpp)
    s = read_hest(tmp_path, SID, progress=False)
    assert s.mpp == tissue.sample.mpp
    assert s.adata.uns[Key.UNS]["provenance"]["mpp_spot_spacing"] == pytest.approx(tissue.sample.mpp)


def test_hest_metadata_that_disagrees_with_its_spots_stops(tmp_path, tissue):
    """As in HEST issue #122: metadata 20% off its own pseudo-spot grid stops with both values, unless --mpp."""
    write_hest_folder(tmp_path, tissue.sample, meta={"pixel_size_um_estimated": tissue.sample.mpp * 1.2})
    write_hest_st(tmp_path, tissue.sample, pool_mpp=tissue.sample.mpp)
    with pytest.raises(InvalidSampleError, match=rf"sample {SID}: the pixel size sources disagree: {SID}\.json's "
                                                 r"pixel_size_um_estimated says 0\.6 um/px, the 100 um spot spacing of "
                                                 rf"st/{SID}\.h5ad says 0\.5 um/px.*give it with --mpp"):
        read_hest(tmp_path, SID, progress=False)
    assert read_hest(tmp_path, SID, mpp=0.5, progress=False).mpp == 0.5


def test_hest_tiff_tags_are_never_trusted(tmp_path, tissue, writers, caplog):
    """A wsi written as HEST writes it (LZW pyramid, resolution tags 10x off) with the metadata HEST derives from it:
    the embedded value is recorded, never used; without an estimate nor st/, --mpp is asked for."""
    image = tissue.sample.image.read_region(0, 0, 600, 600)
    write_hest_folder(tmp_path, tissue.sample, meta={"pixel_size_um_embedded": tissue.sample.mpp / 10})
    writers.write_hest_wsi(tmp_path / "wsis" / f"{SID}.tif", image, mpp=tissue.sample.mpp)
    with caplog.at_level(logging.WARNING):
        s = read_hest(tmp_path, SID, progress=False)
    assert s.mpp == tissue.sample.mpp and s.image.compression == "LZW"
    assert s.adata.uns[Key.UNS][UnsKey.MPP_EMBEDDED] == pytest.approx(tissue.sample.mpp / 10)
    assert "only recorded" in caplog.text
    meta = json.loads((tmp_path / "metadata" / f"{SID}.json").read_text())
    del meta["pixel_size_um_estimated"]
    (tmp_path / "metadata" / f"{SID}.json").write_text(json.dumps(meta))
    with pytest.raises(InvalidSampleError, match=r"no pixel_size_um_estimated and there is no st/TENX00\.h5ad.*"
                                                 r"HEST issue #106.*give it with --mpp"):
        read_hest(tmp_path, SID, progress=False)
    write_hest_st(tmp_path, tissue.sample, pool_mpp=tissue.sample.mpp)  # the spots alone then give it
    assert read_hest(tmp_path, SID, progress=False).mpp == pytest.approx(tissue.sample.mpp)


def test_aggregation_is_the_same_in_small_batches(tmp_path, tissue):
    write_hest_folder(tmp_path, tissue.sample)
    path = tmp_path / "transcripts" / f"{SID}_transcripts.parquet"
    big = aggregate_transcripts(path, progress=False)
    small = aggregate_transcripts(path, batch_size=997, progress=False)
    order = [small.cell_ids.index(c) for c in big.cell_ids]
    gorder = [small.genes.index(g) for g in big.genes]
    assert (big.counts != small.counts[order][:, gorder]).nnz == 0
    np.testing.assert_allclose(big.mean_xy, small.mean_xy[order])
    assert big.stats["counted"] == small.stats["counted"]


def test_hest_errors_name_the_problem(tmp_path, tissue):
    write_hest_folder(tmp_path / "a", tissue.sample)
    write_hest_folder(tmp_path / "a", tissue.sample, sample_id="TENX01")
    with pytest.raises(InvalidSampleError, match="holds 2 HEST samples.*--sample-id"):
        read_hest(tmp_path / "a", progress=False)
    with pytest.raises(InvalidSampleError, match="'TENX99' not found.*TENX00"):
        read_hest(tmp_path / "a", "TENX99", progress=False)
    os.remove(tmp_path / "a" / "transcripts" / "TENX01_transcripts.parquet")
    with pytest.raises(InvalidSampleError, match="transcripts/TENX01_transcripts.parquet not found"):
        read_hest(tmp_path / "a", "TENX01", progress=False)
    write_hest_folder(tmp_path / "v", tissue.sample, meta={"st_technology": "Visium"})
    with pytest.raises(InvalidSampleError, match="Visium, not Xenium"):
        read_hest(tmp_path / "v", progress=False)
    # polygons in micrometres instead of pixels: centres run past the image
    big = tissue.sample.adata.copy()
    write_hest_folder(tmp_path / "u", tissue.sample, meta={"pixel_size_um_estimated": 0.2})
    with pytest.raises(InvalidSampleError, match="implausible|outside"):
        read_hest(tmp_path / "u", mpp=0.01, progress=False)
    del big


def test_hest_centres_outside_the_image_say_so(tmp_path, tissue):
    write_hest_folder(tmp_path, tissue.sample)
    seg = tmp_path / "xenium_seg" / f"{SID}_xenium_cell_seg.parquet"
    t = pq.read_table(seg)
    scaled = [_wkb_polygon(_octagon(c * 3.0)) for c in tissue.sample.spatial]
    pq.write_table(t.set_column(0, "geometry", pa.array(scaled, pa.binary())), seg)
    with pytest.raises(InvalidSampleError, match=r"extend to .* but the image is 600 x 600 px.*are they micrometres"):
        read_hest(tmp_path, SID, progress=False)


@pytest.mark.slow
def test_cv_end_to_end_on_a_hest_folder(tmp_path, tissue):
    """`gcmoe cv --data <HEST root> --sample-id ...` runs the whole comparison."""
    from typer.testing import CliRunner

    from gcmoe.cli import app
    from gcmoe.files import write_h5ad

    root = tmp_path / "hest"
    write_hest_folder(root, tissue.sample)
    write_h5ad(tissue.reference, tmp_path / "ref.h5ad")
    (tmp_path / "run.yaml").write_text("train:\n  max_epochs: 3\n  patience: 3\ntargets:\n  n_top_genes: 20\n")
    result = CliRunner().invoke(app, [
        "cv", "--config", str(tmp_path / "run.yaml"), "--data", str(root), "--sample-id", SID,
        "--reference", str(tmp_path / "ref.h5ad"), "--models", "stnet,gcmoe", "--out", str(tmp_path / "run"),
    ])
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    (name, d), = results["datasets"].items()
    assert name == SID and d["n_cells"] > 300
    assert set(d["models"]) == {"ST-Net*", "GC-MoE"}
    assert all(np.isfinite(e["mean"]) for e in d["models"].values())
    assert d["routing"]["source"] == "transfer"  # HEST cells carry no types: transferred from the reference

    # convert once, then the Sample .h5ad runs the same way
    out = tmp_path / "s.h5ad"
    result = CliRunner().invoke(app, ["convert", "--data", str(root), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert detect_format(out) == "sample"
    assert read_sample(out).n_cells == d["n_cells"]


PANNUKE = ("Neoplastic", "Inflammatory", "Connective", "Dead", "Epithelial")


def _cellvit_features(centres: np.ndarray, classes: np.ndarray) -> list:
    """CellViT's GeoJSON as HEST ships it (cellvit_seg/{id}_cellvit_seg.geojson): one QuPath annotation per class,
    a MultiPolygon of all its nuclei."""
    feats = []
    for name in dict.fromkeys(classes):
        parts = [[np.vstack([_octagon(c), _octagon(c)[:1]]).tolist()] for c in centres[classes == name]]
        feats.append({"type": "Feature", "id": f"x-id-{name}", "geometry": {"type": "MultiPolygon", "coordinates": parts},
                      "properties": {"objectType": "annotation", "classification": {"name": name, "color": [255, 0, 0]}}})
    return feats


def _write_cellvit(root: Path, sample, geojson: bool = False, zipped: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """HEST's cellvit_seg/: the GeoParquet HEST writes with geopandas (geometry, class, cell_id = running number,
    in the GeoJSON's order: grouped by class), or the GeoJSON, or only its zip."""
    import zipfile

    import geopandas as gpd
    from shapely.geometry import Polygon

    classes = np.array(PANNUKE)[np.arange(sample.n_cells) % len(PANNUKE)]
    order = np.concatenate([np.flatnonzero(classes == name) for name in dict.fromkeys(classes)])
    centres, classes = sample.spatial[order], classes[order]
    folder = root / "cellvit_seg"
    folder.mkdir(exist_ok=True)
    if zipped or geojson:
        text = json.dumps(_cellvit_features(centres, classes))
        if zipped:
            with zipfile.ZipFile(folder / f"{SID}_cellvit_seg.geojson.zip", "w") as zf:
                zf.writestr(f"{SID}_cellvit_seg.geojson", text)
        else:
            (folder / f"{SID}_cellvit_seg.geojson").write_text(text)
    else:
        gdf = gpd.GeoDataFrame({"class": classes}, geometry=[Polygon(_octagon(c)) for c in centres])
        gdf["cell_id"] = np.arange(len(gdf))
        gdf.to_parquet(folder / f"{SID}_cellvit_seg.parquet")
    return centres, classes


@pytest.mark.parametrize("geojson", [False, True])
def test_hest_cellvit_nuclei_give_the_cells(tmp_path, tissue, geojson):
    """segmentation="cellvit": cells are CellViT's nuclei (GeoParquet by geopandas, or CellViT's per-class
    MultiPolygon GeoJSON, parts numbered as HEST numbers them), transcripts assigned by polygon, the class kept."""
    info = write_hest_folder(tmp_path, tissue.sample)
    centres, classes = _write_cellvit(tmp_path, tissue.sample, geojson=geojson)
    s = read_hest(tmp_path, segmentation="cellvit", progress=False)
    truth, _ = _truth(tissue.sample, info["cell_ids"])
    by_centre = {tuple(np.round(c, 6)): i for i, c in enumerate(tissue.sample.spatial)}
    nucleus_to_cell = {str(k): info["cell_ids"][by_centre[tuple(np.round(c, 6))]] for k, c in enumerate(centres)}
    got = pd.DataFrame(np.asarray(s.counts.todense()), index=[nucleus_to_cell[i] for i in s.adata.obs_names],
                       columns=s.genes)
    pd.testing.assert_frame_equal(got.loc[truth.index, truth.columns], truth, check_dtype=False)
    expected = {str(k): c for k, c in enumerate(classes)}
    assert list(s.adata.obs["cellvit_class"]) == [expected[i] for i in s.adata.obs_names]
    assert s.adata.uns[Key.UNS][UnsKey.PROVENANCE]["assignment"] == "polygons"


def test_hest_zipped_geojson_is_refused_with_the_parquet_as_fix(tmp_path, tissue):
    """HEST's *.geojson.zip (xenium_seg: 100 cells dealt into 10 chunks without ids) is never read as cells."""
    from gcmoe.data.readers import read_polygons

    write_hest_folder(tmp_path, tissue.sample)
    _write_cellvit(tmp_path, tissue.sample, zipped=True)
    with pytest.raises(InvalidSampleError, match=r"holds only TENX00_cellvit_seg.geojson.zip.*download "
                                                 r"cellvit_seg/TENX00_cellvit_seg.parquet"):
        read_hest(tmp_path, segmentation="cellvit", progress=False)
    seg = tmp_path / "xenium_seg"
    (seg / f"{SID}_xenium_cell_seg.parquet").rename(tmp_path / "kept.parquet")
    chunks = []
    for k, part in enumerate(np.array_split(tissue.sample.spatial[:100], 10)):  # HEST's write_geojson(chunk=True)
        chunks.append({"type": "Feature", "id": f"1-id-{k}", "geometry": {"type": "MultiPolygon", "coordinates": [
            [np.vstack([_octagon(c), _octagon(c)[:1]]).tolist()] for c in part]},
            "properties": {"objectType": "annotation", "classification": {"name": str(k), "color": [0, 0, 0]}}})
    (tmp_path / "chunked.geojson").write_text(json.dumps(chunks))
    import zipfile

    with zipfile.ZipFile(seg / f"{SID}_xenium_cell_seg.geojson.zip", "w") as zf:
        zf.write(tmp_path / "chunked.geojson", f"{SID}_xenium_cell_seg.geojson")
    with pytest.raises(InvalidSampleError, match=r"10 chunks without their cell ids.*xenium_seg/TENX00_xenium_cell_seg.parquet"):
        read_hest(tmp_path, progress=False)
    with pytest.raises(InvalidSampleError, match=r"zipped segmentation is not read.*TENX00_xenium_cell_seg.parquet"):
        read_polygons(seg / f"{SID}_xenium_cell_seg.geojson.zip")
    with pytest.raises(InvalidSampleError, match=r"HEST's chunked GeoJSON \(the cells dealt into 10 features"):
        read_polygons(tmp_path / "chunked.geojson")
