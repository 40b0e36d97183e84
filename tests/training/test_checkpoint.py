import numpy as np
import pytest
import torch

from gcmoe.models import create_model
from gcmoe.training.checkpoint import CheckpointError, load_model, save_model
from gcmoe.training.cells import CellData
from gcmoe.training.trainer import predict


def _data(n=64, d=8, g=6, m=4):
    gen = torch.Generator().manual_seed(0)
    nbr = torch.randint(-1, n, (n, m), generator=gen)
    return CellData(torch.randn(n, d, generator=gen), torch.randn(n, g, generator=gen),
                    neighbours=nbr, positions=torch.rand(n, 2, generator=gen) * 100)


@pytest.mark.parametrize("name", ["stnet", "gcmoe", "gcmoe_no_cap_c2ca"])
def test_saved_model_reloads_to_identical_predictions(tmp_path, name):
    torch.manual_seed(0)
    params = {"adjacency": (torch.rand(4, 6, 6) > 0.7).float()} if name == "gcmoe" else {}
    model = create_model(name, 8, 6, **params)
    model.set_input_stats(torch.randn(8), torch.rand(8) + 0.5)
    data = _data()
    before = predict(model, data, np.arange(64))
    save_model(model, tmp_path / "m", name, params, {"genes": [f"g{i}" for i in range(6)], "cell_types": []})
    loaded, meta = load_model(tmp_path / "m")
    np.testing.assert_array_equal(predict(loaded, data, np.arange(64)), before)
    assert meta["genes"][0] == "g0" and (tmp_path / "m" / "README.md").is_file()


def test_damaged_weights_are_detected(tmp_path):
    model = create_model("stnet", 8, 6)
    save_model(model, tmp_path / "m", "stnet", {}, {})
    weights = tmp_path / "m" / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="checksum"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / "model.json").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_model(tmp_path / "m")


def test_model_saved_with_an_old_default_says_which_setting(tmp_path):
    """A GC-MoE saved with per-expert C2CA blocks (the old default, absent from its params) is refused with the
    setting to add; with that setting in model.json it loads."""
    import json

    adjacency = torch.zeros(4, 6, 6)
    old = create_model("gcmoe", 8, 6, adjacency=adjacency, c2ca_shared=False)
    save_model(old, tmp_path / "m", "gcmoe", {"adjacency": adjacency}, {})
    with pytest.raises(CheckpointError, match="c2ca_shared"):
        load_model(tmp_path / "m")
    meta_path = tmp_path / "m" / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["params"]["c2ca_shared"] = False
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="model.json does not match its checksum in SHA256SUMS.*seal_model"):
        load_model(tmp_path / "m")  # edited: refused until re-sealed on purpose
    from gcmoe.training.checkpoint import seal_model

    seal_model(tmp_path / "m")
    loaded, _ = load_model(tmp_path / "m")
    assert loaded.attention.key.shape[0] == 4
