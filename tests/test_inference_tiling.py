"""predict_slide gives the same predictions whether the slide's features come from many tiles or one."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

import gcmoe.features as features
from gcmoe.config import RunConfig, TissueConfig
from gcmoe.inference import predict_slide
from gcmoe.pipeline import train_model


@pytest.mark.slow
@pytest.mark.parametrize("model", ["gcmoe"])
def test_tiled_and_untiled_predictions_agree(tmp_path, monkeypatch, model):
    cfg = RunConfig(out=str(tmp_path / "train"))
    cfg.data.tissue = TissueConfig(n_cells=250, height=400, width=400, n_genes=40, n_reference_cells=150, seed=5)
    cfg.train.max_epochs = 2
    cfg.targets.n_top_genes = 8
    folder = train_model(cfg, model, progress=False)
    slide = tmp_path / "train" / "data" / "virtual_tissue.tif"
    import anndata

    xy = anndata.read_h5ad(tmp_path / "train" / "data" / "virtual_tissue.h5ad").obsm["spatial"]
    pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1]}).to_csv(tmp_path / "cells.csv", index=False)

    original = features.extract_features_with_stats
    tiles = {}

    def with_tile_size(size):
        def extract(sample, config, **kwargs):
            result = original(sample, replace(config, tile_size=size), **kwargs)
            tiles[size] = result.stats.tiles_run
            return result

        return extract

    preds = {}
    for size in (256, 1024):  # 256: many tiles (96 px of useful stride); 1024: one tile holds the 400 px slide
        monkeypatch.setattr(features, "extract_features_with_stats", with_tile_size(size))
        ad = predict_slide(folder, slide, tmp_path / f"p{size}.h5ad", cells=tmp_path / "cells.csv",
                           cache_dir=tmp_path / f"cache{size}", progress=False)
        preds[size] = np.asarray(ad.X)
    monkeypatch.setattr(features, "extract_features_with_stats", original)
    assert tiles[256] > 4 and tiles[1024] == 1
    # features pass through the float16 cache: predictions agree to that rounding, not bit for bit
    scale = np.abs(preds[1024]).max()
    np.testing.assert_allclose(preds[256], preds[1024], atol=2e-3 * scale, rtol=0)
