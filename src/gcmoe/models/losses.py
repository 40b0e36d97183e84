"""Training losses shared by all models.

L_exp = 1 - (1/G) sum_g r_g, with r_g the Pearson correlation over the cells of the mini-batch between
predicted and measured expression of gene g; optionally + w * MSE. Genes constant in a batch contribute
r = 0 through the epsilon in the denominator rather than NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor


def batch_pearson(pred: Tensor, target: Tensor, eps: float = 1e-8) -> Tensor:
    """Per-gene Pearson r across the batch's cells. Shapes: (B, G), (B, G) -> (G,)."""
    pc = pred - pred.mean(dim=0, keepdim=True)
    tc = target - target.mean(dim=0, keepdim=True)
    num = (pc * tc).sum(dim=0)
    den = torch.sqrt((pc * pc).sum(dim=0) * (tc * tc).sum(dim=0) + eps)
    return num / den


def expression_loss(pred: Tensor, target: Tensor, mse_weight: float = 0.0) -> Tensor:
    """L_exp: 1 - mean per-gene PCC over the batch, plus ``mse_weight`` * MSE."""
    loss = 1.0 - batch_pearson(pred, target).mean()
    if mse_weight:
        loss = loss + mse_weight * torch.mean((pred - target) ** 2)
    return loss
