"""Real single-cell expression placed in a rendered virtual tissue.

A virtual tissue is generated as usual (layout, morphology, H&E); then each of its cells takes the measured
counts of a real cell whose type matches the cell's subtype (``DEFAULT_SUBTYPE_MAP`` for GHIST's breast
types), each real cell at most once: where the layout has more cells of a subtype than there are real cells
to give, the extra cells stay in the image but not in the cell table (as cells that segmentation or QC
dropped on a real slide). Within a subtype, the real cells are ordered by nucleus size and given to the virtual cells in the
order of their drawn nucleus area (with noise, ``size_noise``), so a larger nucleus in the image carries a larger real nucleus' counts (on
the real crop log nucleus size and log total counts correlate at 0.54). A stratified share of the real cells
is kept apart as the labelled reference (CAP's priors, label transfer), never placed in the tissue.

What is real: every count vector and cell-type label. What is generated: positions, neighbourhoods, the image.
So the neighbourhood carries no expression signal beyond cell type and layout, and there is no ceiling (the
noise-free expression is unknown); oracles from the true types measure what is reachable.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
from anndata import AnnData

from gcmoe._constants import Key, UnsKey
from gcmoe.config import TissueConfig
from gcmoe.data.sample import Sample
from gcmoe.errors import ConfigError, InvalidSampleError

log = logging.getLogger(__name__)

# virtual subtype -> real types it may take counts from (GHIST's breast demo names)
DEFAULT_SUBTYPE_MAP: dict[str, tuple[str, ...]] = {
    "malignant": ("Malignant",),
    "luminal": ("Epithelial",),
    "myoepithelial": ("Epithelial",),
    "T_cell": ("T",),
    "B_cell": ("B",),
    "plasma_cell": ("Plasma",),
    "macrophage": ("Macrophage", "Myeloid"),
    "fibroblast": ("Fibroblast",),
    "endothelial": ("Endothelial",),
}


@dataclass
class TransplantedTissue:
    """A rendered tissue carrying real counts, the held-out real reference, and what was reused."""

    sample: Sample
    reference: AnnData
    report: dict


def transplant_expression(config: TissueConfig, real: AnnData, type_key: str = Key.CELL_TYPE,
                          size_key: str | None = "nucleus_size_px",
                          subtype_map: dict[str, tuple[str, ...]] | None = None,
                          reference_fraction: float = 0.25, size_noise: float = 1.0) -> TransplantedTissue:
    """Generate the virtual tissue of ``config`` (nine subtypes) and give its cells real counts.

    Parameters
    ----------
    config
        Tissue settings; ``n_cell_types`` is set to 9 (one subtype per routing type) before generation.
    real
        Real cells: raw counts in ``layers["counts"]`` (or ``X``), types in ``obs[type_key]``.
    type_key
        The obs column of the real types.
    size_key
        An obs column of real nucleus sizes for the rank matching, or None to assign at random.
    subtype_map
        Virtual subtype -> real types (default ``DEFAULT_SUBTYPE_MAP``).
    reference_fraction
        Share of each real type kept apart as the reference.
    size_noise
        Noise added to the drawn log nucleus areas before the rank matching, in units of their sd within the
        subtype: 0 pairs sizes exactly; 1 (default) brings the correlation of log nucleus area with log total
        counts near the real crop's (0.54).

    Returns
    -------
    TransplantedTissue: ``sample`` with the real counts (``obs["cell_type"]`` = real type,
    ``obs["cell_subtype"]`` = virtual subtype, ``obs["nucleus_area_um2"]``, ``obs["real_cell_id"]``; each
    real cell once), ``reference`` (the held-out real cells, ``obs["cell_type"]``), ``report`` (cells per
    type, rendered cells left out of the table per subtype).
    """
    from gcmoe.data.virtual_tissue.simulate import simulate_tissue

    subtype_map = dict(subtype_map or DEFAULT_SUBTYPE_MAP)
    if type_key not in real.obs:
        raise InvalidSampleError(f"the real cells have no obs[{type_key!r}]; columns: {list(real.obs.columns)}")
    if not 0.0 <= reference_fraction < 1.0:
        raise ConfigError(f"reference_fraction must be in [0, 1), got {reference_fraction}")
    real_types = real.obs[type_key].astype(str).to_numpy()
    unknown = sorted({t for ts in subtype_map.values() for t in ts} - set(real_types))
    if unknown:
        raise InvalidSampleError(f"real types {unknown} of the subtype map are absent; real types: "
                                 f"{sorted(set(real_types))}")
    counts = real.layers[Key.COUNTS] if Key.COUNTS in real.layers else real.X
    counts = np.asarray(counts.toarray() if hasattr(counts, "toarray") else counts, dtype=np.float32)
    size = real.obs[size_key].to_numpy(dtype=float) if size_key else None

    rng = np.random.default_rng(np.random.SeedSequence([config.seed, 7919]))
    is_ref = np.zeros(real.n_obs, dtype=bool)
    for t in np.unique(real_types):
        rows = np.flatnonzero(real_types == t)
        is_ref[rng.choice(rows, size=int(round(reference_fraction * rows.size)), replace=False)] = True

    tissue = simulate_tissue(dataclasses.replace(config, n_cell_types=9))
    subtype = np.asarray(tissue.truth.cell_subtype, dtype=str)
    missing = sorted(set(subtype) - set(subtype_map))
    if missing:
        raise ConfigError(f"the subtype map has no entry for the virtual subtypes {missing}")
    area = np.asarray(tissue.truth.nucleus_area_um2, dtype=float)
    subtype_all = subtype
    donor = np.full(len(subtype), -1, dtype=np.int64)
    dropped: dict[str, int] = {}
    # real types shared by several subtypes (luminal and myoepithelial cells both take Epithelial counts) are
    # shared out in proportion to the subtypes' cell counts
    n_virtual = {s: int((subtype == s).sum()) for s in set(subtype)}
    demand = {t: sum(n for s, n in n_virtual.items() if t in subtype_map[s]) for t in set(real_types)}
    used = is_ref.copy()
    for s in sorted(set(subtype)):
        cells = np.flatnonzero(subtype == s)
        pool = np.flatnonzero(~used & np.isin(real_types, subtype_map[s]))
        quota = sum(int(((~is_ref) & (real_types == t)).sum() * cells.size // max(demand[t], 1))
                    for t in subtype_map[s])
        if not pool.size or not quota:
            raise InvalidSampleError(f"no real cell of type(s) {subtype_map[s]} is left for subtype {s!r}")
        if cells.size > min(quota, pool.size):  # more virtual cells than real ones: keep a random subset
            dropped[s] = int(cells.size - min(quota, pool.size))
            cells = np.sort(rng.choice(cells, size=min(quota, pool.size), replace=False))
        taken = rng.choice(pool, size=cells.size, replace=False)
        used[taken] = True
        if size is not None:
            log_area = np.log(area[cells])
            jitter = rng.normal(0.0, size_noise * max(log_area.std(), 1e-6), cells.size)
            cells = cells[np.argsort(log_area + jitter, kind="stable")]
            taken = taken[np.argsort(size[taken] + rng.uniform(0, 1e-3, taken.size), kind="stable")]
        donor[cells] = taken
    keep = np.flatnonzero(donor >= 0)
    donor, subtype, area = donor[keep], subtype[keep], area[keep]

    sample = tissue.sample
    obs = pd.DataFrame({
        "cell_subtype": pd.Categorical(subtype),
        "region": sample.adata.obs["region"].to_numpy()[keep],
        "nucleus_area_um2": area,
        "real_cell_id": real.obs_names.to_numpy()[donor].astype(str),
    })
    provenance = dict(sample.adata.uns[Key.UNS][UnsKey.PROVENANCE])
    provenance["expression"] = {"source": str(real.uns.get(Key.UNS, {}).get("provenance", {}).get("folder", "")),
                                "transplanted": True, "reference_fraction": reference_fraction}
    out = Sample.from_arrays(
        counts[donor], sample.adata.obsm[Key.SPATIAL][keep], sample.image, sample.mpp, list(real.var_names),
        config.sample_id, cell_ids=list(sample.adata.obs_names[keep]), cell_type=real_types[donor], obs=obs,
        provenance=provenance,
    )
    reference = AnnData(X=counts[is_ref].copy(), obs=pd.DataFrame(
        {Key.CELL_TYPE: pd.Categorical(real_types[is_ref])}, index=real.obs_names[is_ref].astype(str)))
    reference.var_names = real.var_names.copy()
    reference.layers[Key.COUNTS] = reference.X.copy()
    names = sorted(set(real_types))
    reference.uns[Key.UNS] = {"type_mapping": {t: t for t in names}}
    report = {
        "cells": int(len(donor)),
        "rendered_cells": int(len(subtype_all)),
        "dropped_cells_by_subtype": dropped,
        "reference_cells": int(is_ref.sum()),
        "cells_by_type": {t: int((real_types[donor] == t).sum()) for t in names},
    }
    log.info("transplant: %d of %d rendered cells carry real counts; left out of the table: %s", len(donor),
             len(subtype_all), dropped)
    return TransplantedTissue(out, reference, report)
