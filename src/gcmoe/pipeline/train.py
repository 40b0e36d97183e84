"""Training one model on all cells of a run (``gcmoe train``) and saving its folder with the model card."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from gcmoe.config import RunConfig, save_config
from gcmoe.pipeline.data import extract_sharded, load_samples, prepare_run
from gcmoe.pipeline.inputs import build_model, check_streamable
from gcmoe.pipeline.outputs import (
    attach_log_file,
    detach_log_file,
    model_card,
    plain_params,
)


def train_model(config: RunConfig, model_name: str, progress: bool = True, resume: bool = False) -> Path:
    """Train one model on all cells of the run (validation carved in spatial blocks) and save its folder.

    The training state is checkpointed under ``<out>/checkpoints/<model>`` (``train.checkpoint_every``);
    ``resume`` continues from the newest checkpoint there (refused if the settings or data differ).

    The folder (``<out>/model``) holds safetensors weights and a JSON card with everything prediction needs:
    genes, routing types, encoder and its pixel size, target transform, training data and validation PCC.

    Under torchrun every process encodes its share of each slide's tiles and trains its share of each batch
    (:mod:`gcmoe.training.distributed`); rank 0 prepares the rest of the data first (the others then read its
    caches) and alone writes the outputs.
    """
    import torch

    from gcmoe.data.genes import select_genes
    from gcmoe.data.normalisation import compute_targets
    from gcmoe.data.splits import carve_validation
    from gcmoe.models import create_model, get_model_entry
    from gcmoe.training.checkpoint import save_model
    from gcmoe.training.distributed import rank_world
    from gcmoe.training.ensemble import fit_ensemble, member_seeds
    from gcmoe.training.trainer import check_train_config
    from gcmoe.training.trainer import seed_everything

    out = Path(config.out)
    rank, world = rank_world()
    main = rank == 0
    if main:
        out.mkdir(parents=True, exist_ok=True)
    handler = attach_log_file(out / "log.txt") if main else None
    try:
        entry = get_model_entry(model_name)
        check_streamable([entry], config)
        member_seeds(config.train)  # a bad train.ensemble fails before the features are made
        check_train_config(config.train)  # so do a batch size of 0, a negative lr, a missing GPU
        if main:
            save_config(config, out / "config.yaml")
        loaded = encoder = None
        if world > 1:
            loaded = load_samples(config, out)
            encoder = extract_sharded(config, loaded[0], out, progress and main)
        if main:
            run = prepare_run(config, out, entry.inputs, progress, loaded, encoder)
        if world > 1:
            torch.distributed.barrier()  # rank 0 has written the data and caches the others now read
        if not main:
            run = prepare_run(config, out, entry.inputs, progress=False, loaded=loaded, encoder=encoder)
        pooled = run.pooled
        all_idx = np.arange(len(pooled.sample_ids))
        train_parts, val_parts = [], []
        for sid in dict.fromkeys(pooled.sample_ids):
            tr, va = carve_validation(pooled.xy, all_idx[pooled.sample_ids == sid], config.train.val_fraction, config.train.seed)
            train_parts.append(tr)
            val_parts.append(va)
        train_idx, val_idx = np.concatenate(train_parts), np.concatenate(val_parts)
        genes = select_genes(pooled.counts, pooled.genes, train_idx, config.targets)
        cols = np.array([pooled.genes.index(g) for g in genes])
        targets_t = None
        if run.store is None:
            targets_t = torch.from_numpy(np.ascontiguousarray(compute_targets(pooled.counts, config.targets)[:, cols]))
        seed_everything(config.train.seed)
        model, params, data = build_model(entry, run, genes, config, targets_t)
        fingerprint = {"model": entry.name, "params": json.dumps(plain_params(params), sort_keys=True),
                       "genes": ",".join(genes)}
        model, res = fit_ensemble(
            model, lambda: create_model(entry.name, pooled.feature_dim, len(genes), **params), data, run.rows(train_idx),
            run.rows(val_idx), config.train, progress=progress, description=entry.display_name,
            checkpoint_dir=out / "checkpoints" / entry.name, resume=resume, fingerprint=fingerprint)
        training_data = {"samples": sorted(set(pooled.sample_ids)), "n_cells": int(len(all_idx)),
                         "n_train": int(len(train_idx)), "n_val": int(len(val_idx))}
        meta = model_card(entry, genes, run, config, training_data, res)
        if world > 1:
            torch.distributed.barrier()
        return save_model(model, out / "model", entry.name, params, meta) if main else out / "model"
    finally:
        if handler is not None:
            detach_log_file(handler)
