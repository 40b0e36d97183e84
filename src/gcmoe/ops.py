"""Small tensor operations shared by the feature builders and the models: torch only, no files, no settings.

A **disc** of radius r around a point c is the set of pixels whose centre lies within r of c (distance <= r);
pixel ``(row i, col j)`` spans ``[j, j + 1) x [i, i + 1)`` and has its centre at ``(j + 0.5, i + 0.5)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gcmoe.errors import ConfigError

__all__ = ["disc_pixels"]


def disc_pixels(centres: Tensor, radius: float, size: int) -> tuple[Tensor, Tensor, Tensor]:
    """The pixels of a ``size`` x ``size`` tile inside the disc of ``radius`` px around each centre.

    ``centres`` (n, 2) float, (x, y) working pixels. Returns ``(owner, row, col)``, three (nnz,) long tensors:
    disc ``owner[k]`` holds pixel ``(row[k], col[k])``; pixels outside the tile are left out. A disc whose
    radius is below half a pixel may hold no pixel at all.
    """
    if radius < 0:
        raise ConfigError(f"a disc radius must be >= 0 pixels, got {radius}")
    device = centres.device
    reach = int(math.ceil(radius)) + 1
    span = torch.arange(-reach, reach + 1, device=device)
    base = torch.floor(centres.double())  # the pixel holding each centre
    cols = base[:, 0, None, None] + span[None, None, :]  # (n, 1, K)
    rows = base[:, 1, None, None] + span[None, :, None]  # (n, K, 1)
    dx = cols + 0.5 - centres[:, 0, None, None].double()
    dy = rows + 0.5 - centres[:, 1, None, None].double()
    inside = (dx * dx + dy * dy <= radius * radius + 1e-9) & (cols >= 0) & (cols < size) & (rows >= 0) & (rows < size)
    owner, r_k, c_k = torch.nonzero(inside, as_tuple=True)
    return owner, base[owner, 1].long() + span[r_k], base[owner, 0].long() + span[c_k]
