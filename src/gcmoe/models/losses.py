"""Training losses shared by all models.

L_exp = 1 - (1/G) sum_g r_g, with r_g the Pearson correlation over the cells of the mini-batch between
predicted and measured expression of gene g; optionally + w * MSE. Genes constant in a batch contribute
r = 0 through the epsilon in the denominator rather than NaN.

BLEEP*'s contrastive loss, for image embeddings u_i and expression embeddings v_i of the batch's cells:
    logits_ij = v_i . u_j / tau,   T = softmax_rows((u u^T + v v^T) / (2 tau))   (BLEEP's soft targets)
    L = mean_i [ CE(T_i, softmax(logits_i)) + CE(T^T_i, softmax(logits^T_i)) ] / 2
With ``soft_targets=False``, T is the identity (CLIP's InfoNCE).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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


def contrastive_loss(image: Tensor, expression: Tensor, temperature: float = 0.1, soft_targets: bool = True) -> Tensor:
    """Symmetric CLIP-style loss between paired embeddings (BLEEP's soft targets by default).

    Shapes: image (B, P), expression (B, P) (unit vectors in BLEEP*) -> scalar.
    """
    logits = expression @ image.T / temperature
    if soft_targets:
        targets = torch.softmax((image @ image.T + expression @ expression.T) / (2 * temperature), dim=-1)
    else:
        targets = torch.eye(len(image), dtype=image.dtype, device=image.device)
    expression_loss_ = -(targets * F.log_softmax(logits, dim=-1)).sum(-1)
    image_loss = -(targets.T * F.log_softmax(logits.T, dim=-1)).sum(-1)
    return ((expression_loss_ + image_loss) / 2).mean()
