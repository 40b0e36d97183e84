"""The settings of ``gcmoe demo``: the virtual tissue, ST-Net* and the GC-MoE family, a shortened budget."""

from __future__ import annotations

import os

from gcmoe.config import RunConfig, TissueConfig

DEMO_MODELS = ["stnet", "gcmoe_no_moe_cap_c2ca", "gcmoe_no_cap_c2ca", "gcmoe_no_c2ca", "gcmoe"]
# cells in the report's t-SNE of a --quick demo (the report's default is 3000): each t-SNE of the 1,200-cell
# tissue's held-out cells took 4-9 s on 2 cores, about 2 s at 600
QUICK_REPORT_CELLS = 600


def demo_config(out: str | os.PathLike = "gcmoe_demo", quick: bool = False) -> RunConfig:
    """Settings of ``gcmoe demo``: the default virtual tissue (or a tiny one with ``quick``), ST-Net* and GC-MoE
    with its ablations, 5 vertical strips. The training budget is shorter than the paper's (docs/index.md)."""
    config = RunConfig(out=str(out), models=list(DEMO_MODELS))
    if quick:
        config.data.tissue = TissueConfig(n_cells=1_200, height=800, width=800, n_genes=80, n_reference_cells=500)
        config.train.max_epochs = 30
        config.train.patience = 5
    else:
        config.train.max_epochs = 400
        config.train.patience = 30
    return config

