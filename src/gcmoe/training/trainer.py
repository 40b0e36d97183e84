"""The one trainer every model goes through: Adam, mini-batches of cells, early stopping, best-weights restore.

Each epoch shuffles the training cells (seeded), steps Adam on L_exp (+ the model's weighted auxiliary
losses), then scores the validation cells by mean per-gene PCC. Training stops after ``patience`` epochs
without an improvement of at least ``min_delta``, and the weights of the best epoch are restored.

Two hooks let a model use its training cells beyond the loss (BLEEP*'s memory bank): ``fit`` calls
``model.on_validation_start(data, train_idx)`` before each validation pass and ``model.on_fit_end(data,
train_idx)`` once the best weights are restored (both no-ops in :class:`CellModel`). When ``CellData.groups``
is set (HisToGene*'s windows), a training batch is made of whole groups instead of single cells.

Under torchrun (:mod:`gcmoe.training.distributed`) each rank computes its share of every global batch and
the loss is that of the whole batch, so N processes train the weights one process would (to float tolerance).
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gcmoe.config import TrainConfig
from gcmoe.evaluation.metrics import pearson_per_gene
from gcmoe.features.context import ContextGrid, WindowTiling
from gcmoe.features.pixel_tiles import PixelTiles
from gcmoe.models.base import CellModel
from gcmoe.models.losses import expression_loss
from gcmoe.training.distributed import gather_rows, is_main_process, rank_world
from gcmoe.training.streaming import StreamingCells
from gcmoe.training.state import TrainingState, load_training_state, save_training_state, tensor_digest

log = logging.getLogger(__name__)


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


@dataclass
class FitResult:
    best_epoch: int
    best_val_pcc: float
    epochs_run: int
    seconds: float
    train_cells_per_s: float  # training cells processed per second of optimisation (excludes validation)
    history: list[dict[str, float]]


def run_fingerprint(config: TrainConfig, data: CellData, train_idx: np.ndarray, val_idx: np.ndarray) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed: the training settings (bar device and threads) and
    hashes of the features, targets and cell split."""
    settings = {f"train.{k}": v for k, v in asdict(config).items() if k not in ("device", "num_threads")}
    return settings | {
        "features": data.digest() if isinstance(data, StreamingCells) else tensor_digest(data.features),
        "targets": data.digest() if isinstance(data, StreamingCells) else tensor_digest(data.targets),
        "split": tensor_digest(np.asarray(train_idx), np.asarray(val_idx)),
    }


def seed_everything(seed: int) -> None:
    """Seed torch and numpy; CPU runs are then repeatable."""
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


@torch.no_grad()
def collect(
    model: CellModel, data: CellData, idx: np.ndarray, fn: Callable[[CellModel, dict[str, Tensor]], Tensor],
    batch_size: int = 8192,
) -> np.ndarray:
    """``fn(model, batch)`` over cells ``idx`` in eval mode, concatenated (float32 numpy)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    if isinstance(data, StreamingCells):
        result = None
        for source, local, where in data.eval_batches(np.asarray(idx), min(batch_size, data.eval_batch_size)):
            batch = source.inputs(local, train=False)
            values = fn(model, {k: v.to(device) for k, v in batch.items()}).float().cpu().numpy()
            if result is None:
                result = np.empty((len(idx), *values.shape[1:]), dtype=np.float32)
            result[where] = values
            del source, batch  # one buffer alive at a time
        model.train(was_training)
        return result if result is not None else np.zeros((0,), dtype=np.float32)
    out = []
    index = torch.as_tensor(np.asarray(idx), dtype=torch.long)
    for start in range(0, len(index), batch_size):
        batch = data.inputs(index[start : start + batch_size], train=False)
        out.append(fn(model, {k: v.to(device) for k, v in batch.items()}).float().cpu())
    model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros((0,), dtype=np.float32)


def predict(model: CellModel, data: CellData, idx: np.ndarray, batch_size: int = 8192) -> np.ndarray:
    """Predictions for cells ``idx`` (float32, len(idx) x G), model in eval mode."""
    if len(idx) == 0:
        return np.zeros((0, _n_targets(data)), dtype=np.float32)
    return collect(model, data, idx, lambda m, b: m(**b).prediction, batch_size)


def _to(t: Tensor, device: torch.device) -> Tensor:
    """Move a batch tensor to ``device``; through pinned memory (asynchronously) for CUDA."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


