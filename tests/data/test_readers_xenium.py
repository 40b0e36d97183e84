"""10x Xenium reader: an output folder in 10x's layout (experiment.xenium, cells.parquet, the HDF5 or MEX
matrix, a registered H&E with its alignment CSV), written from a small synthetic slide and read back."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp

from gcmoe.data.image import write_tiff
from gcmoe.data.readers import detect_format, read_alignment, read_feature_matrix, read_sample, read_xenium
from gcmoe.errors import InvalidSampleError

PIXEL_SIZE = 0.2125
HE_MPP = 0.5
THETA = np.deg2rad(7.0)


def he_to_morph() -> np.ndarray:
    """An affine H&E px -> morphology px: rotation, scale HE_MPP / PIXEL_SIZE, translation."""
    s = HE_MPP / PIXEL_SIZE
    c, n = np.cos(THETA) * s, np.sin(THETA) * s
    return np.array([[c, -n, 120.0], [n, c, 340.0], [0.0, 0.0, 1.0]])


def write_h5_matrix(path: Path, counts: sp.spmatrix, barcodes, names, types) -> None:
    """The 10x HDF5 feature-barcode layout: genes x cells CSC under matrix/."""
    m = sp.csc_matrix(sp.csr_matrix(counts).T)
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        g["data"], g["indices"], g["indptr"] = m.data.astype(np.int32), m.indices.astype(np.int64), m.indptr.astype(np.int64)
        g["shape"] = np.array(m.shape, dtype=np.int32)
        g["barcodes"] = np.array([b.encode() for b in barcodes])
        feats = g.create_group("features")
        feats["id"] = np.array([f"ENSG{i:08d}".encode() for i in range(len(names))])
        feats["name"] = np.array([n.encode() for n in names])
        feats["feature_type"] = np.array([t.encode() for t in types])
        feats["genome"] = np.array([b"GRCh38"] * len(names))


@pytest.fixture
def slide():
    rng = np.random.default_rng(0)
    image = np.full((300, 400, 3), (230, 170, 200), dtype=np.uint8)
    xy = np.column_stack([rng.uniform(10, 390, 60), rng.uniform(10, 290, 60)])
    counts = rng.poisson(3.0, size=(60, 8))
    return image, xy, counts


def write_xenium_folder(folder: Path, slide, mex: bool = False, keypoints: bool = False, version="xenium-2.0.0.10") -> dict:
    image, xy, counts = slide
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "experiment.xenium").write_text(json.dumps(
        {"major_version": 5, "analysis_sw_version": version, "pixel_size": PIXEL_SIZE, "panel_name": "Test panel",
         "region_name": "region_1"}))
    ids = [f"aaab{i:04d}-1" for i in range(len(xy))]
    morph = (he_to_morph() @ np.column_stack([xy, np.ones(len(xy))]).T).T[:, :2]
    um = morph * PIXEL_SIZE
    # cells.parquet in a different order than the matrix, ids as bytes (as in some 10x files)
    order = np.arange(len(ids))[::-1]
    pd.DataFrame({"cell_id": [ids[i].encode() for i in order], "x_centroid": um[order, 0], "y_centroid": um[order, 1],
                  "cell_area": np.full(len(ids), 40.0), "transcript_counts": counts.sum(1)[order]}).to_parquet(
        folder / "cells.parquet")
    genes = [f"GENE{j}" for j in range(counts.shape[1])]
    controls = ["NegControlProbe_00001", "BLANK_0001", "UnassignedCodeword_0002"]
    full = np.hstack([counts, np.ones((len(ids), 3), dtype=int)])
    types = ["Gene Expression"] * len(genes) + ["Negative Control Probe", "Blank Codeword", "Unassigned Codeword"]
    if mex:
        d = folder / "cell_feature_matrix"
        d.mkdir()
        with gzip.open(d / "matrix.mtx.gz", "wb") as fh:
            scipy.io.mmwrite(fh, sp.coo_matrix(full.T))
        with gzip.open(d / "barcodes.tsv.gz", "wt") as fh:
            fh.write("\n".join(ids) + "\n")
        with gzip.open(d / "features.tsv.gz", "wt") as fh:
            fh.write("".join(f"ENSG{i}\t{n}\t{t}\n" for i, (n, t) in enumerate(zip(genes + controls, types))))
    else:
        write_h5_matrix(folder / "cell_feature_matrix.h5", full, ids, genes + controls, types)
    write_tiff(folder / "sample_he_image.ome.tif", image, HE_MPP)
    if keypoints:
        pts = np.array([[10.0, 10.0], [380.0, 20.0], [200.0, 280.0], [50.0, 250.0]])
        fixed = (he_to_morph() @ np.column_stack([pts, np.ones(4)]).T).T[:, :2] * PIXEL_SIZE
        pd.DataFrame({"fixedX": fixed[:, 0], "fixedY": fixed[:, 1], "alignmentX": pts[:, 0], "alignmentY": pts[:, 1]}
                     ).to_csv(folder / "sample_he_keypoints.csv", index=False)
    else:
        np.savetxt(folder / "sample_he_imagealignment.csv", he_to_morph(), delimiter=",")
    return {"ids": ids, "genes": genes, "um": um}


@pytest.mark.parametrize("mex,keypoints", [(False, False), (True, False), (False, True)])
def test_xenium_folder_maps_cells_onto_the_he(tmp_path, slide, mex, keypoints):
    info = write_xenium_folder(tmp_path, slide, mex=mex, keypoints=keypoints)
    assert detect_format(tmp_path) == "xenium"
    s = read_sample(tmp_path)
    _, xy, counts = slide
    order = [info["ids"].index(c) for c in s.adata.obs_names]
    np.testing.assert_allclose(s.spatial, xy[order], atol=1e-6)
    assert s.genes == info["genes"]  # controls dropped
    np.testing.assert_array_equal(np.asarray(sp.csr_matrix(s.counts).todense()), counts[order])
    assert s.mpp == pytest.approx(HE_MPP)
    np.testing.assert_allclose(s.adata.obsm["spatial_um"], info["um"][order])
    assert "cell_area" in s.adata.obs and s.sample_id == "region_1"
    prov = s.adata.uns["gcmoe"]["provenance"]
    assert prov["format"] == "xenium" and prov["features_dropped"] == 3
    assert prov["mpp_image_tags"] == pytest.approx(HE_MPP)


def test_alignment_is_read_as_he_to_morphology(tmp_path):
    np.savetxt(tmp_path / "a.csv", he_to_morph(), delimiter=",")
    np.testing.assert_allclose(read_alignment(tmp_path / "a.csv"), he_to_morph())
    (tmp_path / "bad.csv").write_text("1,0\n0,1\n")
    with pytest.raises(InvalidSampleError, match="3x3 affine"):
        read_alignment(tmp_path / "bad.csv")


def test_feature_matrix_h5_layout(tmp_path):
    counts = sp.random(5, 4, density=0.5, random_state=0, format="csr") * 10
    counts.data = np.round(counts.data)
    write_h5_matrix(tmp_path / "m.h5", counts, [f"c{i}" for i in range(5)], list("abcd"), ["Gene Expression"] * 4)
    m, barcodes, feats = read_feature_matrix(tmp_path / "m.h5")
    assert barcodes == [f"c{i}" for i in range(5)] and feats["name"].tolist() == list("abcd")
    np.testing.assert_array_equal(m.toarray(), counts.toarray())


def test_xenium_errors(tmp_path, slide):
    write_xenium_folder(tmp_path, slide)
    cells = pd.read_parquet(tmp_path / "cells.parquet")
    cells["cell_id"] = [f"zzz{i}" for i in range(len(cells))]
    cells.to_parquet(tmp_path / "cells.parquet")
    with pytest.raises(InvalidSampleError, match="do not match"):
        read_xenium(tmp_path)
    other = tmp_path / "b"
    write_xenium_folder(other, slide)
    (other / "sample_he_image.ome.tif").unlink()
    with pytest.raises(InvalidSampleError, match="--image"):
        read_xenium(other)
    with pytest.warns(UserWarning, match="not one this reader was checked against"):
        write_xenium_folder(tmp_path / "c", slide, version="xenium-9.0.0")
        read_xenium(tmp_path / "c")
    # an alignment that does not belong to this image: cells fall off the H&E
    np.savetxt(other / "sample_he_imagealignment.csv", np.diag([0.1, 0.1, 1.0]), delimiter=",")
    with pytest.raises(InvalidSampleError, match="but the image is 400 x 300 px"):
        read_xenium(other, image=tmp_path / "sample_he_image.ome.tif", mpp=0.5)


def _fixed(pts: np.ndarray, units: str) -> np.ndarray:
    """The Xenium side of keypoints at H&E pixels ``pts``: micrometres or morphology pixels."""
    morph = (he_to_morph() @ np.column_stack([pts, np.ones(len(pts))]).T).T[:, :2]
    return morph * PIXEL_SIZE if units == "um" else morph


KEYPOINTS_HE = np.array([[10.0, 10.0], [380.0, 20.0], [200.0, 280.0], [50.0, 250.0], [300.0, 150.0]])


def _keypoints_csv(units: str) -> str:
    fixed = _fixed(KEYPOINTS_HE, units)
    return pd.DataFrame({"fixedX": fixed[:, 0], "fixedY": fixed[:, 1], "alignmentX": KEYPOINTS_HE[:, 0],
                         "alignmentY": KEYPOINTS_HE[:, 1]}).to_csv(index=False)


def _without_alignment(folder: Path, slide) -> dict:
    info = write_xenium_folder(folder, slide)
    (folder / "sample_he_imagealignment.csv").unlink()
    return info


def test_no_alignment_is_an_error_unless_identity(tmp_path, slide):
    """No alignment file: an error naming what to give; identity refused for a 0.5 um/px H&E, read for a 0.2125 one."""
    import tifffile

    info = _without_alignment(tmp_path, slide)
    with pytest.raises(InvalidSampleError, match=r"no alignment of the H&E sample_he_image.ome.tif .*--alignment "
                                                 r"FILE, or --alignment identity"):
        read_xenium(tmp_path)
    with pytest.raises(InvalidSampleError, match=r"--alignment identity maps one H&E pixel onto one morphology-image "
                                                 r"pixel \(0.2125 um\), but the H&E's pixel size is 0.5 um/px"):
        read_xenium(tmp_path, alignment="identity")
    with pytest.raises(InvalidSampleError, match="pixel size is 0.5 um/px \\(--mpp\\)"):
        read_sample(tmp_path, image=tmp_path / "sample_he_image.ome.tif", alignment="identity", mpp=0.5)
    # an H&E on the morphology grid (its own pixel size 0.2125) reads with identity: centres = um / 0.2125
    image = np.full((3000, 2000, 3), 200, dtype=np.uint8)
    write_tiff(tmp_path / "morph_grid.tif", image, PIXEL_SIZE)
    s = read_xenium(tmp_path, image=tmp_path / "morph_grid.tif", alignment="identity")
    order = [info["ids"].index(c) for c in s.adata.obs_names]
    np.testing.assert_allclose(s.spatial, info["um"][order] / PIXEL_SIZE)
    assert s.mpp == pytest.approx(PIXEL_SIZE) and s.adata.uns["gcmoe"]["provenance"]["files"]["alignment"] == "identity"
    # an H&E that states no pixel size: identity is taken at Xenium's
    tifffile.imwrite(tmp_path / "plain.tif", image, photometric="rgb", metadata=None)
    assert read_xenium(tmp_path, image=tmp_path / "plain.tif", alignment="identity").mpp == pytest.approx(PIXEL_SIZE)


@pytest.mark.parametrize("export", ["matrix_csv", "zip_both", "zip_keypoints", "keypoints_px"])
def test_xenium_explorer_exports_are_found(tmp_path, slide, export, caplog):
    """Xenium Explorer's "Download Alignment File": the matrix alone (<image>_matrix.csv), matrix + keypoints
    (*_alignment_files.zip), keypoints alone; keypoints in either unit."""
    import zipfile

    info = _without_alignment(tmp_path, slide)
    if export == "matrix_csv":
        np.savetxt(tmp_path / "sample_he_image_matrix.csv", he_to_morph(), delimiter=",")
    elif export.startswith("zip"):
        with zipfile.ZipFile(tmp_path / "sample_he_alignment_files.zip", "w") as zf:
            if export == "zip_both":
                zf.writestr("matrix.csv", "\n".join(",".join(f"{v:.12g}" for v in row) for row in he_to_morph()))
            zf.writestr("keypoints.csv", _keypoints_csv("um"))
    else:
        (tmp_path / "sample_he_keypoints.csv").write_text(_keypoints_csv("px"))
    with caplog.at_level("INFO", logger="gcmoe.data.readers.xenium"):
        s = read_xenium(tmp_path)
    order = [info["ids"].index(c) for c in s.adata.obs_names]
    np.testing.assert_allclose(s.spatial, slide[1][order], atol=1e-6)
    assert s.mpp == pytest.approx(HE_MPP)
    if export == "zip_both":  # the export's keypoints are micrometres: they agree with its matrix read so
        assert "keypoints agree with its matrix when fixedX/fixedY are read as um" in caplog.text


def test_keypoint_units_are_settled_from_the_data(tmp_path):
    """fixedX/Y in um or morphology px: the reading that agrees with the H&E's pixel size (else with the range of
    H&E scans) wins; when both readings are plausible, an error asks for --keypoint-units."""
    for units in ("um", "px"):
        (tmp_path / f"{units}.csv").write_text(_keypoints_csv(units))
        for he_mpp in (HE_MPP, None):
            np.testing.assert_allclose(read_alignment(tmp_path / f"{units}.csv", PIXEL_SIZE, "auto", he_mpp),
                                       he_to_morph(), atol=1e-9)
        np.testing.assert_allclose(read_alignment(tmp_path / f"{units}.csv", PIXEL_SIZE, units), he_to_morph(), atol=1e-9)
    # an H&E at 0.6 um/px with micrometre keypoints: as pixels it would be 0.13 um/px, also a scan's pixel size
    scale = np.diag([0.6 / HE_MPP, 0.6 / HE_MPP, 1.0])
    fixed = (he_to_morph() @ scale @ np.column_stack([KEYPOINTS_HE, np.ones(5)]).T).T[:, :2] * PIXEL_SIZE
    pd.DataFrame({"fixedX": fixed[:, 0], "fixedY": fixed[:, 1], "alignmentX": KEYPOINTS_HE[:, 0],
                  "alignmentY": KEYPOINTS_HE[:, 1]}).to_csv(tmp_path / "ambiguous.csv", index=False)
    with pytest.raises(InvalidSampleError, match=r"as micrometres the H&E would be 0.6 um/px, as pixels 0.1275 um/px; "
                                                 r"give --keypoint-units um or px"):
        read_alignment(tmp_path / "ambiguous.csv", PIXEL_SIZE)
    np.testing.assert_allclose(read_alignment(tmp_path / "ambiguous.csv", PIXEL_SIZE, "auto", 0.6),
                               he_to_morph() @ scale, atol=1e-9)


def test_convert_passes_alignment_options(tmp_path, slide):
    """`gcmoe convert`: no alignment stops with the message and status 2; --alignment identity (on an H&E of
    Xenium's pixel size) and --keypoint-units reach the reader."""
    from typer.testing import CliRunner

    from gcmoe.cli import app

    _without_alignment(tmp_path / "x", slide)
    write_tiff(tmp_path / "grid.tif", np.full((3000, 2000, 3), 200, dtype=np.uint8), PIXEL_SIZE)
    runner = CliRunner()
    result = runner.invoke(app, ["convert", "--data", str(tmp_path / "x"), "--out", str(tmp_path / "a.h5ad")])
    assert result.exit_code == 2 and "--alignment identity" in result.output
    result = runner.invoke(app, ["convert", "--data", str(tmp_path / "x"), "--image", str(tmp_path / "grid.tif"),
                                 "--alignment", "identity", "--out", str(tmp_path / "b.h5ad")])
    assert result.exit_code == 0, result.output
    (tmp_path / "kp.csv").write_text(_keypoints_csv("px"))
    result = runner.invoke(app, ["convert", "--data", str(tmp_path / "x"), "--alignment", str(tmp_path / "kp.csv"),
                                 "--keypoint-units", "um", "--out", str(tmp_path / "c.h5ad")])
    assert result.exit_code == 2 and "but the image is 400 x 300 px" in result.output  # px read as um: off the H&E
    result = runner.invoke(app, ["convert", "--data", str(tmp_path / "x"), "--alignment", str(tmp_path / "kp.csv"),
                                 "--keypoint-units", "px", "--out", str(tmp_path / "d.h5ad")])
    assert result.exit_code == 0, result.output
