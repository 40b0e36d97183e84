"""Regions of the virtual tissue and where its cells sit.

The tissue is laid out on a grid of 2 um cells: glass, fat, tumour nests (thresholded smooth random fields),
normal ducts (lumens lined by one or two luminal layers and an outer myoepithelial layer), small vessels
(endothelium around a lumen holding red cells), immune infiltrates (stroma close to the tumour and the ducts)
and collagenous stroma with a fibre direction that wraps around the nests. Free cells are dropped at region
densities, given a subtype by the region's mix and pushed apart until nuclei no longer overlap (cohesive
nests, packed lymphocytes, sparse fibroblasts along the fibres).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from gcmoe.data.virtual_tissue.cell_types import BASE_NAMES, TypeSet
from gcmoe.data.virtual_tissue.fields import sample_grid, smooth_field

log = logging.getLogger(__name__)

REGION_NAMES = ("background", "fat", "stroma", "tumour", "immune", "epithelium", "lumen", "vessel")
BACKGROUND, FAT, STROMA, TUMOUR, IMMUNE, EPITHELIUM, LUMEN, VESSEL = range(len(REGION_NAMES))
_NO_CELLS = (BACKGROUND, LUMEN, VESSEL)  # regions a free cell may not be pushed into

GRID_UM = 2.0  # size of one layout grid cell, micrometres
GLASS_FRACTION = 0.04  # of the image: no tissue
FAT_FRACTION = 0.10  # of the tissue
TUMOUR_FRACTION = 0.40  # of the non-fat tissue
IMMUNE_FRACTION = 0.24  # of the stroma left after ducts and vessels
DUCT_SHARE = 0.075  # of the cells: luminal + myoepithelial cells in ducts
VESSEL_SHARE = 0.025  # of the cells: endothelium of small vessels
# Free-cell density per region, cells per um^2 (relative; rescaled to n_cells).
DENSITY = {TUMOUR: 1 / 110.0, IMMUNE: 1 / 52.0, STROMA: 1 / 330.0, FAT: 1 / 2500.0}
# Subtype mix of the free cells of each region (base subtype names).
REGION_MIX = {
    TUMOUR: {"malignant": 0.88, "T_cell": 0.06, "macrophage": 0.04, "fibroblast": 0.02},
    IMMUNE: {"T_cell": 0.50, "B_cell": 0.22, "plasma_cell": 0.10, "macrophage": 0.12, "fibroblast": 0.04,
             "endothelial": 0.02},
    STROMA: {"fibroblast": 0.62, "macrophage": 0.09, "T_cell": 0.12, "plasma_cell": 0.06, "B_cell": 0.03,
             "endothelial": 0.08},
    FAT: {"fibroblast": 0.4, "endothelial": 0.3, "macrophage": 0.3},
}


@dataclass
class Layout:
    """Cells and regions of one tissue.

    Attributes
    ----------
    xy
        (n_cells, 2) cell centres, (x, y) full-resolution pixels, inside the image.
    subtype
        (n_cells,) index into the TypeSet's subtypes.
    region
        (n_cells,) region code of each cell (see ``REGION_NAMES``).
    orientation
        (n_cells,) direction of the nucleus' long axis, radians in image (x, y); NaN where free.
    region_map
        (gh, gw) uint8 region codes on the layout grid, ``step`` pixels per grid cell.
    fibre_angle
        (gh, gw) float32 collagen fibre direction, radians.
    rbc_xy, adipocyte_xy
        Centres (x, y) px of red blood cells (inside vessels) and of fat cells.
    """

    xy: np.ndarray
    subtype: np.ndarray
    region: np.ndarray
    orientation: np.ndarray
    region_map: np.ndarray
    step: float
    fibre_angle: np.ndarray
    rbc_xy: np.ndarray
    adipocyte_xy: np.ndarray


class _Cells:
    """Accumulates structured cells (ducts, vessels)."""

    def __init__(self) -> None:
        self.xy: list[np.ndarray] = []
        self.name: list[np.ndarray] = []
        self.angle: list[np.ndarray] = []
        self.region: list[np.ndarray] = []

    def add(self, xy: np.ndarray, name: str, angle: np.ndarray, region: int) -> None:
        self.xy.append(xy)
        self.name.append(np.full(len(xy), name, dtype=object))
        self.angle.append(angle)
        self.region.append(np.full(len(xy), region, dtype=np.int8))

    def __len__(self) -> int:
        return int(sum(len(a) for a in self.xy))


def _ring(centre: np.ndarray, axes: tuple[float, float], angle: float, spacing: float, jitter: float,
          rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Points spaced along an ellipse (um) and the outward normal angle at each."""
    a, b = axes
    perimeter = np.pi * (3 * (a + b) - np.sqrt((3 * a + b) * (a + 3 * b)))
    n = max(3, int(round(perimeter / spacing)))
    t = np.linspace(0, 2 * np.pi, n, endpoint=False) + rng.uniform(0, 2 * np.pi)
    t += rng.normal(0, 0.5 * np.pi / n, n)
    local = np.column_stack([a * np.cos(t), b * np.sin(t)])
    normal = np.arctan2(np.sin(t) / b, np.cos(t) / a) + angle
    c, s = np.cos(angle), np.sin(angle)
    pts = centre + local @ np.array([[c, s], [-s, c]])
    pts += rng.normal(0, jitter, pts.shape)
    return pts, normal


