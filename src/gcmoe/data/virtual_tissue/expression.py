"""Expression of the virtual tissue: gene programs, expected counts, count noise, reference scRNA-seq.

For cell i of subtype t with state (activity a, differentiation d, hidden module activities h_1..h_M,
library factor z) and neighbourhood fractions f_imm, f_tum (share of immune / tumour cells among the cells
within ``NEIGHBOUR_UM``), the log-abundance of gene g is

    eta_ig = b_g + T_tg + a A_tg + d D_tg + sum_m h_m M_tmg + f_imm N_tg + f_tum U_tg

and its own expected counts are own_ig = L_i softmax_g(eta_i)_g with the library size
log L_i = log L_t + LIBRARY_ACTIVITY a + LIBRARY_SD z (a, the state that enlarges the nucleus, also raises the
cell's counts). A share of each neighbour's transcripts is assigned to the cell, as segmentation does on real
Xenium slides: mu_i = own_i + sum_j S_ij own_j, with S from ``spill_matrix``. ``mu`` is the noise-free
expected count matrix (the truth). Observed counts are zero-inflated negative binomial:

    X_ig ~ NB(mean mu_ig, over-dispersion phi_g)   (variance mu + phi mu^2; phi_g = noise * phi0_g)
    X_ig := 0 with probability pi(mu_ig) = dropout * DROPOUT_MAX / (1 + (mu_ig / DROPOUT_MID)^DROPOUT_SLOPE)

Programs (b, T, A, D, M, N, U, L_t, phi0) come from ``program_seed`` alone, so tissues drawn with different
seeds share their biology and a reference drawn from them matches every tissue.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from scipy.spatial import cKDTree

from gcmoe._constants import Key
from gcmoe.data.virtual_tissue.cell_types import (EPITHELIAL, IMMUNE_FAMILIES, LYMPHOID, STROMAL, TUMOUR,
                                                  TypeSet)

STATE_NAMES = ("activity", "differentiation", "module_1", "module_2", "library", "nbr_immune", "nbr_tumour")
VISIBLE_STATE = ("activity", "differentiation")  # drawn into the image (morphology.py)
N_MODULES = 2
NEIGHBOUR_UM = 40.0  # radius of the neighbourhood whose composition induces genes
ACTIVITY_SPATIAL = 0.4  # share of the activity variance that is a smooth spatial field
ACTIVITY_FIELD_UM = 45.0  # correlation length of that field
LIBRARY_ACTIVITY = 0.36  # d log library size / d activity
LIBRARY_SD = 0.85  # sd of log library size not explained by the activity
SPILL = 0.26  # capture efficiency of neighbours' transcripts inside a cell's segment
TERRITORY_UM = 8.0  # radius of the segment of an isolated cell (nucleus expansion)
SPILL_SIGMA_UM = 7.0  # reach of the spill-over kernel
DISPERSION_MEDIAN = 0.05  # median NB over-dispersion phi0 at noise = 1
DROPOUT_MAX = 0.15  # zero-inflation of the lowest means at dropout = 1
DROPOUT_MID = 0.5  # mean count at which the zero-inflation halves
DROPOUT_SLOPE = 1.5
REFERENCE_DEPTH = 3.0  # scRNA-seq library size / Xenium library size
PLATFORM_SD = 0.3  # sd of the per-gene log capture bias of the reference platform

# Strength of the hidden co-expression modules (sd of their log-effect) per base subtype.
_MODULE_STRENGTH = {"malignant": 0.32, "luminal": 0.25, "myoepithelial": 0.21, "T_cell": 0.09, "B_cell": 0.11,
                    "plasma_cell": 0.14, "macrophage": 0.25, "fibroblast": 0.39, "endothelial": 0.25}
_ACTIVITY_STRENGTH = {"malignant": 0.6, "T_cell": 0.35, "B_cell": 0.35}  # others 0.2
# Panel composition, as shares of the genes: family markers (families whose subtypes express them, share,
# log-effect), subtype-specific markers per base subtype, proliferation genes; the rest is background.
_FAMILY_MARKERS = (((TUMOUR, EPITHELIAL), 0.15, 3.9), ((EPITHELIAL,), 0.045, 3.65), (IMMUNE_FAMILIES, 0.15, 3.9),
                   ((LYMPHOID,), 0.045, 3.4), ((STROMAL,), 0.12, 3.9))
_MARKER_SHARE = {"malignant": 0.065}  # others: MARKER_SHARE_DEFAULT
MARKER_SHARE_DEFAULT = 0.035
PROLIFERATION_SHARE = 0.04
MARKER_EFFECT = 2.2  # mean log-effect of a subtype marker in its subtype
MARKER_BASE = -1.7  # mean log-abundance of a marker outside its subtypes (markers are leaky)
BACKGROUND_LEVEL = -3.3  # mean log-abundance of genes outside every programme
GRADED_SD = 0.35  # sd of the random log-effect of every subtype on every gene
# Neighbourhood-induced gene sets: (name, n genes, which fraction, {base subtype: log-effect at fraction 1})
_NEIGHBOUR_SETS = (
    ("ifn_response", 5, "immune", {"malignant": 2.2, "macrophage": 1.5, "endothelial": 1.5, "luminal": 1.5,
                                   "fibroblast": 1.0}),
    ("caf_activation", 5, "tumour", {"fibroblast": 2.5, "endothelial": 1.2}),
    ("tam_polarisation", 3, "tumour", {"macrophage": 2.2}),
    ("t_exhaustion", 3, "tumour", {"T_cell": 1.8}),
)


@dataclass
class GenePrograms:
    """Parameters of the expression model (see the module docstring); S subtypes, G genes, M modules."""

    genes: list[str]
    subtype_names: list[str]
    base: np.ndarray  # (G,) b_g
    subtype_effect: np.ndarray  # (S, G) T
    activity: np.ndarray  # (S, G) A
    differentiation: np.ndarray  # (S, G) D
    modules: np.ndarray  # (S, M, G) M
    nbr_immune: np.ndarray  # (S, G) N
    nbr_tumour: np.ndarray  # (S, G) U
    log_library: np.ndarray  # (S,) log L_t
    dispersion: np.ndarray  # (G,) phi0_g
    platform_bias: np.ndarray  # (G,) log capture bias of the reference platform
    gene_role: list[str] = field(default_factory=list)  # what each gene is, for documentation


class _Pool:
    """Hands out gene indices without repetition until every gene was used, then starts over."""

    def __init__(self, n: int, rng: np.random.Generator) -> None:
        self.n, self.rng = n, rng
        self.perm, self.pos = rng.permutation(n), 0

    def take(self, k: int) -> np.ndarray:
        out = []
        for _ in range(k):
            if self.pos == self.n:
                self.perm, self.pos = self.rng.permutation(self.n), 0
            out.append(self.perm[self.pos])
            self.pos += 1
        return np.asarray(out, dtype=np.int64)


def make_programs(types: TypeSet, n_genes: int, program_seed: int = 0) -> GenePrograms:
    """Draw the gene programs for the subtypes of ``types`` and ``n_genes`` genes, from ``program_seed``."""
    rng = np.random.default_rng(np.random.SeedSequence([program_seed, 4021]))
    names = types.names
    n_sub = len(names)
    base_names = [names[b] for b in types.base_index]
    families = np.array([s.family for s in types.subtypes])
    is_base = types.base_index == np.arange(n_sub)
    role = [""] * n_genes
    pool = _Pool(n_genes, rng)
    size = lambda share: max(1, int(round(share * n_genes)))  # noqa: E731

    def mark(idx: np.ndarray, what: str) -> None:
        for g in idx:
            role[g] = f"{role[g]}+{what}" if role[g] else what

    b = rng.normal(BACKGROUND_LEVEL, 0.9, n_genes)  # programme genes get their own baseline below
    effect = rng.normal(0, GRADED_SD, (n_sub, n_genes))  # every gene differs a little between subtypes
    act = np.zeros((n_sub, n_genes))
    diff = np.zeros((n_sub, n_genes))
    modules = np.zeros((n_sub, N_MODULES, n_genes))
    nbr_imm = np.zeros((n_sub, n_genes))
    nbr_tum = np.zeros((n_sub, n_genes))
    own_markers: dict[int, np.ndarray] = {}

    for fams, share, log_effect in _FAMILY_MARKERS:
        genes = pool.take(size(share))
        mark(genes, "marker:" + "/".join(fams))
        b[genes] = rng.normal(MARKER_BASE, 0.4, genes.size)
        for s in np.flatnonzero(np.isin(families, fams)):
            effect[s, genes] += log_effect + rng.normal(0, 0.3, genes.size)
    for s in np.flatnonzero(is_base):
        genes = pool.take(size(_MARKER_SHARE.get(names[s], MARKER_SHARE_DEFAULT)))
        own_markers[s] = genes
        mark(genes, f"marker:{names[s]}")
        b[genes] = rng.normal(MARKER_BASE, 0.4, genes.size)
        effect[s, genes] += MARKER_EFFECT + rng.normal(0, 0.5, genes.size)
        related = (EPITHELIAL,) if families[s] == TUMOUR else (families[s],)
        siblings = np.flatnonzero(is_base & np.isin(families, related) & (np.arange(n_sub) != s))
        for g in genes:  # some markers are shared with a related subtype (tumour vs luminal, T vs B ...)
            if siblings.size and rng.random() < 0.35:
                effect[rng.choice(siblings), g] += 0.6 * MARKER_EFFECT
    prolif = pool.take(size(PROLIFERATION_SHARE))
    mark(prolif, "proliferation")
    b[prolif] = rng.normal(MARKER_BASE, 0.3, prolif.size)
    for set_name, count, which, effects in _NEIGHBOUR_SETS:
        genes = pool.take(max(1, int(round(count * n_genes / 150))))
        mark(genes, f"neighbourhood:{set_name}")
        b[genes] = rng.normal(MARKER_BASE - 0.5, 0.3, genes.size)
        target = nbr_imm if which == "immune" else nbr_tum
        for s in range(n_sub):
            if base_names[s] in effects:
                target[s, genes] = effects[base_names[s]] * rng.uniform(0.7, 1.3, genes.size)
    for s in np.flatnonzero(~is_base):  # variants: the base's programme plus markers of their own
        base_s = types.base_index[s]
        effect[s] = effect[base_s] + rng.normal(0, 0.3, n_genes)
        genes = pool.take(size(0.027))
        mark(genes, f"marker:{names[s]}")
        effect[s, genes] += MARKER_EFFECT + rng.normal(0, 0.5, genes.size)
        own_markers[s] = np.concatenate([own_markers[base_s], genes])
    role = [r or "background" for r in role]

    for s in range(n_sub):
        markers = own_markers[s]
        act[s, prolif] = _ACTIVITY_STRENGTH.get(base_names[s], 0.2) * 2.0
        act[s, rng.choice(markers, size=min(2, markers.size), replace=False)] = 0.3
        pick = np.concatenate([rng.choice(markers, size=min(3, markers.size), replace=False),
                               rng.choice(n_genes, size=min(2, n_genes), replace=False)])
        diff[s, pick] = rng.choice([-1, 1], size=pick.size) * rng.uniform(0.3, 0.6, pick.size)
        strength = _MODULE_STRENGTH.get(base_names[s], 0.3)
        candidates = np.union1d(np.flatnonzero(b + effect[s] > -1.5), markers)
        for m in range(N_MODULES):
            genes = rng.choice(candidates, size=min(10, candidates.size), replace=False)
            sign = np.where(rng.random(genes.size) < 0.85, 1.0, -1.0)
            modules[s, m, genes] = strength * rng.uniform(0.6, 1.0, genes.size) * sign * 1.8
    width = max(3, len(str(n_genes - 1)))
    return GenePrograms(
        genes=[f"gene_{g:0{width}d}" for g in range(n_genes)],
        subtype_names=list(names),
        base=b,
        subtype_effect=effect,
        activity=act,
        differentiation=diff,
        modules=modules,
        nbr_immune=nbr_imm,
        nbr_tumour=nbr_tum,
        log_library=np.log([s.library for s in types.subtypes]),
        dispersion=np.clip(DISPERSION_MEDIAN * np.exp(rng.normal(0, 0.4, n_genes)), 0.02, 1.0),
        platform_bias=rng.normal(0, PLATFORM_SD, n_genes),
        gene_role=role,
    )


def neighbour_fractions(xy_um: np.ndarray, subtype: np.ndarray, types: TypeSet, radius_um: float = NEIGHBOUR_UM
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Share of immune and of tumour cells among each cell's neighbours within ``radius_um`` (0 if none)."""
    n = len(xy_um)
    if n < 2:
        return np.zeros(n), np.zeros(n)
    pairs = cKDTree(xy_um).query_pairs(radius_um, output_type="ndarray")
    i, j = pairs[:, 0], pairs[:, 1]
    immune = types.family_mask(IMMUNE_FAMILIES)[subtype].astype(float)
    tumour = types.family_mask(TUMOUR)[subtype].astype(float)
    count = np.bincount(i, minlength=n) + np.bincount(j, minlength=n)
    frac = []
    for flag in (immune, tumour):
        hits = np.bincount(i, flag[j], minlength=n) + np.bincount(j, flag[i], minlength=n)
        frac.append(np.divide(hits, count, out=np.zeros(n), where=count > 0))
    return frac[0], frac[1]


