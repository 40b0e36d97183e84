"""TRIPLEX*: three views of a cell (its own feature, its neighbourhood, a wide context) fused by cross-attention.

TRIPLEX (Chung et al. 2024) encodes three resolutions of a spot: the target spot's patch (a fine-tuned
ResNet-18, 49 tokens), its 5 x 5 neighbouring spots (frozen features, a transformer with relative-position
attention bias) and the whole slide (frozen features of every spot, a transformer with a convolutional
position encoding, APEG), then fuses them: the spot's global token is the query of a cross-attention over
the target tokens and, with the same weights, over the neighbour tokens; the two results are summed and
normalised. Each view and the fusion have their own linear head; the loss is the fusion's plus, per view,
(1 - alpha) x its supervised loss + alpha x its distance to the fused prediction (alpha = 0.3).

Adapted to cells with shared frozen features (z = standardised cell feature, E = ``dim``):

    target      t_i = W_t z_i                                              (B, 1, E): one token
    neighbour   n_i = Enc_n([W_n z_i ; W_n z_j + U_n phi(o_ij / (S/2))])   (B, 1+M, E): the cell and its C2CA
                                                                           window neighbours (S = 64 um)
    global      g_i = Enc_g(W_g zbar_q + U_g phi(o_iq / R))[own square]    (B, E): the n x n grid of context
                squares (side C um) around the cell; zbar_q = mean feature of square q, o_iq = its centre's
                offset from the cell, R = n C / 2; the token of the cell's own square is its global token
    fusion      f_i = LN(Cross(g_i; t_i) + Cross(g_i; n_i))                shared cross-attention blocks
    predictions y^ = H(f_i), y^_t = H_t(t_i), y^_n = H_n(mean_j n_ij), y^_g = H_g(g_i)

phi is the fixed Fourier offset encoding of GC-MoE's C2CA (``layers.offset_encoding``) and U a learned map:
a learned encoding of continuous offsets in place of TRIPLEX's grid attention bias and APEG. The
trainer's L_exp acts on y^; the model adds, for v in {t, n, g},
    L_views   = view_weight (1 - alpha) sum_v L_exp(y^_v, y)
    L_distill = view_weight alpha sum_v L_exp(y^_v, stopgrad(y^))
with L_exp = 1 - mean per-gene PCC over the batch (TRIPLEX uses MSE; PCC keeps every model on one
objective). Inference uses y^ only.

Shapes: features (B, D), neighbour_features (B, M, D), neighbour_offsets (B, M, 2) um, neighbour_mask
(B, M), context_features (B, R, D), context_offsets (B, R, 2) um, context_mask (B, R), targets (B, G)
during training -> ModelOutput(prediction (B, G), {"views", "distill"}).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from gcmoe.models.base import CellModel, ModelOutput
from gcmoe.models.inputs import ContextSpec, InputGeometry, ModelInputs
from gcmoe.models.layers import TransformerEncoder, offset_encoding, offset_encoding_dim
from gcmoe.models.losses import expression_loss
from gcmoe.models.registry import register_model


class TriplexOutput(NamedTuple):
    """The fused prediction, each view's own prediction, and the view tokens (for analysis and tests)."""

    prediction: Tensor  # (B, G) from the fusion
    target_prediction: Tensor  # (B, G)
    neighbour_prediction: Tensor  # (B, G)
    global_prediction: Tensor  # (B, G)
    target_tokens: Tensor  # (B, 1, E)
    neighbour_tokens: Tensor  # (B, 1 + M, E)
    global_token: Tensor  # (B, E)
    fused: Tensor  # (B, E)


class CrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention (query and keys normalised by the same LayerNorm, as in TRIPLEX) + MLP, both
    residual. Shapes: query (B, 1, E), keys (B, T, E), key_padding_mask (B, T) True = padding -> (B, 1, E)."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_dim, dim),
                                 nn.Dropout(dropout))

    def forward(self, query: Tensor, keys: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        q, kv = self.norm(query), self.norm(keys)
        query = query + self.attention(q, kv, kv, key_padding_mask=key_padding_mask, need_weights=False)[0]
        return query + self.mlp(self.mlp_norm(query))


class TRIPLEX(CellModel):
    """Target, neighbour and global views of a cell, fused by cross-attention; multi-view loss."""

    inputs = ModelInputs(neighbours=True, context=True, targets=True)

    def __init__(
        self,
        in_dim: int,
        n_genes: int,
        window_um: float = 64.0,
        context_um: float = 100.0,
        context_size: int = 5,
        dim: int = 64,
        heads: int = 4,
        depth_neighbour: int = 1,
        depth_global: int = 1,
        depth_fusion: int = 1,
        mlp_ratio: float = 2.0,
        dropout: float = 0.1,
        alpha: float = 0.3,
        view_weight: float = 1.0,
    ) -> None:
        super().__init__(in_dim, n_genes)
        if context_size < 1 or context_size % 2 == 0:
            raise TypeError(f"context_size must be an odd number of squares per side, got {context_size}")
        self.window_um = float(window_um)
        self.context_um = float(context_um)
        self.context_size = int(context_size)
        self.alpha = float(alpha)
        self.view_weight = float(view_weight)
        p = offset_encoding_dim()
        self.target_embed = nn.Linear(in_dim, dim)
        self.neighbour_embed = nn.Linear(in_dim, dim)
        self.neighbour_position = nn.Linear(p, dim)
        self.neighbour_encoder = TransformerEncoder(dim, depth_neighbour, heads, mlp_ratio, dropout)
        self.neighbour_norm = nn.LayerNorm(dim)
        self.global_embed = nn.Linear(in_dim, dim)
        self.global_position = nn.Linear(p, dim)
        self.global_encoder = TransformerEncoder(dim, depth_global, heads, mlp_ratio, dropout)
        self.global_norm = nn.LayerNorm(dim)
        self.fusion = nn.ModuleList(
            CrossAttentionBlock(dim, heads, int(dim * mlp_ratio), dropout) for _ in range(depth_fusion)
        )
        self.fusion_norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_genes)
        self.target_head = nn.Linear(dim, n_genes)
        self.neighbour_head = nn.Linear(dim, n_genes)
        self.global_head = nn.Linear(dim, n_genes)

    def _fuse(self, query: Tensor, keys: Tensor, padding: Tensor | None) -> Tensor:
        for block in self.fusion:
            query = block(query, keys, padding)
        return query

    def views(
        self,
        features: Tensor,
        neighbour_features: Tensor,
        neighbour_offsets: Tensor,
        neighbour_mask: Tensor,
        context_features: Tensor,
        context_offsets: Tensor,
        context_mask: Tensor,
    ) -> TriplexOutput:
        z = self.standardize(features)
        b = z.shape[0]
        # target view: the cell's own feature, one token
        target = self.target_embed(z).unsqueeze(1)  # (B, 1, E)
        # neighbour view: the cell at offset 0, then its window neighbours
        zn = torch.cat([z.unsqueeze(1), self.standardize(neighbour_features)], 1)  # (B, 1+M, D)
        offsets = torch.cat([neighbour_offsets.new_zeros(b, 1, 2), neighbour_offsets], 1)
        mask = torch.cat([neighbour_mask.new_ones(b, 1), neighbour_mask], 1)
        tokens = self.neighbour_embed(zn) + self.neighbour_position(offset_encoding(offsets / (self.window_um / 2)))
        neighbour = self.neighbour_norm(self.neighbour_encoder(tokens, mask))
        # global view: the grid of context squares; the cell's own square is the middle slot
        reach = self.context_size * self.context_um / 2
        tokens = self.global_embed(self.standardize(context_features)) + self.global_position(
            offset_encoding(context_offsets / reach))
        own = context_offsets.shape[1] // 2  # only the own square's output is used
        glob = self.global_norm(self.global_encoder(tokens, context_mask, query=own))  # (B, E)
        # fusion: the global token queries the target tokens and the neighbour tokens
        query = glob.unsqueeze(1)
        fused = self._fuse(query, target, None) + self._fuse(query, neighbour, ~mask)
        fused = self.fusion_norm(fused.squeeze(1))
        m = mask.unsqueeze(-1).to(neighbour.dtype)
        neighbour_mean = (neighbour * m).sum(1) / m.sum(1)
        return TriplexOutput(
            prediction=self.head(fused),
            target_prediction=self.target_head(target.mean(1)),
            neighbour_prediction=self.neighbour_head(neighbour_mean),
            global_prediction=self.global_head(glob),
            target_tokens=target,
            neighbour_tokens=neighbour,
            global_token=glob,
            fused=fused,
        )

    def input_geometry(self) -> InputGeometry:
        """The context grid this model was built for."""
        return InputGeometry(context=ContextSpec(self.context_um, self.context_size))

    def forward(
        self,
        features: Tensor,
        neighbour_features: Tensor | None = None,
        neighbour_offsets: Tensor | None = None,
        neighbour_mask: Tensor | None = None,
        context_features: Tensor | None = None,
        context_offsets: Tensor | None = None,
        context_mask: Tensor | None = None,
        targets: Tensor | None = None,
        **_: Tensor,
    ) -> ModelOutput:
        needed = (neighbour_features, neighbour_offsets, neighbour_mask,
                  context_features, context_offsets, context_mask)
        if any(x is None for x in needed):
            raise ValueError("TRIPLEX* needs neighbour_* and context_* inputs (CellData with neighbours and context)")
        out = self.views(features, *needed)
        losses: dict[str, Tensor] = {}
        if self.training and targets is not None and self.view_weight:
            views = (out.target_prediction, out.neighbour_prediction, out.global_prediction)
            teacher = out.prediction.detach()
            supervised = sum(expression_loss(v, targets) for v in views)
            distill = sum(expression_loss(v, teacher) for v in views)
            losses["views"] = self.view_weight * (1 - self.alpha) * supervised
            losses["distill"] = self.view_weight * self.alpha * distill
        return ModelOutput(out.prediction, losses)


@register_model(
    "triplex", "TRIPLEX*",
    "own feature, C2CA-window neighbours and a grid of wide-context squares, fused by cross-attention; multi-view loss",
    inputs=TRIPLEX.inputs,
)
def create_triplex(in_dim: int, n_genes: int, **params) -> TRIPLEX:
    return TRIPLEX(in_dim, n_genes, **params)
