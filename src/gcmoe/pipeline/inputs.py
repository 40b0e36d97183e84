"""Input building: a registered model and the cells it reads, from its declared inputs.

A model declares what it needs (:class:`gcmoe.models.inputs.ModelInputs`) and, once built, the geometry of
its wider inputs (:meth:`gcmoe.models.base.CellModel.input_geometry`). :func:`cell_data` turns both into the
trainer's :class:`~gcmoe.training.cells.CellData`; the cross-validation, ``gcmoe train`` and prediction on a
new slide (gcmoe.inference) all build their inputs through it.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import numpy as np

from gcmoe.config import RunConfig
from gcmoe.errors import ConfigError
from gcmoe.models.inputs import InputGeometry, ModelInputs

if TYPE_CHECKING:
    from torch import Tensor

    from gcmoe.data.sample import Sample
    from gcmoe.models.registry import ModelEntry
    from gcmoe.pipeline.data import PooledCells, Routing, RunData
    from gcmoe.prior.coexpression import CoexpressionPrior
    from gcmoe.training.cells import CellData


def check_streamable(entries: list[ModelEntry], config: RunConfig) -> None:
    """Refuse, before any work, models that cannot train from a cell store when ``train.stream`` is on, and
    models whose co-expression prior needs a reference the run does not have."""
    needs = [e.display_name for e in entries if e.inputs.coexpression]
    if needs and config.data.source != "virtual" and not config.data.reference:
        raise ConfigError(f"{', '.join(needs)} build co-expression graphs from a labelled reference scRNA-seq .h5ad "
                          "(and transfer routing labels from it when the slides have no obs['cell_type']): give "
                          "data.reference (--reference)")
    if not config.train.stream:
        return
    bad = {e.display_name: e.inputs.in_memory_only for e in entries if not e.inputs.streamable}
    if bad:
        detail = "; ".join(f"{k} needs {', '.join(v)} of all cells in memory" for k, v in bad.items())
        raise ConfigError(f"train.stream: {detail}. Models that stream: ST-Net* and the GC-MoE family; train the "
                          "others without --stream")


def cell_data(inputs: ModelInputs, geometry: InputGeometry, features: Tensor, targets: Tensor, xy_um: np.ndarray,
              samples: list[Sample], sample_ids: np.ndarray | None = None, neighbours: Tensor | None = None,
              cell_type: Tensor | None = None) -> CellData:
    """The cells as a model with these ``inputs`` and ``geometry`` reads them.

    Parameters
    ----------
    features, targets
        (N, D) and (N, G), the cells in pooled order: slide after slide.
    xy_um
        (N, 2) cell centres in micrometres of each cell's own slide.
    samples
        The slides in pooled order (raw pixel tiles are read from their images).
    sample_ids
        (N,) each cell's slide, so no window or context square spans two slides (None: one slide).
    neighbours, cell_type
        C2CA neighbours (N, M) and routing labels (N,), given when the inputs ask for them.
    """
    import torch

    from gcmoe.training.cells import CellData

    windows = context = pixels = None
    if inputs.windows:
        from gcmoe.features.context import tile_windows

        windows = tile_windows(xy_um, geometry.windows.window_um, geometry.windows.max_cells, sample_ids)
    if inputs.context:
        from gcmoe.features.context import context_grid

        context = context_grid(xy_um, geometry.context.context_um, geometry.context.size, sample_ids)
    if inputs.pixels:
        from gcmoe.features.pixel_tiles import build_pixel_tiles

        pixels = build_pixel_tiles([s.image for s in samples], [s.mpp for s in samples], [s.spatial for s in samples],
                                   **asdict(geometry.pixels))
    return CellData(
        features, targets,
        cell_type=cell_type if inputs.cell_types else None,
        neighbours=neighbours if inputs.neighbours else None,
        positions=torch.from_numpy(xy_um.astype(np.float32)) if inputs.positions else None,
        windows=windows,
        context=context,
        targets_as_input=inputs.targets,
        pixels=pixels,
    )


def build_model(entry: ModelEntry, run: RunData, genes: list[str], config: RunConfig, targets_t: Tensor | None,
                prior: CoexpressionPrior | None = None) -> tuple[Any, dict[str, Any], Any]:
    """Create a registered model for ``genes`` with what it needs from the run; returns (model, params, data).

    ``prior``: the co-expression graphs of ``genes`` when the caller already built them (built here otherwise).
    ``data`` is a :class:`~gcmoe.training.cells.CellData`, or a cell store's
    :class:`~gcmoe.training.streaming.StreamingCells` when the run streams.
    """
    import torch

    from gcmoe.models import create_model

    inputs = entry.inputs
    params = dict(config.model_params.get(entry.name, {}))
    if inputs.cell_types:
        params.setdefault("n_types", len(run.routing.types))
    if inputs.coexpression:
        if prior is None:
            prior = build_prior(run.reference, genes, run.routing, config, run.pooled)
        params.setdefault("adjacency", torch.from_numpy(prior.adjacency))
    if inputs.neighbours:
        params.setdefault("window_um", config.neighbours.window_um)
    pooled = run.pooled
    model = create_model(entry.name, pooled.feature_dim, len(genes), **params)
    if run.store is not None:
        from gcmoe.training.streaming import StreamingCells

        check_streamable([entry], config)
        cols = np.array([pooled.genes.index(g) for g in genes])
        data = StreamingCells(run.store.store, config.train.buffer_chunks, neighbours=inputs.neighbours,
                              cell_types=inputs.cell_types, target_columns=cols)
        return model, params, data
    # wider contexts are built with the model's own geometry (its settings or their defaults), per slide
    data = cell_data(inputs, model.input_geometry(), torch.from_numpy(pooled.features), targets_t, pooled.xy_um,
                     pooled.samples, pooled.sample_ids, neighbours=run.neighbours,
                     cell_type=torch.from_numpy(run.routing.codes) if inputs.cell_types else None)
    return model, params, data


def build_prior(reference, genes: list[str], routing: Routing, config: RunConfig, pooled: PooledCells
                ) -> CoexpressionPrior:
    """The co-expression graphs of ``genes`` per routing type, from the reference (settings ``prior``)."""
    from gcmoe.pipeline.data import type_mapping
    from gcmoe.prior.coexpression import build_coexpression_prior

    return build_coexpression_prior(
        reference, genes, routing.types, type_key=config.prior.type_key,
        mapping=type_mapping(reference, config, pooled) or None, tau=config.prior.tau,
    )
