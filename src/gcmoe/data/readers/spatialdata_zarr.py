"""A SpatialData zarr store (as spatialdata-io writes Xenium, Visium HD, ...) -> :class:`Sample`.

Read with the ``spatialdata`` library (the optional ``spatialdata`` extra; it installs beside the pinned torch):

- the table (``tables/<key>``, an AnnData): counts in ``layers["counts"]`` or ``X``; ``uns["spatialdata_attrs"]``
  names the element it annotates (``region``) and the column of ``obs`` holding its instance ids
  (``instance_key``);
- the cells' shapes: the annotated region when it is a shapes element (spatialdata-io's ``cell_circles``),
  else the shapes element indexed by the same ids (``cell_boundaries`` when the table annotates the
  ``cell_labels`` raster); centres are the circles' centres or the polygons' centroids;
- the H&E: an RGB uint8 image element (``images/<key>``, OME-Zarr), opened lazily by
  :class:`gcmoe.data.image.OmeZarrImage` (no copy is made; the Sample references the folder).

Centres go from the shapes' own coordinates through the shapes' transformation to the coordinate system
(``global``) and back through the inverse of the image's: H&E pixels. spatialdata-io's Xenium shapes are in
micrometres (``x_centroid``/``y_centroid``, scaled by 1 / pixel_size into ``global``), as is the table's
``obsm["spatial"]``, so the H&E's pixel size is the scale of image pixels -> shape micrometres; other stores
(Visium HD's shapes are image pixels) need ``coords="px"`` and ``--mpp``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from gcmoe.data.image import OmeZarrImage, is_ome_zarr
from gcmoe.data.readers._common import check_mpp, inside_image
from gcmoe.data.readers._coords import check_spacing
from gcmoe.data.readers.h5ad import raw_counts
from gcmoe.data.readers.polygons import as_str_id
from gcmoe.data.sample import Sample
from gcmoe.errors import ImageReadError, InvalidSampleError
from gcmoe.files import plain_values

log = logging.getLogger(__name__)


class SpatialDataKeys:
    """Element folders and table attributes of a SpatialData zarr store."""

    TABLES = "tables"
    IMAGES = "images"
    SHAPES = "shapes"
    TABLE = "table"  # spatialdata-io's name for the cell table
    ATTRS = "spatialdata_attrs"
    REGION = "region"
    INSTANCE_KEY = "instance_key"
    COORDINATE_SYSTEM = "global"


def is_spatialdata_zarr(path: str | os.PathLike) -> bool:
    """A zarr folder holding ``tables/`` (and the elements it annotates)."""
    path = Path(path)
    return is_ome_zarr(path) and (path / SpatialDataKeys.TABLES).is_dir()


def _spatialdata():
    try:
        import spatialdata
    except ImportError as exc:
        raise InvalidSampleError(
            "reading a SpatialData zarr store needs the spatialdata library: pip install 'gcmoe[spatialdata]'"
        ) from exc
    return spatialdata


def _pick(names: list[str], given: str | None, what: str, path: Path, default: str | None = None) -> str:
    if given is not None:
        if given not in names:
            raise InvalidSampleError(f"{path}: no {what} {given!r}; its {what}s are {names}")
        return given
    if default in names:
        return default
    if len(names) == 1:
        return names[0]
    raise InvalidSampleError(f"{path}: holds {len(names)} {what}s {names}; choose one")


def _affine(element, coordinate_system: str, name: str, path: Path) -> np.ndarray:
    """The 3x3 affine (x, y) of an element into the coordinate system."""
    from spatialdata.transformations import get_transformation

    transforms = get_transformation(element, get_all=True)
    if coordinate_system not in transforms:
        raise InvalidSampleError(f"{path}: element {name!r} is not in coordinate system {coordinate_system!r} "
                                 f"(it is in {sorted(transforms)})")
    return np.asarray(transforms[coordinate_system].to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")),
                      dtype=np.float64)


def _rgb_images(sdata, path: Path) -> list[str]:
    """Image elements that are 8-bit RGB (the H&E; morphology images are 16-bit grey or many channels)."""
    names = []
    for name in sdata.images:
        try:
            OmeZarrImage(path / SpatialDataKeys.IMAGES / name)
        except ImageReadError:
            continue
        names.append(name)
    return names


def _shapes_for(sdata, table, region: list[str], ids: pd.Index, given: str | None, path: Path) -> str:
    if given is not None:
        return _pick(list(sdata.shapes), given, "shapes element", path)
    for name in region:
        if name in sdata.shapes:
            return name
    matching = [n for n in sorted(sdata.shapes) if pd.Index(sdata.shapes[n].index.map(as_str_id)).isin(ids).mean() > 0.9]
    if not matching:
        raise InvalidSampleError(
            f"{path}: the table annotates {region}, which are not shapes, and no shapes element holds its cell ids; "
            f"name the element with the cell outlines (shapes={sorted(sdata.shapes)})"
        )
    return matching[0]


def _centres(gdf) -> np.ndarray:
    """Circle centres or polygon centroids (n, 2), in the element's own coordinates."""
    geometry = gdf.geometry
    return np.column_stack([geometry.centroid.x.to_numpy(), geometry.centroid.y.to_numpy()]).astype(np.float64)


