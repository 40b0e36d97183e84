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
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gcmoe.config import TrainConfig
from gcmoe.errors import ConfigError, TrainingError
from gcmoe.evaluation.metrics import pearson_per_gene
from gcmoe.models.base import CellModel
from gcmoe.models.losses import expression_loss
from gcmoe.training.cells import CellSource
from gcmoe.training.distributed import gather_rows, is_main_process, rank_world
from gcmoe.training.state import TrainingState, load_training_state, save_training_state, tensor_digest

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    best_epoch: int
    best_val_pcc: float
    epochs_run: int
    seconds: float
    train_cells_per_s: float  # training cells processed per second of optimisation (excludes validation)
    history: list[dict[str, float]]
    members: list[dict[str, float]] | None = None  # a seed ensemble's members (gcmoe.training.ensemble)


def run_fingerprint(config: TrainConfig, data: CellSource, train_idx: np.ndarray, val_idx: np.ndarray) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed: the training settings (bar device and threads) and
    hashes of the features, targets and cell split."""
    settings = {f"train.{k}": v for k, v in asdict(config).items() if k not in ("device", "num_threads")}
    return settings | data.digests() | {"split": tensor_digest(np.asarray(train_idx), np.asarray(val_idx))}


def seed_everything(seed: int) -> None:
    """Seed torch and numpy; CPU runs are then repeatable."""
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


@torch.no_grad()
def collect(
    model: CellModel, data: CellSource, idx: np.ndarray, fn: Callable[[CellModel, dict[str, Tensor]], Tensor],
    batch_size: int = 8192,
) -> np.ndarray:
    """``fn(model, batch)`` over cells ``idx`` in eval mode, in the order of ``idx`` (float32 numpy)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    result = None
    for source, local, where in data.eval_batches(np.asarray(idx), batch_size):
        batch = source.inputs(local, train=False)
        values = fn(model, {k: v.to(device) for k, v in batch.items()}).float().cpu().numpy()
        if result is None:
            result = np.empty((len(idx), *values.shape[1:]), dtype=np.float32)
        result[where] = values
        del source, batch  # one buffer of a cell store alive at a time
    model.train(was_training)
    return result if result is not None else np.zeros((0,), dtype=np.float32)


def predict(model: CellModel, data: CellSource, idx: np.ndarray, batch_size: int = 8192) -> np.ndarray:
    """Predictions for cells ``idx`` (float32, len(idx) x G), model in eval mode."""
    if len(idx) == 0:
        return np.zeros((0, data.n_targets), dtype=np.float32)
    return collect(model, data, idx, lambda m, b: m(**b).prediction, batch_size)


def _to(t: Tensor, device: torch.device) -> Tensor:
    """Move a batch tensor to ``device``; through pinned memory (asynchronously) for CUDA."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


_START_THREADS = torch.get_num_threads()


def default_threads() -> int:
    """torch's CPU threads when none are set: ``OMP_NUM_THREADS`` if given, else torch's count at import.

    Set again at every fit because numba's OpenMP layer, which scanpy's ``highly_variable_genes`` starts, resets
    the process's shared OpenMP thread count to numba's (all cores): with ``OMP_NUM_THREADS=1`` torch then ran
    on two threads, and two such processes on two cores trained up to 10x slower.
    """
    try:
        return max(int(os.environ["OMP_NUM_THREADS"]), 1)
    except (KeyError, ValueError):
        return _START_THREADS


def check_train_config(config: TrainConfig) -> None:
    """Refuse training settings that cannot train (ConfigError naming the setting), before any work."""
    import math

    for name in ("batch_size", "max_epochs", "patience"):
        if getattr(config, name) < 1:
            raise ConfigError(f"train.{name} must be at least 1, got {getattr(config, name)}")
    if not (math.isfinite(config.lr) and config.lr > 0):
        raise ConfigError(f"train.lr must be a positive number, got {config.lr}")
    if not (math.isfinite(config.weight_decay) and config.weight_decay >= 0):
        raise ConfigError(f"train.weight_decay must be a number >= 0, got {config.weight_decay}")
    try:
        device = torch.device(config.device)
    except RuntimeError as exc:
        raise ConfigError(f"train.device {config.device!r} is not a torch device (cpu, cuda, cuda:0, ...): {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device is {config.device!r} but this torch sees no CUDA device "
                          f"(torch {torch.__version__}); use device: cpu or a CUDA build of torch on a GPU machine")


def fit(
    model: CellModel,
    data: CellSource,
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
        raise TrainingError(f"{description}: training needs at least 2 training and 2 validation cells, got "
                            f"{len(train_idx)} and {len(val_idx)}; give a slide with more cells (or a larger "
                            "train.val_fraction when the validation cells are too few)")
    check_train_config(config)
    torch.set_num_threads(config.num_threads or default_threads())
    seed_everything(config.seed)
    device = torch.device(config.device)
    model.to(device)
    train_idx, val_idx = np.asarray(train_idx), np.asarray(val_idx)
    mean, std = data.feature_stats(train_idx)
    if not (bool(torch.isfinite(mean).all()) and bool(torch.isfinite(std).all())):
        raise TrainingError(f"{description}: the image features of the training cells hold NaN or infinite values "
                            "(their mean or standard deviation is not finite); the feature cache or cell store is "
                            "damaged or the encoder failed: delete the cache folder (<out>/cache) to recompute them")
    model.set_input_stats(mean.to(device), std.to(device))
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    val_true = data.targets_of(val_idx)
    if not np.isfinite(val_true).all():
        raise TrainingError(f"{description}: the targets of the validation cells hold NaN or infinite values; the "
                            "counts or the cell store are damaged: delete the cache folder (<out>/cache) and check the "
                            "counts")

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
            raise ConfigError(f"train.batch_size {config.batch_size} is smaller than the {world} processes; give a "
                              f"batch size of at least {world}")
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
            for source, idx in data.train_batches(train_idx, config.batch_size, generator):
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
                if not scaler.is_enabled() and not bool(torch.isfinite(loss.detach())):  # the scaler skips such steps
                    raise TrainingError(
                        f"{description}: the training loss became {float(loss.detach())} at epoch {epoch}: training "
                        f"diverged or a batch holds non-finite inputs; lower train.lr (now {config.lr}) or check the "
                        "features and counts")
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
            val_pred = predict(model, data, val_idx)
            if not np.isfinite(val_pred).all():
                raise TrainingError(
                    f"{description}: the model predicts NaN or infinite values for the validation cells at epoch "
                    f"{epoch}: training diverged; lower train.lr (now {config.lr})")
            r = pearson_per_gene(val_pred, val_true)
            if not np.isfinite(r).any():
                raise TrainingError(
                    f"{description}: the validation score is undefined at epoch {epoch}: no gene varies across the "
                    f"{len(val_idx)} validation cells (or the predictions are constant); give more cells or a larger "
                    "train.val_fraction")
            val_pcc = float(np.nanmean(r))
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
        train_cells_per_s=len(train_idx) * epoch / max(train_seconds, 1e-9),  # resumed: over all epochs
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
