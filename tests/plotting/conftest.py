"""A tiny cross-validated run folder for the figure tests (a few seconds to build, once per module)."""

from __future__ import annotations

import pytest

from gcmoe.config import RunConfig, TissueConfig
from gcmoe.pipeline import run_cv

TINY_MODELS = ["stnet", "gcmoe_no_cap_c2ca", "gcmoe"]


def make_tiny_run(root) -> object:
    """run_cv on a 300-cell virtual tissue with ST-Net*, GC-MoE without CAP and GC-MoE; 2 epochs, 3 strips."""
    cfg = RunConfig(out=str(root), models=list(TINY_MODELS))
    cfg.data.tissue = TissueConfig(n_cells=300, height=400, width=400, n_genes=40, n_reference_cells=200, seed=2)
    cfg.train.max_epochs = 2
    cfg.targets.n_top_genes = 12
    cfg.cv.n_folds = 3
    run_cv(cfg, progress=False)
    return root


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("run"))
