"""Building blocks of GC-MoE, batched over K experts (one batched matmul per step, no loop over experts).

Notation: B cells in a batch, M neighbour slots, D feature dim, K experts, G genes, d attention width,
P offset-encoding width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def normalized_adjacency(adjacency: Tensor) -> Tensor:
    """Symmetric GCN normalisation D^-1/2 (A + I) D^-1/2 of a (..., G, G) adjacency (any leading dims)."""
    g = adjacency.shape[-1]
    a = adjacency.float() + torch.eye(g, dtype=torch.float32, device=adjacency.device)
    deg = a.sum(dim=-1)
    inv_sqrt = deg.clamp(min=1e-12).rsqrt()
    return inv_sqrt.unsqueeze(-1) * a * inv_sqrt.unsqueeze(-2)


def offset_encoding(offsets: Tensor, n_freq: int = 4) -> Tensor:
    """Fixed Fourier encoding of relative offsets already scaled to about [-1, 1].

    Shapes: (..., 2) -> (..., P) with P = 3 + 4 * n_freq: the offset, its length, and sin/cos at
    frequencies pi * 2^f for each axis.
    """
    length = offsets.norm(dim=-1, keepdim=True)
    freqs = math.pi * (2.0 ** torch.arange(n_freq, dtype=offsets.dtype, device=offsets.device))
    angles = (offsets.unsqueeze(-1) * freqs).flatten(-2)  # (..., 2 * n_freq)
    return torch.cat([offsets, length, angles.sin(), angles.cos()], dim=-1)


def offset_encoding_dim(n_freq: int = 4) -> int:
    return 3 + 4 * n_freq


class ExpertLinear(nn.Module):
    """K independent linear maps applied to the same or per-expert inputs. Shapes: (B, [K,] I) -> (B, K, O)."""

    def __init__(self, n_experts: int, in_dim: int, out_dim: int, bias: bool = True) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(in_dim)
        self.weight = nn.Parameter(torch.empty(n_experts, in_dim, out_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n_experts, out_dim).uniform_(-bound, bound)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            out = torch.einsum("bi,kio->bko", x, self.weight)
        else:
            out = torch.einsum("bki,kio->bko", x, self.weight)
        return out + self.bias if self.bias is not None else out


class ExpertFFN(nn.Module):
    """Per-expert LayerNorm -> Linear -> GELU -> Linear. Shapes: (B, K, D) -> (B, K, O)."""

    def __init__(self, n_experts: int, in_dim: int, hidden: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.gamma = nn.Parameter(torch.ones(n_experts, in_dim))
        self.beta = nn.Parameter(torch.zeros(n_experts, in_dim))
        self.fc1 = ExpertLinear(n_experts, in_dim, hidden)
        self.fc2 = ExpertLinear(n_experts, hidden, out_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = F.layer_norm(x, (self.in_dim,)) * self.gamma + self.beta
        return self.fc2(self.dropout(F.gelu(self.fc1(x))))


class ExpertCrossAttention(nn.Module):
    """C2CA for K experts: the cell attends to its neighbours, keys/values carry a learned offset encoding.

    For attention block a, cell i, neighbour j with encoded offset phi_ij (P):
        q_ia = Wq_a z_i,   s_ija = q_ia . (Wk_a z_j + Uk_a phi_ij) / sqrt(d),   w_ija = softmax_j(s_ija) over valid j
        attn_ik = Wo_k (Wv_a sum_j w_ija z_j + Uv_a sum_j w_ija phi_ij)
    With ``shared`` there is one block (a = 1) whose pooled neighbourhood every expert reads through its own
    output map Wo_k; otherwise each expert has its own block (a = k). Wo starts at zero, so at initialisation
    attn = 0 and C2CA is the identity: the expert starts as its ablation without C2CA and moves away from it
    only as far as the gradient of the training loss takes it.
    Because the key and value maps are linear, they are applied after the sum over neighbours (or folded
    into the query), so the cost per cell is O(A (M D + D d)), not O(A M D d). A cell with no valid
    neighbour gets attn = 0, so C2CA then reduces to the FFN of its own feature.

    Shapes: z (B, D), neighbours (B, M, D), phi (B, M, P), mask (B, M) True = valid -> (B, K, D), and the
    attention weights (B, A, M) (zero on padded slots).
    """

    def __init__(self, n_experts: int, dim: int, attn_dim: int, offset_dim: int, shared: bool = True) -> None:
        super().__init__()
        blocks = 1 if shared else n_experts
        self.scale = 1.0 / math.sqrt(attn_dim)
        self.query = ExpertLinear(blocks, dim, attn_dim)
        std_in = 1.0 / math.sqrt(dim)
        self.key = nn.Parameter(torch.randn(blocks, dim, attn_dim) * std_in)
        self.key_offset = nn.Parameter(torch.randn(blocks, offset_dim, attn_dim) / math.sqrt(offset_dim))
        self.value = nn.Parameter(torch.randn(blocks, dim, attn_dim) * std_in)
        self.value_offset = nn.Parameter(torch.randn(blocks, offset_dim, attn_dim) / math.sqrt(offset_dim))
        self.out = nn.Parameter(torch.zeros(n_experts, attn_dim, dim))

    def forward(self, z: Tensor, neighbours: Tensor, phi: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        q = self.query(z) * self.scale  # (B, A, d)
        q_feat = torch.einsum("bad,aid->bai", q, self.key)  # (B, A, D): Wk^T q
        q_off = torch.einsum("bad,apd->bap", q, self.key_offset)  # (B, A, P)
        scores = torch.einsum("bai,bmi->bam", q_feat, neighbours) + torch.einsum("bap,bmp->bam", q_off, phi)
        valid = mask.unsqueeze(1)  # (B, 1, M)
        scores = scores.masked_fill(~valid, float("-inf"))
        any_valid = valid.any(dim=-1, keepdim=True)  # (B, 1, 1)
        weights = torch.softmax(scores.masked_fill(~any_valid, 0.0), dim=-1) * valid  # zero on padding
        pooled_feat = torch.einsum("bam,bmi->bai", weights, neighbours)  # (B, A, D)
        pooled_off = torch.einsum("bam,bmp->bap", weights, phi)  # (B, A, P)
        v = torch.einsum("bai,aid->bad", pooled_feat, self.value) + torch.einsum("bap,apd->bad", pooled_off, self.value_offset)
        if v.shape[1] == 1:  # shared block: every expert reads the same pooled neighbourhood
            return torch.einsum("bd,kdi->bki", v[:, 0], self.out), weights
        return torch.einsum("bkd,kdi->bki", v, self.out), weights


class ExpertGCN(nn.Module):
    """CAP: a 2-layer GCN per expert over its gene co-expression graph turns gene embeddings into
    gene-wise prediction vectors:  W_k = Â_k relu(Â_k E_k Θ1_k) Θ2_k.

    Shapes: adjacency (K, G, G) normalised, E (K, G, e) -> W (K, G, O).
    """

    def __init__(self, n_experts: int, n_genes: int, embed_dim: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Parameter(torch.randn(n_experts, n_genes, embed_dim) / math.sqrt(embed_dim))
        self.theta1 = nn.Parameter(torch.randn(n_experts, embed_dim, hidden) / math.sqrt(embed_dim))
        self.theta2 = nn.Parameter(torch.randn(n_experts, hidden, out_dim) / math.sqrt(hidden))

    def forward(self, norm_adjacency: Tensor) -> Tensor:
        h = torch.relu(torch.bmm(norm_adjacency, torch.bmm(self.embedding, self.theta1)))
        return torch.bmm(norm_adjacency, torch.bmm(h, self.theta2))



class TransformerBlock(nn.Module):
    """Pre-norm self-attention block (ViT-style), over padded token sets:

        x <- x + drop(W_o MHA(LN(x)))      keys restricted to the valid tokens
        x <- x + drop(MLP(LN(x)))          MLP = Linear -> GELU -> Linear

    Attention weights are not dropped (dropout acts on the residual branches only), which keeps the
    per-token cost low on CPU. With ``query`` set, only that token is updated and returned (the last block of
    an encoder whose other outputs are not used).

    Shapes: x (B, T, E), mask (B, T) True = valid -> (B, T, E), or (B, 1, E) with ``query``.
    """

    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"the token width {dim} must be a multiple of the number of heads {heads}")
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor, query: int | None = None) -> Tensor:
        b, t, e = x.shape
        h = self.norm1(x)
        weight, bias = self.qkv.weight.split([e, 2 * e]), self.qkv.bias.split([e, 2 * e])
        if query is not None:
            x = x[:, query : query + 1]
            h_q = h[:, query : query + 1]
        else:
            h_q = h
        q = F.linear(h_q, weight[0], bias[0]).view(b, -1, self.heads, e // self.heads).transpose(1, 2)
        k, v = F.linear(h, weight[1], bias[1]).view(b, t, 2, self.heads, e // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, -1, e)))
        return x + self.drop(self.mlp(self.norm2(x)))


class TransformerEncoder(nn.Module):
    """``depth`` :class:`TransformerBlock` s. With ``query`` set, returns only that token's output (B, E).

    Shapes: x (B, T, E), mask (B, T) True = valid -> (B, T, E), or (B, E) with ``query``.
    """

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float = 2.0, dropout: float = 0.0) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, int(dim * mlp_ratio), dropout) for _ in range(depth))

    def forward(self, x: Tensor, mask: Tensor, query: int | None = None) -> Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x, mask, query if i == len(self.blocks) - 1 else None)
        if query is None:
            return x
        return x[:, 0] if self.blocks else x[:, query]
