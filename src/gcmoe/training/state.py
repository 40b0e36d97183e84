"""Resumable training: the trainer's whole state in a folder, written atomically, refused when it does not fit.

A checkpoint is one folder ``epoch-000012/`` under the run's checkpoint directory:

    state.safetensors   model weights, best weights so far, Adam's moments, the RNG states (tensors only)
    state.json          epoch, early-stopping state, history, optimizer hyper-parameters, the numpy RNG
                        state, the run's fingerprint (config, model, data hashes) and the SHA-256 of
                        state.safetensors

It is written as ``.epoch-000012.tmp/`` and renamed when complete, so a crash mid-write leaves the previous
checkpoint intact; older checkpoints are removed after the new one is in place. Nothing is pickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gcmoe.files import file_sha256, publish, remove_owned, temporary_path
from gcmoe.training.checkpoint import CheckpointError

FORMAT = "gcmoe-training-state/1"
_PREFIX = "epoch-"


@dataclass
class TrainingState:
    """What the trainer needs to continue exactly where it stopped."""

    epoch: int
    best_pcc: float
    best_epoch: int
    stale: int
    train_seconds: float
    history: list[dict[str, float]]
    finished: bool
    model: dict[str, Tensor]
    best: dict[str, Tensor]
    optimizer: dict[str, Any]
    generator: Tensor
    torch_rng: Tensor
    numpy_rng: tuple
    scaler: dict[str, Any] | None = None  # GradScaler state (mixed precision on CUDA); empty when unused


def tensor_digest(*tensors: Tensor | np.ndarray) -> str:
    """SHA-256 (16 hex digits) of arrays' shapes, dtypes and bytes: identifies a run's data."""
    h = hashlib.sha256()
    for t in tensors:
        a = t.detach().cpu().numpy() if isinstance(t, Tensor) else np.asarray(t)
        a = np.ascontiguousarray(a)
        h.update(f"{a.shape}{a.dtype}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def save_training_state(folder: str | os.PathLike, state: TrainingState, fingerprint: Mapping[str, Any]) -> Path:
    """Write ``state`` as ``folder/epoch-NNNNNN`` atomically; remove older checkpoints. Returns the new folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{_PREFIX}{state.epoch:06d}"
    final = folder / name
    tmp = temporary_path(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors: dict[str, Tensor] = {}
    tensors.update({f"model.{k}": v for k, v in state.model.items()})
    tensors.update({f"best.{k}": v for k, v in state.best.items()})
    for idx, slots in state.optimizer["state"].items():
        for key, value in slots.items():
            tensors[f"optim.{idx}.{key}"] = value if isinstance(value, Tensor) else torch.tensor(value)
    tensors["rng.generator"] = state.generator
    tensors["rng.torch"] = state.torch_rng
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(state.numpy_rng[1], dtype=np.int64))
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / "state.safetensors"))
    meta = {
        "format": FORMAT,
        "epoch": state.epoch,
        "best_pcc": state.best_pcc if np.isfinite(state.best_pcc) else None,
        "best_epoch": state.best_epoch,
        "stale": state.stale,
        "train_seconds": state.train_seconds,
        "history": state.history,
        "finished": state.finished,
        "param_groups": state.optimizer["param_groups"],
        "numpy_rng": [state.numpy_rng[0], int(state.numpy_rng[2]), int(state.numpy_rng[3]), float(state.numpy_rng[4])],
        "scaler": dict(state.scaler or {}),
        "fingerprint": dict(fingerprint),
        "sha256": file_sha256(tmp / "state.safetensors"),
    }
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    publish(tmp, final)
    for old in folder.glob(f"{_PREFIX}*"):
        if old != final and old.is_dir():
            remove_owned(old)
    return final


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder under ``folder``, or None."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    done = sorted(p for p in folder.glob(f"{_PREFIX}*") if (p / "state.json").is_file())
    return done[-1] if done else None


def load_training_state(folder: str | os.PathLike, fingerprint: Mapping[str, Any]) -> TrainingState | None:
    """The newest checkpoint under ``folder`` (None when there is none).

    Raises CheckpointError when it is damaged (checksum) or belongs to another run: the message names every
    fingerprint field that differs (settings, model, data).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = latest_checkpoint(folder)
    if path is None:
        return None
    try:
        meta = json.loads((path / "state.json").read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path / 'state.json'} is not valid JSON ({exc}); delete {path} to start over") from exc
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown training-state format {meta.get('format')!r}")
    weights = path / "state.safetensors"
    if not weights.is_file() or file_sha256(weights) != meta.get("sha256"):
        raise CheckpointError(f"{weights} is missing or does not match its checksum: the checkpoint is damaged; "
                              f"delete {path} to resume from scratch")
    saved = meta.get("fingerprint", {})
    differs = [k for k in sorted(set(saved) | set(fingerprint)) if saved.get(k) != fingerprint.get(k)]
    if differs:
        detail = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {fingerprint.get(k)!r}" for k in differs)
        raise CheckpointError(f"cannot resume from {path}: it was made by a different run ({detail}). "
                              "Resume with the same settings and data, or start in a new output folder.")
    try:
        tensors = load_file(str(weights), device="cpu")
    except SafetensorError as exc:
        raise CheckpointError(f"{weights} cannot be read ({exc})") from exc
    model = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
    optim_state: dict[int, dict[str, Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, key = k.split(".", 2)
            optim_state.setdefault(int(idx), {})[key] = v
    kind, pos, has_gauss, cached = meta["numpy_rng"]
    numpy_rng = (kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached)
    return TrainingState(
        epoch=int(meta["epoch"]),
        best_pcc=float("-inf") if meta["best_pcc"] is None else float(meta["best_pcc"]),
        best_epoch=int(meta["best_epoch"]),
        stale=int(meta["stale"]),
        train_seconds=float(meta["train_seconds"]),
        history=list(meta["history"]),
        finished=bool(meta["finished"]),
        model=model,
        best=best,
        optimizer={"state": optim_state, "param_groups": meta["param_groups"]},
        generator=tensors["rng.generator"],
        torch_rng=tensors["rng.torch"],
        numpy_rng=numpy_rng,
        scaler=meta.get("scaler") or None,
    )