def read_spatialdata(
    path: str | os.PathLike,
    image: str | os.PathLike | None = None,
    mpp: float | None = None,
    sample_id: str | None = None,
    table: str | None = None,
    shapes: str | None = None,
    coords: Literal["auto", "px", "um"] = "auto",
    coordinate_system: str = SpatialDataKeys.COORDINATE_SYSTEM,
) -> Sample:
    """Read a SpatialData zarr store's cell table, cell shapes and H&E as a Sample (module docstring).

    Parameters
    ----------
    path
        The ``.zarr`` store.
    image
        The H&E image element: its name, or its folder (``store.zarr/images/he_image``); default: the only
        8-bit RGB image.
    mpp
        Micrometres per H&E pixel; default: from the transformations when the shapes are micrometres.
    table, shapes
        The table and the shapes element with the cells; default: ``table`` (or the only one) and the shapes
        the table annotates (or that carry its ids).
    coords
        Unit of the shapes' coordinates: ``um`` (spatialdata-io's Xenium), ``px``, or ``auto``: ``um`` when they
        equal the table's ``obsm["spatial"]`` (spatialdata-io writes 10x's micrometre centroids there), else ``px``.
    """
    path = Path(path)
    if not is_spatialdata_zarr(path):
        raise InvalidSampleError(f"{path} is not a SpatialData zarr store (a zarr folder with tables/)")
    sdata = _spatialdata().read_zarr(path)
    table_key = _pick(list(sdata.tables), table, "table", path, default=SpatialDataKeys.TABLE)
    adata = sdata.tables[table_key]
    attrs = dict(adata.uns.get(SpatialDataKeys.ATTRS) or {})
    region = attrs.get(SpatialDataKeys.REGION) or []
    region = [region] if isinstance(region, str) else list(region)
    instance_key = attrs.get(SpatialDataKeys.INSTANCE_KEY)
    ids = pd.Index(adata.obs[instance_key].map(as_str_id) if instance_key in adata.obs else adata.obs_names.map(as_str_id))
    shapes_key = _shapes_for(sdata, adata, region, ids, shapes, path)
    gdf = sdata.shapes[shapes_key]
    rows = pd.Index(gdf.index.map(as_str_id)).get_indexer(ids)
    if (rows < 0).all():
        raise InvalidSampleError(f"{path}: no cell of table {table_key!r} (e.g. {list(ids[:3])}) is in shapes "
                                 f"{shapes_key!r} (e.g. {list(gdf.index[:3])})")
    if (rows < 0).any():
        log.warning("%s: %d cells of table %r have no shape in %r and are left out", path.name, int((rows < 0).sum()),
                    table_key, shapes_key)
    own = _centres(gdf)[rows[rows >= 0]]

    image_key = Path(image).name if image is not None else None
    image_key = _pick(_rgb_images(sdata, path) if image_key is None else list(sdata.images), image_key,
                      "8-bit RGB image", path)
    slide = OmeZarrImage(path / SpatialDataKeys.IMAGES / image_key)
    to_image = np.linalg.inv(_affine(sdata.images[image_key], coordinate_system, image_key, path)) \
        @ _affine(gdf, coordinate_system, shapes_key, path)
    xy = (to_image @ np.column_stack([own, np.ones(len(own))]).T).T[:, :2]

    if coords == "auto":
        spatial = np.asarray(adata.obsm["spatial"], dtype=np.float64)[rows >= 0, :2] if "spatial" in adata.obsm else None
        coords = "um" if spatial is not None and np.allclose(spatial, own, rtol=1e-6, atol=1e-6) else "px"
    if mpp is None and coords == "um":
        mpp = float(np.sqrt(abs(np.linalg.det(np.linalg.inv(to_image)[:2, :2]))))  # image px -> shape um
        where = f"the transformations of {image_key!r} and {shapes_key!r} (shapes in micrometres)"
    else:
        where = "given" if mpp is not None else f"shapes {shapes_key!r} are not micrometres"
    sample_id = sample_id or path.stem
    mpp = check_mpp(mpp, sample_id, where)
    keep = inside_image(xy, slide.shape, sample_id, mpp, f"{path.name} shapes {shapes_key!r}")
    check_spacing(xy[keep], "px", mpp, sample_id, f"{path.name} shapes {shapes_key!r}")
    sub = adata[np.flatnonzero(rows >= 0)[keep]]
    counts = raw_counts(sub, f"{path} table {table_key!r}")
    drop = [c for c in (instance_key, attrs.get("region_key"), "cell_type", "sample_id") if c and c in sub.obs]
    obs = sub.obs.drop(columns=drop).reset_index(drop=True)
    obs = obs.loc[:, [c for c in obs.columns if obs[c].dtype.kind in "biuf" or str(obs[c].dtype) == "category"]]
    provenance = {"format": "spatialdata", "store": str(path.resolve()), "table": table_key, "shapes": shapes_key,
                  "image": image_key, "coordinate_system": coordinate_system, "coords": coords, "mpp_source": where}
    return Sample.from_arrays(
        counts, xy[keep], slide, mpp, list(map(str, sub.var_names)), sample_id,
        cell_ids=list(ids[rows >= 0][keep]), obs=obs if obs.shape[1] else None, provenance=plain_values(provenance, h5ad=True),
    )
