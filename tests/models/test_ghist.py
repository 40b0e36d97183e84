"""GHIST*: raw-pixel tiles, disc pooling, the U-Net model, training, saving, the table marker."""

import numpy as np
import pytest
import torch

from gcmoe.config import TrainConfig
from gcmoe.data.image import ArrayImage
from gcmoe.errors import ConfigError
from gcmoe.features.pixel_tiles import build_pixel_tiles
from gcmoe.ops import disc_pixels
from gcmoe.models import create_model
from gcmoe.models.ghist import pool_discs
from gcmoe.training.checkpoint import load_model, save_model
from gcmoe.training.cells import CellData
from gcmoe.training.trainer import fit, predict, seed_everything

SMALL = dict(mpp=1.0, tile_size=32, margin=6, widths=(8, 16), groups=4, cell_radius_um=2.5, nucleus_radius_um=1.5)


def test_pooling_of_a_known_map_over_known_discs_is_exact():
    t = 12
    rows, cols = torch.meshgrid(torch.arange(t), torch.arange(t), indexing="ij")
    maps = torch.zeros(2, 2, t, t, dtype=torch.float64)
    maps[0, 0] = cols + 10 * rows  # value of pixel (row, col) = col + 10 row
    maps[1, 0] = 100 + cols + 10 * rows
    maps[0, 1, 5, 5] = 1.0  # a single lit pixel
    cell_xy = torch.tensor([[5.5, 5.5], [5.5, 5.5], [5.0, 5.0], [5.5, 5.5], [0.2, 0.2]], dtype=torch.float64)
    tile = torch.tensor([0, 0, 0, 1, 0])
    radius = torch.tensor([1.0, 1.5, 1.0, 1.0, 1.5])
    out = torch.stack([pool_discs(maps, tile[i : i + 1], cell_xy[i : i + 1], float(radius[i]))[0] for i in range(5)])
    # r = 1 at a pixel centre: the pixel and its 4 edge neighbours; r = 1.5: the 3 x 3 block
    assert out[0].tolist() == [55.0, 1 / 5]
    assert out[1].tolist() == [55.0, 1 / 9]
    # at a pixel corner, r = 1: the 4 pixels around the corner, rows and cols 4..5
    assert out[2].tolist() == [49.5, 1 / 4]
    assert out[3].tolist() == [155.0, 0.0]
    # near the tile's corner, r = 1.5, the disc is cut by the border: pixels (0, 0), (0, 1), (1, 0) only
    assert out[4, 0].item() == pytest.approx((0 + 1 + 10) / 3)
    owner, r, c = disc_pixels(cell_xy[:1], 1.0, t)
    assert sorted(zip(r.tolist(), c.tolist())) == [(4, 5), (5, 4), (5, 5), (5, 6), (6, 5)] and owner.tolist() == [0] * 5


def test_pooling_is_differentiable_in_the_map():
    maps = torch.zeros(1, 1, 8, 8, requires_grad=True)
    pool_discs(maps, torch.tensor([0]), torch.tensor([[4.5, 4.5]]), 1.0).sum().backward()
    grad = maps.grad[0, 0]
    assert grad.sum().item() == pytest.approx(1.0) and grad[4, 4].item() == pytest.approx(0.2)


