"""gcmoe predict --slides: a 3-slide cohort end to end, resumed, sharded and shared by 2 torchrun processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from gcmoe.cli import app
from gcmoe.cohort import list_slides
from gcmoe.config import RunConfig, TissueConfig
from gcmoe.data.image import write_tiff
from gcmoe.data.virtual_tissue import simulate_tissue
from gcmoe.errors import InvalidSampleError
from gcmoe.pipeline import train_model

SLIDES = ("s0", "s1", "s2")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """A tiny GC-MoE and three slides: a virtual tissue of 340 px on glass (900 x 700 px at 0.5 um/px)."""
    root = tmp_path_factory.mktemp("cohort")
    cfg = RunConfig(out=str(root / "train"))
    cfg.data.tissue = TissueConfig(n_cells=300, height=360, width=360, n_genes=40, n_reference_cells=200, seed=5)
    cfg.train.max_epochs = 1
    cfg.targets.n_top_genes = 6
    folder = train_model(cfg, "gcmoe", progress=False)
    for k, name in enumerate(SLIDES):
        vt = simulate_tissue(TissueConfig(n_cells=300, height=340, width=340, n_genes=40, n_reference_cells=100,
                                          seed=10 + k))
        rng = np.random.default_rng(k)
        canvas = np.full((700, 900, 3), 240, np.uint8) + rng.integers(0, 8, (700, 900, 3), dtype=np.uint8)
        y0, x0 = 100 + 50 * k, 150 + 80 * k
        canvas[y0:y0 + 340, x0:x0 + 340] = vt.sample.image.read_region(0, 0, 340, 340)
        write_tiff(root / "slides" / f"{name}.tif", canvas, 0.5, tile=128)
        if k == 2:  # this slide's cells come from a file, through the manifest
            xy = vt.sample.spatial + [x0, y0]
            pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1]}).to_csv(root / "s2_cells.csv", index=False)
    pd.DataFrame({"slide": [f"slides/{n}.tif" for n in SLIDES], "cells": ["", "", "s2_cells.csv"],
                  "age": [60, 71, 55]}).to_csv(root / "manifest.csv", index=False)
    return folder, root


def _predict(folder, slides, out, *extra):
    return CliRunner().invoke(app, ["predict", "--model", str(folder), "--slides", str(slides), "--out", str(out),
                                    *extra])


@pytest.mark.slow
def test_a_cohort_end_to_end_then_resumed_then_on_two_processes(cohort, tmp_path):
    folder, root = cohort
    out = tmp_path / "run"
    result = _predict(folder, root / "manifest.csv", out)
    assert result.exit_code == 0, result.output
    assert "3 slides predicted, 0 already finished, 0 failed" in result.output
    table = pd.read_parquet(out / "cohort.parquet")
    assert list(table["slide_id"]) == list(SLIDES)
    assert pd.read_csv(out / "cohort.csv").shape == table.shape
    for name in SLIDES:
        slide = out / "slides" / name
        ad = anndata.read_h5ad(slide / "predicted.h5ad")
        row = table.set_index("slide_id").loc[name]
        types = list(ad.obs["expert"].cat.categories)
        assert row["n_cells"] == ad.n_obs > 30
        assert sum(row[f"n_cells[{t}]"] for t in types) == ad.n_obs
        gene = ad.var_names[0]
        assert row[gene] == pytest.approx(float(np.mean(ad.X[:, 0])), rel=1e-5)
        biggest = ad.obs["expert"].value_counts().index[0]
        sel = (ad.obs["expert"] == biggest).to_numpy()
        assert row[f"{gene}[{biggest}]"] == pytest.approx(float(np.mean(ad.X[sel, 0])), rel=1e-5)
        assert ad.uns["gcmoe"]["slide_id"] == name and ad.uns["gcmoe"]["model"]["encoder"]["config_hash"]
        cells = json.loads((slide / "cells.geojson").read_text())
        assert len(cells["features"]) == ad.n_obs
        first = cells["features"][0]["properties"]
        assert set(ad.var_names) <= set(first["measurements"]) and first["classification"]["name"] in types
        summary = json.loads((slide / "summary.json").read_text())
        assert 0.1 < summary["qc"]["tissue_fraction"] < 0.35  # 340^2 of 900 x 700 px: 18%
        assert (slide / "qc.png").stat().st_size > 1000 and (slide / "tissue_mask.png").is_file()
    assert anndata.read_h5ad(out / "slides" / "s2" / "predicted.h5ad").n_obs == 300  # the manifest's cell file
    page = (out / "index.html").read_text()
    assert page.count("<img") == 3 and "3 of 3 slides finished" in page

    # a run killed while predicting s1: its summary (written last) is missing; a rerun redoes s1 alone
    (out / "slides" / "s1" / "summary.json").unlink()
    kept = {n: (out / "slides" / n / "predicted.h5ad").stat().st_mtime_ns for n in ("s0", "s2")}
    result = _predict(folder, root / "manifest.csv", out)
    assert result.exit_code == 0, result.output
    assert "1 slides predicted, 2 already finished" in result.output
    assert kept == {n: (out / "slides" / n / "predicted.h5ad").stat().st_mtime_ns for n in ("s0", "s2")}
    pd.testing.assert_frame_equal(pd.read_parquet(out / "cohort.parquet"), table)

    # two processes share the slides (torchrun, gloo) and give the same table
    shared = tmp_path / "shared"
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "gcmoe",
         "predict", "--model", str(folder), "--slides", str(root / "manifest.csv"), "--out", str(shared)],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shared_table = pd.read_parquet(shared / "cohort.parquet")
    pd.testing.assert_frame_equal(shared_table, table, check_exact=False, rtol=1e-4)


@pytest.mark.slow
def test_shards_split_the_slides_and_other_settings_are_refused(cohort, tmp_path):
    folder, root = cohort
    out = tmp_path / "run"
    result = _predict(folder, root / "slides", out, "--shard", "1/2", "--no-geojson")
    assert result.exit_code == 0, result.output
    assert "1 slides predicted" in result.output and "2 left to other shards" in result.output
    assert [p.name for p in (out / "slides").iterdir()] == ["s1"]
    assert not (out / "slides" / "s1" / "cells.geojson").exists()
    assert list(pd.read_csv(out / "cohort.csv")["slide_id"]) == ["s1"]
    page = (out / "index.html").read_text()
    assert "1 of 3 slides finished" in page and "geojson" not in page
    # the same slide at another pixel size is not "finished": refused, naming the difference
    pd.DataFrame({"slide": [str(root / "slides" / "s1.tif")], "mpp": [0.45]}).to_csv(tmp_path / "m.csv", index=False)
    result = _predict(folder, tmp_path / "m.csv", out)
    assert result.exit_code == 2 and "mpp: None then, 0.45 now" in result.output
    result = _predict(folder, root / "slides", out, "--shard", "2/2")
    assert result.exit_code == 2 and "0 <= i < n" in result.output


def test_slide_lists(tmp_path):
    for name in ("b.svs", "a.ome.tif", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert [(j.slide_id, j.slide.name) for j in list_slides(tmp_path)] == [("a", "a.ome.tif"), ("b", "b.svs")]
    assert [j.slide_id for j in list_slides(str(tmp_path / "*.svs"))] == ["b"]
    (tmp_path / "m.csv").write_text("slide,slide_id,mpp\nb.svs,B1,0.25\na.ome.tif,,\n")
    jobs = list_slides(tmp_path / "m.csv")
    assert [(j.slide_id, j.mpp) for j in jobs] == [("B1", 0.25), ("a", None)]
    (tmp_path / "bad.csv").write_text("file\nb.svs\n")
    with pytest.raises(InvalidSampleError, match="no 'slide' column"):
        list_slides(tmp_path / "bad.csv")
    (tmp_path / "dup.csv").write_text("slide,slide_id\nb.svs,x\na.ome.tif,x\n")
    with pytest.raises(InvalidSampleError, match="have the id 'x'"):
        list_slides(tmp_path / "dup.csv")
    (tmp_path / "mpp.csv").write_text("slide,mpp\nb.svs,abc\n")
    with pytest.raises(InvalidSampleError, match="line 2: mpp 'abc'"):
        list_slides(tmp_path / "mpp.csv")
    with pytest.raises(InvalidSampleError, match="no file matches"):
        list_slides(str(tmp_path / "*.ndpi"))


@pytest.mark.slow
def test_an_encoder_other_than_the_models_is_refused(cohort, tmp_path):
    import shutil

    from gcmoe.inference import load_predictor
    from gcmoe.training.checkpoint import seal_model

    folder, _ = cohort
    card = json.loads((folder / "model.json").read_text())["encoder"]
    assert card["config_hash"] and card["tile_size"] and "weights_sha256" in card
    moved = Path(shutil.copytree(folder, tmp_path / "model"))
    meta = json.loads((moved / "model.json").read_text())
    meta["encoder"]["config_hash"] = "0123456789abcdef"
    (moved / "model.json").write_text(json.dumps(meta))
    seal_model(moved)  # an edit on purpose: the checksums follow it
    with pytest.raises(InvalidSampleError, match="encoder.config_hash: '0123456789abcdef' there"):
        load_predictor(moved)
    meta["encoder"]["weights"] = str(tmp_path / "gone.pt")
    (moved / "model.json").write_text(json.dumps(meta))
    seal_model(moved)
    with pytest.raises(InvalidSampleError, match="gone.pt.*--encoder-weights"):
        load_predictor(moved)
