"""Cell polygons from segmentation files, their centroids, and point-in-polygon assignment.

Read without shapely/geopandas: GeoParquet's ``geometry`` column is WKB, which is parsed here (Polygon and
MultiPolygon, 2-D or with Z, little- or big-endian, ISO or EWKB type codes). Supported files:

- GeoParquet (HEST ``xenium_seg/{id}_xenium_cell_seg.parquet``): a WKB ``geometry`` column, the cell id in a
  ``cell_id`` column or in the pandas index stored by geopandas;
- 10x vertex tables (Xenium ``cell_boundaries.parquet``): one row per vertex, ``cell_id``, ``vertex_x``, ``vertex_y``;
- GeoJSON FeatureCollections or feature lists, ids from ``id`` or ``properties.cell_id``/``properties.id``. A
  feature that is a QuPath *annotation* holding many objects (``properties.objectType == "annotation"`` with a
  MultiPolygon/MultiPoint: CellViT's export, one feature per nucleus class, and HEST's ``cellvit_seg``) gives
  one object per part, numbered in file order as HEST numbers them (its parquet's ``cell_id``), with the
  feature's ``classification.name`` as the class. HEST's chunked GeoJSON (``write_geojson(chunk=True)``: the
  cells dealt into 10 features named "0".."9", their ids dropped) and zipped GeoJSON (``*.geojson.zip``) are
  refused: the parquet beside them holds the same polygons with their ids.

Coordinates are returned as they are stored; the caller knows their unit (HEST: H&E pixels; 10x: micrometres).
"""

from __future__ import annotations

import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gcmoe.errors import InvalidSampleError

log = logging.getLogger(__name__)

MAX_VERTICES = 64  # polygons with more vertices are subsampled for point-in-polygon tests (cells have ~7-25)


@dataclass
class Polygons:
    """Cell outlines: one exterior ring per cell (the largest part of a MultiPolygon).

    ``rings[i]`` is an (n_i, 2) float64 array of (x, y) vertices of cell ``ids[i]``.
    """

    ids: list[str]
    rings: list[np.ndarray]
    classes: list[str] | None = None  # a class per cell when the file has one (CellViT's nucleus types)

    def __len__(self) -> int:
        return len(self.ids)

    def centroids(self) -> np.ndarray:
        """Area centroids (n, 2) of the rings (vertex mean for degenerate rings)."""
        return np.array([ring_centroid(r)[0] for r in self.rings], dtype=np.float64).reshape(-1, 2)

    def areas(self) -> np.ndarray:
        """Areas of the rings, in squared coordinate units."""
        return np.array([ring_centroid(r)[1] for r in self.rings], dtype=np.float64)


def ring_centroid(ring: np.ndarray) -> tuple[np.ndarray, float]:
    """Area centroid and area of a ring (n, 2), closed or open, by the shoelace formula."""
    x, y = ring[:, 0], ring[:, 1]
    x1, y1 = np.roll(x, -1), np.roll(y, -1)
    cross = x * y1 - x1 * y
    area = cross.sum() / 2.0
    if abs(area) < 1e-12:
        return ring.mean(axis=0), 0.0
    return np.array([((x + x1) * cross).sum(), ((y + y1) * cross).sum()]) / (6.0 * area), abs(area)


