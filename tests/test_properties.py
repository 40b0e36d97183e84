"""Property-based tests (hypothesis) of the readers users feed files to: whatever the bytes, the answer is a
usable result or a GcmoeError, never another exception. Kept small (max_examples) and derandomized (the same
examples every run: a steady few seconds in CI); to explore, raise max_examples and drop derandomize locally."""

from __future__ import annotations

import itertools
import json
import string
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gcmoe.errors import GcmoeError

FAST = settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow])
_names = itertools.count()

cell = st.one_of(st.integers(-5, 500).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
                 st.text(string.ascii_letters + string.digits + ".-", max_size=5), st.just(""))
json_value = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-10, 1000), st.floats(-1e3, 1e3), st.text(max_size=4)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(
        st.sampled_from(["nuc", "centroid", "features", "geometry", "type", "coordinates", "id", "Point",
                         "Polygon", "properties"]), inner, max_size=4)),
    max_leaves=12)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("properties")


def _fresh(folder: Path, name: str) -> Path:
    return folder / f"{next(_names)}-{name}"


def _check_centres(xy: np.ndarray, ids: list[str]) -> None:
    assert xy.ndim == 2 and xy.shape[1] == 2 and len(xy) == len(ids) > 0
    assert np.isfinite(xy).all() and len(set(ids)) == len(ids)


@FAST
@given(header=st.sampled_from(["x,y", "cell_id,x,y", "centroid_x,centroid_y", "a,b", "x"]),
       rows=st.lists(st.lists(cell, min_size=1, max_size=3), max_size=6))
def test_cell_csv_gives_centres_or_a_clear_error(folder, header, rows):
    from gcmoe.data.cells import read_cell_centres

    path = _fresh(folder, "cells.csv")
    path.write_text(header + "\n" + "\n".join(",".join(r) for r in rows) + "\n")
    try:
        _check_centres(*read_cell_centres(path))
    except GcmoeError:
        pass


@FAST
@given(value=json_value, suffix=st.sampled_from([".json", ".geojson"]))
def test_cell_json_gives_centres_or_a_clear_error(folder, value, suffix):
    from gcmoe.data.cells import read_cell_centres

    path = _fresh(folder, "cells" + suffix)
    path.write_text(json.dumps(value))
    try:
        _check_centres(*read_cell_centres(path))
    except GcmoeError:
        pass


@FAST
@given(raw=st.binary(max_size=200))
def test_cell_file_bytes_give_centres_or_a_clear_error(folder, raw):
    from gcmoe.data.cells import read_cell_centres

    for suffix in (".csv", ".json", ".npy"):
        path = _fresh(folder, "cells" + suffix)
        path.write_bytes(raw)
        try:
            _check_centres(*read_cell_centres(path))
        except GcmoeError:
            pass


@pytest.fixture(scope="module")
def slide(folder) -> Path:
    import tifffile

    path = folder / "he.tif"
    tifffile.imwrite(path, np.full((120, 120, 3), 200, np.uint8), photometric="rgb")
    return path


counts_values = st.sampled_from([0.0, 1.0, 3.0, 2.5, -1.0, float("nan"), float("inf"), 1e9])


@settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(n=st.integers(0, 12), counts=st.lists(counts_values, min_size=1, max_size=4),
       xy=st.sampled_from(["ok", "nan", "outside", "strings", "one_column"]),
       mpp=st.sampled_from([0.5, "abc", -1.0, 0.0, None, "0.5"]),
       cell_type=st.booleans(), duplicate=st.booleans(), sample_id=st.sampled_from(["s1", ".hidden", "a/b", ""]))
def test_h5ad_reader_gives_a_sample_or_a_clear_error(folder, slide, n, counts, xy, mpp, cell_type, duplicate,
                                                     sample_id):
    import anndata
    import pandas as pd

    from gcmoe.data.readers import read_sample

    rng = np.random.default_rng(n)
    x = np.resize(np.asarray(counts, np.float32), (n, 3))
    obs = pd.DataFrame(index=[f"c{i}" for i in range(n)])
    if duplicate and n > 1:
        obs.index = ["c0"] * n
    if cell_type:
        obs["cell_type"] = rng.choice(["a", "b"], n)
    adata = anndata.AnnData(X=x, obs=obs)
    adata.var_names = ["g0", "g1", "g2"]
    centres = rng.uniform(10, 110, (n, 2))
    centres = {"ok": centres, "nan": np.where(np.arange(n)[:, None] == 0, np.nan, centres),
               "outside": centres * 100, "strings": centres.astype(str), "one_column": centres[:, :1]}[xy]
    adata.obsm["spatial"] = centres
    adata.layers["counts"] = x.copy()
    adata.uns["gcmoe"] = {"sample_id": sample_id, "image_path": str(slide)} | ({} if mpp is None else {"mpp": mpp})
    path = _fresh(folder, "cells.h5ad")
    adata.write_h5ad(path)
    for fmt in ("h5ad", "sample"):  # the generic AnnData reader and gcmoe's own Sample files
        try:
            sample = read_sample(path, fmt, image=slide if fmt == "h5ad" else None)
        except GcmoeError:
            continue
        assert sample.n_cells > 0 and np.isfinite(sample.spatial).all()
        assert np.isfinite(sample.mpp) and sample.mpp > 0
        counts = sample.adata.layers["counts"]
        counts = counts.toarray() if hasattr(counts, "toarray") else np.asarray(counts)
        assert np.isfinite(counts).all() and (counts >= 0).all() and (counts == np.round(counts)).all()


@pytest.fixture(scope="module")
def model_folder(folder) -> Path:
    import torch

    from gcmoe.models import create_model
    from gcmoe.training.checkpoint import save_model

    torch.manual_seed(0)
    path = folder / "model"
    save_model(create_model("stnet", 8, 4), path, "stnet", {},
               {"genes": ["g0", "g1", "g2", "g3"], "cell_types": []})
    return path


card_edit = st.one_of(
    st.tuples(st.just("drop"), st.sampled_from(["model", "params", "in_dim", "n_genes", "genes", "format",
                                                "tensor_params", "weights_sha256"])),
    st.tuples(st.just("set"), st.sampled_from(["model", "params", "in_dim", "n_genes", "genes", "tensor_params"]),
              json_value),
    st.tuples(st.just("genes"), st.sampled_from(["reverse", "shorten", "duplicate"])),
)


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(card_edit, min_size=1, max_size=3), seal=st.booleans())
def test_model_folder_loader_loads_or_gives_a_clear_error(folder, model_folder, edits, seal):
    import shutil

    from gcmoe.training.checkpoint import load_model, seal_model

    path = _fresh(folder, "model")
    shutil.copytree(model_folder, path)
    meta = json.loads((path / "model.json").read_text())
    original = dict(meta)
    for edit in edits:
        if edit[0] == "drop":
            meta.pop(edit[1], None)
        elif edit[0] == "set":
            meta[edit[1]] = edit[2]
        elif isinstance(meta.get("genes"), list):
            genes = meta["genes"]
            meta["genes"] = {"reverse": genes[::-1], "shorten": genes[:-1], "duplicate": genes[:1] * len(genes)}[edit[1]]
    (path / "model.json").write_text(json.dumps(meta))
    if seal:
        seal_model(path)
    try:
        model, loaded = load_model(path)
    except GcmoeError:
        return
    # what loads is what was saved: an edit gets through only when sealed on purpose and still consistent
    assert seal or loaded == original
    assert model.n_genes == loaded["n_genes"]
    assert loaded.get("genes") is None or len(loaded["genes"]) == model.n_genes
