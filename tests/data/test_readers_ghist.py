"""GHIST's demo inputs (expression CSV, type codes, nucleus sizes), written as GHIST's pandas code writes them,
and their transplant into a rendered virtual tissue."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from gcmoe.config import TissueConfig
from gcmoe.data.readers.ghist import GHIST_BREAST_TYPES, read_ghist_expression
from gcmoe.data.virtual_tissue.transplant import transplant_expression
from gcmoe.errors import InvalidSampleError


def write_ghist_demo(folder, n=900, genes=40, seed=0, config=True):
    """GHIST's data_demo/ layout: an indexed count CSV with cell_id, c_ids/ct_idx, and nucleus sizes."""
    rng = np.random.default_rng(seed)
    ids = np.arange(100_000, 100_000 + n)
    codes = rng.integers(0, len(GHIST_BREAST_TYPES), n)
    names = [f"G{g}" for g in range(genes)]
    lam = np.exp(rng.normal(-0.5, 1.0, (len(GHIST_BREAST_TYPES), genes)))[codes]
    size = rng.lognormal(3.0, 0.4, n).round()
    counts = rng.poisson(lam * (size / size.mean())[:, None])
    expr = pd.DataFrame(counts, columns=names, index=ids)
    expr.insert(0, "cell_id", ids)
    folder.mkdir(parents=True, exist_ok=True)
    expr.to_csv(folder / "expr_mat_breast_demo.csv")
    pd.DataFrame({"c_ids": ids[::-1], "ct_idx": codes[::-1]}).to_csv(folder / "cell_types_breast_demo.csv", index=False)
    pd.DataFrame({"h&e": ids, "orig_size": size}).to_csv(folder / "nuclei_sizes_breast_demo.csv", index=False)
    if config:
        (folder / "config_demo.json").write_text(json.dumps({"data": {"cell_types": list(GHIST_BREAST_TYPES)}}))
    return ids, codes, counts, size


def test_read_ghist_expression(tmp_path):
    ids, codes, counts, size = write_ghist_demo(tmp_path / "data_demo")
    adata = read_ghist_expression(tmp_path / "data_demo")
    assert list(adata.obs_names) == [str(i) for i in ids]
    assert np.array_equal(adata.layers["counts"], counts)
    assert list(adata.obs["cell_type"]) == [GHIST_BREAST_TYPES[c] for c in codes]
    assert np.array_equal(adata.obs["nucleus_size_px"], size)


def test_ghist_type_names_from_config_or_argument(tmp_path):
    write_ghist_demo(tmp_path / "d", config=False)
    names = [f"t{k}" for k in range(9)]
    assert set(read_ghist_expression(tmp_path / "d", type_names=names).obs["cell_type"]) <= set(names)
    with pytest.raises(InvalidSampleError, match="type names"):
        read_ghist_expression(tmp_path / "d", type_names=["a", "b"])


def test_ghist_refusals(tmp_path):
    with pytest.raises(InvalidSampleError, match="data_demo"):
        read_ghist_expression(tmp_path)
    write_ghist_demo(tmp_path / "d")
    types = pd.read_csv(tmp_path / "d" / "cell_types_breast_demo.csv").iloc[5:]
    types.to_csv(tmp_path / "d" / "cell_types_breast_demo.csv", index=False)
    with pytest.raises(InvalidSampleError, match="have no type"):
        read_ghist_expression(tmp_path / "d")


def test_transplant_gives_each_real_cell_once_and_keeps_a_reference(tmp_path):
    write_ghist_demo(tmp_path / "d", n=2500)
    real = read_ghist_expression(tmp_path / "d")
    config = TissueConfig(seed=2, n_cells=900, height=700, width=700, n_genes=60, n_reference_cells=10)
    t = transplant_expression(config, real, reference_fraction=0.2)
    adata = t.sample.adata
    donors = adata.obs["real_cell_id"].astype(str).to_numpy()
    assert len(set(donors)) == len(donors)  # no real cell twice
    assert not set(donors) & set(t.reference.obs_names)  # the reference is held out
    rows = real.obs_names.get_indexer(donors)
    assert np.array_equal(np.asarray(adata.layers["counts"]), real.layers["counts"][rows])
    assert list(adata.obs["cell_type"].astype(str)) == list(real.obs["cell_type"].astype(str).to_numpy()[rows])
    assert list(adata.var_names) == list(real.var_names)
    assert t.report["cells"] == adata.n_obs and t.report["rendered_cells"] == 900
    assert adata.n_obs + sum(t.report["dropped_cells_by_subtype"].values()) == 900
    # subtype -> real type follows the map (T cells carry T counts, macrophages Macrophage or Myeloid)
    pairs = set(zip(adata.obs["cell_subtype"].astype(str), adata.obs["cell_type"].astype(str)))
    assert ("T_cell", "T") in pairs and all(t in ("Macrophage", "Myeloid") for s, t in pairs if s == "macrophage")
    # bigger drawn nuclei carry bigger real nuclei (rank matching within subtype, with noise)
    size = real.obs["nucleus_size_px"].to_numpy()[rows]
    r = np.corrcoef(np.log(adata.obs["nucleus_area_um2"]), np.log(size))[0, 1]
    assert r > 0.3
    again = transplant_expression(config, real, reference_fraction=0.2)
    assert np.array_equal(again.sample.adata.obs["real_cell_id"], adata.obs["real_cell_id"])


