"""Training from a cell store on disk: the buffers give the in-memory inputs, every cell once per epoch."""

import numpy as np
import pytest
import torch

from gcmoe.config import TrainConfig
from gcmoe.errors import FeatureCacheError
from gcmoe.features.neighbours import window_neighbours
from gcmoe.models import create_model
from gcmoe.training.streaming import CellStore, StreamingCells, spatial_order, write_cell_store
from gcmoe.training.cells import CellData
from gcmoe.training.trainer import fit, predict


def _cells(n=900, d=5, g=3, seed=0):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 400, size=(n, 2))
    order = spatial_order(xy)
    xy = xy[order]
    x = rng.normal(size=(n, d)).astype(np.float16).astype(np.float32)
    nbr = window_neighbours(xy, 64.0, 8)
    y = x @ rng.normal(size=(d, g))
    y += 0.5 * np.nan_to_num(np.where(nbr[..., None] >= 0, x[nbr.clip(0)], 0).mean(1) @ rng.normal(size=(d, g)))
    y = (y + 0.3 * rng.normal(size=(n, g))).astype(np.float32)
    types = rng.integers(0, 2, n)
    return x, y, nbr, xy.astype(np.float32), types


@pytest.fixture
def store(tmp_path):
    x, y, nbr, xy, types = _cells()
    return write_cell_store(tmp_path / "store", x, y, nbr, xy, types, ["a", "b", "c"], ["t0", "t1"], chunk=128)


def test_store_round_trip(store):
    x, y, nbr, xy, types = _cells()
    assert store.n_cells == 900 and store.n_chunks == 8 and store.meta["genes"] == ["a", "b", "c"]
    np.testing.assert_array_equal(store.rows("features", 0, 900), x.astype(np.float16))
    rows = np.array([3, 130, 131, 899])
    np.testing.assert_array_equal(store.take("neighbours", rows), nbr[rows])


def test_buffers_give_the_in_memory_inputs(store):
    x, y, nbr, xy, types = _cells()
    memory = CellData(torch.from_numpy(x), torch.from_numpy(y), cell_type=torch.from_numpy(types),
                      neighbours=torch.from_numpy(nbr), positions=torch.from_numpy(xy))
    stream = StreamingCells(store, buffer_chunks=2)
    seen = []
    for source, local in stream.train_batches(np.arange(900), 100, torch.Generator().manual_seed(0)):
        own_rows = source.features.shape[0]
        assert own_rows < 900  # a buffer, not the data set
        # map buffer rows back to store rows through the features' identity with the in-memory copy
        got = source.inputs(local, train=True)
        glob = [int(np.flatnonzero((x == f.numpy()).all(1))[0]) for f in got["features"]]
        want = memory.inputs(torch.tensor(glob), train=True)
        for key in ("features", "cell_type", "neighbour_mask"):
            torch.testing.assert_close(got[key], want[key])
        mask = want["neighbour_mask"]
        torch.testing.assert_close(got["neighbour_features"][mask], want["neighbour_features"][mask])
        torch.testing.assert_close(got["neighbour_offsets"][mask], want["neighbour_offsets"][mask])
        torch.testing.assert_close(source.targets[local], torch.from_numpy(y[glob]))
        seen += glob
    assert sorted(seen) == list(range(900))  # every training cell exactly once per epoch


def test_only_training_cells_are_served(store):
    stream = StreamingCells(store, buffer_chunks=3)
    train = np.arange(0, 900, 3)
    n = sum(len(local) for _, local in stream.train_batches(train, 64, torch.Generator().manual_seed(1)))
    assert n == len(train)
    assert stream.targets_of(np.array([899, 5])).shape == (2, 3)


def test_fit_from_the_store_learns_and_predicts_like_memory(store):
    x, y, nbr, xy, types = _cells()
    stream = StreamingCells(store, buffer_chunks=2)
    idx = np.arange(900)
    model = create_model("gcmoe_no_cap_c2ca", 5, 3, n_types=2)
    res = fit(model, stream, idx[:600], idx[600:750], TrainConfig(max_epochs=40, patience=10, batch_size=128))
    assert res.best_val_pcc > 0.7
    memory = CellData(torch.from_numpy(x), torch.from_numpy(y), cell_type=torch.from_numpy(types),
                      neighbours=torch.from_numpy(nbr), positions=torch.from_numpy(xy))
    test = np.array([899, 750, 801, 760])  # unsorted, across chunks
    np.testing.assert_allclose(predict(model, stream, test), predict(model, memory, test), rtol=1e-5, atol=1e-5)
    mean, std = stream.feature_stats(idx[:600])
    torch.testing.assert_close(mean, torch.from_numpy(x[:600].mean(0)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(std, torch.from_numpy(x[:600].std(0, ddof=1)), rtol=1e-4, atol=1e-5)


def test_c2ca_model_from_the_store(store):
    from gcmoe.models.gcmoe import GCMoE

    model = GCMoE(5, 3, n_types=2, cap=False)  # router + C2CA: neighbours and labels come from the buffers
    res = fit(model, StreamingCells(store), np.arange(600), np.arange(600, 750),
              TrainConfig(max_epochs=3, patience=5, batch_size=128))
    assert res.epochs_run == 3 and np.isfinite(res.best_val_pcc)


def test_a_broken_store_is_refused(tmp_path, store):
    (store.path / "meta.json").write_text("{")
    with pytest.raises(FeatureCacheError, match="not a complete cell store"):
        CellStore(store.path)


def test_write_with_an_order_remaps_the_neighbours(tmp_path):
    x, y, nbr, xy, types = _cells(n=300)
    order = np.random.default_rng(3).permutation(300)
    store = write_cell_store(tmp_path / "s", x, y, nbr, xy, types, ["a", "b", "c"], chunk=64, order=order)
    feats = store.rows("features", 0, 300).astype(np.float32)
    nb = store.rows("neighbours", 0, 300)
    np.testing.assert_array_equal(feats, x[order])
    for row in (0, 17, 299):  # the neighbours of store row `row` are the original cell's neighbours
        want = nbr[order[row]]
        got = nb[row]
        np.testing.assert_array_equal(np.where(got >= 0, order[got.clip(0)], -1), want)


def test_target_columns_pick_genes_in_their_order(store):
    x, y, nbr, xy, types = _cells()
    cols = np.array([2, 0])
    stream = StreamingCells(store, buffer_chunks=2, target_columns=cols)
    assert stream.n_targets == 2 and stream.digest() != StreamingCells(store).digest()
    np.testing.assert_array_equal(stream.targets_of(np.array([899, 5, 130])), y[[899, 5, 130]][:, cols])
    for source, local in stream.train_batches(np.arange(900), 300, torch.Generator().manual_seed(0)):
        assert source.targets.shape[1] == 2
        got = source.features[local].numpy()
        glob = [int(np.flatnonzero((x == f).all(1))[0]) for f in got]
        np.testing.assert_array_equal(source.targets[local].numpy(), y[glob][:, cols])
    with pytest.raises(ValueError, match="target_columns"):
        StreamingCells(store, target_columns=np.array([3]))
