import json

import numpy as np
import pandas as pd
import pytest

from gcmoe.data.cells import read_cell_centres
from gcmoe.errors import InvalidSampleError


def test_csv_and_parquet(tmp_path):
    pd.DataFrame({"cell_id": ["a", "b"], "x_centroid": [1.0, 2.0], "y_centroid": [3.0, 4.0]}).to_csv(tmp_path / "c.csv", index=False)
    xy, ids = read_cell_centres(tmp_path / "c.csv")
    np.testing.assert_array_equal(xy, [[1, 3], [2, 4]])
    assert ids == ["a", "b"]
    pd.DataFrame({"cell_id": [b"aa-1", b"bb-1"], "x": [5.0, 6.0], "y": [7.0, 8.0]}).to_parquet(tmp_path / "c.parquet")
    xy, ids = read_cell_centres(tmp_path / "c.parquet")
    assert ids == ["aa-1", "bb-1"] and xy[1, 1] == 8.0


def test_geojson_polygon_centroids(tmp_path):
    square = [[[0, 0], [4, 0], [4, 2], [0, 2], [0, 0]]]
    fc = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "id": "n1", "geometry": {"type": "Polygon", "coordinates": square}},
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [10, 11]}},
    ]}
    (tmp_path / "n.geojson").write_text(json.dumps(fc))
    xy, ids = read_cell_centres(tmp_path / "n.geojson")
    np.testing.assert_allclose(xy, [[2, 1], [10, 11]])
    assert ids == ["n1", "cell_1"]


def test_hovernet_json(tmp_path):
    (tmp_path / "h.json").write_text(json.dumps({"nuc": {"3": {"centroid": [5, 6]}, "7": {"centroid": [1, 2]}}}))
    xy, ids = read_cell_centres(tmp_path / "h.json")
    assert ids == ["3", "7"] and xy.tolist() == [[5, 6], [1, 2]]


def test_label_mask(tmp_path):
    mask = np.zeros((20, 30), dtype=np.int32)
    mask[2:5, 10:13] = 4  # centre (x=11, y=3)
    mask[10:12, 0:2] = 9  # centre (x=0.5, y=10.5)
    np.save(tmp_path / "m.npy", mask)
    xy, ids = read_cell_centres(tmp_path / "m.npy")
    assert ids == ["4", "9"]
    np.testing.assert_allclose(xy, [[11, 3], [0.5, 10.5]])


@pytest.mark.parametrize(("name", "content", "message"), [
    ("c.csv", "a,b\n1,2\n", "no centroid columns"),
    ("c.xyz", "", "unknown cell file type"),
    ("c.json", "{not json", "not valid JSON"),
    ("c.csv", "x,y,cell_id\n1,2,a\n3,4,a\n", "not unique"),
    ("c.csv", "x,y\n", "holds no cells"),
])
def test_bad_cell_files(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(InvalidSampleError, match=message):
        read_cell_centres(tmp_path / name)


def test_cellvit_geojson_gives_one_centre_per_nucleus(tmp_path):
    """CellViT's export (one QuPath annotation per class, a MultiPolygon of its nuclei): one centre per part, not
    per class; a zipped GeoJSON is refused with the parquet as the fix."""
    rng = np.random.default_rng(0)
    centres = rng.uniform(20, 480, (30, 2))
    square = np.array([[-3, -3], [3, -3], [3, 3], [-3, 3], [-3, -3]], dtype=float)
    feats = [{"type": "Feature", "geometry": {"type": "MultiPolygon",
                                              "coordinates": [[(c + square).tolist()] for c in centres[k::3]]},
              "properties": {"objectType": "annotation", "classification": {"name": name, "color": [0, 0, 0]}}}
             for k, name in enumerate(["Neoplastic", "Inflammatory", "Connective"])]
    (tmp_path / "cells.geojson").write_text(json.dumps(feats))
    xy, ids = read_cell_centres(tmp_path / "cells.geojson")
    np.testing.assert_allclose(xy, np.concatenate([centres[k::3] for k in range(3)]), atol=1e-9)
    assert ids == [str(i) for i in range(30)]
    import zipfile

    with zipfile.ZipFile(tmp_path / "cells.geojson.zip", "w") as zf:
        zf.write(tmp_path / "cells.geojson", "cells.geojson")
    with pytest.raises(InvalidSampleError, match="zipped GeoJSON is not read; use the .parquet"):
        read_cell_centres(tmp_path / "cells.geojson.zip")