def _ellipse_mask(shape: tuple[int, int], centre_g: np.ndarray, axes_g: tuple[float, float], angle: float,
                  box: float | None = None) -> tuple[tuple[slice, slice], np.ndarray]:
    """Grid cells inside an ellipse (grid units): the bounding slices (half-side ``box``) and the mask in them."""
    r = (box if box is not None else max(axes_g)) + 1
    y0, y1 = max(int(centre_g[1] - r), 0), min(int(centre_g[1] + r) + 2, shape[0])
    x0, x1 = max(int(centre_g[0] - r), 0), min(int(centre_g[0] + r) + 2, shape[1])
    yy, xx = np.mgrid[y0:y1, x0:x1]
    dx, dy = xx + 0.5 - centre_g[0], yy + 0.5 - centre_g[1]
    c, s = np.cos(angle), np.sin(angle)
    u, v = dx * c + dy * s, -dx * s + dy * c
    return (slice(y0, y1), slice(x0, x1)), (u / axes_g[0]) ** 2 + (v / axes_g[1]) ** 2 < 1


def _place_ducts(region_map: np.ndarray, um_cell: float, budget: int, cells: _Cells, rng: np.random.Generator) -> int:
    """Normal ducts in the stroma: lumen, luminal layer(s), myoepithelial layer. Returns the number placed."""
    allowed = region_map == STROMA
    allowed[[0, -1], :] = False
    allowed[:, [0, -1]] = False
    edt = ndimage.distance_transform_edt(allowed) * um_cell
    placed = n_ducts = 0
    for _ in range(60):
        if placed >= budget:
            break
        r_lumen = rng.uniform(5.0, 22.0)
        aspect = rng.uniform(1.0, 1.7)
        angle = rng.uniform(0, np.pi)
        a, b = r_lumen * np.sqrt(aspect), r_lumen / np.sqrt(aspect)
        two_layers = r_lumen > 12.0
        d_myo = (9.0 if two_layers else 3.5) + 5.5
        outer = d_myo + 3.0
        cand = np.flatnonzero(edt.ravel() >= a + outer + 4.0)
        if cand.size == 0:
            continue
        g = cand[rng.integers(cand.size)]
        centre = (np.array([g % region_map.shape[1], g // region_map.shape[1]]) + rng.uniform(0, 1, 2)) * um_cell
        parts = [_ring(centre, (a + 3.5, b + 3.5), angle, 7.0, 0.5, rng)]
        if two_layers:
            xy2, n2 = _ring(centre, (a + 9.0, b + 9.0), angle, 7.5, 0.6, rng)
            keep = rng.random(len(xy2)) < 0.6
            parts.append((xy2[keep], n2[keep]))
        myo = _ring(centre, (a + d_myo, b + d_myo), angle, 12.0, 0.5, rng)
        n_new = sum(len(p[0]) for p in parts) + len(myo[0])
        if placed + n_new > budget * 1.15 + 2:
            continue
        for xy, normal in parts:
            cells.add(xy, "luminal", normal, EPITHELIUM)  # columnar: long axis radial
        cells.add(myo[0], "myoepithelial", myo[1] + np.pi / 2, EPITHELIUM)  # flattened: tangential
        cg = centre / um_cell
        sl, outer_mask = _ellipse_mask(region_map.shape, cg, ((a + outer) / um_cell, (b + outer) / um_cell), angle)
        _, lumen_mask = _ellipse_mask(region_map.shape, cg, (a / um_cell, b / um_cell), angle,
                                      box=(a + outer) / um_cell)
        region_map[sl][outer_mask] = EPITHELIUM
        region_map[sl][lumen_mask] = LUMEN
        sl, halo = _ellipse_mask(region_map.shape, cg, ((a + outer + 8) / um_cell, (b + outer + 8) / um_cell), angle)
        allowed[sl][halo] = False
        edt = ndimage.distance_transform_edt(allowed) * um_cell
        placed += n_new
        n_ducts += 1
    return n_ducts


def _place_vessels(region_map: np.ndarray, um_cell: float, budget: int, cells: _Cells,
                   rng: np.random.Generator) -> np.ndarray:
    """Small vessels: an endothelial ring around a lumen with red cells. Returns red-cell centres (um)."""
    allowed = np.isin(region_map, (STROMA, FAT))
    allowed[[0, -1], :] = False
    allowed[:, [0, -1]] = False
    edt = ndimage.distance_transform_edt(allowed) * um_cell
    cand = np.flatnonzero(edt.ravel() >= 10.0)
    rng.shuffle(cand)
    centres: list[np.ndarray] = []
    rbc: list[np.ndarray] = []
    placed = 0
    for g in cand[:4000]:
        if placed >= budget:
            break
        centre = (np.array([g % region_map.shape[1], g // region_map.shape[1]]) + 0.5) * um_cell
        if centres and np.min(np.hypot(*(np.asarray(centres) - centre).T)) < 28.0:
            continue
        r = rng.uniform(2.5, 6.5)
        aspect = rng.uniform(1.0, 2.2)
        angle = rng.uniform(0, np.pi)
        a, b = r * np.sqrt(aspect), r / np.sqrt(aspect)
        xy, normal = _ring(centre, (a + 1.6, b + 1.6), angle, 10.0, 0.3, rng)
        if len(xy) > 3:
            xy, normal = xy[: max(2, len(xy) - 1)], normal[: max(2, len(xy) - 1)]
        cells.add(xy, "endothelial", normal + np.pi / 2, STROMA)
        placed += len(xy)
        centres.append(centre)
        sl, mask = _ellipse_mask(region_map.shape, centre / um_cell, (a / um_cell, b / um_cell), angle)
        region_map[sl][mask] = VESSEL
        n_rbc = rng.poisson(np.pi * a * b / 30.0 * rng.uniform(0.3, 1.0))
        if n_rbc:
            rr = np.sqrt(rng.random(n_rbc)) * 0.7
            tt = rng.uniform(0, 2 * np.pi, n_rbc)
            local = np.column_stack([a * rr * np.cos(tt), b * rr * np.sin(tt)])
            c, s = np.cos(angle), np.sin(angle)
            rbc.append(centre + local @ np.array([[c, s], [-s, c]]))
    return np.concatenate(rbc) if rbc else np.zeros((0, 2))


def _largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
    """Integers proportional to ``weights`` that sum exactly to ``total``."""
    if total <= 0 or weights.sum() <= 0:
        return np.zeros(len(weights), dtype=np.int64)
    raw = weights / weights.sum() * total
    out = np.floor(raw).astype(np.int64)
    rest = total - out.sum()
    out[np.argsort(-(raw - out), kind="stable")[:rest]] += 1
    return out


def _relax(xy: np.ndarray, radius: np.ndarray, mobile: np.ndarray, region_map: np.ndarray, step: float,
           shape: tuple[int, int], rng: np.random.Generator, n_iter: int = 10) -> np.ndarray:
    """Push overlapping nuclei apart (fixed cells do not move; moves into lumens or glass are refused)."""
    n = len(xy)
    if n < 2:
        return xy
    hi = np.array([shape[1] - 1.0, shape[0] - 1.0])
    for _ in range(n_iter):
        pairs = cKDTree(xy).query_pairs(2 * float(radius.max()), output_type="ndarray")
        if len(pairs) == 0:
            break
        i, j = pairs[:, 0], pairs[:, 1]
        d = xy[j] - xy[i]
        dist = np.hypot(d[:, 0], d[:, 1])
        need = radius[i] + radius[j]
        over = (dist < need) & (mobile[i] | mobile[j])
        if not over.any():
            break
        i, j, d, dist, need = i[over], j[over], d[over], dist[over], need[over]
        tiny = dist < 1e-6
        d[tiny] = rng.normal(size=(int(tiny.sum()), 2))
        dist = np.where(tiny, np.hypot(d[:, 0], d[:, 1]), dist)
        unit = d / dist[:, None]
        mi, mj = mobile[i].astype(float), mobile[j].astype(float)
        share_i, share_j = mi / (mi + mj), mj / (mi + mj)
        push = (need - dist)[:, None] * unit
        disp = np.zeros_like(xy)
        for axis in (0, 1):
            disp[:, axis] -= np.bincount(i, push[:, axis] * share_i, minlength=n)
            disp[:, axis] += np.bincount(j, push[:, axis] * share_j, minlength=n)
        new = np.clip(xy + 0.5 * disp, 0.5, hi - 0.5)
        bad = np.isin(sample_grid(region_map, new, step), _NO_CELLS) | ~mobile
        xy = np.where(bad[:, None], xy, new)
    return xy


def _adipocytes(region_map: np.ndarray, um_cell: float, rng: np.random.Generator) -> np.ndarray:
    """Centres (um) of fat cells: well-spaced seeds in the fat region (their Voronoi cells are the adipocytes)."""
    fat = np.flatnonzero(region_map.ravel() == FAT)
    if fat.size == 0:
        return np.zeros((0, 2))
    n_try = int(fat.size * um_cell**2 / (np.pi * 16.0**2)) + 1
    g = fat[rng.integers(fat.size, size=n_try)]
    pts = (np.column_stack([g % region_map.shape[1], g // region_map.shape[1]]) + rng.random((n_try, 2))) * um_cell
    keep: list[int] = []
    tree_pts: list[np.ndarray] = []
    for k, p in enumerate(pts):
        if tree_pts and np.min(np.hypot(*(np.asarray(tree_pts) - p).T)) < 34.0:
            continue
        keep.append(k)
        tree_pts.append(p)
    return pts[keep]


def _onto_membranes(xy: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """Move points onto the nearest adipocyte membrane (the bisector of their two nearest fat-cell centres)."""
    if len(xy) == 0 or len(seeds) < 2:
        return xy
    _, nn = cKDTree(seeds).query(xy, k=2)
    s1, s2 = seeds[nn[:, 0]], seeds[nn[:, 1]]
    normal = (s2 - s1) / np.maximum(np.hypot(*(s2 - s1).T), 1e-9)[:, None]
    along = ((xy - 0.5 * (s1 + s2)) * normal).sum(axis=1)
    return xy - along[:, None] * normal


def build_layout(height: int, width: int, mpp: float, n_cells: int, types: TypeSet, radius_um: np.ndarray,
                 rng: np.random.Generator) -> Layout:
    """Lay out regions and place exactly ``n_cells`` cells.

    Parameters
    ----------
    height, width, mpp
        Image size in pixels and micrometres per pixel.
    n_cells
        Number of cells to place.
    types
        Subtypes of the tissue (variants of a base subtype take over part of its cells, in clonal patches).
    radius_um
        (n_subtypes,) exclusion radius of each subtype's nucleus, micrometres.
    rng
        Random generator (the layout's own stream).
    """
    step = max(1.0, GRID_UM / mpp)  # px per grid cell
    um_cell = step * mpp
    gshape = (int(np.ceil(height / step)), int(np.ceil(width / step)))
    cells_um = lambda um: um / um_cell  # noqa: E731

    region_map = np.full(gshape, STROMA, dtype=np.uint8)
    f_tissue = smooth_field(gshape, cells_um(120.0), rng)
    glass = f_tissue < np.quantile(f_tissue, GLASS_FRACTION)
    f_fat = smooth_field(gshape, cells_um(90.0), rng)
    fat = ~glass & (f_fat > np.quantile(f_fat[~glass], 1 - FAT_FRACTION))
    f_tum = 0.75 * smooth_field(gshape, cells_um(38.0), rng) + 0.55 * smooth_field(gshape, cells_um(220.0), rng)
    rest = ~glass & ~fat
    tumour = rest & (f_tum > np.quantile(f_tum[rest], 1 - TUMOUR_FRACTION))
    tumour = ndimage.binary_opening(tumour, iterations=2) & rest
    region_map[glass] = BACKGROUND
    region_map[fat] = FAT
    region_map[tumour] = TUMOUR

    structured = _Cells()
    n_ducts = _place_ducts(region_map, um_cell, int(round(DUCT_SHARE * n_cells)), structured, rng)
    rbc_um = _place_vessels(region_map, um_cell, int(round(VESSEL_SHARE * n_cells)), structured, rng)

    # immune infiltrates: stroma near the tumour and the ducts, plus aggregates where a random field peaks
    d_tum = ndimage.distance_transform_edt(region_map != TUMOUR) * um_cell
    d_duct = ndimage.distance_transform_edt(~np.isin(region_map, (EPITHELIUM, LUMEN))) * um_cell
    f_imm = smooth_field(gshape, cells_um(28.0), rng) + 1.1 * np.exp(-d_tum / 35.0) + 0.7 * np.exp(-d_duct / 25.0)
    stroma = region_map == STROMA
    if stroma.any():
        region_map[stroma & (f_imm > np.quantile(f_imm[stroma], 1 - IMMUNE_FRACTION))] = IMMUNE

    # free cells: counts per region by area x density, positions uniform inside, subtype by the region's mix
    n_struct = len(structured)
    if n_struct > n_cells:  # tiny tissues: keep the first structured cells only
        log.debug("dropping %d structured cells to fit n_cells=%d", n_struct - n_cells, n_cells)
    codes = sorted(DENSITY)
    areas = np.array([(region_map == c).sum() for c in codes], dtype=float)
    counts = _largest_remainder(areas * np.array([DENSITY[c] for c in codes]), max(n_cells - n_struct, 0))
    xy_free, name_free, region_free = [], [], []
    for code, count in zip(codes, counts):
        if count == 0:
            continue
        where = np.flatnonzero(region_map.ravel() == code)
        g = where[rng.integers(where.size, size=count)]
        pos = (np.column_stack([g % gshape[1], g // gshape[1]]) + rng.random((count, 2))) * um_cell
        mix = REGION_MIX[code]
        xy_free.append(pos)
        name_free.append(rng.choice(np.array(list(mix), dtype=object), size=count, p=np.array(list(mix.values()))))
        region_free.append(np.full(count, code, dtype=np.int8))

    def cat(parts: list[np.ndarray], empty: np.ndarray) -> np.ndarray:
        return np.concatenate(parts) if parts else empty

    adipocytes = _adipocytes(region_map, um_cell, rng)
    xy_um = cat(structured.xy + xy_free, np.zeros((0, 2)))[:n_cells]
    names = cat(structured.name + name_free, np.zeros(0, dtype=object))[:n_cells]
    region = cat(structured.region + region_free, np.zeros(0, dtype=np.int8))[:n_cells]
    orientation = cat(structured.angle + [np.full(len(p), np.nan) for p in xy_free], np.zeros(0))[:n_cells]
    in_fat = region == FAT
    xy_um[in_fat] = _onto_membranes(xy_um[in_fat], adipocytes)
    mobile = np.arange(len(xy_um)) >= min(n_struct, n_cells)
    mobile &= ~in_fat  # fat-cell nuclei stay on the membranes
    base = np.array([BASE_NAMES.index(n) for n in names], dtype=np.int64)
    base = _ensure_all_base(base, mobile, rng)

    xy = np.clip(xy_um / mpp, 0.5, np.array([width - 1.5, height - 1.5]))
    base_radius = np.asarray(radius_um)[: len(BASE_NAMES)]  # the TypeSet lists the base subtypes first
    xy = _relax(xy, base_radius[base] / mpp, mobile, region_map, step, (height, width), rng)
    xy = np.clip(xy, 0.0, np.array([width - 1.0, height - 1.0]))
    subtype = _assign_variants(base, xy, types, gshape, step, cells_um, rng)

    # fibre direction: along the contours of a smoothed structure map (wraps around nests and ducts)
    struct = np.isin(region_map, (TUMOUR, EPITHELIUM, LUMEN)).astype(np.float32)
    potential = ndimage.gaussian_filter(struct, cells_um(18.0)) + 0.12 * smooth_field(gshape, cells_um(70.0), rng)
    gy, gx = np.gradient(potential)
    fibre_angle = (np.arctan2(gy, gx) + np.pi / 2).astype(np.float32)
    fibre_like = np.isin(base, [BASE_NAMES.index("fibroblast"), BASE_NAMES.index("endothelial")]) & np.isnan(orientation)
    orientation[fibre_like] = sample_grid(fibre_angle, xy[fibre_like], step) + rng.normal(0, 0.2, int(fibre_like.sum()))

    log.debug("layout: %d ducts, %d structured + %d free cells, grid %s", n_ducts, n_struct, n_cells - n_struct, gshape)
    return Layout(
        xy=xy,
        subtype=subtype,
        region=region.astype(np.int8),
        orientation=orientation,
        region_map=region_map,
        step=step,
        fibre_angle=fibre_angle,
        rbc_xy=rbc_um / mpp,
        adipocyte_xy=adipocytes / mpp,
    )


def _ensure_all_base(base: np.ndarray, mobile: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Give every base subtype a few cells (tiny tissues may lack ducts or infiltrates)."""
    n_types = len(BASE_NAMES)
    want = min(3, len(base) // (2 * n_types))
    if want == 0:
        return base
    base = base.copy()
    for b in range(n_types):
        have = int((base == b).sum())
        if have >= want:
            continue
        counts = np.bincount(base, minlength=n_types)
        donors = np.flatnonzero(mobile & (counts[base] > 2 * want) & (base != b))
        if donors.size:
            take = rng.choice(donors, size=min(want - have, donors.size), replace=False)
            base[take] = b
            log.debug("too few %s cells for this tissue size: converted %d cells", BASE_NAMES[b], take.size)
    return base


def _assign_variants(base: np.ndarray, xy: np.ndarray, types: TypeSet, gshape: tuple[int, int], step: float,
                     cells_um, rng: np.random.Generator) -> np.ndarray:
    """Map base subtype indices to TypeSet indices; variants take clonal patches of their base's cells."""
    subtype = np.empty(len(base), dtype=np.int64)
    base_of = types.base_index
    for b in range(len(BASE_NAMES)):
        members = np.flatnonzero(base_of == b)  # the base subtype first, then its variants
        idx = np.flatnonzero(base == b)
        if len(members) == 1 or idx.size == 0:
            subtype[idx] = members[0]
            continue
        field = sample_grid(smooth_field(gshape, cells_um(80.0), rng), xy[idx], step)
        ranks = np.argsort(np.argsort(field, kind="stable"), kind="stable")
        subtype[idx] = members[np.minimum(ranks * len(members) // idx.size, len(members) - 1)]
    return subtype
