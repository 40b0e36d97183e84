import numpy as np
import torch

from gcmoe.config import TrainConfig
from gcmoe.evaluation.metrics import pearson_per_gene
from gcmoe.models import create_model
from gcmoe.training.cells import CellData
from gcmoe.training.trainer import fit, predict, seed_everything


def _data(n=1200, d=6, g=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    w = rng.normal(size=(d, g)).astype(np.float32)
    y = (x @ w + 0.5 * rng.normal(size=(n, g))).astype(np.float32)
    return CellData(torch.from_numpy(x), torch.from_numpy(y))


def test_stnet_learns_and_restores_best():
    data = _data()
    idx = np.arange(1200)
    model = create_model("stnet", 6, 4)
    res = fit(model, data, idx[:900], idx[900:1000], TrainConfig(max_epochs=30, patience=5, batch_size=128))
    assert res.best_val_pcc > 0.8
    assert res.history[res.best_epoch - 1]["val_pcc"] == res.best_val_pcc
    # the restored weights are the best epoch's: validation PCC recomputed equals the recorded best
    r = pearson_per_gene(predict(model, data, idx[900:1000]), data.targets[900:1000].numpy())
    assert np.nanmean(r) == res.best_val_pcc or abs(np.nanmean(r) - res.best_val_pcc) < 1e-6
    test_r = pearson_per_gene(predict(model, data, idx[1000:]), data.targets[1000:].numpy())
    assert np.nanmean(test_r) > 0.8


def test_early_stopping_stops():
    data = _data()
    idx = np.arange(1200)
    res = fit(create_model("stnet", 6, 4), data, idx[:900], idx[900:], TrainConfig(max_epochs=500, patience=3, lr=0.05))
    assert res.epochs_run < 500
    assert res.epochs_run - res.best_epoch == 3


def test_seeded_runs_are_identical():
    data = _data()
    idx = np.arange(1200)
    cfg = TrainConfig(max_epochs=5, patience=5, seed=7)
    models = []
    for _ in range(2):
        seed_everything(cfg.seed)
        models.append(create_model("stnet", 6, 4))
        fit(models[-1], data, idx[:900], idx[900:], cfg)
    a, b = models
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(pa, pb)


def test_grouped_batches_keep_groups_whole():
    from gcmoe.training.cells import _batches

    groups = torch.from_numpy(np.random.default_rng(0).integers(0, 40, 1000))
    gen = torch.Generator().manual_seed(0)
    batches = _batches(1000, 128, gen, groups)
    assert sorted(torch.cat(batches).tolist()) == list(range(1000))  # every cell once
    owner = {}
    for b, batch in enumerate(batches):
        for g in groups[batch].unique().tolist():
            assert owner.setdefault(g, b) == b  # a group never spans two batches
    assert len(batches) == round(1000 / 128) and min(len(b) for b in batches) > 40
    # without groups the shuffle is the plain one (seeded runs of the other models are unchanged)
    plain = _batches(1000, 128, torch.Generator().manual_seed(0))
    assert torch.equal(torch.cat(plain), torch.randperm(1000, generator=torch.Generator().manual_seed(0)))


def test_fit_calls_the_model_hooks_with_training_cells():
    from gcmoe.models.stnet import STNet

    calls = []

    class Recording(STNet):
        def on_validation_start(self, data, train_idx):
            calls.append(("validation", len(train_idx)))

        def on_fit_end(self, data, train_idx):
            calls.append(("end", len(train_idx)))

    data = _data(n=300)
    idx = np.arange(300)
    fit(Recording(6, 4), data, idx[:200], idx[200:], TrainConfig(max_epochs=3, patience=5))
    assert calls == [("validation", 200)] * 3 + [("end", 200)]


def test_mixed_precision_trains():
    data = _data()
    idx = np.arange(1200)
    res = fit(create_model("stnet", 6, 4), data, idx[:900], idx[900:], TrainConfig(max_epochs=15, patience=5, amp=True))
    assert res.best_val_pcc > 0.7  # bfloat16 autocast on the CPU; float16 + GradScaler on CUDA


def test_fit_restores_the_thread_count_a_library_changed(monkeypatch):
    """numba (started by scanpy's HVG selection) resets the OpenMP thread count torch shares; fit sets it back."""
    import torch

    from gcmoe.training.trainer import default_threads

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert default_threads() == 1
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # what the numba layer does
        data = _data(n=300)
        idx = np.arange(300)
        fit(create_model("stnet", 6, 4), data, idx[:250], idx[250:], TrainConfig(max_epochs=1, patience=1))
        assert torch.get_num_threads() == 1
        fit(create_model("stnet", 6, 4), data, idx[:250], idx[250:], TrainConfig(max_epochs=1, num_threads=2))
        assert torch.get_num_threads() == 2  # an explicit train.num_threads wins
    finally:
        torch.set_num_threads(before)
