"""Nuclei detection that needs no download: colour deconvolution + threshold + distance-transform watershed.

Per tile (with an overlap margin, so a nucleus on a tile border is seen whole): haematoxylin optical density
from Ruifrok-Johnston deconvolution (scikit-image's ``rgb2hed``), lightly smoothed; a foreground mask above
``threshold_scale`` x Otsu's threshold (one threshold for the whole slide, from regions sampled over it), holes
filled, specks removed; touching nuclei split by a watershed on the distance transform seeded at its maxima
(at least ``min_distance_um`` apart); one centre per region (its centroid). A detection belongs to the tile
whose core holds it, so none is counted twice. Returns centres (x, y) in full-resolution pixels.

It finds nuclei, not cells: touching nuclei can merge and pale nuclei can be missed. Its precision and recall
on the virtual tissue are in benchmarks/results/detection.md.
"""

from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING

import numpy as np

from gcmoe.data.image import SlideImage
from gcmoe.errors import InvalidSampleError

if TYPE_CHECKING:
    from gcmoe.tissue import TissueMask

log = logging.getLogger(__name__)


def detect_nuclei(
    image: SlideImage,
    mpp: float,
    min_distance_um: float = 2.0,
    threshold_scale: float = 1.2,
    min_area_um2: float = 3.0,
    tile: int = 2048,
    progress: bool = False,
    tissue: TissueMask | None = None,
) -> np.ndarray:
    """Centres (n, 2) float64 (x, y) in full-resolution pixels of the nuclei found in ``image``.

    With ``tissue`` (:func:`gcmoe.tissue.detect_tissue`), only the tiles that touch tissue are read
    (:func:`detection_tiles`), the threshold is sampled on tissue, and nuclei off the tissue are dropped.
    """
    from scipy import ndimage as ndi
    from skimage.color import rgb2hed
    from skimage.feature import peak_local_max
    from skimage.filters import gaussian
    from skimage.segmentation import watershed

    if not mpp > 0:
        raise InvalidSampleError(f"nuclei detection needs the pixel size; got mpp={mpp}")
    height, width = image.shape
    smooth = max(0.5 / mpp, 0.5)  # 0.5 um
    min_distance = max(int(round(min_distance_um / mpp)), 1)
    min_area = max(min_area_um2 / mpp**2, 1.0)
    margin = int(np.ceil(12.0 / mpp))  # larger than a nucleus
    tiles = detection_tiles(image.shape, tile, tissue)
    threshold = threshold_scale * _global_threshold(image, smooth, tiles=None if tissue is None else tiles, tile=tile)
    found = []
    iterator = tiles
    if progress:
        from rich.progress import track

        iterator = track(tiles, description="detecting nuclei", transient=True)
    for x0, y0 in iterator:
        w, h = min(tile, width - x0), min(tile, height - y0)
        rgb = image.read_region(x0 - margin, y0 - margin, w + 2 * margin, h + 2 * margin)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # rgb2hed warns on pure white (log of zero handled by clipping)
            hema = gaussian(np.clip(rgb2hed(rgb)[..., 0], 0, None), sigma=smooth)
        mask = ndi.binary_fill_holes(hema > threshold)
        labels, _ = ndi.label(mask)
        sizes = np.bincount(labels.ravel())
        mask &= sizes[labels] >= min_area
        if not mask.any():
            continue
        dist = gaussian(ndi.distance_transform_edt(mask), sigma=smooth * 2)
        labels, _ = ndi.label(mask)
        peaks = peak_local_max(dist, min_distance=min_distance, labels=labels, exclude_border=False)
        markers = np.zeros(labels.shape, dtype=np.int32)
        markers[peaks[:, 0], peaks[:, 1]] = np.arange(1, len(peaks) + 1)
        regions = watershed(-dist, markers, mask=mask)
        index = np.arange(1, len(peaks) + 1)
        cy, cx = np.asarray(ndi.center_of_mass(mask, regions, index)).reshape(-1, 2).T
        xs, ys = cx - margin, cy - margin
        core = (xs >= 0) & (xs < w) & (ys >= 0) & (ys < h)
        found.append(np.column_stack([xs[core] + x0, ys[core] + y0]))
    centres = np.concatenate(found) if found else np.zeros((0, 2))
    if tissue is not None and len(centres):
        centres = centres[tissue.contains(centres)]
    log.info("detected %d nuclei in a %dx%d px image", len(centres), width, height)
    return centres.astype(np.float64)