def spill_matrix(xy_um: np.ndarray, spill: float = SPILL) -> sp.csr_matrix:
    """Sparse (n, n) matrix S with mu = own + S @ own: transcripts of neighbours captured by a cell's segment.

    Each cell's transcripts spread around it as a Gaussian of sd SPILL_SIGMA_UM (per um^2); cell i captures
    those of its neighbours that fall in its segment, whose area is larger where cells are sparse (a nucleus
    expanded into free space) and smaller in crowds: S_ij = SPILL * area_i * K(d_ij), with
    area_i = pi TERRITORY_UM^2 / (1 + sum_j exp(-d_ij^2 / (2 sigma^2))). A fibroblast beside a nest therefore
    carries a varying share of the tumour profile; a lymphocyte in an aggregate captures little.
    """
    n = len(xy_um)
    if n < 2 or spill == 0:
        return sp.csr_matrix((n, n))
    pairs = cKDTree(xy_um).query_pairs(3 * SPILL_SIGMA_UM, output_type="ndarray")
    d2 = ((xy_um[pairs[:, 0]] - xy_um[pairs[:, 1]]) ** 2).sum(axis=1)
    k = np.exp(-d2 / (2 * SPILL_SIGMA_UM**2))
    rows = np.concatenate([pairs[:, 0], pairs[:, 1]])
    cols = np.concatenate([pairs[:, 1], pairs[:, 0]])
    vals = np.concatenate([k, k])
    area = np.pi * TERRITORY_UM**2 / (1.0 + np.bincount(rows, vals, minlength=n))
    vals = spill * area[rows] * vals / (2 * np.pi * SPILL_SIGMA_UM**2)
    return sp.csr_matrix((vals, (rows, cols)), shape=(n, n))


