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
        # HisToGene*'s windows: 3 windows of up to 10 cells; cell b sits in window b % 3, column b // 3
        "window_features": torch.randn(3, 10, 8),
        "window_offsets": torch.randn(3, 10, 2) * 50,
        "window_mask": torch.arange(10).expand(3, 10) < torch.tensor([[6], [5], [5]]),
        "window_index": torch.arange(16) % 3,
        "window_slot": torch.arange(16) // 3,
        # TRIPLEX*'s context grid: 3 x 3 squares, the own square (middle) always present
        "context_features": torch.randn(16, 9, 8),
        "context_offsets": torch.randn(16, 9, 2) * 100,
        "context_mask": torch.ones(16, 9, dtype=torch.bool),
        "targets": torch.randn(16, 5),
        # GHIST*'s raw pixels: 2 tiles of 64 px (its default), cell b in tile b % 2, inside the margin
        "tile_pixels": torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8),
        "tile_index": torch.arange(16) % 2,
        "cell_xy": torch.rand(16, 2) * 40 + 12,
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
