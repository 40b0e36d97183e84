"""Shared fixtures: tiny data built in the real layouts."""

from __future__ import annotations

import numpy as np
import pytest

from gcmoe.data.sample import Sample


@pytest.fixture
def tiny_sample() -> Sample:
    """40 cells on a 120 x 200 px pink image, 6 genes, two cell types."""
    rng = np.random.default_rng(0)
    image = np.zeros((120, 200, 3), dtype=np.uint8)
    image[:] = (235, 180, 210)
    xy = np.column_stack([rng.uniform(5, 195, 40), rng.uniform(5, 115, 40)])
    counts = rng.poisson(2.0, size=(40, 6))
    return Sample.from_arrays(
        counts, xy, image, mpp=0.5, genes=[f"g{i}" for i in range(6)], sample_id="tiny",
        cell_type=np.where(np.arange(40) % 2 == 0, "neoplastic", "connective"),
    )


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A cross-validated run folder: 300-cell virtual tissue, ST-Net*, GC-MoE without CAP and GC-MoE, 2 epochs,
    3 strips (built once for the figure and report tests)."""
    from gcmoe.config import RunConfig, TissueConfig
    from gcmoe.pipeline import run_cv

    root = tmp_path_factory.mktemp("run")
    cfg = RunConfig(out=str(root), models=["stnet", "gcmoe_no_cap_c2ca", "gcmoe"])
    cfg.data.tissue = TissueConfig(n_cells=300, height=400, width=400, n_genes=40, n_reference_cells=200, seed=2)
    cfg.train.max_epochs = 2
    cfg.targets.n_top_genes = 12
    cfg.cv.n_folds = 3
    run_cv(cfg, progress=False)
    return root


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need a CUDA device: where there is none they are skipped, with the reason."""
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (tests marked gpu)")
    for item in gpu_items:
        item.add_marker(skip)
