"""Training a seed ensemble (``train.ensemble`` = N): N members of one model, each fit on its own, averaged.

Member 0 is the model as a single run would train it (same seed); member m > 0 starts from weights drawn with
seed ``seed + m * SEED_STRIDE`` and trains with that seed (batch order, dropout). The validation cells, genes,
features and every other setting are shared. With one member, this is :func:`gcmoe.training.trainer.fit`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from gcmoe.config import TrainConfig
from gcmoe.errors import ConfigError
from gcmoe.models.base import CellModel
from gcmoe.models.ensemble import SeedEnsemble
from gcmoe.training.cells import CellSource
from gcmoe.training.trainer import FitResult, fit, predict, seed_everything

SEED_STRIDE = 1000  # far from the per-fold seed offsets (seed + fold index) of cross-validation


def member_seeds(config: TrainConfig) -> list[int]:
    """The training seed of each member."""
    if isinstance(config.ensemble, bool) or not isinstance(config.ensemble, int) or config.ensemble < 1:
        raise ConfigError(f"train.ensemble must be a whole number of at least 1 (models averaged), got "
                          f"{config.ensemble!r}")
    return [config.seed + m * SEED_STRIDE for m in range(config.ensemble)]


def fit_ensemble(
    model: CellModel,
    new_member: Callable[[], CellModel],
    data: CellSource,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    config: TrainConfig,
    progress: bool = False,
    description: str = "training",
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    fingerprint: Mapping[str, Any] | None = None,
) -> tuple[CellModel, FitResult]:
    """Train ``model`` (member 0) and ``config.ensemble - 1`` more from ``new_member()``; return the model (or the
    :class:`SeedEnsemble` of all members) and its fit summary.

    Each member is checkpointed in ``checkpoint_dir/member-<m>`` (a single model in ``checkpoint_dir``), so a
    resumed run keeps the members that finished. The summary's validation PCC is the ensemble's; epochs and times
    add up over the members; ``members`` holds each member's own summary.
    """
    seeds = member_seeds(config)
    if len(seeds) == 1:
        return model, fit(model, data, train_idx, val_idx, config, progress, description, checkpoint_dir, resume,
                          fingerprint)
    members, results = [], []
    for m, seed in enumerate(seeds):
        if m:
            seed_everything(seed)
            model = new_member()
        where = None if checkpoint_dir is None else Path(checkpoint_dir) / f"member-{m}"
        results.append(fit(model, data, train_idx, val_idx, replace(config, seed=seed), progress,
                           f"{description} [member {m + 1}/{len(seeds)}]", where, resume, fingerprint))
        members.append(model)
    ensemble = SeedEnsemble(members)
    from gcmoe.evaluation.metrics import pearson_per_gene

    val_pcc = float(np.nanmean(pearson_per_gene(predict(ensemble, data, val_idx), data.targets_of(val_idx))))
    train_seconds = sum(r.epochs_run * len(train_idx) / r.train_cells_per_s for r in results)
    summary = FitResult(
        best_epoch=int(round(np.mean([r.best_epoch for r in results]))),
        best_val_pcc=val_pcc,
        epochs_run=sum(r.epochs_run for r in results),
        seconds=sum(r.seconds for r in results),
        train_cells_per_s=sum(r.epochs_run for r in results) * len(train_idx) / max(train_seconds, 1e-9),
        history=results[0].history,
        members=[{"seed": s, "best_epoch": r.best_epoch, "val_pcc": r.best_val_pcc, "epochs_run": r.epochs_run}
                 for s, r in zip(seeds, results)],
    )
    return ensemble, summary
