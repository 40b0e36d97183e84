"""The cells a trainer reads: one protocol, :class:`CellSource`, whether they are in memory or streamed.

:class:`CellData` holds per-cell tensors in memory and builds each batch's model inputs (features, and the
neighbours, windows, context squares or pixel tiles a model asks for). A cell store read from disk
(:class:`gcmoe.training.streaming.StreamingCells`) serves the same protocol with one buffer of chunks at a
time; each of its buffers is a :class:`CellData`. The trainer only calls the protocol's methods.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from gcmoe.features.context import ContextGrid, WindowTiling
from gcmoe.features.pixel_tiles import PixelTiles
from gcmoe.training.state import tensor_digest

__all__ = ["CellData", "CellSource"]


class CellSource(Protocol):
    """What the trainer needs of its cells: statistics, targets, and batches of model inputs.

    A batch comes as (a :class:`CellData` holding its cells, their rows in it); ``rows`` given to the
    methods index the source's cells.
    """

    @property
    def n_targets(self) -> int: ...

    def digests(self) -> dict[str, str]:
        """Hashes of the features and targets (``{"features", "targets"}``)."""
        ...

    def feature_stats(self, idx: np.ndarray) -> tuple[Tensor, Tensor]:
        """Mean and standard deviation (ddof 1) of the features of cells ``idx``."""
        ...

    def targets_of(self, idx: np.ndarray) -> np.ndarray:
        """Targets of cells ``idx`` (in that order), float32."""
        ...

    def train_batches(self, train_idx: np.ndarray, batch_size: int, generator: torch.Generator
                      ) -> Iterator[tuple[CellData, Tensor]]:
        """One epoch of shuffled training batches (seeded by ``generator``)."""
        ...

    def eval_batches(self, idx: np.ndarray, batch_size: int) -> Iterator[tuple[CellData, Tensor, np.ndarray]]:
        """Evaluation batches over cells ``idx``, with each batch's positions in ``idx``."""
        ...


