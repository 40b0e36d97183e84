"""BLEEP*: a joint image/expression embedding learned contrastively; prediction by retrieval of training cells.

BLEEP (Xie et al. 2023) projects a spot's image embedding (ResNet-50) and its expression vector into one
256-d space with two projection heads, trains them with a CLIP-style symmetric loss whose targets are soft
(the mean of the image-image and expression-expression similarities), and predicts a query spot as the
average expression of the k training spots whose *expression* embeddings are nearest to the query's image
embedding. Here the image side is the shared frozen cell feature (standardised), the expression side is the
cell's target vector, and:

    u_i = normalize(P_img(z_i)),   v_i = normalize(P_exp(y_i))            P: BLEEP's projection head
    L   = contrastive_loss(u, v, tau)                                     (models/losses.py)
    y^_q = sum_{j in kNN(u_q)} w_j y_j,   w = softmax(<u_q, key_j> / tau_r) over the k nearest keys

The keys are the training cells' expression embeddings v_j (``bank_key="expression"``, BLEEP's choice) or
their image embeddings u_j (``"image"``); the values are their measured targets. The memory bank is built by
:meth:`BLEEP.build_bank` from training cells only, with the current weights: before every validation pass
(so early stopping scores what inference would do) and once more after the best weights are restored (the
trainer's ``on_validation_start`` / ``on_fit_end`` hooks). It is stored as buffers, so a saved model
predicts identically after loading.

During a training step the model's prediction is an in-batch retrieval (each cell from the other cells of
its batch), detached: the trainer's L_exp on it is reported but gives no gradient, so BLEEP* learns from
its contrastive loss alone, as in the paper.

Shapes: features (B, D), targets (B, G) during training -> ModelOutput(prediction (B, G), {"contrastive"}).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gcmoe.models.base import CellModel, ModelOutput
from gcmoe.models.inputs import ModelInputs
from gcmoe.models.losses import contrastive_loss
from gcmoe.models.registry import register_model


class ProjectionHead(nn.Module):
    """BLEEP's projection head: x -> LayerNorm(W1 x + dropout(W2 GELU(W1 x))). Shapes: (B, I) -> (B, P)."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.projection = nn.Linear(in_dim, out_dim)
        self.fc = nn.Linear(out_dim, out_dim)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: Tensor) -> Tensor:
        projected = self.projection(x)
        return self.norm(projected + self.dropout(self.fc(F.gelu(projected))))


@torch.no_grad()
def retrieve(
    query: Tensor, keys: Tensor, values: Tensor, k: int, temperature: float,
    query_chunk: int = 1024, key_chunk: int = 32768,
) -> Tensor:
    """Similarity-weighted average of the values of the ``k`` keys most similar (dot product) to each query.

    Weights are softmax(similarity / temperature) over the k retained keys; with k = 1 the value of the best
    key is returned exactly. Queries and keys are processed in chunks, so memory stays bounded by
    query_chunk x key_chunk whatever the size of the bank.

    Shapes: query (B, P), keys (N, P), values (N, G) -> (B, G).
    """
    k = min(int(k), keys.shape[0])
    if k < 1:
        raise ValueError("retrieval needs a non-empty memory bank and k >= 1")
    out = []
    for qs in range(0, query.shape[0], query_chunk):
        q = query[qs : qs + query_chunk]
        best_sim = torch.full((q.shape[0], 0), float("-inf"), dtype=q.dtype, device=q.device)
        best_idx = torch.zeros((q.shape[0], 0), dtype=torch.long, device=q.device)
        for ks in range(0, keys.shape[0], key_chunk):
            sim = q @ keys[ks : ks + key_chunk].T
            top_sim, top_idx = sim.topk(min(k, sim.shape[1]), dim=1)
            best_sim, pos = torch.cat([best_sim, top_sim], 1).topk(min(k, best_sim.shape[1] + top_sim.shape[1]), dim=1)
            best_idx = torch.cat([best_idx, top_idx + ks], 1).gather(1, pos)
        weights = torch.softmax(best_sim / temperature, dim=1)  # (b, k)
        out.append(torch.einsum("bk,bkg->bg", weights, values[best_idx]))
    return torch.cat(out)