def draw_state(subtype: np.ndarray, activity_field: np.ndarray | None, nbr_immune: np.ndarray,
               nbr_tumour: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The per-cell state, columns ``STATE_NAMES``.

    ``activity_field`` (N(0, 1) at each cell, or None) makes part of the activity spatially smooth.
    """
    n = len(subtype)
    z = rng.standard_normal((n, 5))
    activity = z[:, 0]
    if activity_field is not None:
        activity = np.sqrt(ACTIVITY_SPATIAL) * activity_field + np.sqrt(1 - ACTIVITY_SPATIAL) * z[:, 0]
    return np.column_stack([activity, z[:, 1], z[:, 2], z[:, 3], z[:, 4], nbr_immune, nbr_tumour])


def own_expression(programs: GenePrograms, subtype: np.ndarray, state: np.ndarray) -> np.ndarray:
    """Each cell's own expected counts (before spill-over), (n, G)."""
    p = programs
    s = subtype
    eta = (p.base[None, :] + p.subtype_effect[s] + state[:, [0]] * p.activity[s] + state[:, [1]] * p.differentiation[s]
           + state[:, [5]] * p.nbr_immune[s] + state[:, [6]] * p.nbr_tumour[s])
    for m in range(N_MODULES):
        eta += state[:, [2 + m]] * p.modules[s, m]
    eta -= eta.max(axis=1, keepdims=True)
    share = np.exp(eta)
    share /= share.sum(axis=1, keepdims=True)
    library = np.exp(p.log_library[s] + LIBRARY_ACTIVITY * state[:, 0] + LIBRARY_SD * state[:, 4])
    return library[:, None] * share


def dropout_probability(mu: np.ndarray, dropout_max: float, dropout_mid: float, dropout_slope: float) -> np.ndarray:
    """Probability that a count is replaced by zero, given its mean."""
    if dropout_max <= 0:
        return np.zeros_like(mu)
    return np.clip(dropout_max / (1.0 + (np.maximum(mu, 0.0) / dropout_mid) ** dropout_slope), 0.0, 1.0)


def dropout_params(dropout: float) -> dict[str, float]:
    """The dropout parameters stored with the truth, for a config's ``dropout`` scale."""
    return {"dropout_max": float(min(1.0, dropout * DROPOUT_MAX)), "dropout_mid": DROPOUT_MID,
            "dropout_slope": DROPOUT_SLOPE}


def draw_counts(mu: np.ndarray, dispersion: np.ndarray, dropout: dict[str, float], rng: np.random.Generator
                ) -> np.ndarray:
    """Zero-inflated negative-binomial counts around ``mu`` (n, G); float32 holding integers."""
    mu = np.asarray(mu, dtype=np.float64)
    phi = np.broadcast_to(np.asarray(dispersion, dtype=np.float64), mu.shape)
    lam = mu.copy()
    over = phi > 0
    if over.any():
        lam[over] = rng.gamma(1.0 / phi[over], mu[over] * phi[over])
    x = rng.poisson(lam).astype(np.float32)
    pi = dropout_probability(mu, dropout["dropout_max"], dropout["dropout_mid"], dropout["dropout_slope"])
    x[rng.random(mu.shape) < pi] = 0.0
    return x


def simulate_reference(programs: GenePrograms, types: TypeSet, n_cells: int, tissue_subtype: np.ndarray,
                       tissue_state: np.ndarray, dispersion: np.ndarray, dropout: dict[str, float],
                       rng: np.random.Generator, provenance: dict | None = None) -> AnnData:
    """A labelled scRNA-seq reference drawn from the same programs (no spatial, no image).

    Composition: halfway between the tissue's and uniform. States are drawn afresh; the neighbourhood
    fractions (the niche a dissociated cell came from) are resampled from tissue cells of the same subtype.
    Depth is ``REFERENCE_DEPTH`` times the tissue's, genes carry a platform capture bias, no spill-over.

    Returns
    -------
    AnnData with raw counts in ``X`` and ``layers["counts"]``, ``obs["cell_type"]`` (subtype names),
    ``obs["routing_type"]`` and ``uns["gcmoe"]["type_mapping"]`` = {subtype: routing type}.
    """
    n_sub = len(types.subtypes)
    tissue_share = np.bincount(tissue_subtype, minlength=n_sub) / max(len(tissue_subtype), 1)
    share = 0.5 * tissue_share + 0.5 / n_sub
    subtype = rng.choice(n_sub, size=n_cells, p=share / share.sum())
    state = draw_state(subtype, None, np.zeros(n_cells), np.zeros(n_cells), rng)
    for s in range(n_sub):
        mine = np.flatnonzero(subtype == s)
        donors = np.flatnonzero(tissue_subtype == s)
        if mine.size and donors.size:
            state[mine, 5:7] = tissue_state[rng.choice(donors, size=mine.size), 5:7]
    own = own_expression(programs, subtype, state) * REFERENCE_DEPTH * np.exp(programs.platform_bias)[None, :]
    counts = draw_counts(own, dispersion, dropout, rng)
    names = np.array(types.names, dtype=object)
    obs = pd.DataFrame(index=pd.Index([f"ref_{i}" for i in range(n_cells)]))
    obs[Key.CELL_TYPE] = pd.Categorical(names[subtype], categories=types.names)
    obs["routing_type"] = pd.Categorical(np.array(types.routing_names, dtype=object)[types.routing_of[subtype]],
                                         categories=list(types.routing_names))
    adata = AnnData(X=counts, obs=obs)
    adata.var_names = pd.Index(programs.genes)
    adata.layers[Key.COUNTS] = counts.copy()
    adata.uns[Key.UNS] = {"type_mapping": types.mapping, "provenance": dict(provenance or {})}
    return adata
