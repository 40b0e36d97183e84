"""gcmoe.files: atomic writes, values files can store, file hashes."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from gcmoe.files import atomic_path, file_sha256, plain_values, publish, temporary_path, write_json, write_text


def test_atomic_path_replaces_only_on_success(tmp_path):
    path = tmp_path / "sub" / "a.txt"
    write_text(path, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert path.read_text() == "old"
    assert [p.name for p in path.parent.iterdir()] == ["a.txt"]  # no temporary file left behind
    with atomic_path(path, suffix=".npz") as tmp:
        assert tmp.name.endswith(".npz") and tmp.parent == path.parent
        np.savez(tmp, x=np.arange(3))
    with np.load(path) as f:
        assert f["x"].tolist() == [0, 1, 2]


def test_publish_replaces_a_folder_whole(tmp_path):
    final = tmp_path / "store"
    final.mkdir()
    (final / "stale.txt").write_text("x")
    tmp = temporary_path(final)
    tmp.mkdir()
    (tmp / "new.txt").write_text("y")
    publish(tmp, final)
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"] and not tmp.exists()


def test_plain_values_for_json_and_h5ad():
    value = {1: (np.float32(0.5), float("nan"), None), "a": np.int64(3), "b": np.bool_(True), "c": np.arange(2)}
    assert plain_values(value) == {"1": [0.5, None, None], "a": 3, "b": True, "c": [0, 1]}
    h5 = plain_values(value, h5ad=True)
    assert h5["1"][0] == 0.5 and np.isnan(h5["1"][1]) and len(h5["1"]) == 2  # None dropped, NaN kept
    assert isinstance(h5["c"], np.ndarray) and type(h5["a"]) is int


def test_write_json_is_valid_json_and_hash_matches_hashlib(tmp_path):
    path = write_json(tmp_path / "r.json", {"x": float("inf"), "y": [np.float64(1.5)]})
    assert json.loads(path.read_text()) == {"x": None, "y": [1.5]}
    assert file_sha256(path, chunk=3) == hashlib.sha256(path.read_bytes()).hexdigest()
