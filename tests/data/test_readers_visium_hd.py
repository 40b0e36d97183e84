"""Visium HD cell segmentation: Space Ranger 4's ``outs/segmented_outputs/`` in miniature, read back."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import scipy.sparse as sp

from gcmoe.data.image import write_tiff
from gcmoe.data.readers import detect_format, read_sample, read_visium_hd
from gcmoe.errors import InvalidSampleError

MPP = 0.2738  # microns_per_pixel of the microscope image
N = 40


def _square(centre, half: float) -> list:
    x, y = centre
    return [[[x - half, y - half], [x + half, y - half], [x + half, y + half], [x - half, y + half], [x - half, y - half]]]


def write_space_ranger(outs: Path, seed: int = 0) -> dict:
    """``outs/segmented_outputs/`` as Space Ranger 4 writes it: the filtered cell matrix (MEX), cell and nucleus
    GeoJSON (``properties.cell_id`` integers; two polygons of cells the filter dropped), scalefactors."""
    rng = np.random.default_rng(seed)
    seg = outs / "segmented_outputs"
    (seg / "spatial").mkdir(parents=True)
    (seg / "filtered_feature_cell_matrix").mkdir()
    cell_ids = np.sort(rng.choice(np.arange(1, 10_000), N + 2, replace=False))
    centres = np.column_stack([rng.uniform(30, 570, N + 2), rng.uniform(30, 370, N + 2)])
    for name, half in (("cell_segmentations.geojson", 9.0), ("nucleus_segmentations.geojson", 4.0)):
        feats = [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": _square(c, half)},
                  "properties": {"cell_id": int(i)}} for i, c in zip(cell_ids, centres)]
        (seg / name).write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    barcodes = [f"cellid_{i:09d}-1" for i in cell_ids[:N]]  # the last two did not pass the filter
    genes = [f"GENE{j}" for j in range(6)]
    counts = rng.poisson(2.0, (N, len(genes)))
    d = seg / "filtered_feature_cell_matrix"
    with gzip.open(d / "matrix.mtx.gz", "wb") as fh:
        scipy.io.mmwrite(fh, sp.coo_matrix(counts.T))
    with gzip.open(d / "barcodes.tsv.gz", "wt") as fh:
        fh.write("\n".join(barcodes) + "\n")
    with gzip.open(d / "features.tsv.gz", "wt") as fh:
        fh.write("".join(f"ENSG{j:05d}\t{g}\tGene Expression\n" for j, g in enumerate(genes)))
    (seg / "spatial" / "scalefactors_json.json").write_text(json.dumps(
        {"spot_diameter_fullres": 7.3, "bin_size_um": 2.0, "microns_per_pixel": MPP, "tissue_lowres_scalef": 0.02,
         "fiducial_diameter_fullres": 1200.0, "tissue_hires_scalef": 0.2}))
    return {"barcodes": barcodes, "centres": centres[:N], "counts": counts, "genes": genes}


def test_visium_hd_segmented_outputs_read_as_cells(tmp_path):
    outs = tmp_path / "sample1" / "outs"
    info = write_space_ranger(outs)
    write_tiff(tmp_path / "he.tif", np.full((400, 600, 3), 210, np.uint8), mpp=MPP)
    assert detect_format(outs) == "visium_hd"
    s = read_sample(outs, image=tmp_path / "he.tif")
    assert s.sample_id == "sample1" and s.mpp == pytest.approx(MPP)
    assert list(s.adata.obs_names) == info["barcodes"] and s.genes == info["genes"]
    np.testing.assert_allclose(s.spatial, info["centres"], atol=1e-9)
    np.testing.assert_array_equal(np.asarray(sp.csr_matrix(s.counts).todense()), info["counts"])
    np.testing.assert_allclose(s.adata.obs["area_um2"], (18 * MPP) ** 2)
    nuclei = read_visium_hd(outs / "segmented_outputs", image=tmp_path / "he.tif", segmentation="nucleus")
    np.testing.assert_allclose(nuclei.spatial, info["centres"], atol=1e-9)
    np.testing.assert_allclose(nuclei.adata.obs["area_um2"], (8 * MPP) ** 2)
    # the microscope image in outs/microscope_image/ (where spatialdata-io looks) needs no --image
    (outs / "microscope_image").mkdir()
    (tmp_path / "he.tif").rename(outs / "microscope_image" / "he.tif")
    assert read_visium_hd(outs).n_cells == N


def test_visium_hd_errors_say_what_to_give(tmp_path):
    outs = tmp_path / "outs"
    write_space_ranger(outs)
    with pytest.raises(InvalidSampleError, match=r"give it with --image \(the file passed to spaceranger count --image\)"):
        read_visium_hd(outs)
    write_tiff(tmp_path / "he_05.tif", np.full((400, 600, 3), 210, np.uint8), mpp=0.5)
    with pytest.raises(InvalidSampleError, match=r"microns_per_pixel says 0.2738 um/px, he_05.tif's TIFF resolution "
                                                 r"tags says 0.5 um/px"):
        read_visium_hd(outs, image=tmp_path / "he_05.tif")
    assert read_visium_hd(outs, image=tmp_path / "he_05.tif", mpp=MPP).mpp == MPP
    geo = outs / "segmented_outputs" / "cell_segmentations.geojson"
    fc = json.loads(geo.read_text())
    for f in fc["features"]:
        f["properties"]["cell_id"] += 1_000_000
    geo.write_text(json.dumps(fc))
    with pytest.raises(InvalidSampleError, match="do not match: are both from the same Space Ranger run"):
        read_visium_hd(outs, image=tmp_path / "he_05.tif", mpp=MPP)
    with pytest.raises(InvalidSampleError, match="binned outputs are squares, not cells"):
        read_visium_hd(tmp_path)
