import torch

from gcmoe.models import create_model, list_models
from gcmoe.models.losses import batch_pearson, expression_loss


def test_every_registered_model_builds_and_predicts():
    for name in list_models():
        model = create_model(name, in_dim=8, n_genes=5)
        out = model(torch.randn(16, 8))
        assert out.prediction.shape == (16, 5)
        assert all(v.ndim == 0 for v in out.losses.values())


def test_pearson_loss():
    x = torch.randn(64, 4)
    assert torch.allclose(batch_pearson(x, 2 * x + 1), torch.ones(4), atol=1e-5)
    assert expression_loss(x, 3 * x).item() < 1e-5
    assert expression_loss(x, -x).item() > 1.99
    assert torch.isfinite(expression_loss(x, torch.zeros(64, 4)))  # constant target: finite, no NaN
