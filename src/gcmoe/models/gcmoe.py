"""GC-MoE: genomics-guided, cell-type-specific mixture of experts (docs/gcmoe.md).

For cell i with standardised feature z_i (D), neighbours j in its window, K experts and G genes:
    pi_i   = softmax(R(z_i [, mean_j z_j]))                    router, (K,); neighbours' mean with router_context
    g_ik   = FFN_k(z_i + C2CA_k(z_i, {z_j, o_ij}))             expert k's refined feature, (d_out,)
    W_k    = GCN_k(Â_k, E_k)                                   CAP: gene-wise vectors over graph A_k, (G, d_out)
    y_ikg  = <w_kg, g_ik> + b_kg
    y_i    = sum_k pi_ik y_ik
Auxiliary losses (weighted once, at construction):
    L_route = CE(pi_i, type label)   (cells with a label, training only)
    L_coexp = mean over k, over edges (g, h) of A_k, of ||w_kg - w_kh||^2

Ablations are settings of this one model (the paper's names):
    "Ours w/o CS-MoE, CAP, C2CA": moe=False, cap=False, c2ca=False
    "Ours w/o CAP, C2CA":         moe=True,  cap=False, c2ca=False
    "Ours w/o C2CA":              moe=True,  cap=True,  c2ca=False
    "GC-MoE":                     moe=True,  cap=True,  c2ca=True
C2CA's output map starts at zero and the neighbour parts are built last, so with the same seed the full
model starts exactly as "Ours w/o C2CA"; in training, each neighbour is hidden with probability
``neighbour_dropout`` (docs/gcmoe.md, "What differs from the paper").
Without MoE there is one expert and no router (its CAP graph, when used, is the all-cells graph).
Without CAP each expert has a free linear head W_k (G, d_out).

Shapes: features (B, D), neighbour_features (B, M, D), neighbour_offsets (B, M, 2) micrometres,
neighbour_mask (B, M) bool, cell_type (B,) long with -1 = unknown -> ModelOutput(prediction (B, G), losses).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gcmoe.models.ablations import ABLATIONS
from gcmoe.models.base import CellModel, ModelOutput
from gcmoe.models.inputs import ModelInputs
from gcmoe.models.layers import (
    ExpertCrossAttention,
    ExpertFFN,
    ExpertGCN,
    normalized_adjacency,
    offset_encoding,
    offset_encoding_dim,
)
from gcmoe.models.registry import register_model


class GCMoEOutput(NamedTuple):
    """Everything GC-MoE computes for a batch, for analysis; ``forward`` returns the ModelOutput part."""

    prediction: Tensor  # (B, G)
    routing: Tensor  # (B, K) router probabilities (ones when moe=False)
    expert_predictions: Tensor  # (B, K, G)
    attention: Tensor | None  # (B, A, M), A = 1 shared attention block or K; None without C2CA


class GCMoE(CellModel):
    """Router + K cell-type experts, each C2CA -> FFN -> CAP head."""

    def __init__(
        self,
        in_dim: int,
        n_genes: int,
        adjacency: Tensor | None = None,
        n_types: int = 4,
        moe: bool = True,
        cap: bool = True,
        c2ca: bool = True,
        hidden: int = 128,
        out_dim: int = 64,
        attn_dim: int = 32,
        gene_embed_dim: int = 32,
        gcn_hidden: int = 64,
        router_hidden: int = 64,
        window_um: float = 64.0,
        dropout: float = 0.1,
        c2ca_shared: bool = True,
        neighbour_dropout: float = 0.5,
        router_context: bool = False,
        lambda_route: float = 1.0,
        lambda_coexp: float = 0.1,
    ) -> None:
        super().__init__(in_dim, n_genes)
        self.moe, self.cap, self.c2ca = moe, cap, c2ca
        self.inputs = self.inputs_for(moe, cap, c2ca)
        self.n_types = n_types
        self.n_experts = n_types if moe else 1
        self.window_um = float(window_um)
        self.lambda_route = lambda_route if moe else 0.0
        self.lambda_coexp = lambda_coexp if cap else 0.0
        k = self.n_experts
        if moe:
            self.router = nn.Sequential(nn.Linear(in_dim, router_hidden), nn.GELU(), nn.Linear(router_hidden, n_types))
        self.ffn = ExpertFFN(k, in_dim, hidden, out_dim, dropout)
        if cap:
            adj = _expert_adjacency(adjacency, n_genes, n_types, moe)
            self.register_buffer("adjacency", adj)  # (K, G, G) binary, saved with the model
            self.register_buffer("norm_adjacency", normalized_adjacency(adj))
            self.gcn = ExpertGCN(k, n_genes, gene_embed_dim, gcn_hidden, out_dim)
        else:
            self.head = nn.Parameter(torch.randn(k, n_genes, out_dim) / out_dim**0.5)
        self.gene_bias = nn.Parameter(torch.zeros(k, n_genes))
        # the neighbour parts last, zero where they meet the rest: with the same seed, the full model starts
        # exactly as its ablation without C2CA
        self.neighbour_dropout = float(neighbour_dropout)
        self.router_context = bool(router_context and c2ca and moe)
        if c2ca:
            self.attention = ExpertCrossAttention(k, in_dim, attn_dim, offset_encoding_dim(), shared=c2ca_shared)
        if self.router_context:
            self.router_neighbours = nn.Linear(in_dim, router_hidden, bias=False)
            nn.init.zeros_(self.router_neighbours.weight)

    def route(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        """Router logits (B, K) from the standardised feature and, with router_context, the neighbours' mean."""
        if context is None or not self.router_context:
            return self.router(z)
        hidden = self.router[0](z) + self.router_neighbours(context)
        return self.router[2](self.router[1](hidden))

    @staticmethod
    def inputs_for(moe: bool, cap: bool, c2ca: bool) -> ModelInputs:
        """Routing labels always (K, and the router's supervision); C2CA neighbours and CAP graphs when on."""
        return ModelInputs(cell_types=True, neighbours=c2ca, coexpression=cap)

    @property
    def routes(self) -> bool:
        return self.moe

    def routing(self, features: Tensor, neighbour_features: Tensor | None = None,
                neighbour_offsets: Tensor | None = None, neighbour_mask: Tensor | None = None, **_: Tensor) -> Tensor:
        """The router's probabilities pi (B, K)."""
        return self.compute(features, neighbour_features, neighbour_offsets, neighbour_mask).routing

    def gene_vectors(self) -> Tensor:
        """The gene-wise prediction vectors W (K, G, d_out): CAP's GCN output, or the free heads."""
        return self.gcn(self.norm_adjacency) if self.cap else self.head

    def compute(
        self,
        features: Tensor,
        neighbour_features: Tensor | None = None,
        neighbour_offsets: Tensor | None = None,
        neighbour_mask: Tensor | None = None,
    ) -> GCMoEOutput:
        z = self.standardize(features)
        b = z.shape[0]
        attention = context = None
        h = z.unsqueeze(1).expand(b, self.n_experts, z.shape[1])
        if self.c2ca:
            if neighbour_features is None or neighbour_offsets is None or neighbour_mask is None:
                raise ValueError("GC-MoE with C2CA needs neighbour_features, neighbour_offsets and neighbour_mask")
            zn = self.standardize(neighbour_features)
            if self.training and self.neighbour_dropout > 0:
                neighbour_mask = neighbour_mask & (torch.rand_like(neighbour_mask, dtype=z.dtype) >= self.neighbour_dropout)
            phi = offset_encoding(neighbour_offsets / (self.window_um / 2))
            attn, attention = self.attention(z, zn, phi, neighbour_mask)
            h = h + attn
            if self.router_context:
                m = neighbour_mask.unsqueeze(-1).to(z.dtype)
                context = (zn * m).sum(1) / m.sum(1).clamp(min=1.0)  # mean neighbour feature, 0 without any
        g = self.ffn(h)  # (B, K, d_out)
        w = self.gene_vectors()  # (K, G, d_out)
        expert_pred = torch.einsum("bko,kgo->bkg", g, w) + self.gene_bias  # (B, K, G)
        if self.moe:
            routing = torch.softmax(self.route(z, context), dim=-1)
            prediction = torch.einsum("bk,bkg->bg", routing, expert_pred)
        else:
            routing = torch.ones(b, 1, dtype=z.dtype, device=z.device)
            prediction = expert_pred[:, 0]
        return GCMoEOutput(prediction, routing, expert_pred, attention)

    def forward(
        self,
        features: Tensor,
        neighbour_features: Tensor | None = None,
        neighbour_offsets: Tensor | None = None,
        neighbour_mask: Tensor | None = None,
        cell_type: Tensor | None = None,
        **_: Tensor,
    ) -> ModelOutput:
        out = self.compute(features, neighbour_features, neighbour_offsets, neighbour_mask)
        losses: dict[str, Tensor] = {}
        if self.moe and cell_type is not None and self.lambda_route:
            known = cell_type >= 0
            if known.any():
                log_pi = torch.log(out.routing[known].clamp(min=1e-8))
                losses["route"] = self.lambda_route * F.nll_loss(log_pi, cell_type[known])
        if self.cap and self.lambda_coexp and self.training:
            losses["coexp"] = self.lambda_coexp * coexpression_loss(self.gene_vectors(), self.adjacency)
        return ModelOutput(out.prediction, losses)


