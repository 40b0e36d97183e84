"""What every cell-level model shares: input standardisation buffers and the output type.

A model maps a batch of cell tensors to predicted targets. Auxiliary losses (routing, co-expression,
contrastive, ...) come back beside the prediction in :class:`ModelOutput`, already multiplied by the
weights the model was built with, so the trainer only sums them.

Shapes: ``features`` (B, D) -> ``prediction`` (B, G).
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from gcmoe.models.inputs import InputGeometry, ModelInputs


class ModelOutput(NamedTuple):
    prediction: Tensor  # (B, G)
    losses: dict[str, Tensor]  # weighted auxiliary losses; empty for plain regressors


class CellModel(nn.Module):
    """Base class: holds the feature mean/std of the training cells as buffers (saved with the weights).

    ``inputs`` declares what the model needs beyond its cells' features (:class:`ModelInputs`); a subclass
    whose settings change it sets it per instance.
    """

    inputs: ClassVar[ModelInputs] = ModelInputs()

    def __init__(self, in_dim: int, n_genes: int) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.n_genes = n_genes
        self.register_buffer("feature_mean", torch.zeros(in_dim))
        self.register_buffer("feature_std", torch.ones(in_dim))

    def set_input_stats(self, mean: Tensor, std: Tensor) -> None:
        """Standardise inputs with these statistics (computed on training cells only)."""
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(torch.clamp(std, min=1e-6))

    def standardize(self, features: Tensor) -> Tensor:
        return (features - self.feature_mean) / self.feature_std

    def input_geometry(self) -> InputGeometry:
        """The sizes of the wider inputs this model was built for (windows, context grid, pixel tiles)."""
        return InputGeometry()

    @property
    def routes(self) -> bool:
        """Whether the model routes cells to experts (:meth:`routing` then gives the probabilities)."""
        return False

    def routing(self, **inputs: Tensor) -> Tensor:
        """The routing probabilities (B, K) of a batch's inputs, for models that route."""
        raise NotImplementedError(f"{type(self).__name__} does not route cells to experts")

    def on_validation_start(self, data, train_idx) -> None:
        """Called by the trainer before each validation pass with the run's ``CellData`` and the training
        cells (e.g. to rebuild a memory bank from them with the current weights). No-op by default."""

    def on_fit_end(self, data, train_idx) -> None:
        """Called by the trainer once the best weights are restored. No-op by default."""
