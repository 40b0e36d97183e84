import numpy as np
import pytest
import torch

from gcmoe.models import create_model
from gcmoe.models.gcmoe import ABLATIONS, GCMoE, coexpression_loss
from gcmoe.models.layers import ExpertCrossAttention, normalized_adjacency, offset_encoding_dim
from gcmoe.models.losses import expression_loss


def _batch(b=16, m=5, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        features=torch.randn(b, d, generator=g),
        neighbour_features=torch.randn(b, m, d, generator=g),
        neighbour_offsets=torch.randn(b, m, 2, generator=g) * 10,
        neighbour_mask=torch.rand(b, m, generator=g) > 0.3,
    )


def test_normalized_adjacency_by_hand():
    # path graph 0-1-2: A + I has degrees 2, 3, 2
    a = torch.tensor([[0, 1, 0], [1, 0, 1], [0, 1, 0]], dtype=torch.float32)
    s2, s6 = 1 / 2, 1 / np.sqrt(6)
    expected = torch.tensor([[s2, s6, 0], [s6, 1 / 3, s6], [0, s6, s2]], dtype=torch.float32)
    assert torch.allclose(normalized_adjacency(a), expected, atol=1e-6)
    assert torch.allclose(normalized_adjacency(torch.stack([a, a]))[1], expected, atol=1e-6)


def test_coexp_loss_zero_when_connected_genes_share_vectors():
    adj = torch.zeros(2, 4, 4)
    adj[0, 0, 1] = adj[0, 1, 0] = 1
    adj[1, 2, 3] = adj[1, 3, 2] = 1
    v = torch.randn(2, 4, 3)
    v[0, 1] = v[0, 0]
    v[1, 3] = v[1, 2]
    assert coexpression_loss(v, adj).item() == pytest.approx(0.0, abs=1e-6)
    v2 = v.clone()
    v2[0, 1] += 1.0
    v3 = v.clone()
    v3[0, 1] += 2.0
    assert 0 < coexpression_loss(v2, adj).item() < coexpression_loss(v3, adj).item()
    # unconnected genes do not count
    v4 = v.clone()
    v4[0, 3] += 5.0
    assert coexpression_loss(v4, adj).item() == pytest.approx(0.0, abs=1e-6)


def test_router_probabilities_sum_to_one():
    model = GCMoE(8, 6, adjacency=torch.zeros(4, 6, 6))
    out = model.compute(**_batch())
    assert out.routing.shape == (16, 4)
    assert torch.allclose(out.routing.sum(-1), torch.ones(16), atol=1e-6)
    assert torch.allclose(out.prediction, torch.einsum("bk,bkg->bg", out.routing, out.expert_predictions), atol=1e-5)


def test_all_masked_c2ca_equals_ffn_of_own_feature():
    torch.manual_seed(0)
    model = GCMoE(8, 6, adjacency=torch.zeros(4, 6, 6)).eval()
    batch = _batch()
    batch["neighbour_mask"] = torch.zeros(16, 5, dtype=torch.bool)
    out = model.compute(**batch)
    z = model.standardize(batch["features"])
    g = model.ffn(z.unsqueeze(1).expand(16, 4, 8))
    expected = torch.einsum("bko,kgo->bkg", g, model.gene_vectors()) + model.gene_bias
    assert torch.allclose(out.expert_predictions, expected, atol=1e-5)
    assert torch.count_nonzero(out.attention) == 0


@pytest.mark.parametrize("shared", [True, False])
def test_padded_neighbours_get_zero_attention_and_do_not_matter(shared):
    torch.manual_seed(0)
    attn = ExpertCrossAttention(3, 8, 4, offset_encoding_dim(), shared=shared)
    torch.nn.init.normal_(attn.out)  # trained-like output map (it starts at zero)
    b = _batch()
    phi = torch.randn(16, 5, offset_encoding_dim())
    out, w = attn(b["features"], b["neighbour_features"], phi, b["neighbour_mask"])
    assert out.shape == (16, 3, 8) and w.shape == (16, 1 if shared else 3, 5)
    assert torch.count_nonzero(out) > 0
    assert torch.all(w[~b["neighbour_mask"].unsqueeze(1).expand_as(w)] == 0)
    has = b["neighbour_mask"].any(-1)
    assert torch.allclose(w.sum(-1)[has], torch.ones_like(w.sum(-1)[has]), atol=1e-6)
    changed = b["neighbour_features"].clone()
    changed[~b["neighbour_mask"]] = 1e3  # garbage in padded slots
    out2, _ = attn(b["features"], changed, phi, b["neighbour_mask"])
    assert torch.allclose(out, out2, atol=1e-5)


