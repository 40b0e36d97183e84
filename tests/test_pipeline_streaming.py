"""The pipeline with train.stream: the run's cell store is written slide by slide and training reads it."""

import logging

import numpy as np
import pytest

from gcmoe.config import RunConfig, TissueConfig
from gcmoe.errors import ConfigError


@pytest.fixture
def small_chunks(monkeypatch):
    """128-cell chunks, so a tiny tissue spans several chunks and buffers."""
    monkeypatch.setattr("gcmoe.training.streaming.DEFAULT_CHUNK", 128)


def _config(out, models, stream=True):
    cfg = RunConfig(out=str(out), models=models)
    cfg.data.tissue = TissueConfig(n_cells=500, height=500, width=500, n_genes=40, n_reference_cells=300, seed=3)
    cfg.train.max_epochs = 3
    cfg.train.patience = 3
    cfg.train.stream = stream
    cfg.train.buffer_chunks = 2
    cfg.targets.n_top_genes = 12
    cfg.cv.n_folds = 3
    return cfg


def _two_slides(tmp_path, cfg):
    """``cfg`` reading two small virtual slides from Sample .h5ad files (leave one slide out)."""
    from gcmoe.data.virtual_tissue import simulate_tissue
    from gcmoe.files import write_h5ad

    paths = []
    for seed in (3, 4):
        tissue = simulate_tissue(TissueConfig(n_cells=300, height=400, width=400, n_genes=40, n_reference_cells=300,
                                              seed=seed, sample_id=f"slide{seed}"))
        paths.append(str(tissue.sample.write(tmp_path / f"slide{seed}.h5ad")))
        write_h5ad(tissue.reference, tmp_path / "reference.h5ad")
    cfg.data.source, cfg.data.samples, cfg.data.reference = "samples", paths, str(tmp_path / "reference.h5ad")
    return cfg


@pytest.mark.parametrize("slides", [1, 2])
def test_the_store_holds_the_in_memory_data(tmp_path, small_chunks, slides):
    from gcmoe.data.normalisation import compute_targets
    from gcmoe.models.inputs import ModelInputs
    from gcmoe.pipeline import prepare_run

    needs = ModelInputs(neighbours=True, cell_types=True, coexpression=True)
    configs = [_config(tmp_path / "m", ["gcmoe"], stream=False), _config(tmp_path / "s", ["gcmoe"])]
    if slides == 2:
        configs = [_two_slides(tmp_path, c) for c in configs]
    memory = prepare_run(configs[0], tmp_path / "m", needs, progress=False)
    stream = prepare_run(configs[1], tmp_path / "s", needs, progress=False)
    assert len(set(stream.pooled.sample_ids)) == slides
    assert stream.pooled.features is None and stream.store is not None
    store, rows = stream.store.store, stream.store.rows
    n = len(rows)
    assert store.n_chunks > 3 and sorted(rows) == list(range(n))
    pooled = memory.pooled
    read = {name: store.rows(name, 0, n) for name in ("features", "targets", "neighbours", "positions", "cell_type")}
    np.testing.assert_array_equal(read["features"][rows], pooled.features.astype(np.float16))
    np.testing.assert_allclose(read["targets"][rows], compute_targets(pooled.counts, _config(tmp_path, []).targets))
    np.testing.assert_array_equal(read["positions"][rows], pooled.xy_um.astype(np.float32))
    np.testing.assert_array_equal(read["cell_type"][rows], memory.routing.codes)
    nbr = memory.neighbours.numpy()  # pooled indices; the store's are store rows
    np.testing.assert_array_equal(read["neighbours"][rows], np.where(nbr >= 0, rows[nbr.clip(min=0)], -1))
    assert store.meta["genes"] == pooled.genes


def test_cv_streams_and_predicts_in_the_pooled_order(tmp_path, small_chunks, caplog):
    import anndata
    import torch

    from gcmoe.models import get_model_entry
    from gcmoe.pipeline import build_model, prepare_run, run_cv
    from gcmoe.training.checkpoint import load_model
    from gcmoe.training.trainer import predict

    cfg = _config(tmp_path, ["stnet", "gcmoe"])
    res = run_cv(cfg, progress=False)
    d = res["datasets"]["virtual_tissue"]
    assert d["streamed"] is True
    for entry in d["models"].values():
        assert len(entry["folds"]) == 3 and np.isfinite(entry["mean"]) and entry["mean"] > 0.1
    # the streamed fold-1 model, applied to the same cells held in memory, gives the kept predictions
    fold = anndata.read_h5ad(next(iter(sorted((tmp_path / "predictions").glob("*.h5ad")))))
    model, meta = load_model(tmp_path / "models" / "gcmoe")
    memory_cfg = _config(tmp_path / "m", ["gcmoe"], stream=False)
    run = prepare_run(memory_cfg, tmp_path / "m", get_model_entry("gcmoe").inputs, progress=False)
    n = len(run.pooled.sample_ids)
    _, _, data = build_model(get_model_entry("gcmoe"), run, meta["genes"], memory_cfg, torch.zeros(n, 12))
    position = {c: i for i, c in enumerate(run.pooled.samples[0].adata.obs_names)}
    test = np.array([position[c] for c in fold.obs_names])  # the fold's cells, in the h5ad's order
    np.testing.assert_allclose(predict(model, data, test), fold.layers["gcmoe"], rtol=1e-4, atol=1e-4)
    # a resumed run reuses the store and every finished (model, fold)
    with caplog.at_level(logging.INFO, logger="gcmoe"):
        again = run_cv(cfg, progress=False, resume=True)
    assert "reused" in caplog.text and caplog.text.count("(resume)") == 6
    assert again["datasets"]["virtual_tissue"]["models"]["GC-MoE"]["folds"] == d["models"]["GC-MoE"]["folds"]


def test_models_that_need_all_cells_are_refused_before_any_work(tmp_path):
    from gcmoe.pipeline import run_cv

    with pytest.raises(ConfigError, match=r"train.stream: HisToGene\* needs windows"):
        run_cv(_config(tmp_path, ["stnet", "histogene"]), progress=False)
    assert not (tmp_path / "cache").exists()


def test_train_stream_from_the_command_line(tmp_path, small_chunks):
    from typer.testing import CliRunner

    from gcmoe.cli import app
    from gcmoe.config import save_config
    from gcmoe.training.checkpoint import load_model

    cfg = _config(tmp_path, ["gcmoe"], stream=False)
    save_config(cfg, tmp_path / "c.yaml")
    result = CliRunner().invoke(app, ["train", "-c", str(tmp_path / "c.yaml"), "--model", "stnet", "--stream",
                                      "--out", str(tmp_path / "t")])
    assert result.exit_code == 0, result.output
    model, meta = load_model(tmp_path / "t" / "model")
    assert meta["model"] == "stnet" and len(meta["genes"]) == 12
    assert list((tmp_path / "t" / "cache" / "cells").iterdir())