def detection_tiles(shape: tuple[int, int], tile: int, tissue: TissueMask | None = None) -> list[tuple[int, int]]:
    """Origins (x0, y0) of the ``tile``-sided tiles :func:`detect_nuclei` reads: all of them, or with ``tissue``
    those that touch tissue."""
    height, width = shape
    tiles = [(x0, y0) for y0 in range(0, height, tile) for x0 in range(0, width, tile)]
    if tissue is not None:
        tiles = [(x0, y0) for x0, y0 in tiles if tissue.covers(x0, y0, x0 + tile, y0 + tile)]
    return tiles


def _global_threshold(image: SlideImage, sigma: float, n_samples: int = 16, size: int = 512,
                      tiles: list[tuple[int, int]] | None = None, tile: int = 2048) -> float:
    """Otsu's threshold of the smoothed haematoxylin map, on regions sampled over the whole slide (or within
    ``tiles``, origins of ``tile``-sided tiles), so every tile uses the same threshold (a tile of pure stroma
    does not lower it)."""
    from skimage.color import rgb2hed
    from skimage.filters import gaussian, threshold_otsu

    height, width = image.shape
    rng = np.random.default_rng(0)
    values = []
    if tiles is not None and not tiles:
        return float("inf")  # no tissue: nothing to threshold
    for _ in range(n_samples):
        if tiles is None:
            x = int(rng.integers(0, max(width - size, 1)))
            y = int(rng.integers(0, max(height - size, 1)))
        else:
            tx, ty = tiles[int(rng.integers(len(tiles)))]
            x = tx + int(rng.integers(0, max(min(tile, width - tx) - size, 1)))
            y = ty + int(rng.integers(0, max(min(tile, height - ty) - size, 1)))
        rgb = image.read_region(x, y, min(size, width), min(size, height))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            values.append(gaussian(np.clip(rgb2hed(rgb)[..., 0], 0, None), sigma=sigma).ravel()[::7])
    v = np.concatenate(values)
    if np.ptp(v) <= 0:
        return float(v.max()) + 1.0  # a blank image: nothing passes
    return float(threshold_otsu(v))


def match_centres(found: np.ndarray, truth: np.ndarray, radius_px: float) -> dict[str, float]:
    """Precision and recall of ``found`` against ``truth`` with one-to-one matching within ``radius_px``."""
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial import cKDTree

    if len(found) == 0 or len(truth) == 0:
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0, "matched": 0, "found": len(found), "truth": len(truth)}
    pairs = cKDTree(found).sparse_distance_matrix(cKDTree(truth), radius_px, output_type="coo_matrix")
    matched = 0
    if pairs.nnz:
        import scipy.sparse as sp
        from scipy.sparse.csgraph import connected_components

        # one-to-one matching: solve the assignment within each connected group of candidate pairs
        n_f, n_t = len(found), len(truth)
        graph = sp.bmat([[None, pairs.tocsr()], [pairs.T.tocsr(), None]])
        _, labels = connected_components(graph, directed=False)
        rows, cols, dist = pairs.row, pairs.col, pairs.data
        comp = labels[rows]
        for c in np.unique(comp):
            sel = comp == c
            r_ids, r_inv = np.unique(rows[sel], return_inverse=True)
            c_ids, c_inv = np.unique(cols[sel], return_inverse=True)
            cost = np.full((len(r_ids), len(c_ids)), 1e9)
            cost[r_inv, c_inv] = dist[sel]
            ri, ci = linear_sum_assignment(cost)
            matched += int((cost[ri, ci] < 1e9).sum())
        del n_f, n_t
    precision, recall = matched / len(found), matched / len(truth)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "matched": matched, "found": len(found), "truth": len(truth)}