def coexpression_loss(vectors: Tensor, adjacency: Tensor) -> Tensor:
    """L_coexp: mean over experts k and edges (g, h) of A_k of ||w_kg - w_kh||^2 (0 for an edgeless graph).

    Shapes: vectors (K, G, O), adjacency (K, G, G) binary symmetric without self loops.
    """
    sq = (vectors * vectors).sum(-1)  # (K, G)
    dist = sq.unsqueeze(-1) + sq.unsqueeze(-2) - 2 * torch.bmm(vectors, vectors.transpose(1, 2))
    edges = adjacency.float()
    per_expert = []
    for k in range(vectors.shape[0]):  # K is small; only the edge count differs per expert
        n = edges[k].sum()
        per_expert.append((dist[k].clamp(min=0) * edges[k]).sum() / n if n > 0 else dist.new_zeros(()))
    return torch.stack(per_expert).mean()


def _expert_adjacency(adjacency: Tensor | None, n_genes: int, n_types: int, moe: bool) -> Tensor:
    """(K, G, G) binary graphs for the experts: the type graphs with MoE, their union (or a given shared
    graph) without."""
    if adjacency is None:
        adjacency = torch.zeros(n_types if moe else 1, n_genes, n_genes)
    adjacency = torch.as_tensor(adjacency, dtype=torch.float32)
    if adjacency.dim() == 2:
        adjacency = adjacency.unsqueeze(0)
    if adjacency.shape[-2:] != (n_genes, n_genes):
        raise ValueError(f"co-expression graphs must be (K, {n_genes}, {n_genes}), got {tuple(adjacency.shape)}")
    if moe and adjacency.shape[0] != n_types:
        raise ValueError(f"GC-MoE with {n_types} cell types needs {n_types} graphs, got {adjacency.shape[0]}")
    if not moe and adjacency.shape[0] != 1:
        adjacency = (adjacency.sum(0, keepdim=True) > 0).float()
    adjacency = (adjacency > 0).float()
    eye = torch.eye(n_genes, dtype=torch.bool)
    return adjacency.masked_fill(eye, 0.0)


def _make_factory(switches: dict[str, bool]):
    def factory(in_dim: int, n_genes: int, **params) -> GCMoE:
        for key in switches:
            if key in params:
                raise TypeError(f"{key!r} is fixed by the model name; pick another registered variant")
        return GCMoE(in_dim, n_genes, **switches, **params)

    return factory


for _name, (_display, _switches) in ABLATIONS.items():
    register_model(
        _name, _display, f"GC-MoE with moe={_switches['moe']}, cap={_switches['cap']}, c2ca={_switches['c2ca']}",
        GCMoE.inputs_for(**_switches),
    )(_make_factory(_switches))
