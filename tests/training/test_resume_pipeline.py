"""`gcmoe train` checkpoints every model's whole state and resumes it (tiny virtual tissue)."""

import pytest
import torch

from gcmoe.config import RunConfig, TissueConfig
from gcmoe.training.checkpoint import CheckpointError, load_model
from gcmoe.training.state import latest_checkpoint


def _config(out, model):
    cfg = RunConfig(out=str(out), models=[model])
    cfg.data.tissue = TissueConfig(n_cells=700, height=600, width=600, n_genes=60, n_reference_cells=400, seed=5)
    cfg.train.max_epochs = 3
    cfg.train.patience = 10
    cfg.train.checkpoint_every = 1
    cfg.targets.n_top_genes = 20
    return cfg


@pytest.mark.slow
@pytest.mark.parametrize("name", ["stnet", "histogene", "bleep", "triplex", "gcmoe"])
def test_train_checkpoints_and_resumes_every_model(tmp_path, name):
    from gcmoe.pipeline import train_model

    folder = train_model(_config(tmp_path, name), name, progress=False)
    assert latest_checkpoint(tmp_path / "checkpoints" / name).name == "epoch-000003"
    first, _ = load_model(folder)
    again, _ = load_model(train_model(_config(tmp_path, name), name, progress=False, resume=True))
    for (k, a), b in zip(first.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    changed = _config(tmp_path, name)
    changed.targets.n_top_genes = 15
    with pytest.raises(CheckpointError, match="genes"):
        train_model(changed, name, progress=False, resume=True)


@pytest.mark.slow
def test_cv_resumes_after_a_crash_with_the_uninterrupted_results(tmp_path, monkeypatch):
    """A cv run that dies in its third (model, fold) continues from cv_state and gives the same table."""
    import json

    from gcmoe.pipeline import run_cv
    from gcmoe.training import ensemble

    def cv_config(out):
        cfg = _config(out, "stnet")
        cfg.models = ["stnet", "gcmoe_no_cap_c2ca"]
        cfg.cv.n_folds = 2
        return cfg

    whole = run_cv(cv_config(tmp_path / "whole"), progress=False)
    real_fit, calls = ensemble.fit, {"n": 0}  # each (model, fold) goes through fit_ensemble -> fit

    def crashing_fit(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the run dies mid-way
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(ensemble, "fit", crashing_fit)
    with pytest.raises(KeyboardInterrupt):
        run_cv(cv_config(tmp_path / "crashed"), progress=False)
    assert len(list((tmp_path / "crashed" / "cv_state").rglob("*.json"))) == 2
    calls["n"] = -100
    resumed = run_cv(cv_config(tmp_path / "crashed"), progress=False, resume=True)
    assert calls["n"] == -100 + 2  # only the two unfinished (model, fold) pairs were trained again
    a, b = whole["datasets"]["virtual_tissue"]["models"], resumed["datasets"]["virtual_tissue"]["models"]
    for name in a:
        assert a[name]["folds"] == b[name]["folds"], name
    assert json.loads((tmp_path / "crashed" / "results.json").read_text())["datasets"]
    changed = cv_config(tmp_path / "crashed")
    changed.train.lr = 0.01
    with pytest.raises(CheckpointError, match="different run"):
        run_cv(changed, progress=False, resume=True)
