"""``simulate_tissue``: one call from settings to a paired H&E image, single-cell counts, reference and truth."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
from anndata import AnnData

from gcmoe import __version__
from gcmoe._constants import Key, UnsKey
from gcmoe.config import TissueConfig
from gcmoe.data.sample import Sample
from gcmoe.data.virtual_tissue.cell_types import TypeSet, resolve_types
from gcmoe.data.virtual_tissue.expression import (ACTIVITY_FIELD_UM, STATE_NAMES, VISIBLE_STATE, GenePrograms,
                                                  SPILL, draw_counts, draw_state, dropout_params, make_programs,
                                                  neighbour_fractions, own_expression, simulate_reference,
                                                  spill_matrix)
from gcmoe.data.virtual_tissue.fields import sample_grid, smooth_field
from gcmoe.data.virtual_tissue.layout import REGION_NAMES, Layout, build_layout
from gcmoe.data.virtual_tissue.morphology import Morphology, exclusion_radius_um, sample_morphology
from gcmoe.data.virtual_tissue.render import STAIN_PRESETS, render_he
from gcmoe.data.virtual_tissue.truth import DISPERSION_KEY
from gcmoe.errors import ConfigError

log = logging.getLogger(__name__)

GENERATOR = "gcmoe.data.virtual_tissue"
_STREAMS = ("layout", "state", "morphology", "render", "counts", "reference")


@dataclass
class TissueTruth:
    """The generator's ground truth for the cells of a virtual tissue (rows in the Sample's cell order).

    Attributes
    ----------
    expected_counts
        (n_cells, n_genes) noise-free expected counts mu (also ``layers["truth_mean"]``).
    state
        (n_cells, len(state_names)) per-cell state (also ``obsm["truth_state"]``): activity and
        differentiation show in the morphology; module_1/2 and library are hidden; nbr_immune / nbr_tumour
        are the immune / tumour shares of the cells within 40 um.
    state_names
        Column names of ``state``.
    cell_type, cell_subtype
        (n_cells,) routing type and finer subtype names.
    type_mapping
        {subtype: routing type}.
    nucleus_area_um2
        (n_cells,) area of each drawn nucleus.
    morphology
        Per-cell morphology parameters (nucleus semi-axes, angle, stain densities, cytoplasm, ...).
    region
        (n_cells,) region name of each cell.
    dispersion
        (n_genes,) negative-binomial over-dispersion (also ``var["truth_dispersion"]``).
    dropout
        Zero-inflation parameters (also in ``uns["gcmoe"]["truth"]``).
    programs
        The gene programs the expression was drawn from.
    region_map, region_map_step, region_names
        Region codes on the layout grid (``region_map_step`` image pixels per grid cell) and their names.
    """

    expected_counts: np.ndarray
    state: np.ndarray
    state_names: list[str]
    cell_type: np.ndarray
    cell_subtype: np.ndarray
    type_mapping: dict[str, str]
    nucleus_area_um2: np.ndarray
    morphology: pd.DataFrame
    region: np.ndarray
    dispersion: np.ndarray
    dropout: dict[str, float]
    programs: GenePrograms
    region_map: np.ndarray
    region_map_step: float
    region_names: tuple[str, ...]


@dataclass
class VirtualTissue:
    """A generated tissue: the Sample (image + cells + counts), its reference scRNA-seq and the truth."""

    sample: Sample
    reference: AnnData
    truth: TissueTruth


def _resolve_config(config: TissueConfig | None, overrides: dict) -> TissueConfig:
    config = config if config is not None else TissueConfig()
    names = [f.name for f in dataclasses.fields(TissueConfig)]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise ConfigError(f"unknown tissue setting(s) {unknown}; valid ones are {names}")
    config = dataclasses.replace(config, **overrides)
    checks = [
        (config.n_cells >= 1, "n_cells must be >= 1"),
        (config.height >= 32 and config.width >= 32, "height and width must be >= 32 pixels"),
        (0.05 <= config.mpp <= 10.0, "mpp must be between 0.05 and 10 micrometres per pixel"),
        (config.n_cell_types >= 1, "n_cell_types must be >= 1"),
        (config.n_genes >= 10, "n_genes must be >= 10 (>= 50 for the top-50 HVG evaluation)"),
        (config.noise >= 0, "noise must be >= 0"),
        (config.dropout >= 0, "dropout must be >= 0"),
        (config.morphology_contrast >= 0, "morphology_contrast must be >= 0"),
        (config.neighbourhood_effect >= 0, "neighbourhood_effect must be >= 0"),
        (config.spill >= 0, "spill must be >= 0"),
        (config.stain in STAIN_PRESETS, f"stain must be one of {sorted(STAIN_PRESETS)}"),
        (config.n_reference_cells >= 0, "n_reference_cells must be >= 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"tissue: {message}; got {dataclasses.asdict(config)}")
    return config


def simulate_tissue(config: TissueConfig | None = None, **overrides) -> VirtualTissue:
    """Generate a virtual H&E tissue with single-cell counts, a matching reference and the ground truth.

    Deterministic: the same settings give the same image and counts; ``seed`` draws the tissue,
    ``program_seed`` the gene programs (shared between tissues of different seeds).

    Parameters
    ----------
    config
        Tissue settings (default ``TissueConfig()``: 10,000 cells, 2400 x 2400 px at 0.5 um/px, 150 genes,
        the paper's four routing types).
    **overrides
        Settings that replace those of ``config``, e.g. ``simulate_tissue(seed=3, n_cells=500)``.

    Returns
    -------
    VirtualTissue whose ``sample.adata`` holds: raw counts in ``X`` and ``layers["counts"]`` (float32 integers);
    ``obsm["spatial"]`` (x, y) pixels; ``obs["cell_type"]`` (routing type), ``obs["cell_subtype"]``,
    ``obs["region"]``, ``obs["nucleus_area_um2"]``; the truth in ``layers["truth_mean"]``,
    ``obsm["truth_state"]``, ``var["truth_dispersion"]``, ``var["gene_role"]`` and ``uns["gcmoe"]["truth"]``
    (dropout parameters, state names); ``uns["gcmoe"]["provenance"]`` (generator, version,
    settings) and ``uns["gcmoe"]["type_mapping"]``.
    """
    config = _resolve_config(config, overrides)
    t0 = time.perf_counter()
    seeds = np.random.SeedSequence(config.seed).spawn(len(_STREAMS))
    streams = {name: np.random.default_rng(s) for name, s in zip(_STREAMS, seeds)}
    types = resolve_types(config.n_cell_types, config.morphology_contrast, config.program_seed)
    programs = make_programs(types, config.n_genes, config.program_seed)
    if config.neighbourhood_effect != 1.0:
        programs = dataclasses.replace(programs, nbr_immune=programs.nbr_immune * config.neighbourhood_effect,
                                       nbr_tumour=programs.nbr_tumour * config.neighbourhood_effect)
    mpp = float(config.mpp)

    layout = build_layout(config.height, config.width, mpp, config.n_cells, types, exclusion_radius_um(types),
                          streams["layout"])
    xy_um = layout.xy * mpp
    nbr_imm, nbr_tum = neighbour_fractions(xy_um, layout.subtype, types)
    rng = streams["state"]
    field_grid = smooth_field(layout.region_map.shape, ACTIVITY_FIELD_UM / (layout.step * mpp), rng)
    state = draw_state(layout.subtype, sample_grid(field_grid, layout.xy, layout.step), nbr_imm, nbr_tum, rng)
    morph = sample_morphology(types, layout.subtype, state[:, 0], state[:, 1], layout.orientation,
                              streams["morphology"])
    t1 = time.perf_counter()
    image = render_he(layout, morph, (config.height, config.width), mpp, streams["render"],
                      stain=config.stain)
    t2 = time.perf_counter()

    own = own_expression(programs, layout.subtype, state)
    mu = own + spill_matrix(xy_um, SPILL * config.spill) @ own
    dispersion = programs.dispersion * config.noise
    dropout = dropout_params(config.dropout)
    counts = draw_counts(mu, dispersion, dropout, streams["counts"])

    sample = _build_sample(config, types, programs, layout, morph, image, counts, mu, state, dispersion, dropout)
    provenance = dict(sample.adata.uns[Key.UNS][UnsKey.PROVENANCE])
    reference = simulate_reference(programs, types, config.n_reference_cells, layout.subtype, state, dispersion,
                                   dropout, streams["reference"], provenance=provenance)
    names = np.array(types.names, dtype=object)
    truth = TissueTruth(
        expected_counts=mu,
        state=state,
        state_names=list(STATE_NAMES),
        cell_type=np.array(types.routing_names, dtype=object)[types.routing_of[layout.subtype]],
        cell_subtype=names[layout.subtype],
        type_mapping=types.mapping,
        nucleus_area_um2=morph.area_um2,
        morphology=morph.table(),
        region=np.array(REGION_NAMES, dtype=object)[layout.region],
        dispersion=dispersion,
        dropout=dropout,
        programs=programs,
        region_map=layout.region_map,
        region_map_step=layout.step,
        region_names=REGION_NAMES,
    )
    log.info("virtual tissue: %d cells, %d genes, %dx%d px in %.1f s (layout %.1f s, image %.1f s)",
             config.n_cells, config.n_genes, config.width, config.height, time.perf_counter() - t0, t1 - t0, t2 - t1)
    return VirtualTissue(sample=sample, reference=reference, truth=truth)


def _build_sample(config: TissueConfig, types: TypeSet, programs: GenePrograms, layout: Layout, morph: Morphology,
                  image: np.ndarray, counts: np.ndarray, mu: np.ndarray, state: np.ndarray, dispersion: np.ndarray,
                  dropout: dict[str, float]) -> Sample:
    """The Sample with its truth fields (see ``simulate_tissue``)."""
    names = np.array(types.names, dtype=object)
    routing = np.array(types.routing_names, dtype=object)[types.routing_of[layout.subtype]]
    obs = pd.DataFrame({
        "cell_subtype": pd.Categorical(names[layout.subtype], categories=types.names),
        "region": pd.Categorical(np.array(REGION_NAMES, dtype=object)[layout.region], categories=list(REGION_NAMES)),
        "nucleus_area_um2": morph.area_um2.astype(np.float64),
    })
    provenance = {"generator": GENERATOR, "gcmoe_version": __version__, "config": dataclasses.asdict(config)}
    sample = Sample.from_arrays(
        counts, layout.xy, image, config.mpp, programs.genes, config.sample_id,
        cell_ids=[f"{config.sample_id}_{i}" for i in range(config.n_cells)],
        cell_type=routing, obs=obs, provenance=provenance,
    )
    adata = sample.adata
    adata.obs[Key.CELL_TYPE] = pd.Categorical(routing, categories=list(types.routing_names))
    adata.layers[Key.TRUTH_MEAN] = mu.astype(np.float64)
    adata.obsm[Key.TRUTH_STATE] = state.astype(np.float64)
    adata.var[DISPERSION_KEY] = dispersion.astype(np.float64)
    adata.var["gene_role"] = programs.gene_role
    adata.uns[Key.UNS]["type_mapping"] = types.mapping
    adata.uns[Key.UNS][UnsKey.TRUTH] = {
        **dropout,
        "count_model": "zero-inflated negative binomial: NB(mean truth_mean, var mu + phi mu^2), "
                       "zero with probability dropout_max / (1 + (mu / dropout_mid)^dropout_slope)",
        "mean_key": Key.TRUTH_MEAN,
        "dispersion_key": DISPERSION_KEY,
        "state_key": Key.TRUTH_STATE,
        "state_names": list(STATE_NAMES),
        "visible_state": list(VISIBLE_STATE),
        "region_names": list(REGION_NAMES),
    }
    return sample
