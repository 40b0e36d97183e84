import numpy as np

from gcmoe.features.neighbours import cached_window_neighbours, window_neighbours


def _brute(xy, i, window, m):
    d = np.abs(xy - xy[i]).max(axis=1)
    cand = np.flatnonzero((d <= window / 2) & (np.arange(len(xy)) != i))
    order = np.argsort(np.linalg.norm(xy[cand] - xy[i], axis=1), kind="stable")
    return cand[order][:m]


def test_window_neighbours_match_brute_force():
    rng = np.random.default_rng(0)
    for density in (300, 2000):  # sparse and crowded windows (more than M candidates)
        xy = rng.uniform(0, 400, (density, 2))
        nbr = window_neighbours(xy, 64.0, 8)
        for i in range(0, density, 7):
            got = nbr[i][nbr[i] >= 0]
            exp = _brute(xy, i, 64.0, 8)
            assert len(got) == len(exp)
            d_got = np.linalg.norm(xy[got] - xy[i], axis=1)
            assert np.all(np.diff(d_got) >= -1e-9)  # nearest first
            np.testing.assert_allclose(np.sort(d_got), np.sort(np.linalg.norm(xy[exp] - xy[i], axis=1)))


def test_querying_in_blocks_gives_the_same_neighbours():
    xy = np.random.default_rng(2).uniform(0, 300, (1500, 2))
    np.testing.assert_array_equal(window_neighbours(xy, 64.0, 8, block=97), window_neighbours(xy, 64.0, 8))


def test_square_window_excludes_self_and_corners():
    xy = np.array([[0.0, 0.0], [31.0, 31.0], [33.0, 0.0], [0.0, -20.0]])
    nbr = window_neighbours(xy, 64.0, 4)
    assert set(nbr[0][nbr[0] >= 0]) == {1, 3}  # (31, 31) is inside the square, (33, 0) is not
    assert 0 not in nbr[0]


def test_cache_roundtrip(tmp_path):
    xy = np.random.default_rng(1).uniform(0, 100, (50, 2))
    a = cached_window_neighbours(xy, 64.0, 8, tmp_path, "s")
    files = list((tmp_path / "neighbours").glob("s-*.npy"))
    assert len(files) == 1
    np.testing.assert_array_equal(a, cached_window_neighbours(xy, 64.0, 8, tmp_path, "s"))
    files[0].write_bytes(b"junk")  # a damaged entry is recomputed
    np.testing.assert_array_equal(a, cached_window_neighbours(xy, 64.0, 8, tmp_path, "s"))
