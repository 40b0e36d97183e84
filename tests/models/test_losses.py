"""Training losses: per-gene PCC over the batch, L_exp, and BLEEP*'s contrastive loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gcmoe.models.losses import batch_pearson, contrastive_loss, expression_loss


def test_batch_pearson_matches_numpy_per_gene():
    rng = np.random.default_rng(0)
    pred, target = rng.normal(size=(50, 3)), rng.normal(size=(50, 3))
    want = [np.corrcoef(pred[:, g], target[:, g])[0, 1] for g in range(3)]
    got = batch_pearson(torch.from_numpy(pred), torch.from_numpy(target)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_expression_loss_adds_the_weighted_mse():
    pred, target = torch.zeros(8, 2), torch.ones(8, 2)
    pred[0] = 1.0  # correlation still 0 for constant target: the loss is 1 + mse_weight * MSE
    assert expression_loss(pred, target).item() == pytest.approx(1.0)
    mse = torch.mean((pred - target) ** 2).item()
    assert expression_loss(pred, target, mse_weight=0.5).item() == pytest.approx(1.0 + 0.5 * mse)


def test_contrastive_loss_is_low_for_matched_pairs_and_symmetric():
    torch.manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(16, 8), dim=-1)
    matched = contrastive_loss(u, u, soft_targets=False).item()
    shuffled = contrastive_loss(u, u[torch.randperm(16)], soft_targets=False).item()
    assert matched < shuffled
    v = torch.nn.functional.normalize(torch.randn(16, 8), dim=-1)
    assert contrastive_loss(u, v).item() == pytest.approx(contrastive_loss(v, u).item(), rel=1e-5)


def test_contrastive_loss_with_identity_targets_is_clip_infonce():
    torch.manual_seed(1)
    u, v = torch.randn(6, 4), torch.randn(6, 4)
    logits = v @ u.T / 0.1
    labels = torch.arange(6)
    want = (torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels)) / 2
    assert contrastive_loss(u, v, soft_targets=False).item() == pytest.approx(want.item(), rel=1e-5)