def write_ghist_inputs(root, n=120, shape=(400, 500), seed=1):
    """A GHIST folder as its config names it: data_demo/ with the CSVs, the nuclei label TIFF (uint32, pixel value =
    cell id, as GHIST reads it with tifffile) and the H&E TIFF on the same grid, and configs/config.json."""
    import tifffile

    ids, codes, counts, size = write_ghist_demo(root / "data_demo", n=n, config=False)
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint32)
    side = int(np.sqrt(shape[0] * shape[1] / n) * 0.9)
    grid = [(r, c) for r in range(4, shape[0] - 8, side) for c in range(4, shape[1] - 8, side)]
    centres = []
    for cid, k in zip(ids, rng.permutation(len(grid))[:n]):
        r, c = grid[k]
        labels[r:r + 5, c:c + 7] = cid
        centres.append((c + 3.0, r + 2.0))
    tifffile.imwrite(root / "data_demo" / "nuclei_breast_demo.tif", labels)
    tifffile.imwrite(root / "data_demo" / "histology_breast_demo.tif", np.full((*shape, 3), 200, np.uint8),
                     photometric="rgb", metadata=None)
    (root / "configs").mkdir()
    sources = {"fp_nuc_seg": "./data_demo/nuclei_breast_demo.tif", "fp_hist": "./data_demo/histology_breast_demo.tif",
               "fp_expr": "./data_demo/expr_mat_breast_demo.csv", "fp_cell_type": "./data_demo/cell_types_breast_demo.csv",
               "fp_nuc_sizes": "./data_demo/nuclei_sizes_breast_demo.csv"}
    (root / "configs" / "config.json").write_text(json.dumps(
        {"data": {"cell_types": list(GHIST_BREAST_TYPES)}, "data_sources": sources}))
    return ids, codes, counts, np.array(centres)


def test_ghist_inputs_read_as_a_sample(tmp_path):
    """GHIST's config (data_sources) or folder: cells where the expression CSV and the nuclei labels meet, centred
    on their nucleus, typed, on the H&E (which states no pixel size: --mpp)."""
    from gcmoe.data.readers import detect_format, read_ghist, read_sample

    ids, codes, counts, centres = write_ghist_inputs(tmp_path)
    config = tmp_path / "configs" / "config.json"
    assert detect_format(config) == "ghist" and detect_format(tmp_path / "data_demo") == "ghist"
    with pytest.raises(InvalidSampleError, match="give it with --mpp"):
        read_ghist(config)
    s = read_sample(config, mpp=0.5)
    assert list(s.adata.obs_names) == [str(i) for i in ids] and s.mpp == 0.5
    np.testing.assert_allclose(s.spatial, centres)
    np.testing.assert_array_equal(np.asarray(s.counts), counts)
    assert list(s.adata.obs["cell_type"]) == [GHIST_BREAST_TYPES[c] for c in codes]
    assert "nucleus_size_px" in s.adata.obs
    folder = read_ghist(tmp_path / "data_demo", mpp=0.5)
    np.testing.assert_allclose(folder.spatial, s.spatial)


def test_ghist_inputs_refusals(tmp_path):
    import tifffile

    from gcmoe.data.readers import read_ghist

    write_ghist_inputs(tmp_path)
    data = tmp_path / "data_demo"
    tifffile.imwrite(tmp_path / "small.tif", np.full((100, 100, 3), 200, np.uint8), photometric="rgb")
    with pytest.raises(InvalidSampleError, match=r"nuclei_breast_demo.tif is 500 x 400 px but the H&E small.tif is "
                                                 r"100 x 100 px"):
        read_ghist(data, image=tmp_path / "small.tif", mpp=0.5)
    tifffile.imwrite(tmp_path / "other.tif", np.full((400, 500), 7, np.uint32))
    with pytest.raises(InvalidSampleError, match="same GHIST input set"):
        read_ghist(data, nuclei=tmp_path / "other.tif", mpp=0.5)
    (data / "nuclei_breast_demo.tif").rename(tmp_path / "moved.tif")
    (data / "images.zip").write_bytes(b"PK")
    with pytest.raises(InvalidSampleError, match="nuclei label TIFF .* not found; GHIST's demo ships it in images.zip"):
        read_ghist(data, mpp=0.5)
