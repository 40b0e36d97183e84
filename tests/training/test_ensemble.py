"""Seed ensembles (train.ensemble): members trained from different seeds, saved as one model, averaged."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from gcmoe.config import RunConfig, TissueConfig, TrainConfig
from gcmoe.errors import ConfigError
from gcmoe.models import create_model
from gcmoe.models.ensemble import SeedEnsemble
from gcmoe.training.cells import CellData
from gcmoe.training.checkpoint import CheckpointError, load_model, seal_model
from gcmoe.training.ensemble import SEED_STRIDE, fit_ensemble, member_seeds
from gcmoe.training.trainer import fit, predict, seed_everything


def _data(n=900, d=6, g=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (x @ rng.normal(size=(d, g)) + 0.5 * rng.normal(size=(n, g))).astype(np.float32)
    return CellData(torch.from_numpy(x), torch.from_numpy(y), cell_type=torch.from_numpy(rng.integers(0, 3, n)))


def _gcmoe():
    return create_model("gcmoe_no_c2ca", 6, 4, n_types=3, adjacency=torch.ones(3, 4, 4) - torch.eye(4))


def test_ensemble_averages_its_members_predictions_and_routing():
    seed_everything(0)
    members = [_gcmoe() for _ in range(3)]
    ensemble = SeedEnsemble(members).eval()
    x = torch.randn(5, 6)
    with torch.no_grad():
        expected = torch.stack([m(features=x).prediction for m in members]).mean(0)
        torch.testing.assert_close(ensemble(features=x).prediction, expected)
        torch.testing.assert_close(ensemble.routing(features=x),
                                   torch.stack([m.routing(features=x) for m in members]).mean(0))
    assert ensemble.routes and ensemble.inputs == members[0].inputs
    with pytest.raises(ValueError, match="same input and output"):
        SeedEnsemble([_gcmoe(), create_model("stnet", 6, 4)])


def test_member_zero_is_the_single_model_and_the_others_differ():
    data, idx = _data(), np.arange(900)
    cfg = TrainConfig(max_epochs=4, patience=4, seed=5, ensemble=3)
    seed_everything(cfg.seed)
    single = _gcmoe()
    fit(single, data, idx[:700], idx[700:], TrainConfig(max_epochs=4, patience=4, seed=5))
    seed_everything(cfg.seed)
    ensemble, res = fit_ensemble(_gcmoe(), _gcmoe, data, idx[:700], idx[700:], cfg)
    assert isinstance(ensemble, SeedEnsemble) and len(ensemble.members) == 3
    for a, b in zip(single.state_dict().values(), ensemble.members[0].state_dict().values()):
        assert torch.equal(a, b)
    w = [m.state_dict()["gene_bias"] for m in ensemble.members]
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])
    assert [m["seed"] for m in res.members] == [5, 5 + SEED_STRIDE, 5 + 2 * SEED_STRIDE]
    assert res.epochs_run == sum(m["epochs_run"] for m in res.members)
    from gcmoe.evaluation.metrics import pearson_per_gene

    r = np.nanmean(pearson_per_gene(predict(ensemble, data, idx[700:]), data.targets[700:].numpy()))
    assert res.best_val_pcc == pytest.approx(float(r), abs=1e-6)


def test_one_member_is_plain_fit_and_a_bad_count_is_refused():
    data, idx = _data(), np.arange(900)
    model = _gcmoe()
    same, res = fit_ensemble(model, _gcmoe, data, idx[:700], idx[700:], TrainConfig(max_epochs=2, patience=2))
    assert same is model and res.members is None
    for bad in (0, -1, True):
        with pytest.raises(ConfigError, match="train.ensemble"):
            member_seeds(TrainConfig(ensemble=bad))


def test_a_resumed_ensemble_keeps_its_finished_members(tmp_path):
    data, idx = _data(), np.arange(900)
    cfg = TrainConfig(max_epochs=3, patience=3, ensemble=2, checkpoint_every=1)
    seed_everything(0)
    first, res = fit_ensemble(_gcmoe(), _gcmoe, data, idx[:700], idx[700:], cfg, checkpoint_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["member-0", "member-1"]
    seed_everything(0)
    again, res2 = fit_ensemble(_gcmoe(), _gcmoe, data, idx[:700], idx[700:], cfg, checkpoint_dir=tmp_path, resume=True)
    for a, b in zip(first.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    assert res2.best_val_pcc == res.best_val_pcc


@pytest.fixture(scope="module")
def ensemble_model(tmp_path_factory):
    from gcmoe.pipeline import train_model

    root = tmp_path_factory.mktemp("ensemble")
    cfg = RunConfig(out=str(root / "train"))
    cfg.data.tissue = TissueConfig(n_cells=500, height=450, width=450, n_genes=50, n_reference_cells=200, seed=4)
    cfg.train.max_epochs = 2
    cfg.train.ensemble = 2
    cfg.targets.n_top_genes = 10
    return train_model(cfg, "gcmoe", progress=False), root


def test_train_saves_an_ensemble_that_loads_and_predicts(ensemble_model):
    folder, root = ensemble_model
    meta = json.loads((folder / "model.json").read_text())
    assert meta["ensemble"]["members"] == 2 and len(meta["ensemble"]["each"]) == 2
    assert "| seed ensemble | 2 model(s) averaged |" in (folder / "README.md").read_text()
    model, _ = load_model(folder)
    assert isinstance(model, SeedEnsemble) and len(model.members) == 2
    from gcmoe.config import TissueConfig as T
    from gcmoe.data.virtual_tissue import simulate_tissue
    from gcmoe.inference import predict_slide

    new = simulate_tissue(T(n_cells=200, height=300, width=300, n_genes=50, n_reference_cells=100, seed=9))
    new.sample.write(root / "new" / "slide.h5ad")
    adata = predict_slide(folder, root / "new" / "slide.tif", root / "pred.h5ad", detect=True, progress=False)
    assert adata.n_vars == 10 and np.isfinite(adata.X).all()
    np.testing.assert_allclose(adata.obsm["routing"].sum(1), 1, atol=1e-5)


def test_a_card_with_a_bad_ensemble_is_refused(ensemble_model, tmp_path):
    import shutil

    folder, _ = ensemble_model
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    meta = json.loads((copy / "model.json").read_text())
    meta["ensemble"]["members"] = 0
    (copy / "model.json").write_text(json.dumps(meta))
    seal_model(copy)
    with pytest.raises(CheckpointError, match="'ensemble'"):
        load_model(copy)
    meta["ensemble"]["members"] = 3  # more members than the weights hold
    (copy / "model.json").write_text(json.dumps(meta))
    seal_model(copy)
    with pytest.raises(CheckpointError, match="cannot be loaded"):
        load_model(copy)


def test_cv_and_train_take_ensemble_on_the_command_line(tmp_path):
    from gcmoe.cli import app

    result = CliRunner().invoke(app, ["train", "--ensemble", "0", "--out", str(tmp_path / "t")])
    assert result.exit_code != 0 and "--ensemble" in result.output
    from gcmoe.cli._app import run_config_from

    assert run_config_from(None, None, None, None, ensemble=3).train.ensemble == 3
    assert run_config_from(None, None, None, None).train.ensemble == 1
