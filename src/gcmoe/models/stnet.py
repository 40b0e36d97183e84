"""ST-Net*: the single-cell adaptation of ST-Net, a regression head on each cell's image feature.

ST-Net fine-tunes a DenseNet on spot crops and regresses genes with one linear layer. Here the image
encoder is shared and frozen (same features for every method), so ST-Net* is an MLP on the cell feature:
    y_i = W_2 · dropout(GELU(W_1 · z_i + b_1)) + b_2,   z_i = standardised f_i.

Shapes: features (B, D) -> prediction (B, G).
"""

from __future__ import annotations

from torch import Tensor, nn

from gcmoe.models.base import CellModel, ModelOutput
from gcmoe.models.registry import register_model


class STNet(CellModel):
    """MLP regression head on cell features."""

    def __init__(self, in_dim: int, n_genes: int, hidden: int = 256, dropout: float = 0.1) -> None:
        super().__init__(in_dim, n_genes)
        self.head = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, n_genes)
        )

    def forward(self, features: Tensor, **_: Tensor) -> ModelOutput:
        return ModelOutput(self.head(self.standardize(features)), {})


@register_model("stnet", "ST-Net*", "MLP head on the cell's frozen image feature (ST-Net adapted to cells)")
def create_stnet(in_dim: int, n_genes: int, hidden: int = 256, dropout: float = 0.1) -> STNet:
    return STNet(in_dim, n_genes, hidden=hidden, dropout=dropout)
