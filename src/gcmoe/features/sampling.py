"""Read features at cell centres from a tile's feature map by bilinear interpolation.

Convention (exact). Continuous tile coordinates ``(u, v)``: input pixel ``k`` spans ``[k, k + 1)``.
A feature map of ``(h, w)`` pixels at stride ``s`` has its pixel ``(row j, column i)`` at the point
``((i + 0.5) * s, (j + 0.5) * s)`` (see :mod:`gcmoe.features.registry`). The feature at ``(u, v)`` is the
bilinear interpolation of the four surrounding feature pixels, i.e. ``grid_sample`` with
``align_corners=False`` at the normalised point ``(2 u / (w s) - 1, 2 v / (h s) - 1)``. Within half a
feature pixel of the map's edge, the edge values are extended (``padding_mode="border"``); tiling keeps
cells far from tile edges, so that only matters for direct calls.

So if the feature map holds ``a + b * x_c + c * y_c`` at each pixel centre ``(x_c, y_c)``, the value read at
``(u, v)`` is exactly ``a + b * u + c * v`` anywhere between the outermost pixel centres.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["sample_feature_map", "to_grid"]


def to_grid(uv: torch.Tensor, stride: int, map_size: tuple[int, int]) -> torch.Tensor:
    """Continuous tile coordinates (n, 2) ``(u, v)`` -> ``grid_sample`` coordinates in [-1, 1] (n, 2)."""
    h, w = map_size
    scale = torch.tensor([2.0 / (w * stride), 2.0 / (h * stride)], dtype=uv.dtype, device=uv.device)
    return uv * scale - 1.0


def sample_feature_map(feature_map: torch.Tensor, uv: torch.Tensor | np.ndarray, stride: int) -> torch.Tensor:
    """Bilinear features at points of one tile.

    Parameters
    ----------
    feature_map
        ``(D, h, w)`` the encoder's output for one tile.
    uv
        ``(n, 2)`` continuous ``(x, y)`` coordinates in the tile's input pixels.
    stride
        Input pixels per feature-map pixel.

    Returns
    -------
    ``(n, D)`` tensor on the feature map's device and dtype.
    """
    if feature_map.ndim != 3:
        raise ValueError(f"feature_map must be (D, h, w), got {tuple(feature_map.shape)}")
    uv = torch.as_tensor(uv, dtype=torch.float64, device=feature_map.device)
    if uv.ndim != 2 or uv.shape[1] != 2:
        raise ValueError(f"points must be (n, 2) (x, y), got {tuple(uv.shape)}")
    d, h, w = feature_map.shape
    if uv.shape[0] == 0:
        return feature_map.new_zeros((0, d))
    grid = to_grid(uv, stride, (h, w)).to(feature_map.dtype).view(1, 1, -1, 2)
    out = F.grid_sample(
        feature_map.unsqueeze(0), grid, mode="bilinear", padding_mode="border", align_corners=False
    )  # (1, D, 1, n)
    return out[0, :, 0, :].T
