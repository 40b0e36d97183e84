"""The virtual tissue: determinism, fields, the count model, expected targets and the ceiling."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from anndata import AnnData
from scipy import stats

from gcmoe._constants import Key, UnsKey
from gcmoe.config import PAPER_CELL_TYPES, TissueConfig
from gcmoe.data.image import ArrayImage
from gcmoe.data.sample import Sample
from gcmoe.data.virtual_tissue import VirtualTissue, ceiling_pcc, expected_target, simulate_tissue
from gcmoe.data.virtual_tissue.expression import draw_counts
from gcmoe.data.virtual_tissue.truth import DISPERSION_KEY, nb_expectation
from gcmoe.errors import ConfigError, InvalidSampleError

SMALL = dict(n_cells=400, height=600, width=600, n_genes=60, n_reference_cells=300)


@pytest.fixture(scope="module")
def tissue() -> VirtualTissue:
    return simulate_tissue(TissueConfig(seed=3, **SMALL))


def _truth(adata: AnnData):
    meta = adata.uns[Key.UNS][UnsKey.TRUTH]
    dropout = {k: float(meta[k]) for k in ("dropout_max", "dropout_mid", "dropout_slope")}
    return np.asarray(adata.layers[Key.TRUTH_MEAN]), np.asarray(adata.var[DISPERSION_KEY]), dropout


def test_same_seed_same_tissue_other_seed_differs(tissue):
    again = simulate_tissue(TissueConfig(seed=3, **SMALL))
    assert np.array_equal(again.sample.image.array, tissue.sample.image.array)
    assert np.array_equal(again.sample.counts, tissue.sample.counts)
    assert np.array_equal(again.sample.spatial, tissue.sample.spatial)
    assert np.array_equal(again.reference.X, tissue.reference.X)
    other = simulate_tissue(TissueConfig(seed=4, **SMALL))
    assert not np.array_equal(other.sample.image.array, tissue.sample.image.array)
    assert not np.array_equal(other.sample.spatial, tissue.sample.spatial)


def test_sample_fields(tissue):
    sample, ad = tissue.sample, tissue.sample.adata
    assert isinstance(sample.image, ArrayImage) and sample.image.shape == (600, 600)
    assert sample.image.array.dtype == np.uint8 and sample.image.array.shape == (600, 600, 3)
    assert ad.shape == (400, 60) and sample.mpp == 0.5
    assert list(ad.obs[Key.CELL_TYPE].cat.categories) == list(PAPER_CELL_TYPES)
    assert set(ad.obs[Key.CELL_TYPE]) == set(PAPER_CELL_TYPES)  # every routing type has cells
    mapping = ad.uns[Key.UNS]["type_mapping"]
    assert len(mapping) == 9
    assert all(mapping[s] == t for s, t in zip(ad.obs["cell_subtype"].astype(str), ad.obs[Key.CELL_TYPE].astype(str)))
    assert ad.layers[Key.TRUTH_MEAN].shape == ad.shape and (ad.layers[Key.TRUTH_MEAN] >= 0).all()
    names = list(ad.uns[Key.UNS][UnsKey.TRUTH]["state_names"])
    assert ad.obsm[Key.TRUTH_STATE].shape == (400, len(names))
    assert (ad.obs["nucleus_area_um2"] > 5).all() and (ad.obs["nucleus_area_um2"] < 400).all()
    assert (ad.var[DISPERSION_KEY] > 0).all()
    prov = ad.uns[Key.UNS][UnsKey.PROVENANCE]
    assert prov["generator"] == "gcmoe.data.virtual_tissue" and prov["config"]["seed"] == 3
    assert ad.obs_names.is_unique and ad.var_names.is_unique


def test_truth_matches_sample(tissue):
    truth, ad = tissue.truth, tissue.sample.adata
    assert np.array_equal(truth.expected_counts, ad.layers[Key.TRUTH_MEAN])
    assert np.array_equal(truth.cell_type.astype(str), ad.obs[Key.CELL_TYPE].astype(str).to_numpy())
    assert np.array_equal(truth.cell_subtype.astype(str), ad.obs["cell_subtype"].astype(str).to_numpy())
    assert np.allclose(truth.nucleus_area_um2, ad.obs["nucleus_area_um2"])
    assert len(truth.morphology) == 400 and truth.state.shape == ad.obsm[Key.TRUTH_STATE].shape


def test_reference(tissue):
    ref = tissue.reference
    assert ref.n_obs == 300 and list(ref.var_names) == tissue.sample.genes
    assert np.array_equal(ref.X, ref.layers[Key.COUNTS])
    mapping = ref.uns[Key.UNS]["type_mapping"]
    assert set(ref.obs[Key.CELL_TYPE].astype(str)) <= set(mapping)
    assert set(mapping.values()) == set(PAPER_CELL_TYPES)
    x = ref.layers[Key.COUNTS]
    assert (x >= 0).all() and np.array_equal(x, np.round(x))
    # deeper than the tissue, as scRNA-seq against Xenium
    assert np.median(x.sum(axis=1)) > np.median(tissue.sample.counts.sum(axis=1))


def test_centres_inside_image(tissue):
    xy = tissue.sample.spatial
    h, w = tissue.sample.image.shape
    assert (xy[:, 0] >= 0).all() and (xy[:, 0] < w).all() and (xy[:, 1] >= 0).all() and (xy[:, 1] < h).all()


def test_counts_are_non_negative_integers(tissue):
    ad = tissue.sample.adata
    counts = np.asarray(ad.layers[Key.COUNTS])
    assert (counts >= 0).all() and np.array_equal(counts, np.round(counts))
    assert np.array_equal(counts, np.asarray(ad.X))
    assert counts.sum(axis=1).min() >= 0 and counts.sum() > 0


def test_nb_expectation_is_exact():
    mu = np.array([0.01, 0.7, 3.0, 40.0, 400.0])
    for phi in (0.0, 0.2, 1.0):
        got = nb_expectation(mu, np.full_like(mu, phi))
        want = []
        for m in mu:
            c = np.arange(0, int(m * 80 + 200))
            pmf = stats.poisson.pmf(c, m) if phi == 0 else stats.nbinom.pmf(c, 1 / phi, 1 / (1 + phi * m))
            want.append((pmf * np.log1p(c)).sum())
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_expected_target_matches_monte_carlo(tissue):
    ad = tissue.sample.adata[:40]
    mu, phi, dropout = _truth(ad)
    rng = np.random.default_rng(0)
    draws = np.stack([draw_counts(mu, phi, dropout, rng) for _ in range(3000)])
    for transform, f in (("log1p", np.log1p), ("none", lambda x: x)):
        mc = f(draws.astype(np.float64))
        se = mc.std(axis=0) / np.sqrt(len(mc))
        diff = np.abs(expected_target(ad, transform) - mc.mean(axis=0))
        assert (diff <= 5.5 * se + 1e-3).all(), transform  # rare genes: all 3000 draws may be zero
        assert np.mean(diff[se > 0] / se[se > 0]) < 1.0, transform  # |z| averages about 0.8


def test_expected_target_normalized_is_monte_carlo_estimate(tissue):
    ad = tissue.sample.adata[:30]
    a = expected_target(ad, "log1p", normalize_total=100.0, n_draws=300, seed=1)
    b = expected_target(ad, "log1p", normalize_total=100.0, n_draws=300, seed=2)
    assert a.shape == ad.shape
    assert np.abs(a - b).mean() < 0.03
    exact = expected_target(ad, "log1p")
    assert np.corrcoef(a.ravel(), exact.ravel())[0, 1] > 0.9


def test_ceiling_pcc_equals_scipy_pearson(tissue):
    ad = tissue.sample.adata
    cells = np.arange(0, 400, 2)
    genes = list(ad.var_names[:25])
    got = ceiling_pcc(ad, genes=genes, cells=cells)
    assert list(got.index) == genes
    expected = expected_target(ad)
    observed = np.log1p(np.asarray(ad.layers[Key.COUNTS], dtype=np.float64))
    for j, g in enumerate(genes):
        e, o = expected[cells, j], observed[cells, j]
        if np.ptp(o) == 0 or np.ptp(e) == 0:
            assert np.isnan(got[g])
        else:
            assert got[g] == pytest.approx(stats.pearsonr(e, o)[0], abs=1e-10)
    boolean = ceiling_pcc(ad, genes=genes, cells=np.isin(np.arange(400), cells))
    pd.testing.assert_series_equal(boolean, got)


def test_ceiling_is_below_one_and_positive(tissue):
    c = ceiling_pcc(tissue.sample.adata)
    assert 0.2 < c.mean() < 0.95


@pytest.mark.parametrize("k", [2, 3, 6, 12])
def test_any_number_of_cell_types(k):
    t = simulate_tissue(TissueConfig(seed=0, n_cells=300, height=500, width=500, n_genes=50, n_cell_types=k,
                                     n_reference_cells=100))
    ad = t.sample.adata
    names = [f"type_{i}" for i in range(k)]
    assert list(ad.obs[Key.CELL_TYPE].cat.categories) == names
    assert set(ad.obs[Key.CELL_TYPE].astype(str)) == set(names)
    mapping = ad.uns[Key.UNS]["type_mapping"]
    assert set(mapping.values()) == set(names) and len(mapping) == max(9, k)
    assert set(t.reference.uns[Key.UNS]["type_mapping"].values()) == set(names)


def test_write_read_keeps_expected_target(tissue, tmp_path):
    path = tissue.sample.write(tmp_path / "vt.h5ad")
    back = Sample.read(path)
    assert np.array_equal(back.image.read_region(0, 0, 600, 600), tissue.sample.image.array)
    np.testing.assert_array_equal(expected_target(back.adata), expected_target(tissue.sample.adata))
    pd.testing.assert_series_equal(ceiling_pcc(back.adata), ceiling_pcc(tissue.sample.adata))


def test_expected_target_without_truth_raises(tiny_sample):
    with pytest.raises(InvalidSampleError, match="truth"):
        expected_target(tiny_sample.adata)
    with pytest.raises(InvalidSampleError):
        ceiling_pcc(tiny_sample.adata)


def test_bad_settings_raise():
    with pytest.raises(ConfigError, match="unknown"):
        simulate_tissue(n_cels=10)
    with pytest.raises(ConfigError):
        simulate_tissue(n_cells=0)
    with pytest.raises(ConfigError):
        expected_target(AnnData(np.zeros((2, 2))), transform="sqrt")


def test_neighbourhood_effect_and_spill_switch_off_the_neighbours(tissue):
    """neighbourhood_effect=0 and spill=0: a cell's expected counts depend on its own type and state only."""
    from gcmoe.data.virtual_tissue.expression import own_expression

    quiet = simulate_tissue(TissueConfig(seed=3, **SMALL, neighbourhood_effect=0.0, spill=0.0))
    assert np.array_equal(quiet.sample.spatial, tissue.sample.spatial)  # same layout and image
    assert np.array_equal(quiet.sample.image.array, tissue.sample.image.array)
    state = quiet.truth.state.copy()
    names = list(quiet.truth.programs.subtype_names)
    subtype = np.array([names.index(s) for s in quiet.truth.cell_subtype])
    moved = state.copy()
    moved[:, 5:7] = np.random.default_rng(0).uniform(0, 1, (len(state), 2))  # other neighbourhoods
    own = own_expression(quiet.truth.programs, subtype, state)
    assert np.allclose(quiet.truth.expected_counts, own)  # no spill-over
    assert np.allclose(own_expression(quiet.truth.programs, subtype, moved), own)  # no induced genes
    assert not np.allclose(tissue.truth.expected_counts, quiet.truth.expected_counts)
    strong = simulate_tissue(TissueConfig(seed=3, **SMALL, neighbourhood_effect=3.0))
    induced = np.array([r.startswith("neighbourhood:") for r in strong.sample.adata.var["gene_role"]])
    var_default = np.log1p(tissue.truth.expected_counts[:, induced]).var(0).mean()
    assert np.log1p(strong.truth.expected_counts[:, induced]).var(0).mean() > 1.5 * var_default


def test_alternate_stain_changes_colour_not_cells(tissue):
    alt = simulate_tissue(TissueConfig(seed=3, **SMALL, stain="alternate"))
    assert np.array_equal(alt.sample.counts, tissue.sample.counts)
    a, b = tissue.sample.image.array.astype(float), alt.sample.image.array.astype(float)
    assert np.abs(a.mean((0, 1)) - b.mean((0, 1))).max() > 5  # another colour balance
    dark_a, dark_b = a.sum(-1) < np.percentile(a.sum(-1), 5), b.sum(-1) < np.percentile(b.sum(-1), 5)
    assert (dark_a & dark_b).sum() > 0.5 * dark_a.sum()  # the nuclei are where they were
    with pytest.raises(ConfigError, match="stain"):
        simulate_tissue(TissueConfig(seed=3, **SMALL, stain="sepia"))