def test_expression_loss_gradient_reaches_router():
    model = GCMoE(8, 6, adjacency=torch.zeros(4, 6, 6))
    out = model(**_batch())
    expression_loss(out.prediction, torch.randn(16, 6)).backward()
    grads = [p.grad for p in model.router.parameters()]
    assert all(g is not None and torch.count_nonzero(g) > 0 for g in grads)


def test_route_loss_uses_only_known_labels():
    model = GCMoE(8, 6, adjacency=torch.zeros(4, 6, 6), lambda_route=1.0)
    b = _batch()
    none_known = model(**b, cell_type=torch.full((16,), -1))
    assert "route" not in none_known.losses
    some = model(**b, cell_type=torch.tensor([0, 1, 2, 3] * 4))
    assert some.losses["route"].item() > 0


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_each_ablation_builds_only_its_parameters(name):
    model = create_model(name, 8, 6, adjacency=torch.zeros(4, 6, 6))
    params = {n.split(".")[0] for n, _ in model.named_parameters()}
    switches = ABLATIONS[name][1]
    assert ("router" in params) == switches["moe"]
    assert ("attention" in params) == switches["c2ca"]
    assert ("gcn" in params) == switches["cap"]
    assert ("head" in params) == (not switches["cap"])
    assert model.n_experts == (4 if switches["moe"] else 1)
    out = model(**_batch(), cell_type=torch.zeros(16, dtype=torch.long))
    assert out.prediction.shape == (16, 6)
    assert ("route" in out.losses) == switches["moe"]
    assert ("coexp" in out.losses) == switches["cap"]


def test_ablation_switches_are_fixed_by_name():
    with pytest.raises(Exception, match="fixed by the model name"):
        create_model("gcmoe", 8, 6, moe=False)


def test_c2ca_needs_neighbours():
    model = GCMoE(8, 6, adjacency=torch.zeros(4, 6, 6))
    with pytest.raises(ValueError, match="neighbour"):
        model(torch.randn(3, 8))


def test_full_model_starts_as_its_ablation_without_c2ca():
    """Zero-initialised neighbour parts: with the same seed, GC-MoE and "w/o C2CA" agree at initialisation."""
    batch = _batch()
    torch.manual_seed(3)
    ablation = create_model("gcmoe_no_c2ca", 8, 6, adjacency=torch.zeros(4, 6, 6)).eval()
    for params in ({}, {"c2ca_shared": False}, {"router_context": True, "neighbour_dropout": 0.3}):
        torch.manual_seed(3)
        full = create_model("gcmoe", 8, 6, adjacency=torch.zeros(4, 6, 6), **params).eval()
        a, f = ablation.compute(batch["features"]), full.compute(**batch)
        assert torch.equal(a.prediction, f.prediction) and torch.equal(a.routing, f.routing)
        # ... and moves away from it once trained: the output map and router context get gradients
        full.train()
        expression_loss(full(**batch).prediction, torch.randn(16, 6)).backward()
        assert torch.count_nonzero(full.attention.out.grad) > 0
        if params.get("router_context"):
            assert torch.count_nonzero(full.router_neighbours.weight.grad) > 0


def test_shared_c2ca_has_one_attention_block_and_per_expert_outputs():
    shared = GCMoE(8, 6, adjacency=torch.zeros(4, 6, 6))
    separate = GCMoE(8, 6, adjacency=torch.zeros(4, 6, 6), c2ca_shared=False)
    assert shared.attention.key.shape[0] == 1 and separate.attention.key.shape[0] == 4
    assert shared.attention.out.shape[0] == separate.attention.out.shape[0] == 4


def test_router_context_reads_the_neighbours_mean():
    torch.manual_seed(0)
    model = GCMoE(8, 6, adjacency=torch.zeros(4, 6, 6), router_context=True).eval()
    torch.nn.init.normal_(model.router_neighbours.weight)
    batch = _batch()
    base = model.compute(**batch).routing
    moved = dict(batch, neighbour_features=batch["neighbour_features"] + 1.0)
    has = batch["neighbour_mask"].any(-1)
    changed = (model.compute(**moved).routing - base).abs().sum(-1) > 1e-6
    assert torch.equal(changed, has)  # cells without neighbours route on their own feature only


def test_neighbour_dropout_acts_in_training_only():
    torch.manual_seed(0)
    model = GCMoE(8, 6, adjacency=torch.zeros(4, 6, 6), neighbour_dropout=0.5, dropout=0.0)
    torch.nn.init.normal_(model.attention.out)
    batch = _batch()
    model.eval()
    assert torch.equal(model.compute(**batch).prediction, model.compute(**batch).prediction)
    model.train()
    assert not torch.allclose(model.compute(**batch).prediction, model.compute(**batch).prediction)
