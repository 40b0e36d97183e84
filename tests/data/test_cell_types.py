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
