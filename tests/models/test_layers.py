"""Building blocks: offset encoding, batched expert layers, the GCN and the transformer encoder."""

from __future__ import annotations

import math

import pytest
import torch

from gcmoe.models.layers import (
    ExpertFFN,
    ExpertGCN,
    ExpertLinear,
    TransformerBlock,
    TransformerEncoder,
    normalized_adjacency,
    offset_encoding,
    offset_encoding_dim,
)


def test_offset_encoding_layout():
    phi = offset_encoding(torch.tensor([[0.5, -0.25]]), n_freq=2)
    assert phi.shape == (1, offset_encoding_dim(2)) == (1, 11)
    assert torch.allclose(phi[0, :3], torch.tensor([0.5, -0.25, math.hypot(0.5, 0.25)]))
    assert torch.allclose(phi[0, 3], torch.sin(torch.tensor(math.pi * 0.5)))  # x at frequency pi


def test_expert_linear_is_k_independent_linear_maps():
    torch.manual_seed(0)
    layer = ExpertLinear(3, 4, 2)
    x = torch.randn(5, 4)
    out = layer(x)
    assert out.shape == (5, 3, 2)
    for k in range(3):
        assert torch.allclose(out[:, k], x @ layer.weight[k] + layer.bias[k], atol=1e-6)
    per_expert = torch.randn(5, 3, 4)
    assert torch.allclose(layer(per_expert)[:, 1], per_expert[:, 1] @ layer.weight[1] + layer.bias[1], atol=1e-6)


def test_expert_ffn_and_gcn_shapes():
    assert ExpertFFN(3, 8, 16, 4)(torch.randn(5, 3, 8)).shape == (5, 3, 4)
    gcn = ExpertGCN(2, 6, 4, 8, 3)
    adjacency = normalized_adjacency(torch.zeros(2, 6, 6))
    assert torch.allclose(adjacency, torch.eye(6).expand(2, 6, 6))  # no edges: each gene its own neighbour
    assert gcn(adjacency).shape == (2, 6, 3)


def test_transformer_ignores_padded_tokens():
    torch.manual_seed(0)
    enc = TransformerEncoder(8, 2, 2).eval()
    x = torch.randn(1, 4, 8)
    mask = torch.tensor([[True, True, False, False]])
    garbage = x.clone()
    garbage[:, 2:] = 100.0
    assert torch.allclose(enc(x, mask)[:, :2], enc(garbage, mask)[:, :2], atol=1e-5)
    assert torch.allclose(enc(x, mask, query=1), enc(x, mask)[:, 1], atol=1e-5)  # one token = its full output


def test_transformer_width_must_split_into_heads():
    with pytest.raises(ValueError, match="multiple of the number of heads"):
        TransformerBlock(10, 3, 20)
