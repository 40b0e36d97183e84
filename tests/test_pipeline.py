"""The pipeline with GC-MoE on a tiny virtual tissue: cv, train + reload."""

import json

import numpy as np
import pytest

from gcmoe.config import RunConfig, TissueConfig
from gcmoe.errors import ConfigError
from gcmoe.pipeline import run_cv, train_model


def _config(out, models):
    cfg = RunConfig(out=str(out), models=models)
    cfg.data.tissue = TissueConfig(n_cells=700, height=600, width=600, n_genes=60, n_reference_cells=400, seed=5)
    cfg.train.max_epochs = 4
    cfg.train.patience = 4
    cfg.targets.n_top_genes = 20
    return cfg


@pytest.mark.slow
def test_cv_with_gcmoe_and_ablations(tmp_path):
    models = ["stnet", "gcmoe_no_moe_cap_c2ca", "gcmoe_no_cap_c2ca", "gcmoe_no_c2ca", "gcmoe"]
    res = run_cv(_config(tmp_path, models), progress=False)
    d = res["datasets"]["virtual_tissue"]
    assert list(d["models"]) == ["ST-Net*", "Ours w/o CS-MoE, CAP, C2CA", "Ours w/o CAP, C2CA", "Ours w/o C2CA", "GC-MoE"]
    for name, entry in d["models"].items():
        assert len(entry["folds"]) == 5 and np.isfinite(entry["mean"])
        assert ("routing_accuracy" in entry) == (name in {"Ours w/o CAP, C2CA", "Ours w/o C2CA", "GC-MoE"})
    assert d["routing"]["types"] == ["neoplastic", "inflammatory", "connective", "epithelial"]
    assert d["routing"]["transfer_agreement"]["accuracy"] > 0.5
    md = (tmp_path / "results.md").read_text()
    assert "Table 2" in md and "| GC-MoE | ✓ | ✓ | ✓ |" in md
    assert json.loads((tmp_path / "results.json").read_text())["datasets"]["virtual_tissue"]["models"]["GC-MoE"]["folds"]


@pytest.mark.slow
def test_train_saves_a_model_that_reloads(tmp_path):
    from gcmoe.training.checkpoint import load_model

    folder = train_model(_config(tmp_path, ["gcmoe"]), "gcmoe", progress=False)
    model, meta = load_model(folder)
    assert meta["model"] == "gcmoe" and len(meta["genes"]) == 20
    assert meta["cell_types"] == ["neoplastic", "inflammatory", "connective", "epithelial"]
    assert meta["encoder"]["name"] == "morphology" and meta["encoder"]["target_mpp"] == 0.5
    assert model.adjacency.shape == (4, 20, 20)


def test_gcmoe_without_reference_is_explained(tmp_path, tiny_sample):
    path = tiny_sample.write(tmp_path / "s.h5ad")
    cfg = RunConfig(out=str(tmp_path / "out"), models=["gcmoe"])
    cfg.data.source = "samples"
    cfg.data.samples = [str(path)]
    cfg.data.qc = False  # a flat pink image without nuclei
    with pytest.raises(ConfigError, match="reference"):
        run_cv(cfg, progress=False)


@pytest.mark.slow
def test_cv_with_the_baselines(tmp_path):
    models = ["stnet", "histogene", "bleep", "triplex"]
    cfg = _config(tmp_path, models)
    cfg.cv.n_folds = 2  # the wiring of each baseline through cv; 5 strips are tested with GC-MoE above
    res = run_cv(cfg, progress=False)
    d = res["datasets"]["virtual_tissue"]
    assert list(d["models"]) == ["ST-Net*", "HisToGene*", "BLEEP*", "TRIPLEX*"]
    for entry in d["models"].values():
        assert len(entry["folds"]) == 2 and np.isfinite(entry["mean"])
    md = (tmp_path / "results.md").read_text()
    assert all(f"| {name} |" in md for name in d["models"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["histogene", "bleep", "triplex"])
def test_baselines_train_save_and_reload(tmp_path, name):
    import torch

    from gcmoe.pipeline import build_model, prepare_run
    from gcmoe.training.checkpoint import load_model
    from gcmoe.training.trainer import predict

    cfg = _config(tmp_path, [name])
    cfg.train.max_epochs = 2
    folder = train_model(cfg, name, progress=False)
    model, meta = load_model(folder)
    assert meta["model"] == name and len(meta["genes"]) == 20
    # the reloaded model predicts every cell of the run, once each, with the inputs the pipeline builds
    from gcmoe.models import get_model_entry

    entry = get_model_entry(name)
    run = prepare_run(cfg, tmp_path, entry.inputs, progress=False)
    n = len(run.pooled.sample_ids)
    _, _, data = build_model(entry, run, meta["genes"], cfg, torch.zeros(n, 20))
    pred = predict(model, data, np.arange(n))
    assert pred.shape == (n, 20) and np.isfinite(pred).all()


def test_all_models_in_table_order():
    from gcmoe.models.registry import models_in_table_order

    names = models_in_table_order()
    assert names[0] == "stnet" and names[-1] == "gcmoe" and {"histogene", "bleep", "triplex"} <= set(names)