class BLEEP(CellModel):
    """Contrastive image/expression projection heads + k-nearest-neighbour retrieval from training cells."""

    inputs = ModelInputs(targets=True)

    def __init__(
        self,
        in_dim: int,
        n_genes: int,
        projection_dim: int = 256,
        dropout: float = 0.1,
        temperature: float = 0.1,
        soft_targets: bool = True,
        k: int = 50,
        retrieval_temperature: float = 0.5,
        bank_key: Literal["expression", "image"] = "expression",
    ) -> None:
        super().__init__(in_dim, n_genes)
        if bank_key not in ("expression", "image"):
            raise TypeError(f"bank_key must be 'expression' or 'image', got {bank_key!r}")
        self.temperature = float(temperature)
        self.soft_targets = bool(soft_targets)
        self.k = int(k)
        self.retrieval_temperature = float(retrieval_temperature)
        self.bank_key = bank_key
        self.image_projection = ProjectionHead(in_dim, projection_dim, dropout)
        self.expression_projection = ProjectionHead(n_genes, projection_dim, dropout)
        # the memory bank: keys (N_train, P) and values (N_train, G); sized when built or loaded
        self.register_buffer("bank_keys", torch.zeros(0, projection_dim))
        self.register_buffer("bank_values", torch.zeros(0, n_genes))

    def embed_image(self, features: Tensor) -> Tensor:
        return F.normalize(self.image_projection(self.standardize(features)), dim=-1)

    def embed_expression(self, targets: Tensor) -> Tensor:
        return F.normalize(self.expression_projection(targets), dim=-1)

    @torch.no_grad()
    def build_bank(self, data, train_idx, chunk: int = 8192) -> None:
        """Memory bank from the training cells ``train_idx`` of ``data`` (a CellData), with the current weights."""
        was_training = self.training
        self.eval()
        device = self.feature_mean.device
        idx = torch.as_tensor(train_idx, dtype=torch.long).reshape(-1)
        values = data.targets.index_select(0, idx).float()
        keys = []
        for start in range(0, len(idx), chunk):
            part = idx[start : start + chunk]
            if self.bank_key == "expression":
                keys.append(self.embed_expression(values[start : start + chunk].to(device)))
            else:
                keys.append(self.embed_image(data.features.index_select(0, part).float().to(device)))
        self.bank_keys = torch.cat(keys) if keys else self.bank_keys.new_zeros(0, self.bank_keys.shape[1])
        self.bank_values = values.to(device)
        self.train(was_training)

    def on_validation_start(self, data, train_idx) -> None:
        self.build_bank(data, train_idx)

    def on_fit_end(self, data, train_idx) -> None:
        self.build_bank(data, train_idx)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # the bank's size is the number of training cells: take it from the weights being loaded
        for name in ("bank_keys", "bank_values"):
            saved = state_dict.get(prefix + name)
            if saved is not None:
                setattr(self, name, torch.empty_like(saved, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, features: Tensor, targets: Tensor | None = None, **_: Tensor) -> ModelOutput:
        image = self.embed_image(features)
        if self.training and targets is not None:
            expression = self.embed_expression(targets)
            losses = {"contrastive": contrastive_loss(image, expression, self.temperature, self.soft_targets)}
            return ModelOutput(self._in_batch_prediction(image, expression, targets), losses)
        if self.bank_keys.shape[0] == 0:
            raise RuntimeError(
                "BLEEP* has no memory bank yet: train it with fit() on CellData(..., targets_as_input=True) "
                "or call build_bank(data, train_idx)"
            )
        return ModelOutput(retrieve(image, self.bank_keys, self.bank_values, self.k, self.retrieval_temperature), {})

    @torch.no_grad()
    def _in_batch_prediction(self, image: Tensor, expression: Tensor, targets: Tensor) -> Tensor:
        """Each cell retrieved from the other cells of its batch (monitoring only; no gradient)."""
        b = image.shape[0]
        if b < 2:
            return targets.detach().clone()
        keys = expression if self.bank_key == "expression" else image
        sim = (image @ keys.T).fill_diagonal_(float("-inf"))
        top_sim, top_idx = sim.topk(min(self.k, b - 1), dim=1)
        weights = torch.softmax(top_sim / self.retrieval_temperature, dim=1)
        return torch.einsum("bk,bkg->bg", weights, targets.detach()[top_idx])


@register_model(
    "bleep", "BLEEP*",
    "contrastive image/expression embedding; prediction = similarity-weighted mean of the k nearest training cells",
    inputs=BLEEP.inputs,
)
def create_bleep(in_dim: int, n_genes: int, **params) -> BLEEP:
    return BLEEP(in_dim, n_genes, **params)
