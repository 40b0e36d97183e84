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
