import numpy as np
import pytest

from gcmoe.config import TargetConfig
from gcmoe.data.genes import select_genes
from gcmoe.data.normalisation import compute_targets, sparse_targets
from gcmoe.errors import InvalidSampleError


def test_log1p_and_normalisation():
    counts = np.array([[1, 3], [0, 0], [2, 2]])
    np.testing.assert_allclose(compute_targets(counts, TargetConfig()), np.log1p(counts), rtol=1e-6)
    norm = compute_targets(counts, TargetConfig(normalize_total=100))
    np.testing.assert_allclose(norm[0], np.log1p([25, 75]), rtol=1e-6)
    np.testing.assert_array_equal(norm[1], [0, 0])  # empty cell stays zero, no NaN
    np.testing.assert_array_equal(compute_targets(counts, TargetConfig(transform="none")), counts)


def test_sparse_targets_equal_the_dense_formula():
    import scipy.sparse as sp

    dense = np.random.default_rng(0).poisson(0.7, (60, 9)).astype(np.float64)
    dense[3] = 0  # an empty cell
    for nt in (None, 100.0):
        for transform in ("log1p", "none"):
            x = dense if nt is None else np.divide(dense * nt, dense.sum(1, keepdims=True),
                                                   out=np.zeros_like(dense), where=dense.sum(1, keepdims=True) > 0)
            want = (np.log1p(x) if transform == "log1p" else x).astype(np.float32)
            got = sparse_targets(sp.csr_matrix(dense.astype(np.float32)), TargetConfig(transform=transform, normalize_total=nt))
            assert sp.issparse(got) and got.dtype == np.float32
            np.testing.assert_array_equal(got.toarray(), want)
            np.testing.assert_array_equal(compute_targets(dense, TargetConfig(transform=transform, normalize_total=nt)), want)


def test_hvg_picks_variable_genes_from_training_cells():
    rng = np.random.default_rng(0)
    n = 400
    flat = rng.poisson(np.exp(rng.uniform(np.log(0.5), np.log(30), size=200)), size=(n, 200))
    high = np.array([1.0, 3.0, 6.0, 12.0, 25.0])
    variable = rng.poisson(np.where(rng.random((n, 5)) < 0.5, 0.05 * high, 2 * high))
    counts = np.hstack([flat, variable])
    genes = [f"flat{i}" for i in range(200)] + [f"var{i}" for i in range(5)]
    chosen = select_genes(counts, genes, np.arange(n), TargetConfig(n_top_genes=5))
    assert sorted(chosen) == sorted(genes[200:])
    # only the given cells count: on cells where the "variable" genes are flat they are not chosen first
    calm = np.flatnonzero((variable > 5).all(axis=1))
    if len(calm) > 20:
        assert sorted(select_genes(counts, genes, calm, TargetConfig(n_top_genes=5))) != sorted(genes[200:])


def test_explicit_genes_must_exist():
    with pytest.raises(InvalidSampleError, match="absent from the data"):
        select_genes(np.ones((3, 2)), ["a", "b"], np.arange(3), TargetConfig(genes=["a", "zz"]))
    assert select_genes(np.ones((3, 2)), ["a", "b"], np.arange(3), TargetConfig(genes=["b"])) == ["b"]
