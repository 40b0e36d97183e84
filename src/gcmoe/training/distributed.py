"""Data-parallel training with torch.distributed: one process per device, launched by ``torchrun``.

Every rank sees the same shuffled global batch and computes the model on its share of the cells; the
predictions are gathered (with gradients) so the loss — 1 - PCC per gene, which does not split into a sum
over cells — is the loss of the whole global batch, exactly as in a single process. DistributedDataParallel
then averages the gradients. Validation and early stopping run identically on every rank; only rank 0 writes.
"""

from __future__ import annotations

import datetime
import logging
import os

import torch
from torch import Tensor

log = logging.getLogger(__name__)


def rank_world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside a process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    return rank_world()[0] == 0


def init_from_env(device: str = "cpu", timeout_s: float | None = None) -> str:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1); returns the device this rank uses.

    The backend is nccl on CUDA and gloo on the CPU. ``timeout_s`` bounds how long a collective (a barrier)
    waits for the other ranks (torch's default, 10 to 30 minutes, when None). Outside torchrun this does nothing
    and returns ``device``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return device
    device = local_device(device)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    kwargs = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
    torch.distributed.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo", **kwargs)
    log.info("rank %d of %d on %s", torch.distributed.get_rank(), world, device)
    return device


def local_device(device: str) -> str:
    """This process's device: a CUDA device becomes ``cuda:<LOCAL_RANK>`` under torchrun (one GPU per process)."""
    if device.startswith("cuda") and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def gather_rows(local: Tensor, sizes: list[int]) -> Tensor:
    """Concatenate every rank's ``local`` rows in rank order (``sizes`` rows each), keeping gradients."""
    from torch.distributed.nn.functional import all_gather

    rank, _ = rank_world()
    width = max(sizes)
    padded = local
    if local.shape[0] < width:
        padded = torch.cat([local, local.new_zeros(width - local.shape[0], *local.shape[1:])])
    parts = all_gather(padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])
