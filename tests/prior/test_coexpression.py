import anndata
import numpy as np
import pytest

from gcmoe.prior.coexpression import (
    CoexpressionPrior,
    PriorError,
    build_coexpression_prior,
    prior_from_files,
    reference_type_mapping,
)


def _reference(n=300, seed=0):
    """Type A: genes g0 and g1 co-vary; type B: g2 and g3 co-vary; g4.. are noise everywhere (40 genes, so
    library-size normalisation does not make the modules anti-correlated with the rest)."""
    rng = np.random.default_rng(seed)
    counts = rng.poisson(5.0, size=(2 * n, 40)).astype(float)
    drive_a = rng.gamma(2.0, 5.0, n)
    counts[:n, 0] += rng.poisson(drive_a)
    counts[:n, 1] += rng.poisson(drive_a)
    drive_b = rng.gamma(2.0, 5.0, n)
    counts[n:, 2] += rng.poisson(drive_b)
    counts[n:, 3] += rng.poisson(drive_b)
    ad = anndata.AnnData(counts)
    ad.var_names = [f"g{i}" for i in range(40)]
    ad.obs["cell_type"] = ["A_fine"] * n + ["B_fine"] * n
    ad.layers["counts"] = ad.X.copy()
    return ad


def test_expected_edges_from_hand_made_reference(tmp_path):
    ref = _reference()
    prior = build_coexpression_prior(ref, [f"g{i}" for i in range(5)], ["A", "B"],
                                     mapping={"A_fine": "A", "B_fine": "B"}, tau=0.3)
    a, b = prior.adjacency
    assert a[0, 1] and a[1, 0] and not b[0, 1]
    assert b[2, 3] and b[3, 2] and not a[2, 3]
    assert not a.diagonal().any() and (a == a.T).all()
    assert a.sum() == 2 and b.sum() == 2
    s = prior.summary()
    assert s["types"]["A"]["edges"] == 1 and s["types"]["B"]["genes_covered"] == 2
    again = CoexpressionPrior.load(prior.save(tmp_path / "prior.npz"))
    assert again.genes == prior.genes and (again.adjacency == prior.adjacency).all()
    sub = prior.subset(["g1", "g0"])
    assert sub.adjacency[0, 0, 1] and sub.adjacency.shape == (2, 2, 2)


def test_missing_genes_warn_and_get_no_edges():
    with pytest.warns(UserWarning, match="absent from the reference.*nope"):
        prior = build_coexpression_prior(_reference(), ["g0", "g1", "nope"], ["A", "B"],
                                         mapping={"A_fine": "A", "B_fine": "B"}, tau=0.3)
    assert prior.missing_genes == ["nope"] and not prior.adjacency[:, 2].any()


def test_type_without_reference_cells_is_refused():
    with pytest.raises(PriorError, match="routing type 'C' has 0 reference cells"):
        build_coexpression_prior(_reference(), ["g0", "g1"], ["A", "C"], mapping={"A_fine": "A"})


def test_corrupt_prior_file(tmp_path):
    bad = tmp_path / "p.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(PriorError, match="not a gcmoe co-expression prior"):
        CoexpressionPrior.load(bad)


def test_reference_type_mapping_order_of_precedence():
    ref = anndata.AnnData(np.zeros((3, 1)))
    ref.obs["cell_type"] = ["T", "B", "Tumour"]
    assert reference_type_mapping(ref) == {"T": "T", "B": "B", "Tumour": "Tumour"}
    assert reference_type_mapping(ref, routing_types=["T", "x"]) == {"T": "T"}
    ref.uns["gcmoe"] = {"type_mapping": {"T": "immune", "B": "immune"}}
    assert reference_type_mapping(ref, routing_types=["T"]) == {"T": "immune", "B": "immune"}
    assert reference_type_mapping(ref, mapping={"Tumour": "neoplastic"}) == {"Tumour": "neoplastic"}


def test_prior_from_files_takes_genes_and_types_from_the_files(tmp_path):
    ref = _reference()
    ref.write_h5ad(tmp_path / "ref.h5ad")
    (tmp_path / "map.yaml").write_text("A_fine: first\nB_fine: second\n")
    prior = prior_from_files(tmp_path / "ref.h5ad", mapping=tmp_path / "map.yaml", tau=0.2)
    assert prior.types == ["first", "second"] and prior.genes == list(map(str, ref.var_names))
