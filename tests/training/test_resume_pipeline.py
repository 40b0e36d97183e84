"""`gcmoe train` checkpoints every model's whole state and resumes it (tiny virtual tissue)."""

import pytest
import torch

from gcmoe.config import RunConfig, TissueConfig
from gcmoe.training.checkpoint import CheckpointError, load_model
from gcmoe.training.state import latest_checkpoint


def _config(out, model):
    cfg = RunConfig(out=str(out), models=[model])
    cfg.data.tissue = TissueConfig(n_cells=700, height=600, width=600, n_genes=60, n_reference_cells=400, seed=5)
    cfg.train.max_epochs = 3
    cfg.train.patience = 10
    cfg.train.checkpoint_every = 1
    cfg.targets.n_top_genes = 20
    return cfg


@pytest.mark.slow
@pytest.mark.parametrize("name", ["stnet", "histogene", "bleep", "triplex", "gcmoe"])
def test_train_checkpoints_and_resumes_every_model(tmp_path, name):
    from gcmoe.pipeline import train_model

    folder = train_model(_config(tmp_path, name), name, progress=False)
    assert latest_checkpoint(tmp_path / "checkpoints" / name).name == "epoch-000003"
    first, _ = load_model(folder)
    again, _ = load_model(train_model(_config(tmp_path, name), name, progress=False, resume=True))
    for (k, a), b in zip(first.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    changed = _config(tmp_path, name)
    changed.targets.n_top_genes = 15
    with pytest.raises(CheckpointError, match="genes"):
        train_model(changed, name, progress=False, resume=True)
