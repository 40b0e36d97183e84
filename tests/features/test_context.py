import numpy as np
import pytest

from gcmoe.features.context import context_grid, tile_windows


def _cells(n=1500, seed=0):
    rng = np.random.default_rng(seed)
    xy = np.concatenate([rng.uniform(0, 700, (n // 2, 2)), rng.uniform(100, 500, (n - n // 2, 2))])
    return xy, np.where(np.arange(n) < n // 2, "a", "b")


def test_every_cell_is_owned_by_exactly_one_window_where_it_is_most_central():
    xy, sid = _cells()
    t = tile_windows(xy, 200.0, 1024, sid)
    n = len(xy)
    np.testing.assert_array_equal(t.members[t.cell_window, t.cell_slot], np.arange(n))  # owner's row holds it
    own_dist = np.abs(xy - t.centres[t.cell_window]).max(axis=1)
    assert own_dist.max() <= 100.0 + 1e-4  # inside its owner
    for i in range(n):
        rows = np.flatnonzero((t.members == i).any(axis=1))
        assert t.cell_window[i] in rows
        assert own_dist[i] <= np.abs(xy[i] - t.centres[rows]).max(axis=1).min() + 1e-4  # most central
    for w in range(t.n_windows):
        m = t.members[w][t.members[w] >= 0]
        assert len(set(sid[m])) == 1  # no window crosses two slides
        inside = np.abs(xy[m] - t.centres[w]).max(axis=1) <= 100.0 + 1e-4
        assert inside.all()
        owned = t.cell_window[m] == w
        assert owned.any() and not np.any(np.diff(owned.astype(int)) > 0)  # owned cells first
        # a window holds every cell of its slide inside its square
        same = np.flatnonzero((sid == sid[m[0]]) & (np.abs(xy - t.centres[w]).max(axis=1) < 100.0 - 1e-3))
        assert set(same) <= set(m)


def test_windows_overlap_at_half_stride():
    gx, gy = np.meshgrid(np.arange(0, 401, 20.0), np.arange(0, 401, 20.0))
    xy = np.column_stack([gx.ravel(), gy.ravel()])
    t = tile_windows(xy, 200.0)
    # centres on a 100-um pitch from (100, 100): 3 x 3 windows cover 400 um
    assert t.n_windows == 9 and np.allclose(np.unique(t.centres[:, 0]), [100.0, 200.0, 300.0])
    i = int(np.flatnonzero((xy == [100.0, 100.0]).all(axis=1))[0])
    assert np.allclose(t.centres[t.cell_window[i]], [100.0, 100.0])  # owned by the window centred on it
    assert (t.members == i).any(axis=1).sum() == 4  # and inside 4 windows (borders included)
    j = int(np.flatnonzero((xy == [140.0, 160.0]).all(axis=1))[0])
    assert np.allclose(t.centres[t.cell_window[j]], [100.0, 200.0])  # nearest centre per axis


def test_too_many_cells_per_window_is_explained():
    xy, _ = _cells(800)
    with pytest.raises(ValueError, match="max_cells"):
        tile_windows(xy, 400.0, max_cells=50)
    t = tile_windows(xy, 200.0, max_cells=120)  # non-owned members are dropped first
    assert t.members.shape[1] <= 120
    np.testing.assert_array_equal(t.members[t.cell_window, t.cell_slot], np.arange(800))


def test_context_grid_on_a_lattice():
    # one cell per 10-um square on a 5 x 4 lattice
    gx, gy = np.meshgrid(np.arange(5), np.arange(4))
    xy = np.column_stack([gx.ravel(), gy.ravel()]) * 10.0 + 5.0
    g = context_grid(xy, 10.0, 3)
    assert g.n_squares == 20
    np.testing.assert_array_equal(g.context[:, 4], g.cell_square)  # own square in the middle
    corner = 0  # the cell at (5, 5): its left and lower neighbours lie outside
    assert list(g.context[corner] >= 0) == [False, False, False, False, True, True, False, True, True]
    right = g.context[corner, 5]
    assert np.allclose(g.centres[right], [20.0, 10.0])  # squares start at the lowest cell
    feats = np.arange(40, dtype=np.float32).reshape(20, 2)
    np.testing.assert_allclose(g.mean_features(feats)[g.cell_square], feats)


def test_context_grid_squares_stay_in_their_slide_and_average_their_cells():
    xy, sid = _cells(600)
    g = context_grid(xy, 50.0, 5, sid)
    for q in range(0, g.n_squares, 7):
        cells = np.flatnonzero(g.cell_square == q)
        assert len(set(sid[cells])) == 1
        assert (np.abs(xy[cells] - g.centres[q]).max(axis=1) <= 25.0 + 1e-4).all()
    feats = np.random.default_rng(1).normal(size=(600, 3))
    means = g.mean_features(feats)
    q = g.cell_square[0]
    np.testing.assert_allclose(means[q], feats[g.cell_square == q].mean(0), rtol=1e-5)
    with pytest.raises(ValueError, match="odd"):
        context_grid(xy, 50.0, 4)
