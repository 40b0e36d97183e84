"""Tiny spatial data for the baselines: cells scattered over two slides, targets that depend on the cell's
own feature and on the mean feature of its surroundings (so context helps)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gcmoe.features.context import context_grid, tile_windows
from gcmoe.features.neighbours import window_neighbours
from gcmoe.training.cells import CellData


def make_spatial_data(
    n: int = 400, d: int = 6, g: int = 5, seed: int = 0, windows: bool = False, context: bool = False,
    neighbours: bool = False, targets_as_input: bool = False, window_um: float = 120.0, context_um: float = 60.0,
    context_size: int = 3,
) -> tuple[CellData, np.ndarray]:
    """(CellData, sample_ids): ``n`` cells on two 300 x 300 um slides."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 300, size=(n, 2))
    sample_ids = np.where(np.arange(n) < n // 2, "a", "b")
    x = rng.normal(size=(n, d)).astype(np.float32)
    field = np.sin(xy[:, :1] / 60.0) + np.cos(xy[:, 1:] / 45.0)  # a smooth tissue-level signal ...
    x[:, 0] += 0.8 * field[:, 0]  # ... that each cell's feature sees only noisily
    w = rng.normal(size=(d, g)).astype(np.float32)
    y = (np.tanh(x @ w) + field * rng.normal(size=(1, g)) + 0.3 * rng.normal(size=(n, g))).astype(np.float32)
    extra = {}
    if neighbours:
        extra["neighbours"] = torch.from_numpy(
            np.concatenate([np.where(nb >= 0, nb + off, -1) for nb, off in
                            ((window_neighbours(xy[sample_ids == s], 64.0, 8), int(np.flatnonzero(sample_ids == s)[0]))
                             for s in ("a", "b"))]))
    if windows:
        extra["windows"] = tile_windows(xy, window_um, 1024, sample_ids)
    if context:
        extra["context"] = context_grid(xy, context_um, context_size, sample_ids)
    if extra:
        extra["positions"] = torch.from_numpy(xy.astype(np.float32))
    data = CellData(torch.from_numpy(x), torch.from_numpy(y), targets_as_input=targets_as_input, **extra)
    return data, sample_ids


@pytest.fixture
def spatial_data():
    return make_spatial_data
