import numpy as np
import pytest
from scipy.stats import pearsonr

from gcmoe.evaluation.metrics import pearson_per_gene, score_genes, summarize_folds


def test_pcc_matches_scipy():
    rng = np.random.default_rng(0)
    pred, true = rng.normal(size=(200, 7)), rng.normal(size=(200, 7))
    true[:, 0] += 3 * pred[:, 0]
    r = pearson_per_gene(pred, true)
    for g in range(7):
        assert r[g] == pytest.approx(pearsonr(pred[:, g], true[:, g]).statistic, abs=1e-10)


def test_constant_genes_reported_and_excluded():
    rng = np.random.default_rng(1)
    pred, true = rng.normal(size=(50, 3)), rng.normal(size=(50, 3))
    true[:, 1] = 2.0  # measured constant
    pred[:, 2] = -1.0  # predicted constant
    s = score_genes(pred, true, ["a", "b", "c"])
    assert s.excluded == ["b", "c"]
    assert s.mean == pytest.approx(pearsonr(pred[:, 0], true[:, 0]).statistic)


def test_summary_ignores_nan_folds():
    mean, std = summarize_folds([0.2, 0.4, float("nan")])
    assert mean == pytest.approx(0.3) and std == pytest.approx(np.std([0.2, 0.4], ddof=1))


def test_score_by_type_scores_each_type_on_its_own_cells():
    from gcmoe.evaluation.metrics import score_by_type

    rng = np.random.default_rng(0)
    true = rng.normal(size=(60, 4))
    types = np.array(["a"] * 30 + ["b"] * 25 + ["c"] * 5)
    pred = true.copy()
    pred[types == "b"] = rng.normal(size=((types == "b").sum(), 4))  # right for a, noise for b
    scores = score_by_type(pred, true, types)
    assert set(scores) == {"a", "b"}  # c has under 10 cells
    assert scores["a"] == pytest.approx(1.0) and abs(scores["b"]) < 0.5