def _n_targets(data) -> int:
    return data.n_targets if isinstance(data, StreamingCells) else int(data.targets.shape[1])


def _epoch_batches(data, train_t: Tensor, batch_size: int, generator: torch.Generator, groups: Tensor | None):
    """(source CellData, its row indices) for each training batch of one epoch: the in-memory cells shuffled
    whole, or a cell store's buffers (:class:`~gcmoe.training.streaming.StreamingCells`)."""
    if isinstance(data, StreamingCells):
        yield from data.train_batches(train_t.numpy(), batch_size, generator)
        return
    for batch_pos in _batches(len(train_t), batch_size, generator, groups):
        yield data, train_t[batch_pos]


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


def fit(
    model: CellModel,
    data: CellData,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    config: TrainConfig,
    progress: bool = False,
    description: str = "training",
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    fingerprint: Mapping[str, Any] | None = None,
) -> FitResult:
    """Train ``model`` in place on ``train_idx`` with early stopping on ``val_idx``; restore the best weights.

    With ``checkpoint_dir``, the whole training state is saved there every ``config.checkpoint_every`` epochs
    and at the end (:mod:`gcmoe.training.state`); with ``resume`` too, training continues from the newest
    checkpoint there and ends with the weights an uninterrupted run would have. ``fingerprint`` (settings,
    model, data) is stored with each checkpoint; a resume whose fingerprint differs is refused.
    """
    if len(train_idx) < 2 or len(val_idx) < 2:
        raise ValueError(f"need at least 2 training and 2 validation cells, got {len(train_idx)} and {len(val_idx)}")
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    seed_everything(config.seed)
    device = torch.device(config.device)
    model.to(device)
    train_t = torch.as_tensor(np.asarray(train_idx), dtype=torch.long)
    if isinstance(data, StreamingCells):
        mean, std = data.feature_stats(np.asarray(train_idx))
        model.set_input_stats(mean.to(device), std.to(device))
    else:
        feats = data.features.index_select(0, train_t).float()
        model.set_input_stats(feats.mean(0).to(device), feats.std(0).to(device))
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    if isinstance(data, StreamingCells):
        val_true, train_groups = data.targets_of(np.asarray(val_idx)), None
    else:
        val_true = data.targets[torch.as_tensor(np.asarray(val_idx), dtype=torch.long)].numpy()
        train_groups = data.groups.index_select(0, train_t) if data.groups is not None else None

    best_state: Mapping[str, Tensor] = copy.deepcopy(model.state_dict())
    best_pcc, best_epoch, stale = -np.inf, 0, 0
    history: list[dict[str, float]] = []
    train_seconds = 0.0
    start_epoch, finished = 0, False
    fingerprint = dict(fingerprint or {}) | run_fingerprint(config, data, train_idx, val_idx)
    # mixed precision (train.amp): float16 with loss scaling on CUDA, bfloat16 on the CPU
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp and device.type == "cuda")
    if checkpoint_dir is not None and resume:
        state = load_training_state(checkpoint_dir, fingerprint)
        if state is not None:
            model.load_state_dict(state.model)
            best_state = {k: v.to(device) for k, v in state.best.items()}
            optimizer.load_state_dict(state.optimizer)
            generator.set_state(state.generator)
            torch.set_rng_state(state.torch_rng)
            np.random.set_state(state.numpy_rng)
            if state.scaler:
                scaler.load_state_dict(state.scaler)
            best_pcc, best_epoch, stale = state.best_pcc, state.best_epoch, state.stale
            history, train_seconds = state.history, state.train_seconds
            start_epoch, finished = state.epoch, state.finished
            log.info("%s: resumed after epoch %d (best epoch %d)", description, start_epoch, best_epoch)

    def save_state(epoch: int, done: bool) -> None:
        if checkpoint_dir is None or not is_main_process():
            return
        save_training_state(checkpoint_dir, TrainingState(
            epoch=epoch, best_pcc=float(best_pcc), best_epoch=best_epoch, stale=stale, train_seconds=train_seconds,
            history=history, finished=done, model=model.state_dict(), best=dict(best_state),
            optimizer=optimizer.state_dict(), generator=generator.get_state(), torch_rng=torch.get_rng_state(),
            numpy_rng=np.random.get_state(), scaler=scaler.state_dict()), fingerprint)

    rank, world = rank_world()
    net = model
    if world > 1:
        if config.batch_size < world:
            raise ValueError(f"batch size {config.batch_size} is smaller than the {world} processes")
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    start = time.perf_counter()
    bar = _progress(progress and not finished and rank == 0, description, config.max_epochs)
    if bar is not None and start_epoch:
        bar[0].update(bar[1], completed=start_epoch)
    epoch = start_epoch
    try:
        for epoch in range(start_epoch + 1, (start_epoch if finished else config.max_epochs) + 1):
            model.train()
            t0 = time.perf_counter()
            total, n_seen = 0.0, 0
            for source, idx in _epoch_batches(data, train_t, config.batch_size, generator, train_groups):
                shares = idx.tensor_split(world)
                batch = {k: _to(v, device) for k, v in source.inputs(shares[rank], train=True).items()}
                target = _to(source.targets.index_select(0, idx), device)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=config.amp):
                    out = net(**batch)
                pred = out.prediction.float()
                pred = pred if world == 1 else gather_rows(pred, [len(p) for p in shares])
                loss = expression_loss(pred, target, config.mse_weight)
                for aux in out.losses.values():
                    loss = loss + aux.float()
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                total += float(loss.detach()) * len(idx)
                n_seen += len(idx)
                # drop this step's references before the next buffer of a cell store is loaded (one at a time)
                del source, batch, target, out, pred, loss
            train_seconds += time.perf_counter() - t0
            model.on_validation_start(data, train_idx)
            r = pearson_per_gene(predict(model, data, val_idx), val_true)
            val_pcc = float(np.nanmean(r)) if np.isfinite(r).any() else float("nan")
            history.append({"epoch": epoch, "train_loss": total / max(n_seen, 1), "val_pcc": val_pcc})
            if np.isfinite(val_pcc) and val_pcc > best_pcc + config.min_delta:
                best_pcc, best_epoch, stale = val_pcc, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                stale += 1
            if bar is not None:
                bar[0].update(bar[1], advance=1, description=f"{description} val PCC {val_pcc:.3f}")
            if stale >= config.patience:
                break
            if config.checkpoint_every and epoch % config.checkpoint_every == 0:
                save_state(epoch, done=False)
        if not finished:
            save_state(epoch, done=True)
    finally:
        if bar is not None:
            bar[0].stop()
    model.load_state_dict(best_state)
    model.on_fit_end(data, train_idx)
    seconds = time.perf_counter() - start
    log.info("%s: best epoch %d (val PCC %.4f) of %d, %.1f s", description, best_epoch, best_pcc, epoch, seconds)
    return FitResult(
        best_epoch=best_epoch,
        best_val_pcc=float(best_pcc),
        epochs_run=epoch,
        seconds=seconds,
        train_cells_per_s=len(train_t) * epoch / max(train_seconds, 1e-9),  # resumed: over all epochs
        history=history,
    )


def _progress(enabled: bool, description: str, total: int):
    """A transient rich progress bar over epochs, or None."""
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True)
    task = bar.add_task(description, total=total)
    bar.start()
    return bar, task
