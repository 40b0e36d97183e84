"""Spatial cross-validation folds: vertical strips within a slide, leave one slide out across slides.

Validation cells for early stopping are carved from each fold's training cells in square spatial blocks,
so that neither the test cells nor their immediate neighbours steer model selection.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gcmoe.errors import ConfigError, InvalidSampleError


@dataclass(frozen=True)
class Fold:
    """Indices into the pooled cells of a run. ``train``, ``val`` and ``test`` are disjoint."""

    name: str
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def vertical_strips(x: np.ndarray, n_folds: int) -> list[np.ndarray]:
    """Split cells into ``n_folds`` vertical strips (bands of x) holding equal numbers of cells.

    Strip k holds the cells whose x lies between the k-th and (k+1)-th quantile of x; ties at a boundary go
    to one strip only. Returns the sorted cell indices of each strip, left to right.
    """
    x = np.asarray(x, dtype=np.float64)
    if n_folds < 2:
        raise ConfigError(f"cross-validation needs at least 2 folds, got n_folds={n_folds}")
    if len(x) < n_folds:
        raise InvalidSampleError(f"{len(x)} cells cannot be split into {n_folds} strips; use fewer folds or more cells")
    order = np.argsort(x, kind="stable")
    return [np.sort(part) for part in np.array_split(order, n_folds)]


def carve_validation(
    xy: np.ndarray, train: np.ndarray, fraction: float, seed: int, blocks_per_side: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """Move about ``fraction`` of the ``train`` cells, in whole square blocks, to a validation set.

    The training cells' bounding box is cut into ``blocks_per_side`` x ``blocks_per_side`` squares of equal
    side; blocks are drawn in a seeded random order until the fraction is reached. Returns (train, val).
    """
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"val_fraction must lie in (0, 1), got {fraction}")
    pts = np.asarray(xy, dtype=np.float64)[train]
    lo = pts.min(axis=0)
    side = max(float((pts.max(axis=0) - lo).max()) / blocks_per_side, 1e-9)
    cell_block = np.floor((pts - lo) / side).astype(np.int64)
    block_id = cell_block[:, 0] * (blocks_per_side + 1) + cell_block[:, 1]
    blocks, counts = np.unique(block_id, return_counts=True)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(blocks))
    taken = np.cumsum(counts[perm])
    n_take = int(np.searchsorted(taken, fraction * len(train))) + 1
    n_take = min(n_take, len(blocks) - 1)  # always leave training blocks
    val_blocks = blocks[perm[:n_take]]
    is_val = np.isin(block_id, val_blocks)
    return np.sort(train[~is_val]), np.sort(train[is_val])


def make_folds(
    sample_ids: Sequence[str] | np.ndarray,
    xy: np.ndarray,
    scheme: str = "auto",
    n_folds: int = 5,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> list[Fold]:
    """Folds over pooled cells: strips of one slide, or leave-one-slide-out over several.

    ``scheme="auto"`` picks strips for one slide and leave-one-slide-out for several. Validation cells are
    carved from every training slide separately.
    """
    sample_ids = np.asarray(sample_ids).astype(str)
    xy = np.asarray(xy, dtype=np.float64)
    slides = list(dict.fromkeys(sample_ids))  # order of first appearance
    if scheme == "auto":
        scheme = "strips" if len(slides) == 1 else "leave_one_slide_out"
    all_idx = np.arange(len(sample_ids))
    if scheme == "strips":
        tests = []
        names = []
        for sid in slides:
            idx = all_idx[sample_ids == sid]
            for k, strip in enumerate(vertical_strips(xy[idx, 0], n_folds)):
                if len(tests) <= k:
                    tests.append([])
                    names.append(f"strip_{k + 1}")
                tests[k].append(idx[strip])
        test_sets = [np.sort(np.concatenate(t)) for t in tests]
    elif scheme == "leave_one_slide_out":
        if len(slides) < 2:
            raise ConfigError("leave_one_slide_out needs at least 2 slides; use scheme 'strips' for one slide")
        test_sets = [all_idx[sample_ids == sid] for sid in slides]
        names = [f"holdout_{sid}" for sid in slides]
    else:
        raise ConfigError(f"unknown cross-validation scheme {scheme!r}; use 'auto', 'strips' or 'leave_one_slide_out'")
    folds = []
    for k, (name, test) in enumerate(zip(names, test_sets)):
        rest = np.setdiff1d(all_idx, test, assume_unique=True)
        train_parts, val_parts = [], []
        for sid in slides:
            part = rest[sample_ids[rest] == sid]
            if len(part) == 0:
                continue
            tr, va = carve_validation(xy, part, val_fraction, seed + 1000 * k)
            train_parts.append(tr)
            val_parts.append(va)
        folds.append(Fold(name, np.sort(np.concatenate(train_parts)), np.sort(np.concatenate(val_parts)), test))
    return folds
