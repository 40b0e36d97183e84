"""Cell centres from the files segmentation tools write, in full-resolution H&E pixels.

- CSV or parquet of centroids: columns ``x``/``y`` (or ``x_centroid``/``y_centroid``, ``centroid_x``/``centroid_y``),
  optional ``cell_id``;
- GeoJSON of nuclei (CellViT, QuPath, HEST's ``cellvit_seg``): a FeatureCollection (or list) of Polygon /
  MultiPolygon / Point features, one centre per feature (the polygon's area centroid); a QuPath annotation that
  holds many objects (CellViT's export: one MultiPolygon per nucleus class) gives one centre per part
  (:func:`gcmoe.data.readers.polygons.geojson_objects`); zipped GeoJSON is refused (use the parquet);
- HoVer-Net JSON: ``{"nuc": {id: {"centroid": [x, y], ...}}}``;
- a label mask (.tif/.tiff/.png/.npy, integer labels, 0 = background, same size as the slide's level 0): one
  centre per label (its centre of mass).

The format is chosen by the file's extension and, for .json/.geojson, by its top-level structure; nothing is
guessed from the path otherwise. Files are parsed as data: nothing is unpickled or executed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from gcmoe.data.readers.polygons import geojson_objects, load_geojson_features, ring_centroid
from gcmoe.errors import InvalidSampleError

X_COLUMNS = ("x", "x_centroid", "centroid_x", "he_x")
Y_COLUMNS = ("y", "y_centroid", "centroid_y", "he_y")


def read_cell_centres(path: str | os.PathLike) -> tuple[np.ndarray, list[str]]:
    """Centres (n, 2) float64 (x, y) in pixels and cell ids from a cell file (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise InvalidSampleError(f"cell file not found: {path}")
    suffix = "".join(path.suffixes[-2:]).lower() if path.suffix.lower() in (".gz", ".zip") else path.suffix.lower()
    if suffix == ".geojson.zip":
        load_geojson_features(path)  # raises: zipped GeoJSON is refused, with the parquet as the fix
    if suffix in (".csv", ".tsv", ".csv.gz", ".parquet"):
        xy, ids = _read_table(path, suffix)
    elif suffix in (".json", ".geojson"):
        xy, ids = _read_json(path)
    elif suffix in (".tif", ".tiff", ".png", ".npy"):
        xy, ids = _read_mask(path, suffix)
    else:
        raise InvalidSampleError(
            f"{path}: unknown cell file type {suffix!r}; give a CSV/parquet of centroids, a GeoJSON or HoVer-Net "
            "JSON of nuclei, or a label mask (.tif/.png/.npy)"
        )
    if len(xy) == 0:
        raise InvalidSampleError(f"{path} holds no cells")
    if not np.all(np.isfinite(xy)):
        raise InvalidSampleError(f"{path}: {int((~np.isfinite(xy)).any(axis=1).sum())} cell centres are NaN or infinite")
    if len(set(ids)) != len(ids):
        raise InvalidSampleError(f"{path}: cell ids are not unique")
    return xy, ids


def _read_table(path: Path, suffix: str) -> tuple[np.ndarray, list[str]]:
    import pandas as pd

    try:
        if suffix == ".parquet":
            df = pd.read_parquet(path)
        else:
            df = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",")
    except Exception as exc:
        raise InvalidSampleError(f"cannot read {path} as a table ({exc})") from exc
    xcol = next((c for c in X_COLUMNS if c in df.columns), None)
    ycol = next((c for c in Y_COLUMNS if c in df.columns), None)
    if xcol is None or ycol is None:
        raise InvalidSampleError(
            f"{path}: no centroid columns; expected one of {X_COLUMNS} and one of {Y_COLUMNS} (pixels of the H&E), "
            f"found {list(df.columns)[:20]}"
        )
    ids = [_as_str(v) for v in df["cell_id"]] if "cell_id" in df.columns else [f"cell_{i}" for i in range(len(df))]
    columns = []
    for col in (xcol, ycol):
        values = pd.to_numeric(df[col], errors="coerce")
        bad = np.flatnonzero(values.isna() & df[col].notna())
        if len(bad):
            raise InvalidSampleError(
                f"{path}: column {col!r} must hold plain numbers (pixels of the H&E), but row {bad[0] + 1} holds "
                f"{df[col].iloc[bad[0]]!r} ({len(bad)} such rows); write the centres as numbers without units")
        columns.append(values.to_numpy(dtype=np.float64))
    return np.column_stack(columns).reshape(-1, 2), ids


