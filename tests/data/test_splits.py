import numpy as np
import pytest

from gcmoe.data.splits import carve_validation, make_folds, vertical_strips
from gcmoe.errors import ConfigError, InvalidSampleError


def _xy(n=1000, seed=0):
    rng = np.random.default_rng(seed)
    return np.column_stack([rng.uniform(0, 1000, n), rng.uniform(0, 500, n)])


def test_strips_are_disjoint_cover_all_and_vertical():
    xy = _xy()
    strips = vertical_strips(xy[:, 0], 5)
    allidx = np.concatenate(strips)
    assert len(allidx) == len(xy) and len(np.unique(allidx)) == len(xy)
    # vertical: every cell of strip k lies left of every cell of strip k+1
    for a, b in zip(strips, strips[1:]):
        assert xy[a, 0].max() <= xy[b, 0].min()
    assert max(map(len, strips)) - min(map(len, strips)) <= 1


def test_strips_need_enough_cells():
    with pytest.raises(InvalidSampleError):
        vertical_strips(np.arange(3.0), 5)
    with pytest.raises(ConfigError):
        vertical_strips(np.arange(10.0), 1)


def test_validation_is_spatial_blocks_from_train():
    xy = _xy(2000)
    train = np.arange(0, 2000, 2)
    tr, va = carve_validation(xy, train, 0.1, seed=3)
    assert set(tr) | set(va) == set(train) and not set(tr) & set(va)
    assert 0.05 < len(va) / len(train) < 0.3


def test_folds_strips_one_slide():
    xy = _xy()
    folds = make_folds(np.array(["s"] * len(xy)), xy, "auto", 5, 0.1, 0)
    assert len(folds) == 5
    tests = np.concatenate([f.test for f in folds])
    assert np.array_equal(np.sort(tests), np.arange(len(xy)))
    for f in folds:
        assert not (set(f.train) & set(f.test)) and not (set(f.val) & set(f.test)) and not (set(f.train) & set(f.val))
        assert len(f.train) + len(f.val) + len(f.test) == len(xy)


def test_leave_one_slide_out():
    xy = np.concatenate([_xy(300, 0), _xy(200, 1), _xy(100, 2)])
    ids = np.array(["a"] * 300 + ["b"] * 200 + ["c"] * 100)
    folds = make_folds(ids, xy, "auto", 5, 0.1, 0)
    assert [f.name for f in folds] == ["holdout_a", "holdout_b", "holdout_c"]
    for f, sid in zip(folds, "abc"):
        assert set(ids[f.test]) == {sid}
        assert sid not in set(ids[f.train]) | set(ids[f.val])
        assert set(ids[f.val]) == set("abc") - {sid}  # validation carved from every training slide


def test_unknown_scheme():
    with pytest.raises(ConfigError, match="unknown cross-validation scheme"):
        make_folds(np.array(["s"] * 10), _xy(10), "random", 5, 0.1, 0)
