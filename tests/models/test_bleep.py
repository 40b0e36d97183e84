import numpy as np
import pytest
import torch

from gcmoe.config import TrainConfig
from gcmoe.models import create_model
from gcmoe.models.bleep import retrieve
from gcmoe.models.losses import contrastive_loss
from gcmoe.training.checkpoint import load_model, save_model
from gcmoe.training.trainer import fit, predict, seed_everything

SMALL = dict(projection_dim=16, k=10)


def _trained(data, train, val, epochs=6, **params):
    seed_everything(0)
    model = create_model("bleep", 6, 5, **(SMALL | params))
    res = fit(model, data, train, val, TrainConfig(max_epochs=epochs, patience=epochs, batch_size=100, lr=3e-3))
    return model, res


def test_retrieval_with_k1_returns_the_exact_training_profile():
    g = torch.Generator().manual_seed(0)
    keys = torch.nn.functional.normalize(torch.randn(300, 8, generator=g), dim=-1)
    values = torch.rand(300, 5, generator=g) * 7
    # a training cell queried against the bank finds itself, and k = 1 returns its profile bit for bit
    assert torch.equal(retrieve(keys, keys, values, k=1, temperature=0.5, key_chunk=64), values)
    # chunking the bank does not change the neighbours
    a = retrieve(keys[:20], keys, values, k=7, temperature=0.5, key_chunk=50)
    b = retrieve(keys[:20], keys, values, k=7, temperature=0.5, key_chunk=10_000)
    torch.testing.assert_close(a, b)
    # a weighted average of k profiles lies within their range
    top = (keys[:1] @ keys.T).topk(7).indices[0]
    assert torch.all(a[0] <= values[top].max(0).values + 1e-5) and torch.all(a[0] >= values[top].min(0).values - 1e-5)


def test_trained_bleep_with_k1_predicts_training_cells_exactly(spatial_data):
    data, _ = spatial_data(targets_as_input=True)
    idx = np.arange(400)
    model, _ = _trained(data, idx[:300], idx[300:340], epochs=2, bank_key="image", k=1)
    np.testing.assert_array_equal(predict(model, data, idx[:300]), data.targets[:300].numpy())


def test_memory_bank_holds_training_cells_only(spatial_data):
    data, _ = spatial_data(targets_as_input=True)
    idx = np.arange(400)
    model, _ = _trained(data, idx[:300], idx[300:340], epochs=2)
    assert model.bank_keys.shape == (300, 16)
    assert torch.equal(model.bank_values, data.targets[:300])  # neither validation nor test cells
    with torch.no_grad():
        keys = model.eval().embed_expression(data.targets[:300])  # built with the restored best weights
    torch.testing.assert_close(model.bank_keys, keys)


def test_bleep_trains_and_its_contrastive_loss_falls(spatial_data):
    data, _ = spatial_data(targets_as_input=True)
    idx = np.arange(400)
    seed_everything(0)
    model = create_model("bleep", 6, 5, **SMALL)
    model.set_input_stats(data.features[:300].mean(0), data.features[:300].std(0))

    def train_loss():
        model.eval()
        with torch.no_grad():
            return contrastive_loss(model.embed_image(data.features[:300]), model.embed_expression(data.targets[:300]))

    before = train_loss()
    fit(model, data, idx[:300], idx[300:340], TrainConfig(max_epochs=15, patience=15, batch_size=100, lr=3e-3))
    after = train_loss()
    assert after < before - 0.1
    test = predict(model, data, idx[340:])
    r = np.mean([np.corrcoef(test[:, j], data.targets[340:, j].numpy())[0, 1] for j in range(5)])
    assert r > 0.2


def test_training_prediction_is_detached_and_test_targets_stay_out(spatial_data):
    data, _ = spatial_data(targets_as_input=True)
    model = create_model("bleep", 6, 5, **SMALL).train()
    out = model(features=data.features[:50], targets=data.targets[:50])
    assert not out.prediction.requires_grad and out.losses["contrastive"].requires_grad
    assert "targets" not in data.inputs(torch.arange(10), train=False)  # never at prediction


def test_saved_bleep_reloads_to_identical_predictions(tmp_path, spatial_data):
    data, _ = spatial_data(targets_as_input=True)
    idx = np.arange(400)
    model, _ = _trained(data, idx[:300], idx[300:340], epochs=2)
    before = predict(model, data, idx[300:])
    save_model(model, tmp_path / "m", "bleep", SMALL, {"genes": [f"g{i}" for i in range(5)]})
    loaded, _ = load_model(tmp_path / "m")
    assert loaded.bank_keys.shape == (300, 16)
    np.testing.assert_array_equal(predict(loaded, data, idx[300:]), before)


def test_bleep_without_a_bank_is_explained():
    model = create_model("bleep", 6, 5, **SMALL).eval()
    with pytest.raises(RuntimeError, match="memory bank"):
        model(features=torch.randn(4, 6))
