"""What a perfect model would predict, and the ceiling it would reach.

The truth stored with a virtual tissue's cells is enough to compute E[target | truth] for any target
transform, also after the Sample was written to .h5ad and read back:

- ``layers["truth_mean"]``: mu, the noise-free expected counts (cells x genes);
- ``var["truth_dispersion"]``: phi_g, the negative-binomial over-dispersion (variance mu + phi mu^2);
- ``uns["gcmoe"]["truth"]``: the zero-inflation parameters ``dropout_max``, ``dropout_mid``, ``dropout_slope``
  (pi(mu) = dropout_max / (1 + (mu / dropout_mid)^dropout_slope)).

Without library-size normalisation the expectation is exact: E[f(X)] = (1 - pi) sum_c f(c) NB(c; mu, phi),
summed until the remaining probability mass is below 1e-12 (f(0) = 0 for both transforms). With
normalisation the target depends on the whole cell (its total count), so the expectation is a Monte Carlo
average over ``n_draws`` re-drawn count matrices with a fixed seed (standard error about sd / sqrt(n_draws)).
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from scipy.special import gammaln

from gcmoe._constants import Key, UnsKey
from gcmoe.data.virtual_tissue.expression import draw_counts, dropout_probability
from gcmoe.errors import ConfigError, InvalidSampleError

log = logging.getLogger(__name__)

DISPERSION_KEY = "truth_dispersion"  # var: NB over-dispersion of each gene
MC_DRAWS = 100  # default Monte Carlo draws when normalize_total is set (about 10 s for the default tissue)
MC_SEED = 12345
_TAIL = 1e-12  # probability mass left out of the exact sums


def _truth_fields(adata: AnnData) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """mu (cells x genes, float64), phi (genes,), dropout parameters; InvalidSampleError when absent."""
    missing = []
    if Key.TRUTH_MEAN not in adata.layers:
        missing.append(f"layers['{Key.TRUTH_MEAN}']")
    if DISPERSION_KEY not in adata.var:
        missing.append(f"var['{DISPERSION_KEY}']")
    meta = adata.uns.get(Key.UNS, {})
    truth = meta.get(UnsKey.TRUTH) if hasattr(meta, "get") else None
    if truth is None or any(k not in truth for k in ("dropout_max", "dropout_mid", "dropout_slope")):
        missing.append(f"uns['{Key.UNS}']['{UnsKey.TRUTH}'] with the dropout parameters")
    if missing:
        raise InvalidSampleError(
            f"no generator truth in this AnnData (missing {', '.join(missing)}): expected_target and ceiling_pcc "
            "need a virtual tissue from gcmoe.data.virtual_tissue.simulate_tissue (or a Sample written from one)"
        )
    mu = adata.layers[Key.TRUTH_MEAN]
    mu = np.asarray(mu.toarray() if sp.issparse(mu) else mu, dtype=np.float64)
    phi = np.asarray(adata.var[DISPERSION_KEY], dtype=np.float64)
    dropout = {k: float(truth[k]) for k in ("dropout_max", "dropout_mid", "dropout_slope")}
    return mu, phi, dropout


def nb_expectation(mu: np.ndarray, phi: np.ndarray, fn=np.log1p, tail: float = _TAIL) -> np.ndarray:
    """E[fn(X)] for X ~ NB(mean mu, over-dispersion phi), elementwise (phi = 0: Poisson); exact to ``tail``.

    The pmf is walked upwards by its recurrence p(c+1) = p(c) (c + r) / (c + 1) * mu / (r + mu), r = 1 / phi,
    from a start well below the mean, for every entry at once, until each entry's remaining mass < ``tail``.
    """
    mu = np.asarray(mu, dtype=np.float64)
    phi = np.broadcast_to(np.asarray(phi, dtype=np.float64), mu.shape)
    shape = mu.shape
    mu, phi = mu.ravel(), phi.ravel()
    out = np.zeros(mu.size)
    live = np.flatnonzero(mu > 0)
    if live.size == 0:
        return out.reshape(shape)
    m, ph = mu[live], phi[live]
    poisson = ph <= 0
    r = np.where(poisson, 0.0, 1.0 / np.where(poisson, 1.0, ph))  # NB size; unused where Poisson
    sd = np.sqrt(m + ph * m * m)
    c = np.maximum(0.0, np.floor(m - 12.0 * sd - 10.0))  # start far below the mean
    with np.errstate(divide="ignore", invalid="ignore"):
        logp_nb = gammaln(c + r) - gammaln(r) - gammaln(c + 1) + r * np.log(r / (r + m)) + c * np.log(m / (r + m))
    logp = np.where(poisson, c * np.log(m) - m - gammaln(c + 1), logp_nb)
    p = np.exp(logp)
    # p(c+1) / p(c) = (a + b c) / (c + 1): Poisson a = mu, b = 0; NB a = r q, b = q with q = mu / (r + mu)
    q = np.where(poisson, 0.0, m / (r + m))
    a = np.where(poisson, m, r * q)
    stop = m + 60.0 * sd + 60.0
    total = np.zeros(live.size)
    mass = np.zeros(live.size)
    idx = np.arange(live.size)
    while idx.size:
        total[idx] += p * fn(c)
        mass[idx] += p
        p = p * (a + q * c) / (c + 1.0)
        c = c + 1.0
        keep = ((1.0 - mass[idx] > tail) | (c <= m)) & (c < stop)
        if not keep.all():
            idx, p, c, a, q, m, stop = idx[keep], p[keep], c[keep], a[keep], q[keep], m[keep], stop[keep]
    out[live] = total
    return out.reshape(shape)


def _check_target(transform: str, normalize_total: float | None) -> None:
    if transform not in ("log1p", "none"):
        raise ConfigError(f"transform must be 'log1p' or 'none', got {transform!r}")
    if normalize_total is not None and not normalize_total > 0:
        raise ConfigError(f"normalize_total must be > 0 or None, got {normalize_total}")


def _observed(counts: np.ndarray, transform: str, normalize_total: float | None) -> np.ndarray:
    x = np.asarray(counts, dtype=np.float64)
    if normalize_total is not None:
        total = x.sum(axis=1, keepdims=True)
        x = np.divide(x * normalize_total, total, out=np.zeros_like(x), where=total > 0)
    return np.log1p(x) if transform == "log1p" else x


def _expected(mu: np.ndarray, phi: np.ndarray, dropout: dict[str, float], transform: str,
              normalize_total: float | None, n_draws: int, seed: int) -> np.ndarray:
    if normalize_total is None:
        keep = 1.0 - dropout_probability(mu, **dropout)
        if transform == "none":
            return keep * mu
        return keep * nb_expectation(mu, phi[None, :])
    log.debug("E[target | truth] with normalize_total=%s: Monte Carlo over %d draws", normalize_total, n_draws)
    rng = np.random.default_rng(seed)
    acc = np.zeros_like(mu)
    chunk = max(1, 2_000_000 // max(mu.shape[1], 1))
    for start in range(0, mu.shape[0], chunk):
        block = mu[start : start + chunk]
        for _ in range(n_draws):
            acc[start : start + chunk] += _observed(draw_counts(block, phi, dropout, rng), transform, normalize_total)
    return acc / n_draws


def expected_target(adata: AnnData, transform: Literal["log1p", "none"] = "log1p",
                    normalize_total: float | None = None, *, n_draws: int = MC_DRAWS, seed: int = MC_SEED
                    ) -> np.ndarray:
    """E[target | truth] for every cell and gene of ``adata`` (in ``adata.var`` order), float64.

    Parameters
    ----------
    adata
        A virtual tissue's AnnData (``tissue.sample.adata``, also after ``Sample.write`` / ``Sample.read``).
    transform
        ``"log1p"``: target = log1p(counts); ``"none"``: raw counts.
    normalize_total
        When set, counts are first scaled to this total per cell (over the genes of ``adata``), as
        ``gcmoe.data.normalisation.compute_targets`` does; the expectation is then Monte Carlo.
    n_draws, seed
        Monte Carlo draws and seed (used only with ``normalize_total``).

    Raises
    ------
    InvalidSampleError
        When the truth fields are missing (not a virtual tissue).
    """
    _check_target(transform, normalize_total)
    mu, phi, dropout = _truth_fields(adata)
    return _expected(mu, phi, dropout, transform, normalize_total, n_draws, seed)


def ceiling_pcc(adata: AnnData, genes: list[str] | None = None, cells: np.ndarray | None = None,
                transform: Literal["log1p", "none"] = "log1p", normalize_total: float | None = None) -> pd.Series:
    """Per gene, the Pearson r between E[target | truth] and the observed target over ``cells``.

    This is the best any predictor can do on these cells: the expectation is the optimal prediction given
    everything the generator knew. Genes whose observed or expected target is constant over the cells get NaN.

    Parameters
    ----------
    adata
        A virtual tissue's AnnData.
    genes
        Genes to score (default: all, in ``adata.var`` order).
    cells
        Integer positions or a boolean mask of the cells to score over (default: all).
    transform, normalize_total
        The target, as in :func:`expected_target`.

    Returns
    -------
    Series of Pearson r indexed by gene name.
    """
    _check_target(transform, normalize_total)
    mu, phi, dropout = _truth_fields(adata)
    names = list(map(str, adata.var_names))
    if genes is None:
        cols = np.arange(len(names))
    else:
        unknown = [g for g in genes if g not in set(names)]
        if unknown:
            raise InvalidSampleError(f"genes not in the data: {unknown[:10]}")
        cols = np.array([names.index(g) for g in genes], dtype=np.int64)
    rows = np.arange(adata.n_obs) if cells is None else np.arange(adata.n_obs)[np.asarray(cells)]
    counts = adata.layers[Key.COUNTS]
    counts = counts[rows].toarray() if sp.issparse(counts) else np.asarray(counts)[rows]
    mu = mu[rows]
    if normalize_total is None:  # per-gene targets: only the requested genes are needed
        expected = _expected(mu[:, cols], phi[cols], dropout, transform, None, 0, 0)
        observed = _observed(counts[:, cols], transform, None)
    else:
        expected = _expected(mu, phi, dropout, transform, normalize_total, MC_DRAWS, MC_SEED)[:, cols]
        observed = _observed(counts, transform, normalize_total)[:, cols]
    return pd.Series(_pearson_columns(expected, observed), index=[names[c] for c in cols], name="ceiling_pcc")


def _pearson_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r between matching columns; NaN where either column is constant."""
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    den = np.sqrt((a * a).sum(axis=0) * (b * b).sum(axis=0))
    num = (a * b).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
