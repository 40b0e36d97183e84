"""Figures from a real (tiny) run folder: the files run_cv keeps, and the CLI's plot commands."""

from __future__ import annotations

import anndata
import numpy as np
import pytest
from typer.testing import CliRunner

from gcmoe.cli import app
from gcmoe.errors import ConfigError
from gcmoe.plotting import (
    RunFolderError,
    plot_run_cv,
    plot_run_gene_pcc,
    plot_run_gene_vectors,
    plot_run_spatial,
    plot_run_tsne,
    read_predictions,
)
from gcmoe.training.checkpoint import load_model

pytestmark = pytest.mark.slow


def test_run_folder_keeps_predictions_and_first_fold_models(tiny_run):
    ad = anndata.read_h5ad(tiny_run / "predictions" / "strip_1.h5ad")
    assert set(ad.layers) == {"stnet", "gcmoe_no_cap_c2ca", "gcmoe"}
    assert ad.uns["gcmoe"]["fold"] == "strip_1" and list(ad.uns["gcmoe"]["genes"]) == list(ad.var_names)
    assert ad.obsm["routing_gcmoe"].shape == (ad.n_obs, 4) and "routing_stnet" not in ad.obsm
    np.testing.assert_array_equal(ad.obs["expert_gcmoe"].cat.codes.to_numpy(), ad.obsm["routing_gcmoe"].argmax(1))
    assert {"sample_id", "cell_type", "routing_label"} <= set(ad.obs)
    assert ad.obsm["spatial"].shape == (ad.n_obs, 2)
    folds = sorted(p.stem for p in (tiny_run / "predictions").glob("*.h5ad"))
    assert folds == ["strip_1", "strip_2", "strip_3"]
    assert sum(anndata.read_h5ad(tiny_run / "predictions" / f"{f}.h5ad").n_obs for f in folds) == 300
    # the kept predictions are the ones that were scored
    import pandas as pd

    from gcmoe.evaluation.metrics import score_genes

    per_gene = pd.read_csv(tiny_run / "per_gene.csv")
    scored = per_gene[(per_gene.model == "GC-MoE") & (per_gene.fold == "strip_1")].set_index("gene")["pcc"]
    again = score_genes(ad.layers["gcmoe"], np.asarray(ad.X), list(ad.var_names))
    np.testing.assert_allclose(again.pcc, scored[list(ad.var_names)].to_numpy(), atol=1e-5)
    model, meta = load_model(tiny_run / "models" / "gcmoe")
    assert meta["genes"] == list(ad.var_names) and meta["training_data"]["fold"] == "strip_1"
    assert tuple(model.gene_vectors().shape[:2]) == (4, ad.n_vars)


def test_all_folds_merge_on_common_genes(tiny_run):
    ad = read_predictions(tiny_run)
    assert ad.n_obs == 300 and set(ad.obs["fold"]) == {"strip_1", "strip_2", "strip_3"}
    with pytest.raises(RunFolderError, match="strip_9"):
        read_predictions(tiny_run, "strip_9")


def test_run_figures(tiny_run):
    assert len(plot_run_tsne(tiny_run, max_cells=100).axes) == 3  # measured, ST-Net*, GC-MoE
    fig = plot_run_gene_vectors(tiny_run, expert="connective", threshold=0.3)
    assert len([a for a in fig.axes if a.get_label() != "<colorbar>"]) == 2
    assert "with CAP" in fig.axes[0].get_title() and "without CAP" in fig.axes[1].get_title()
    fig = plot_run_spatial(tiny_run, n_genes=1, fold="strip_2")
    assert len([a for a in fig.axes if a.get_label() != "<colorbar>"]) == 3 + 3
    assert len(plot_run_gene_pcc(tiny_run).axes) == 1
    assert len(plot_run_cv(tiny_run).axes) == 2
    with pytest.raises(RunFolderError, match="no gene-wise vectors"):
        plot_run_gene_vectors(tiny_run, models=["stnet"])
    with pytest.raises(ConfigError, match="unknown expert"):
        plot_run_gene_vectors(tiny_run, expert="stromal")
    with pytest.raises(RunFolderError, match=r"genes \['NOPE'\] were not evaluated here; evaluated genes: gene_"):
        plot_run_spatial(tiny_run, genes=["NOPE"])


def test_plot_commands(tiny_run, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["plot", "pcc", str(tiny_run), "--models", "stnet,GC-MoE", "--out", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "p.png").stat().st_size > 0 and (tmp_path / "p.svg").stat().st_size > 0
    result = runner.invoke(app, ["plot", "spatial", str(tiny_run), "--genes", "nope"])
    assert result.exit_code == 2 and "not evaluated" in result.output
    result = runner.invoke(app, ["plot", "cv", str(tmp_path)])
    assert result.exit_code == 2 and "not a gcmoe run folder" in result.output


def test_results_carry_the_pcc_within_each_cell_type(tiny_run):
    """per_type in results.json = the mean over folds of the PCC among each type's test cells; in results.md
    and the report too; a routing type with few training cells is named in a warning."""
    import json

    from gcmoe.evaluation.metrics import score_by_type

    dataset = next(iter(json.loads((tiny_run / "results.json").read_text())["datasets"].values()))
    folds = [anndata.read_h5ad(p) for p in sorted((tiny_run / "predictions").glob("*.h5ad"))]
    for name, display in (("stnet", "ST-Net*"), ("gcmoe", "GC-MoE")):
        per_fold = [score_by_type(f.layers[name], np.asarray(f.X), f.obs["routing_label"].astype(str).to_numpy())
                    for f in folds]
        want = {t: np.mean([s[t] for s in per_fold if t in s]) for t in {t for s in per_fold for t in s}}
        got = dataset["models"][display]["per_type"]
        assert set(got) == set(want) and got
        np.testing.assert_allclose([got[t] for t in sorted(got)], [want[t] for t in sorted(got)], atol=1e-6)
    md = (tiny_run / "results.md").read_text()
    assert "PCC within each cell type" in md
    for warning in dataset.get("warnings", []):
        assert "training cells (< 50)" in warning and warning in md
    assert dataset.get("warnings"), "a 300-cell tissue in 3 strips leaves some type with under 50 training cells"
