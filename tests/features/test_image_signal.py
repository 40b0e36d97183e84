"""The default features must see cell type and within-type state on the virtual tissue (issue: not trivial,
but well above chance)."""

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.preprocessing import StandardScaler

from gcmoe._constants import Key
from gcmoe.config import TissueConfig
from gcmoe.data.virtual_tissue import simulate_tissue
from gcmoe.features import extract_features


@pytest.mark.slow
def test_types_and_state_are_visible_in_features():
    tissue = simulate_tissue(TissueConfig(n_cells=2000, height=1100, width=1100, n_genes=60, n_reference_cells=300, seed=2))
    feats = extract_features(tissue.sample, progress=False)
    ad = tissue.sample.adata
    y = ad.obs[Key.CELL_TYPE].astype(str).to_numpy()
    x = tissue.sample.spatial[:, 0]
    train, test = x < np.quantile(x, 0.7), x >= np.quantile(x, 0.7)
    sc = StandardScaler().fit(feats[train])
    acc = (LogisticRegression(max_iter=2000).fit(sc.transform(feats[train]), y[train]).predict(sc.transform(feats[test])) == y[test]).mean()
    values, counts = np.unique(y[test], return_counts=True)
    assert acc > counts.max() / counts.sum() + 0.25, acc
    # within-type state: the "activity" state of neoplastic cells (drawn as nucleus size / chromatin)
    names = list(ad.uns["gcmoe"]["truth"]["state_names"])
    state = np.asarray(ad.obsm[Key.TRUTH_STATE])[:, names.index("activity")]
    neo = y == "neoplastic"
    tr, te = neo & train, neo & test
    if te.sum() < 20:  # the test strip holds few tumour cells: use a random split within the type
        idx = np.flatnonzero(neo)
        tr, te = np.zeros_like(neo), np.zeros_like(neo)
        tr[idx[::2]], te[idx[1::2]] = True, True
    sc = StandardScaler().fit(feats[tr])
    pred = Ridge(alpha=1.0).fit(sc.transform(feats[tr]), state[tr]).predict(sc.transform(feats[te]))
    assert np.corrcoef(pred, state[te])[0, 1] > 0.3
