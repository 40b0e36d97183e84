"""End-to-end: the command line on tiny virtual tissues."""

import json
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from gcmoe.cli import app

runner = CliRunner()


def _check_schema(results: dict, models: list[str]) -> dict:
    (name, d), = results["datasets"].items()
    assert isinstance(d["n_cells"], int) and d["n_cells"] > 0
    assert isinstance(d["n_genes_eval"], int) and d["n_genes_eval"] > 0
    assert d["ceiling"] is None or 0 < d["ceiling"] <= 1
    assert list(d["models"]) == models
    for entry in d["models"].values():
        assert len(entry["folds"]) == 5
        assert entry["mean"] == pytest.approx(float(np.mean(entry["folds"])))
        assert entry["std"] >= 0
    return d


def test_import_is_light():
    code = "import sys, gcmoe, gcmoe.cli, gcmoe.config, gcmoe.models; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_list_models():
    result = runner.invoke(app, ["list", "models"])
    assert result.exit_code == 0 and "ST-Net*" in result.output


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path):
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output
    demo_names = ["ST-Net*", "Ours w/o CS-MoE, CAP, C2CA", "Ours w/o CAP, C2CA", "Ours w/o C2CA", "GC-MoE"]
    d = _check_schema(json.loads((out / "results.json").read_text()), demo_names)
    assert d["ceiling"] is not None
    assert d["models"]["ST-Net*"]["mean"] > 0.05  # it learns something even on the tiny tissue
    assert d["models"]["ST-Net*"]["mean"] < d["ceiling"]
    md = (out / "results.md").read_text()
    assert "| ST-Net* |" in md and "*ceiling*" in md and "Table 2" in md
    for name in ("config.yaml", "log.txt", "per_gene.csv", "data/virtual_tissue.h5ad", "data/reference.h5ad",
                 "report.html"):
        assert (out / name).is_file(), name


@pytest.mark.slow
def test_simulate_then_cv_on_saved_sample(tmp_path):
    data = tmp_path / "tissue"
    result = runner.invoke(app, ["simulate", "--out", str(data), "--n-cells", "600", "--height", "600",
                                 "--width", "600", "--n-genes", "60", "--seed", "3"])
    assert result.exit_code == 0, result.output
    cfg = tmp_path / "run.yaml"
    cfg.write_text("train:\n  max_epochs: 15\n  patience: 5\ntargets:\n  n_top_genes: 20\n")
    out = tmp_path / "run"
    result = runner.invoke(app, ["cv", "--config", str(cfg), "--data", str(data / "virtual_tissue.h5ad"),
                                 "--models", "stnet", "--out", str(out)])
    assert result.exit_code == 0, result.output
    d = _check_schema(json.loads((out / "results.json").read_text()), ["ST-Net*"])
    assert d["n_genes_eval"] == 20 and d["ceiling"] is not None  # the saved tissue keeps its truth


def test_cv_unknown_model_is_a_clear_error(tmp_path):
    result = runner.invoke(app, ["cv", "--models", "nope", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert "unknown model 'nope'" in result.output and "stnet" in result.output


@pytest.mark.slow
def test_prior_command_prints_summary(tmp_path):
    data = tmp_path / "tissue"
    assert runner.invoke(app, ["simulate", "--out", str(data), "--n-cells", "400", "--height", "500", "--width", "500",
                               "--n-genes", "60"]).exit_code == 0
    result = runner.invoke(app, ["prior", "--reference", str(data / "reference.h5ad"), "--sample",
                                 str(data / "virtual_tissue.h5ad"), "--out", str(tmp_path / "prior.npz")])
    assert result.exit_code == 0, result.output
    assert "neoplastic" in result.output and "edges" in result.output and "Jaccard" in result.output
    from gcmoe.prior.coexpression import CoexpressionPrior

    prior = CoexpressionPrior.load(tmp_path / "prior.npz")
    assert prior.types == ["neoplastic", "inflammatory", "connective", "epithelial"] and len(prior.genes) == 60


@pytest.mark.slow
def test_extract_writes_features(tmp_path):
    data = tmp_path / "tissue"
    assert runner.invoke(app, ["simulate", "--out", str(data), "--n-cells", "300", "--height", "400", "--width", "400",
                               "--n-genes", "60"]).exit_code == 0
    out = tmp_path / "f.npy"
    result = runner.invoke(app, ["extract", str(data / "virtual_tissue.h5ad"), "--out", str(out),
                                 "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    feats = np.load(out)
    assert feats.shape[0] == 300 and feats.shape[1] > 10 and np.isfinite(feats).all()
    normalised = tmp_path / "f_reinhard.npy"
    result = runner.invoke(app, ["extract", str(data / "virtual_tissue.h5ad"), "--out", str(normalised),
                                 "--cache-dir", str(tmp_path / "cache"), "--stain-norm", "reinhard"])
    assert result.exit_code == 0, result.output
    assert np.load(normalised).shape == feats.shape and not np.array_equal(np.load(normalised), feats)
    result = runner.invoke(app, ["extract", str(data / "virtual_tissue.h5ad"), "--out", str(tmp_path / "x.npy"),
                                 "--stain-norm", "macenko"])
    assert result.exit_code != 0 and "stain_norm" in result.output
