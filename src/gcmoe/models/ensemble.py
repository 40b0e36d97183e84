"""A seed ensemble: N copies of one model, trained from different seeds, whose predictions are averaged.

Members differ only in their initial weights and batch order (``train.ensemble``; docs/gcmoe.md "Seed
ensembles"). The ensemble predicts the mean of the members' predictions and, for models that route, the mean of
their routing probabilities. It is not trained as one module: each member goes through the trainer on its own
(:func:`gcmoe.training.ensemble.fit_ensemble`).

Shapes: as the members' (``features`` (B, D) -> ``prediction`` (B, G)).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gcmoe.models.base import CellModel, ModelOutput
from gcmoe.models.inputs import InputGeometry


class SeedEnsemble(CellModel):
    """Members of one architecture (same constructor settings), averaged."""

    def __init__(self, members: list[CellModel]) -> None:
        if not members:
            raise ValueError("a seed ensemble needs at least one member")
        first = members[0]
        if any(type(m) is not type(first) or (m.in_dim, m.n_genes) != (first.in_dim, first.n_genes) for m in members):
            raise ValueError("the members of a seed ensemble must be one model with the same input and output sizes")
        super().__init__(first.in_dim, first.n_genes)
        self.members = nn.ModuleList(members)
        self.inputs = first.inputs

    def set_input_stats(self, mean: Tensor, std: Tensor) -> None:
        super().set_input_stats(mean, std)
        for member in self.members:
            member.set_input_stats(mean, std)

    def input_geometry(self) -> InputGeometry:
        return self.members[0].input_geometry()

    @property
    def routes(self) -> bool:
        return self.members[0].routes

    def routing(self, **inputs: Tensor) -> Tensor:
        return torch.stack([m.routing(**inputs) for m in self.members]).mean(0)

    def forward(self, **inputs: Tensor) -> ModelOutput:
        return ModelOutput(torch.stack([m(**inputs).prediction for m in self.members]).mean(0), {})

    def on_validation_start(self, data, train_idx) -> None:
        for member in self.members:
            member.on_validation_start(data, train_idx)

    def on_fit_end(self, data, train_idx) -> None:
        for member in self.members:
            member.on_fit_end(data, train_idx)


def first_member(model: nn.Module) -> nn.Module:
    """The model itself, or an ensemble's first member (for figures of one model's parameters)."""
    return model.members[0] if isinstance(model, SeedEnsemble) else model
