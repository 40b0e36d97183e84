import torch

from gcmoe.models import create_model, list_models
from gcmoe.models.losses import batch_pearson, expression_loss


def test_every_registered_model_builds_and_predicts():
    inputs = {
        "features": torch.randn(16, 8),
        "neighbour_features": torch.randn(16, 4, 8),
        "neighbour_offsets": torch.randn(16, 4, 2),
        "neighbour_mask": torch.ones(16, 4, dtype=torch.bool),
        "cell_type": torch.zeros(16, dtype=torch.long),
    }
    for name in list_models():
        model = create_model(name, in_dim=8, n_genes=5)
        out = model(**inputs)
        assert out.prediction.shape == (16, 5)
        assert all(v.ndim == 0 for v in out.losses.values())


def test_pearson_loss():
    x = torch.randn(64, 4)
    assert torch.allclose(batch_pearson(x, 2 * x + 1), torch.ones(4), atol=1e-5)
    assert expression_loss(x, 3 * x).item() < 1e-5
    assert expression_loss(x, -x).item() > 1.99
    assert torch.isfinite(expression_loss(x, torch.zeros(64, 4)))  # constant target: finite, no NaN
