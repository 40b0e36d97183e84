import anndata
import numpy as np

from gcmoe.data.cell_types import label_agreement, transfer_labels


def test_transfer_on_well_separated_types():
    rng = np.random.default_rng(0)
    programs = {"T": np.r_[np.full(10, 20.0), np.full(20, 0.5)], "Mac": np.r_[np.full(10, 0.5), np.full(10, 20.0), np.full(10, 0.5)],
                "Fib": np.r_[np.full(20, 0.5), np.full(10, 20.0)]}
    ref_types = np.repeat(list(programs), 100)
    ref = anndata.AnnData(np.vstack([rng.poisson(programs[t]) for t in ref_types]).astype(float))
    ref.var_names = [f"g{i}" for i in range(30)]
    ref.obs["cell_type"] = ref_types
    truth = rng.choice(list(programs), 200)
    query = np.vstack([rng.poisson(programs[t] / 4) for t in truth])  # shallower, as in situ
    mapping = {"T": "inflammatory", "Mac": "inflammatory", "Fib": "connective"}
    genes = [f"g{i}" for i in range(30)][::-1]  # a different gene order
    ann = transfer_labels(query[:, ::-1], genes, ref, mapping, layer=None)
    assert (ann.reference_labels == truth).mean() > 0.95
    agree = label_agreement(ann.labels, np.array([mapping[t] for t in truth]))
    assert agree["accuracy"] > 0.95 and set(agree["recall"]) == {"inflammatory", "connective"}


def test_transfer_in_blocks_equals_one_pass(monkeypatch):
    import scipy.sparse as sp

    rng = np.random.default_rng(1)
    ref = anndata.AnnData(rng.poisson(3.0, (90, 12)).astype(float) * np.repeat(np.eye(3), 4, axis=1).repeat(30, 0)[:90])
    ref.var_names = [f"g{i}" for i in range(12)]
    ref.obs["cell_type"] = np.repeat(["a", "b", "c"], 30)
    query = sp.csr_matrix(rng.poisson(1.0, (500, 12)).astype(np.float32))
    genes = list(ref.var_names)
    whole = transfer_labels(query, genes, ref, {"a": "A", "b": "B", "c": "C"}, layer=None)
    monkeypatch.setattr("gcmoe.data.cell_types._BLOCK", 37)
    blocks = transfer_labels(query, genes, ref, {"a": "A", "b": "B", "c": "C"}, layer=None)
    np.testing.assert_array_equal(blocks.labels, whole.labels)
    np.testing.assert_allclose(blocks.score, whole.score)