def _as_str(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _geometry_centre(geom: dict) -> np.ndarray:
    kind, coords = geom.get("type"), geom.get("coordinates")
    if kind == "Point":
        return np.asarray(coords[:2], dtype=np.float64)
    if kind == "Polygon":
        return ring_centroid(np.asarray(coords[0], dtype=np.float64)[:, :2])[0]
    if kind == "MultiPolygon":
        parts = [ring_centroid(np.asarray(p[0], dtype=np.float64)[:, :2]) for p in coords]
        weights = np.array([a for _, a in parts])
        centres = np.stack([c for c, _ in parts])
        return centres.mean(axis=0) if weights.sum() == 0 else (centres * weights[:, None]).sum(0) / weights.sum()
    raise InvalidSampleError(f"unsupported GeoJSON geometry {kind!r}; use Point, Polygon or MultiPolygon")


def _read_json(path: Path) -> tuple[np.ndarray, list[str]]:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidSampleError(f"{path} is not valid JSON ({exc})") from exc
    if isinstance(data, dict) and "nuc" in data:  # HoVer-Net
        if not isinstance(data["nuc"], dict):
            raise InvalidSampleError(f"{path}: HoVer-Net JSON's 'nuc' must map nucleus ids to nuclei")
        items = list(data["nuc"].items())
        centres = []
        for key, nucleus in items:
            centroid = nucleus.get("centroid") if isinstance(nucleus, dict) else None
            try:
                centres.append(np.asarray(centroid, dtype=np.float64).reshape(-1)[:2])
                if centres[-1].shape != (2,):
                    raise ValueError
            except (TypeError, ValueError):
                raise InvalidSampleError(
                    f"{path}: HoVer-Net nucleus {key!r} has no usable 'centroid' (got {centroid!r}); each nucleus needs "
                    "\"centroid\": [x, y] in pixels (HoVer-Net writes it with --save_centroid or in its JSON output)"
                ) from None
        return np.array(centres, dtype=np.float64).reshape(-1, 2), [str(k) for k, _ in items]
    features = data.get("features") if isinstance(data, dict) else data
    if not isinstance(features, list):
        raise InvalidSampleError(f"{path}: expected a GeoJSON FeatureCollection, a list of features, or HoVer-Net JSON")
    for i, feat in enumerate(features):
        ok = isinstance(feat, dict) and isinstance(feat.get("geometry"), dict) and isinstance(
            feat.get("properties") or {}, dict)
        if not ok:
            raise InvalidSampleError(
                f"{path}: feature {i} is not a GeoJSON feature with a geometry object (got {str(feat)[:80]!r}); each "
                "feature needs \"geometry\": {\"type\": \"Point\" or \"Polygon\", \"coordinates\": ...}")
    centres, ids = [], []
    for i, (oid, geom, _) in enumerate(geojson_objects(features, default_id="cell_{i}")):
        if not isinstance(geom, dict) or "type" not in geom:
            raise InvalidSampleError(f"{path}: feature {i} has no geometry")
        try:
            centres.append(_geometry_centre(geom))
        except (TypeError, ValueError, IndexError, KeyError) as exc:
            raise InvalidSampleError(
                f"{path}: feature {i} ({oid}) has a {geom.get('type')} geometry without usable coordinates "
                f"(got {str(geom.get('coordinates'))[:80]!r}: {type(exc).__name__}); give [x, y] for a Point, rings of "
                "[x, y] for a Polygon") from None
        if centres[-1].shape != (2,):
            raise InvalidSampleError(f"{path}: feature {i} ({oid}) has coordinates that are not [x, y] pairs")
        ids.append(oid)
    return np.array(centres, dtype=np.float64).reshape(-1, 2), ids


def _read_mask(path: Path, suffix: str) -> tuple[np.ndarray, list[str]]:
    from scipy import ndimage as ndi

    try:
        if suffix == ".npy":
            mask = np.load(path, allow_pickle=False)  # never unpickled: object arrays raise ValueError
        elif suffix in (".tif", ".tiff"):
            import tifffile

            mask = tifffile.imread(path)
        else:
            from skimage.io import imread

            mask = imread(path)
    except (ValueError, OSError, EOFError) as exc:
        raise InvalidSampleError(
            f"{path}: cannot read a label mask ({exc}); it must be a 2-D integer array saved with numpy.save (no "
            "pickled objects), or a TIFF/PNG label image") from None
    mask = np.asarray(mask)
    if mask.ndim != 2 or not np.issubdtype(mask.dtype, np.integer):
        raise InvalidSampleError(f"{path}: a label mask must be a 2-D integer image (0 = background), got {mask.dtype} {mask.shape}")
    labels = np.unique(mask)
    labels = labels[labels != 0]
    cy, cx = np.asarray(ndi.center_of_mass(np.ones_like(mask, dtype=np.uint8), mask, labels)).reshape(-1, 2).T
    return np.column_stack([cx, cy]), [str(int(v)) for v in labels]
