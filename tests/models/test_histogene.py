import numpy as np
import pytest
import torch

from gcmoe.config import TrainConfig
from gcmoe.models import create_model
from gcmoe.training.checkpoint import load_model, save_model
from gcmoe.training.trainer import fit, predict, seed_everything


def _model(seed=0, **params):
    torch.manual_seed(seed)
    return create_model("histogene", 6, 5, window_um=120.0, dim=32, depth=1, heads=2, **params)


def test_window_assembly_gives_every_cell_exactly_one_prediction(spatial_data):
    data, _ = spatial_data(windows=True)
    model = _model().eval()
    n = data.features.shape[0]
    full = predict(model, data, np.arange(n))
    assert full.shape == (n, 5) and np.isfinite(full).all()
    # a cell's prediction does not depend on which other cells share its batch: it always comes from its own
    # window (the one where it is most central), computed once
    rng = np.random.default_rng(0)
    idx = rng.permutation(n)[:57]
    np.testing.assert_allclose(predict(model, data, idx, batch_size=7), full[idx], rtol=1e-5, atol=1e-5)
    # and it is the head applied to the cell's own token in that window
    i = int(idx[0])
    w = int(data.windows.cell_window[i])
    members = torch.as_tensor(data.windows.members[w])
    members = members[members >= 0]
    pos = data.positions[members] - torch.as_tensor(data.windows.centres[w])
    with torch.no_grad():
        everyone = torch.ones(1, len(members), dtype=torch.bool)
        tokens = model.encode_windows(data.features[members][None], pos[None], everyone)
        expected = model.head(tokens[0, int(data.windows.cell_slot[i])])
    np.testing.assert_allclose(full[i], expected.numpy(), rtol=1e-5, atol=1e-5)


def test_histogene_trains_and_its_loss_falls(spatial_data):
    data, _ = spatial_data(windows=True)
    idx = np.arange(400)
    seed_everything(0)
    model = _model()
    res = fit(model, data, idx[:300], idx[300:340], TrainConfig(max_epochs=12, patience=12, batch_size=100, lr=3e-3))
    losses = [h["train_loss"] for h in res.history]
    assert losses[-1] < losses[0] - 0.1
    assert res.best_val_pcc > 0.2


def test_test_targets_never_enter_training(spatial_data):
    """Test cells are context tokens (features) only: changing their targets changes nothing."""
    data, _ = spatial_data(windows=True)
    idx = np.arange(400)
    states = []
    for shift in (0.0, 100.0):
        data.targets[340:] += shift
        seed_everything(0)
        model = _model()
        fit(model, data, idx[:300], idx[300:340], TrainConfig(max_epochs=2, patience=2, batch_size=100))
        states.append(model.state_dict())
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


def test_saved_histogene_reloads_to_identical_predictions(tmp_path, spatial_data):
    data, _ = spatial_data(windows=True)
    params = dict(window_um=120.0, dim=32, depth=1, heads=2)
    model = create_model("histogene", 6, 5, **params)
    model.set_input_stats(torch.randn(6), torch.rand(6) + 0.5)
    before = predict(model, data, np.arange(400))
    save_model(model, tmp_path / "m", "histogene", params, {"genes": [f"g{i}" for i in range(5)]})
    loaded, meta = load_model(tmp_path / "m")
    assert loaded.window_um == 120.0 and meta["params"]["window_um"] == 120.0
    np.testing.assert_array_equal(predict(loaded, data, np.arange(400)), before)


def test_histogene_without_windows_is_explained():
    with pytest.raises(ValueError, match="window"):
        _model()(features=torch.randn(4, 6))


def test_transformer_encoder_ignores_padding_and_its_query_mode_matches():
    from gcmoe.models.layers import TransformerEncoder

    torch.manual_seed(0)
    enc = TransformerEncoder(16, 2, 4, dropout=0.1).eval()
    x = torch.randn(3, 7, 16)
    mask = torch.arange(7).expand(3, 7) < torch.tensor([[7], [4], [2]])
    with torch.no_grad():
        full = enc(x, mask)
        garbage = x.masked_fill(~mask[..., None], 1e4)
        torch.testing.assert_close(enc(garbage, mask)[mask], full[mask])
        torch.testing.assert_close(enc(x, mask, query=1), full[:, 1])
