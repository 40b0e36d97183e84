import numpy as np
import pytest
import torch

from gcmoe.config import TrainConfig
from gcmoe.models import create_model
from gcmoe.training.checkpoint import load_model, save_model
from gcmoe.training.trainer import fit, predict, seed_everything

PARAMS = dict(window_um=64.0, context_um=60.0, context_size=3, dim=32, heads=2)


def _data(spatial_data):
    return spatial_data(neighbours=True, context=True, targets_as_input=True)[0]


def test_the_three_views_have_the_expected_shapes(spatial_data):
    data = _data(spatial_data)
    model = create_model("triplex", 6, 5, **PARAMS).eval()
    batch = data.inputs(torch.arange(32), train=False)
    assert batch["neighbour_features"].shape == (32, 8, 6) and batch["context_features"].shape == (32, 9, 6)
    with torch.no_grad():
        out = model.views(**{k: v for k, v in batch.items() if k != "cell_type"})
    assert out.target_tokens.shape == (32, 1, 32)
    assert out.neighbour_tokens.shape == (32, 1 + 8, 32)  # the cell itself, then its window neighbours
    assert out.global_token.shape == (32, 32) and out.fused.shape == (32, 32)
    for pred in (out.prediction, out.target_prediction, out.neighbour_prediction, out.global_prediction):
        assert pred.shape == (32, 5) and torch.isfinite(pred).all()
    # the own square sits in the middle slot of the context and is always present
    assert batch["context_mask"][:, 4].all()
    assert batch["context_offsets"][:, 4].abs().max() <= 30.0 + 1e-4


def test_padding_does_not_matter(spatial_data):
    data = _data(spatial_data)
    model = create_model("triplex", 6, 5, **PARAMS).eval()
    batch = {k: v for k, v in data.inputs(torch.arange(64), train=False).items()}
    changed = dict(batch)
    changed["neighbour_features"] = batch["neighbour_features"].masked_fill(~batch["neighbour_mask"][..., None], 1e3)
    changed["context_features"] = batch["context_features"].masked_fill(~batch["context_mask"][..., None], -1e3)
    assert (~batch["neighbour_mask"]).any() and (~batch["context_mask"]).any()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).prediction, model(**changed).prediction)


def test_multi_view_losses_in_training_only(spatial_data):
    data = _data(spatial_data)
    model = create_model("triplex", 6, 5, **PARAMS).train()
    out = model(**data.inputs(torch.arange(64), train=True))
    assert set(out.losses) == {"views", "distill"} and all(v.requires_grad for v in out.losses.values())
    model.eval()
    assert model(**data.inputs(torch.arange(64), train=False)).losses == {}


def test_triplex_trains_and_its_loss_falls(spatial_data):
    data = _data(spatial_data)
    idx = np.arange(400)
    seed_everything(0)
    model = create_model("triplex", 6, 5, **PARAMS)
    res = fit(model, data, idx[:300], idx[300:340], TrainConfig(max_epochs=6, patience=6, batch_size=100, lr=3e-3))
    losses = [h["train_loss"] for h in res.history]
    assert losses[-1] < losses[0] - 0.3
    assert res.best_val_pcc > 0.2


def test_test_targets_never_enter_training(spatial_data):
    data = _data(spatial_data)
    idx = np.arange(400)
    states = []
    for shift in (0.0, 100.0):
        data.targets[340:] += shift
        seed_everything(0)
        model = create_model("triplex", 6, 5, **PARAMS)
        fit(model, data, idx[:300], idx[300:340], TrainConfig(max_epochs=2, patience=2, batch_size=100))
        states.append(model.state_dict())
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


def test_saved_triplex_reloads_to_identical_predictions(tmp_path, spatial_data):
    data = _data(spatial_data)
    model = create_model("triplex", 6, 5, **PARAMS)
    model.set_input_stats(torch.randn(6), torch.rand(6) + 0.5)
    before = predict(model, data, np.arange(400))
    save_model(model, tmp_path / "m", "triplex", PARAMS, {"genes": [f"g{i}" for i in range(5)]})
    loaded, _ = load_model(tmp_path / "m")
    np.testing.assert_array_equal(predict(loaded, data, np.arange(400)), before)


def test_triplex_settings_are_checked():
    with pytest.raises(Exception, match="odd"):
        create_model("triplex", 6, 5, context_size=4)
    with pytest.raises(ValueError, match="context"):
        create_model("triplex", 6, 5)(features=torch.randn(4, 6))