@dataclass
class CellData:
    """Per-cell tensors of a run, indexed by cell.

    ``features`` (N, D) and ``targets`` (N, G) always; ``neighbours`` (N, M) long with -1 padding when a model
    attends to neighbours (their features are gathered from ``features`` by index, offsets computed from
    ``positions``); ``cell_type`` (N,) long with -1 = unknown, passed to the model during training only.
    ``windows`` (a :class:`~gcmoe.features.context.WindowTiling`) and ``context`` (a
    :class:`~gcmoe.features.context.ContextGrid`) give the wider contexts of HisToGene* and TRIPLEX*; like
    neighbours they hold indices, and features are gathered per batch. ``positions`` (N, 2) micrometres go
    with any of the three. ``groups`` (N,) long: cells of one group share their training batch (default: the
    owning window when ``windows`` is given). ``targets_as_input``: the model also receives the measured
    ``targets`` of its training batch (contrastive or multi-view losses); never at prediction. ``pixels`` (a
    :class:`~gcmoe.features.pixel_tiles.PixelTiles`, GHIST*): raw H&E tiles, each cell owned by one tile;
    the batch gets the owning tiles' pixels (read per batch) and each cell's tile row and position, plus the
    tiles' nuclei targets in training; cells of a tile share their training batch (default ``groups``).
    """

    features: Tensor
    targets: Tensor
    cell_type: Tensor | None = None
    neighbours: Tensor | None = None
    positions: Tensor | None = None
    windows: WindowTiling | None = None
    context: ContextGrid | None = None
    groups: Tensor | None = None
    targets_as_input: bool = False
    pixels: PixelTiles | None = None

    def __post_init__(self) -> None:
        n = self.features.shape[0]
        for name in ("targets", "cell_type", "neighbours", "positions", "groups"):
            value = getattr(self, name)
            if value is not None and value.shape[0] != n:
                raise ValueError(f"{name} has {value.shape[0]} rows, features {n}: one row per cell is needed")
        spatial = [k for k in ("neighbours", "windows", "context") if getattr(self, k) is not None]
        if bool(spatial) != (self.positions is not None):
            raise ValueError("positions go with neighbours, windows or context (and only with them)")
        if self.windows is not None:
            w = self.windows
            if len(w.cell_window) != n:
                raise ValueError(f"the window tiling covers {len(w.cell_window)} cells, features {n}")
            self._win_members = torch.as_tensor(w.members, dtype=torch.long)
            self._win_centres = torch.as_tensor(w.centres, dtype=torch.float32)
            self._cell_window = torch.as_tensor(w.cell_window, dtype=torch.long)
            self._cell_slot = torch.as_tensor(w.cell_slot, dtype=torch.long)
            if self.groups is None:
                self.groups = self._cell_window
        if self.context is not None:
            c = self.context
            if len(c.context) != n:
                raise ValueError(f"the context grid covers {len(c.context)} cells, features {n}")
            self._ctx_index = torch.as_tensor(c.context, dtype=torch.long)
            self._ctx_features = torch.from_numpy(c.mean_features(self.features.float().numpy()))
            self._ctx_centres = torch.as_tensor(c.centres, dtype=torch.float32)
        if self.pixels is not None:
            if len(self.pixels.cell_tile) != n:
                raise ValueError(f"the pixel tiling covers {len(self.pixels.cell_tile)} cells, features {n}")
            if self.groups is None:
                self.groups = torch.as_tensor(self.pixels.cell_tile, dtype=torch.long)

    def inputs(self, idx: Tensor, train: bool) -> dict[str, Tensor]:
        """The model's keyword inputs for cells ``idx``."""
        batch = {"features": self.features.index_select(0, idx)}
        if self.neighbours is not None:
            nbr = self.neighbours.index_select(0, idx)  # (B, M)
            mask = nbr >= 0
            flat = nbr.clamp(min=0).reshape(-1)
            batch["neighbour_features"] = self.features.index_select(0, flat).reshape(*nbr.shape, -1)
            own = self.positions.index_select(0, idx).unsqueeze(1)
            batch["neighbour_offsets"] = self.positions.index_select(0, flat).reshape(*nbr.shape, 2) - own
            batch["neighbour_mask"] = mask
        if self.windows is not None:
            batch.update(self._window_inputs(idx))
        if self.context is not None:
            ctx = self._ctx_index.index_select(0, idx)  # (B, R)
            flat = ctx.clamp(min=0).reshape(-1)
            batch["context_features"] = self._ctx_features.index_select(0, flat).reshape(*ctx.shape, -1)
            own = self.positions.index_select(0, idx).unsqueeze(1)
            batch["context_offsets"] = self._ctx_centres.index_select(0, flat).reshape(*ctx.shape, 2) - own
            batch["context_mask"] = ctx >= 0
        if self.pixels is not None:
            batch.update(self.pixels.inputs(idx, train))
        if train and self.cell_type is not None:
            batch["cell_type"] = self.cell_type.index_select(0, idx)
        if train and self.targets_as_input:
            batch["targets"] = self.targets.index_select(0, idx)
        return batch

    def _window_inputs(self, idx: Tensor) -> dict[str, Tensor]:
        """The windows owning cells ``idx``, each once: their members' features and offsets from the window
        centre (U, T, ...), and for each cell its window's row (``window_index``) and its own column."""
        owner = self._cell_window.index_select(0, idx)
        windows, row = torch.unique(owner, return_inverse=True)
        members = self._win_members.index_select(0, windows)  # (U, T_max)
        mask = members >= 0
        width = int(mask.sum(1).max())  # windows are filled from the left
        members, mask = members[:, :width], mask[:, :width]
        flat = members.clamp(min=0).reshape(-1)
        centres = self._win_centres.index_select(0, windows).unsqueeze(1)
        return {
            "window_features": self.features.index_select(0, flat).reshape(*members.shape, -1),
            "window_offsets": self.positions.index_select(0, flat).reshape(*members.shape, 2) - centres,
            "window_mask": mask,
            "window_index": row,
            "window_slot": self._cell_slot.index_select(0, idx),
        }

    # --- the trainer's protocol (:class:`CellSource`), all cells in memory ---

    @property
    def n_targets(self) -> int:
        return int(self.targets.shape[1])

    def digests(self) -> dict[str, str]:
        """Hashes of the features and targets (what a resumed training must agree on)."""
        return {"features": tensor_digest(self.features), "targets": tensor_digest(self.targets)}

    def feature_stats(self, idx: np.ndarray) -> tuple[Tensor, Tensor]:
        """Mean and standard deviation (ddof 1) of the features of cells ``idx``."""
        feats = self.features.index_select(0, torch.as_tensor(np.asarray(idx), dtype=torch.long)).float()
        return feats.mean(0), feats.std(0)

    def targets_of(self, idx: np.ndarray) -> np.ndarray:
        """Targets of cells ``idx`` (in that order)."""
        return self.targets[torch.as_tensor(np.asarray(idx), dtype=torch.long)].numpy()

    def train_batches(self, train_idx: np.ndarray, batch_size: int, generator: torch.Generator
                      ) -> Iterator[tuple[CellData, Tensor]]:
        """One epoch: (this CellData, the rows of a batch), all training cells shuffled (whole groups together)."""
        train_t = torch.as_tensor(np.asarray(train_idx), dtype=torch.long)
        groups = self.groups.index_select(0, train_t) if self.groups is not None else None
        for batch_pos in _batches(len(train_t), batch_size, generator, groups):
            yield self, train_t[batch_pos]

    def eval_batches(self, idx: np.ndarray, batch_size: int) -> Iterator[tuple[CellData, Tensor, np.ndarray]]:
        """(this CellData, rows of a batch, positions of those cells in ``idx``), in order."""
        index = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        for start in range(0, len(index), batch_size):
            stop = min(start + batch_size, len(index))
            yield self, index[start:stop], np.arange(start, stop)


def _batches(n: int, batch_size: int, generator: torch.Generator, groups: Tensor | None = None) -> list[Tensor]:
    """A seeded shuffle of range(n) in near-equal batches of about ``batch_size`` (none tiny).

    With ``groups`` (n,), the groups are shuffled and each batch holds whole groups: batches are cut at the
    group boundary nearest to each multiple of n / n_batches.
    """
    perm = torch.randperm(n, generator=generator)
    n_batches = max(1, round(n / batch_size))
    if groups is None:
        return list(torch.tensor_split(perm, n_batches))
    _, code = torch.unique(groups, return_inverse=True)
    group_rank = torch.randperm(int(code.max()) + 1, generator=generator)[code]
    order = perm[torch.argsort(group_rank[perm], stable=True)]  # groups in random order, cells shuffled within
    ends = torch.cumsum(torch.bincount(group_rank, minlength=int(group_rank.max()) + 1), 0).numpy()
    cuts = sorted({int(ends[np.abs(ends - n * b / n_batches).argmin()]) for b in range(1, n_batches)} - {0, n})
    return list(torch.tensor_split(order, cuts))