def _image(h=100, w=140, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_tiles_own_every_cell_once_and_read_the_right_pixels():
    rng = np.random.default_rng(1)
    image = _image()
    xy = np.column_stack([rng.uniform(0, 140, 80), rng.uniform(0, 100, 80)])
    tiles = build_pixel_tiles([ArrayImage(image)], [0.5], [xy], mpp=0.5, tile_size=32, margin=6, nucleus_radius_um=1.0)
    assert tiles.cell_tile.shape == (80,) and tiles.caching
    # most central: at least the margin from the tile's border
    assert (tiles.cell_xy >= 6).all() and (tiles.cell_xy < 32 - 6).all()
    pix = tiles.read(np.arange(tiles.n_tiles))
    for i in range(80):
        k = tiles.cell_tile[i]
        c, r = np.floor(tiles.cell_xy[i]).astype(int)
        np.testing.assert_array_equal(pix[k, :, r, c].numpy(), image[int(xy[i, 1]), int(xy[i, 0])])
    # the same tile read twice (cached) is identical; the batch holds each owning tile once
    batch = tiles.inputs(torch.tensor([0, 1, 2, 0]), train=True)
    assert batch["tile_pixels"].dtype == torch.uint8 and batch["tile_pixels"].shape[1:] == (3, 32, 32)
    assert batch["tile_pixels"].shape[0] == len(set(tiles.cell_tile[[0, 1, 2]].tolist()))
    assert batch["tile_nuclei"].shape == (batch["tile_pixels"].shape[0], 1, 32, 32)
    assert "tile_nuclei" not in tiles.inputs(torch.tensor([0]), train=False)


def test_resampled_tiles_and_the_nuclei_target():
    image = np.full((200, 200, 3), 200, dtype=np.uint8)
    xy = np.array([[60.0, 60.0], [140.0, 140.0]])  # slide pixels at 0.5 um/px
    tiles = build_pixel_tiles([ArrayImage(image)], [0.5], [xy], mpp=1.0, tile_size=32, margin=6, nucleus_radius_um=2.0)
    assert tiles.grids[0].read_size == 64
    pix = tiles.read([tiles.cell_tile[0]])[0]
    assert pix.shape == (3, 32, 32)
    inside = pix[:, 10:22, 10:22]
    assert (inside == 200).all()  # a uniform slide stays uniform through the antialiased resize
    nuc = tiles.nuclei([tiles.cell_tile[0]])[0, 0]
    cx, cy = tiles.cell_xy[0]
    rows, cols = np.nonzero(nuc.numpy())
    assert len(rows) > 0 and (((cols + 0.5 - cx) ** 2 + (rows + 0.5 - cy) ** 2) <= 4.0 + 1e-6).all()
    # a disc of radius 2 px holds 12 or 13 pixel centres depending on its sub-pixel position
    assert 9 <= len(rows) <= 13


def _tissue(n=150, seed=0):
    """Dark round cells on a pale slide (mpp 1); gene 0 = darkness, gene 1 = -darkness + noise, gene 2 = size."""
    rng = np.random.default_rng(seed)
    h = w = 120
    xy = np.column_stack([rng.uniform(4, w - 4, n), rng.uniform(4, h - 4, n)])
    dark = rng.uniform(0, 1, n)
    size = rng.uniform(1.0, 2.5, n)
    image = np.full((h, w, 3), 235.0)
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    for (x, y), d, s in zip(xy, dark, size):
        disc = (xx - x) ** 2 + (yy - y) ** 2 <= s * s
        image[disc] = [80 + 120 * (1 - d), 40 + 100 * (1 - d), 150]
    y = np.column_stack([dark, -dark + 0.1 * rng.normal(size=n), size]).astype(np.float32)
    tiles = build_pixel_tiles([ArrayImage(image.astype(np.uint8))], [1.0], [xy], mpp=1.0, tile_size=32, margin=6,
                              nucleus_radius_um=1.5)
    return CellData(torch.zeros(n, 4), torch.from_numpy(y), pixels=tiles)


def test_ghist_trains_and_its_loss_falls():
    data = _tissue()
    seed_everything(0)
    model = create_model("ghist", 4, 3, **SMALL)
    res = fit(model, data, np.arange(110), np.arange(110, 150), TrainConfig(max_epochs=10, patience=10, batch_size=40,
                                                                            lr=3e-3))
    losses = [h["train_loss"] for h in res.history]
    assert losses[-1] < losses[0] - 0.2
    assert res.best_val_pcc > 0.3
    # cells of one tile share a training batch
    assert torch.equal(data.groups, torch.as_tensor(data.pixels.cell_tile))


def test_prediction_does_not_depend_on_the_batch_and_reloads(tmp_path):
    data = _tissue(seed=2)
    torch.manual_seed(0)
    model = create_model("ghist", 4, 3, **SMALL)
    model.train()
    model(**data.inputs(torch.arange(60), train=True))  # one pass in training mode must leave no state behind
    full = predict(model, data, np.arange(150))
    assert full.shape == (150, 3) and np.isfinite(full).all()
    idx = np.random.default_rng(0).permutation(150)[:37]
    np.testing.assert_allclose(predict(model, data, idx, batch_size=5), full[idx], rtol=1e-5, atol=1e-6)
    save_model(model, tmp_path / "m", "ghist", dict(SMALL), {"genes": ["a", "b", "c"]})
    loaded, meta = load_model(tmp_path / "m")
    assert loaded.input_geometry() == model.input_geometry() and meta["params"]["widths"] == [8, 16]
    np.testing.assert_array_equal(predict(loaded, data, np.arange(150)), full)


def test_nuclei_loss_is_weighted_and_only_in_training():
    data = _tissue(n=30)
    model = create_model("ghist", 4, 3, **(SMALL | {"lambda_nuclei": 2.0}))
    out = model(**data.inputs(torch.arange(30), train=True))
    assert set(out.losses) == {"nuclei"} and out.losses["nuclei"].item() > 0
    half = create_model("ghist", 4, 3, **(SMALL | {"lambda_nuclei": 1.0}))
    half.load_state_dict(model.state_dict())
    model.eval(), half.eval()
    batch = data.inputs(torch.arange(30), train=True)
    assert model(**batch).losses["nuclei"].item() == pytest.approx(2 * half(**batch).losses["nuclei"].item())
    assert model(**data.inputs(torch.arange(30), train=False)).losses == {}


def test_bad_inputs_and_settings_are_explained():
    model = create_model("ghist", 4, 3, **SMALL)
    with pytest.raises(ValueError, match="tile_pixels"):
        model(features=torch.zeros(2, 4))
    with pytest.raises(ConfigError, match="multiple of 4"):
        create_model("ghist", 4, 3, tile_size=66)
    with pytest.raises(ConfigError, match="margin"):
        create_model("ghist", 4, 3, mpp=1.0, margin=2, cell_radius_um=6.0)
    with pytest.raises(ConfigError, match="one image"):
        build_pixel_tiles([], [], [])


def test_results_table_marks_raw_pixel_models():
    from gcmoe.evaluation.tables import method_table
    from gcmoe.models.registry import models_in_table_order

    assert models_in_table_order().index("ghist") == models_in_table_order().index("triplex") + 1
    d = {"n_cells": 10, "n_genes_eval": 5, "models": {"ST-Net*": {"folds": [0.5], "mean": 0.5, "std": None},
                                                       "GHIST*": {"folds": [0.3], "mean": 0.3, "std": None,
                                                                  "raw_pixels": True}}}
    table = method_table({"datasets": {"A": d}})
    assert "| GHIST* † | 0.300 |" in table and "| ST-Net* | **0.500** |" in table
    assert table.splitlines()[-1].startswith("† trained end to end on raw H&E pixels")


@pytest.mark.slow
def test_train_and_predict_a_new_slide_with_ghist(tmp_path):
    """`gcmoe train --model ghist` through the pipeline, then `predict_slide` reads the slide's pixels."""
    import pandas as pd

    from gcmoe.config import RunConfig, TissueConfig
    from gcmoe.inference import predict_slide
    from gcmoe.models import get_model_entry
    from gcmoe.pipeline import build_model, prepare_run, train_model

    cfg = RunConfig(out=str(tmp_path / "train"), models=["ghist"])
    cfg.data.tissue = TissueConfig(n_cells=300, height=400, width=400, n_genes=40, n_reference_cells=200, seed=4)
    cfg.train.max_epochs = 2
    cfg.targets.n_top_genes = 10
    cfg.model_params = {"ghist": {"widths": [8, 16]}}
    folder = train_model(cfg, "ghist", progress=False)
    model, meta = load_model(folder)
    run = prepare_run(cfg, tmp_path / "again", get_model_entry("ghist").inputs, progress=False)
    n = len(run.pooled.sample_ids)
    _, _, data = build_model(get_model_entry("ghist"), run, meta["genes"], cfg, torch.zeros(n, 10))
    expected = predict(model, data, np.arange(n))
    sample = run.pooled.samples[0]
    cells = tmp_path / "cells.csv"
    pd.DataFrame({"cell_id": sample.adata.obs_names, "x": sample.spatial[:, 0], "y": sample.spatial[:, 1]}).to_csv(
        cells, index=False)
    ad = predict_slide(folder, tmp_path / "train" / "data" / "virtual_tissue.tif", tmp_path / "pred.h5ad",
                       cells=cells, progress=False)
    assert ad.n_obs == n and list(ad.var_names) == meta["genes"]
    np.testing.assert_allclose(ad.X, expected, rtol=1e-4, atol=1e-5)