def as_str_id(value) -> str:
    """Cell ids come as ints, str or bytes (old parquet files): one str form, e.g. b'aaab-1' -> 'aaab-1'."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


# --- WKB -----------------------------------------------------------------------------------------------


def _wkb_geometry(buf: bytes, offset: int = 0) -> tuple[list[list[np.ndarray]], int]:
    """Parse one WKB geometry at ``offset``; returns (polygons as lists of rings, new offset)."""
    order = "<" if buf[offset] == 1 else ">"
    (code,) = struct.unpack_from(order + "I", buf, offset + 1)
    offset += 5
    iso = code & 0x0FFFFFFF
    has_z = bool(code & 0x80000000) or iso // 1000 in (1, 3)
    has_m = bool(code & 0x40000000) or iso // 1000 in (2, 3)
    if code & 0x20000000:  # EWKB with SRID
        offset += 4
    kind = iso % 1000
    dims = 2 + has_z + has_m
    if kind == 3:  # Polygon
        (n_rings,) = struct.unpack_from(order + "I", buf, offset)
        offset += 4
        rings = []
        for _ in range(n_rings):
            (n_pts,) = struct.unpack_from(order + "I", buf, offset)
            offset += 4
            pts = np.frombuffer(buf, dtype=np.dtype(order + "f8"), count=n_pts * dims, offset=offset)
            rings.append(pts.reshape(n_pts, dims)[:, :2].astype(np.float64))
            offset += 8 * n_pts * dims
        return [rings], offset
    if kind == 6:  # MultiPolygon
        (n_parts,) = struct.unpack_from(order + "I", buf, offset)
        offset += 4
        polys = []
        for _ in range(n_parts):
            part, offset = _wkb_geometry(buf, offset)
            polys.extend(part)
        return polys, offset
    raise InvalidSampleError(f"unsupported WKB geometry type {kind}; cell segmentations must be Polygon or MultiPolygon")


def wkb_exterior(buf: bytes) -> np.ndarray:
    """The exterior ring of a WKB Polygon, or of the largest part of a MultiPolygon."""
    polys, _ = _wkb_geometry(bytes(buf))
    polys = [p for p in polys if p and len(p[0]) >= 3]
    if not polys:
        return np.zeros((0, 2))
    if len(polys) == 1:
        return polys[0][0]
    return max((p[0] for p in polys), key=lambda r: ring_centroid(r)[1])


# --- readers -------------------------------------------------------------------------------------------


def read_polygons(path: str | os.PathLike) -> Polygons:
    """Read cell polygons from a GeoParquet, a 10x vertex parquet/CSV, or a GeoJSON file (module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise InvalidSampleError(f"cell segmentation file not found: {path}")
    name = path.name.lower()
    if name.endswith(".zip"):
        raise InvalidSampleError(
            f"{path}: a zipped segmentation is not read: HEST zips its GeoJSON (for the xenium_seg files, the cells "
            "dealt into 10 chunks without their ids); use the .parquet beside it (HEST ships the same polygons as "
            f"{path.name.split('.')[0]}.parquet, with their cell ids)"
        )
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            schema = pq.read_schema(path)
        except Exception as exc:
            raise InvalidSampleError(f"cannot read {path} as parquet ({exc}); is the file complete?") from exc
        if "geometry" in schema.names:
            return _read_geoparquet(path, schema)
        if {"vertex_x", "vertex_y", "cell_id"} <= set(schema.names):
            import pandas as pd

            return _vertex_table(pd.read_parquet(path, columns=["cell_id", "vertex_x", "vertex_y"]), path)
        raise InvalidSampleError(
            f"{path}: neither a GeoParquet 'geometry' column nor 10x columns cell_id/vertex_x/vertex_y; "
            f"found {schema.names[:20]}"
        )
    if name.endswith((".csv", ".csv.gz")):
        import pandas as pd

        return _vertex_table(pd.read_csv(path, usecols=["cell_id", "vertex_x", "vertex_y"]), path)
    if name.endswith((".geojson", ".json")):
        return _read_geojson(path)
    raise InvalidSampleError(f"{path}: unknown segmentation file type; give GeoParquet, a 10x boundaries parquet/CSV or GeoJSON")


def _read_geoparquet(path: Path, schema) -> Polygons:
    import pyarrow.parquet as pq

    meta = schema.pandas_metadata or {}
    index_cols = [c for c in meta.get("index_columns", []) if isinstance(c, str)]
    id_col = "cell_id" if "cell_id" in schema.names else (index_cols[0] if index_cols else None)
    class_col = next((c for c in GeoJsonKeys.CLASS_COLUMNS if c in schema.names), None)
    columns = ["geometry"] + ([id_col] if id_col else []) + ([class_col] if class_col else [])
    ids: list[str] = []
    rings: list[np.ndarray] = []
    classes: list[str] = []
    n_empty = 0
    pf = pq.ParquetFile(path)
    row = 0
    for batch in pf.iter_batches(batch_size=200_000, columns=columns):
        geoms = batch.column("geometry").to_pylist()
        bids = batch.column(id_col).to_pylist() if id_col else list(range(row, row + len(geoms)))
        bclass = batch.column(class_col).to_pylist() if class_col else [None] * len(geoms)
        row += len(geoms)
        for cid, g, cls in zip(bids, geoms, bclass):
            ring = wkb_exterior(g) if g is not None else np.zeros((0, 2))
            if len(ring) < 3:
                n_empty += 1
                continue
            ids.append(as_str_id(cid))
            rings.append(ring)
            classes.append(str(cls))
    if n_empty:
        log.warning("%s: %d empty or degenerate polygons skipped", path.name, n_empty)
    return _checked(Polygons(ids, rings, classes if class_col else None), path)


def _vertex_table(df, path: Path) -> Polygons:
    ids_raw = df["cell_id"].to_numpy()
    # vertices of one cell are contiguous in 10x files; group by run so a repeated id stays one polygon
    change = np.flatnonzero(ids_raw[1:] != ids_raw[:-1]) + 1
    starts = np.concatenate([[0], change])
    ends = np.concatenate([change, [len(ids_raw)]])
    xy = df[["vertex_x", "vertex_y"]].to_numpy(dtype=np.float64)
    ids = [as_str_id(ids_raw[s]) for s in starts]
    rings = [xy[s:e] for s, e in zip(starts, ends)]
    return _checked(Polygons(ids, rings), path)


class GeoJsonKeys:
    """GeoJSON fields of QuPath-style exports (CellViT, HEST) and the class columns of their parquet twins."""

    OBJECT_TYPE = "objectType"
    ANNOTATION = "annotation"  # a QuPath annotation: one feature may hold many objects
    CLASSIFICATION = "classification"
    NAME = "name"
    MULTI = ("MultiPolygon", "MultiPoint")
    HEST_CHUNKS = 10  # HEST's write_geojson(chunk=True) deals the cells into 10 features named "0".."9"
    CLASS_COLUMNS = ("class", "classification", "cell_type")


def load_geojson_features(path: Path) -> list:
    """The features of a GeoJSON FeatureCollection or feature list (zipped GeoJSON refused)."""
    if path.name.lower().endswith(".zip"):
        raise InvalidSampleError(
            f"{path}: zipped GeoJSON is not read; use the .parquet beside it (HEST ships each segmentation as "
            "parquet too, with the cell ids), or unzip it"
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidSampleError(f"{path} is not valid JSON ({exc})") from exc
    features = data.get("features") if isinstance(data, dict) else data
    if not isinstance(features, list):
        raise InvalidSampleError(f"{path}: expected a GeoJSON FeatureCollection or a list of features")
    return features


def _class_name(props: dict) -> str | None:
    cls = props.get(GeoJsonKeys.CLASSIFICATION)
    if isinstance(cls, dict):
        cls = cls.get(GeoJsonKeys.NAME)
    return None if cls is None else str(cls)


def is_multi_object(feature: dict) -> bool:
    """A QuPath annotation holding many objects (CellViT's and HEST's exports): one object per part."""
    geom = (feature or {}).get("geometry") or {}
    props = (feature or {}).get("properties") or {}
    return geom.get("type") in GeoJsonKeys.MULTI and props.get(GeoJsonKeys.OBJECT_TYPE) == GeoJsonKeys.ANNOTATION


def is_hest_chunks(features: list) -> bool:
    """True for HEST's chunked GeoJSON: every feature a multi-object annotation named "0", "1", ... (<= 10)."""
    if not features or len(features) > GeoJsonKeys.HEST_CHUNKS or not all(is_multi_object(f) for f in features):
        return False
    names = [_class_name(f.get("properties") or {}) for f in features]
    return names == [str(i) for i in range(len(names))]


def geojson_objects(features: list, default_id: str = "{i}") -> list[tuple[str, dict, str | None]]:
    """(id, single geometry, class) per object: a multi-object annotation gives one per part, numbered in file
    order (HEST's ``cell_id``); other features give one each, id from ``id``/``properties.cell_id``/``.id``, else
    ``default_id`` formatted with the feature's index ``i``."""
    objects: list[tuple[str, dict, str | None]] = []
    for i, feat in enumerate(features):
        if not isinstance(feat, dict):
            continue
        geom = feat.get("geometry") or {}
        props = feat.get("properties") or {}
        if is_multi_object(feat):
            single = "Polygon" if geom["type"] == "MultiPolygon" else "Point"
            for part in geom.get("coordinates") or []:
                objects.append((str(len(objects)), {"type": single, "coordinates": part}, _class_name(props)))
        else:
            fid = feat.get("id", props.get("cell_id", props.get("id", default_id.format(i=i))))
            objects.append((as_str_id(fid), geom, _class_name(props)))
    return objects


def _read_geojson(path: Path) -> Polygons:
    features = load_geojson_features(path)
    if is_hest_chunks(features):
        raise InvalidSampleError(
            f"{path}: HEST's chunked GeoJSON (the cells dealt into {len(features)} features named 0..{len(features) - 1}, "
            "their cell ids dropped) cannot be matched to the transcripts; use the .parquet of the same "
            "segmentation (HEST ships it beside the GeoJSON, with the cell ids)"
        )
    ids, rings, classes = [], [], []
    skipped: dict[str, int] = {}
    for oid, geom, cls in geojson_objects(features):
        kind = geom.get("type") if isinstance(geom, dict) else type(geom).__name__
        if kind == "Polygon":
            parts = [geom["coordinates"]]
        elif kind == "MultiPolygon":
            parts = geom["coordinates"]
        else:
            skipped[str(kind)] = skipped.get(str(kind), 0) + 1
            continue
        exteriors = [np.asarray(p[0], dtype=np.float64)[:, :2] for p in parts if p and len(p[0]) >= 3]
        if not exteriors:
            skipped[f"{kind} without a ring"] = skipped.get(f"{kind} without a ring", 0) + 1
            continue
        rings.append(max(exteriors, key=lambda r: ring_centroid(r)[1]))
        ids.append(oid)
        classes.append(cls)
    if skipped:
        log.warning("%s: %d features are not cell polygons and were skipped (%s)", path.name, sum(skipped.values()),
                    ", ".join(f"{n} {k}" for k, n in sorted(skipped.items())))
    has_classes = any(c is not None for c in classes)
    return _checked(Polygons(ids, rings, [str(c) for c in classes] if has_classes else None), path)


def _checked(polys: Polygons, path: Path) -> Polygons:
    if len(polys) == 0:
        raise InvalidSampleError(f"{path} holds no cell polygons")
    if len(set(polys.ids)) != len(polys.ids):
        seen: set[str] = set()
        dup = [i for i in polys.ids if i in seen or seen.add(i)][:5]
        raise InvalidSampleError(f"{path}: duplicated cell ids in the segmentation, e.g. {dup}")
    return polys


# --- assignment ----------------------------------------------------------------------------------------


class PolygonIndex:
    """Assign points to the polygon containing them: k nearest centroids, then an even-odd crossing test.

    Polygons are padded to a common vertex count (degenerate repeated vertices add no crossing), so a test is
    one vectorised numpy expression per chunk of points; memory stays at ``chunk x k x vertices``.
    """

    def __init__(self, polygons: Polygons, k: int = 4) -> None:
        from scipy.spatial import cKDTree

        n_vert = min(MAX_VERTICES, max(len(r) for r in polygons.rings))
        padded = np.empty((len(polygons), n_vert, 2), dtype=np.float32)
        radius = 0.0
        for i, ring in enumerate(polygons.rings):
            if len(ring) > n_vert:
                ring = ring[np.linspace(0, len(ring) - 1, n_vert).astype(int)]
            padded[i, : len(ring)] = ring
            padded[i, len(ring):] = ring[-1]
        self.vertices = padded
        self.centroids = polygons.centroids()
        for i in range(len(polygons)):
            radius = max(radius, float(np.abs(polygons.rings[i] - self.centroids[i]).max()) * 1.5)
        self.radius = radius
        self.k = min(k, len(polygons))
        self.tree = cKDTree(self.centroids)

    def assign(self, xy: np.ndarray, chunk: int = 65_536) -> np.ndarray:
        """Index of the polygon containing each point (n, 2), or -1."""
        out = np.full(len(xy), -1, dtype=np.int64)
        for s in range(0, len(xy), chunk):
            pts = np.asarray(xy[s : s + chunk], dtype=np.float64)
            _, cand = self.tree.query(pts, k=self.k, distance_upper_bound=self.radius)
            cand = cand.reshape(len(pts), -1)
            res = np.full(len(pts), -1, dtype=np.int64)
            for j in range(cand.shape[1]):
                c = cand[:, j]
                todo = (res < 0) & (c < len(self.centroids))
                if not todo.any():
                    continue
                hit = _inside(pts[todo], self.vertices[c[todo]])
                idx = np.flatnonzero(todo)[hit]
                res[idx] = c[todo][hit]
            out[s : s + chunk] = res
        return out


def _inside(pts: np.ndarray, rings: np.ndarray) -> np.ndarray:
    """Even-odd rule: point i inside ring i? pts (m, 2), rings (m, V, 2)."""
    x1, y1 = rings[:, :, 0], rings[:, :, 1]
    x2, y2 = np.roll(x1, -1, axis=1), np.roll(y1, -1, axis=1)
    px, py = pts[:, :1], pts[:, 1:2]
    straddle = (y1 > py) != (y2 > py)
    with np.errstate(divide="ignore", invalid="ignore"):
        x_cross = x1 + (py - y1) * (x2 - x1) / (y2 - y1)
    return ((straddle & (px < x_cross)).sum(axis=1) % 2) == 1
