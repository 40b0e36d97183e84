"""Prediction on a new slide: a trained model folder + an H&E image + cell centres -> an h5ad of predictions.

The slide is read in tiles (features are extracted tile by tile, never loading the whole image), cells come
from a file or from the built-in nuclei detector, and the output AnnData holds:

- ``X``: predicted expression on the model's target scale (``uns["gcmoe"]["target"]``; by default log1p of
  counts), genes in ``var_names``;
- ``obsm["spatial"]``: cell centres (x, y) in full-resolution pixels of the slide;
- ``obsm["routing"]`` and ``obs["expert"]`` (GC-MoE with a router): the router's probabilities over the routing
  types (``uns["gcmoe"]["routing_types"]``) and the most probable one;
- ``uns["gcmoe"]``: the model's card (name, genes, encoder, training data), the slide, its pixel size, the
  cell source, and when it was made.

The file is written under a temporary name and renamed.
"""

from __future__ import annotations

import logging
import os
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from gcmoe import __version__
from gcmoe._constants import Key
from gcmoe.errors import InvalidSampleError
from gcmoe.files import plain_values, write_h5ad

log = logging.getLogger(__name__)

MAX_RESAMPLING = 4.0  # slide mpp / model mpp beyond this factor (either way) is refused


def centres_on_slide(cells: str | os.PathLike, coords: str, shape: tuple[int, int], mpp: float,
                     sample_id: str) -> tuple[np.ndarray, list[str]]:
    """A cell file's centres in slide pixels (``coords`` ``px`` or ``um``) and their ids, after the extent and
    spacing checks that tell micrometres from pixels (cells outside the slide, up to 1%, are dropped)."""
    from gcmoe.data.cells import read_cell_centres
    from gcmoe.data.readers._common import inside_image
    from gcmoe.data.readers._coords import check_spacing, to_pixels

    if coords not in ("px", "um"):
        raise InvalidSampleError(f"unknown unit of the cell centres coords={coords!r}; choose px or um")
    raw, ids = read_cell_centres(cells)
    xy = to_pixels(raw, coords, mpp)
    other = "um" if coords == "px" else "px"
    alternatives = {f"as {'micrometres' if other == 'um' else 'pixels'} (--coords {other})": to_pixels(raw, other, mpp),
                    "x and y swapped (swap the file's columns)": xy[:, ::-1]}
    keep = inside_image(xy, shape, sample_id, mpp, Path(cells).name, alternatives)
    check_spacing(raw[keep], coords, mpp, sample_id, Path(cells).name)
    return xy[keep], [i for i, k in zip(ids, keep) if k]


def _default_tile(encoder: str) -> int:
    from gcmoe.features import create_encoder

    return int(create_encoder(encoder).config.tile_size)


def _check_slide_size(shape: tuple[int, int], mpp: float, target_mpp: float, tile: int, slide) -> None:
    """Refuse a slide so small that every tile the model reads would be mostly padding (a 1 x 1 px image)."""
    height, width = shape[:2]
    need = tile * target_mpp / mpp / 4  # slide pixels: a quarter of the tile's side
    if min(height, width) < need:
        raise InvalidSampleError(
            f"{slide} is {width} x {height} px ({width * mpp:.1f} x {height * mpp:.1f} um): smaller than a quarter of "
            f"the {tile} px tile the model reads at {target_mpp} um/px ({need * 4:.0f} slide px), so its features would "
            "come mostly from padding; give the whole slide (or a crop of at least that size), and check --mpp")


def _check_encoder_weights(card: dict, model_dir) -> None:
    """Refuse encoder weights that are not the file the model was trained on (its SHA-256 is in the card)."""
    from gcmoe.files import file_sha256

    weights, digest = card.get("weights"), card.get("weights_sha256")
    if not weights or not digest:
        return
    if not Path(weights).is_file():
        raise InvalidSampleError(f"the encoder weights {weights} the model {model_dir} was trained with are not there; "
                                 "put that file at that path (the model card names it)")
    if file_sha256(weights) != digest:
        raise InvalidSampleError(f"the encoder weights {weights} are not the file the model {model_dir} was trained "
                                 "with (SHA-256 differs); features of other weights mean nothing to the model")


def predict_slide(
    model_dir: str | os.PathLike,
    slide: str | os.PathLike,
    out: str | os.PathLike,
    cells: str | os.PathLike | None = None,
    detect: bool = False,
    mpp: float | None = None,
    cache_dir: str | os.PathLike | None = None,
    device: str = "cpu",
    batch_size: int = 4,
    progress: bool = True,
    coords: str = "px",
):
    """Predict every cell of ``slide`` with the model in ``model_dir`` and write ``out`` (.h5ad).

    Cells come from ``cells`` (see :func:`gcmoe.data.cells.read_cell_centres`; ``coords`` says whether its centres
    are pixels of the slide, ``px``, or micrometres, ``um``; either way they must fit the slide and lie as far
    apart as cells do, :mod:`gcmoe.data.readers._coords`) or, with ``detect``, from
    :func:`gcmoe.data.detection.detect_nuclei`. ``mpp`` defaults to the pixel size the image states (OME, TIFF
    tags; checked for plausibility); PNG and JPEG state none, so they need ``mpp``. Returns the
    AnnData written.
    """
    import anndata
    import pandas as pd
    import torch

    from gcmoe.config import FeatureConfig
    from gcmoe.data.detection import detect_nuclei
    from gcmoe.data.image import open_image
    from gcmoe.data.readers import resolve_image_mpp
    from gcmoe.data.sample import Sample
    from gcmoe.features import extract_features
    from gcmoe.features.neighbours import window_neighbours
    from gcmoe.models import get_model_entry
    from gcmoe.pipeline.inputs import cell_data
    from gcmoe.training.checkpoint import CheckpointError, load_model
    from gcmoe.training.trainer import collect, predict

    out = Path(out)
    if out.suffix != ".h5ad":
        raise InvalidSampleError(f"the prediction is written as .h5ad; got {out}")
    if (cells is None) == (not detect):
        raise InvalidSampleError("give exactly one source of cells: a cell file (--cells) or --detect")
    model, meta = load_model(model_dir, device=device)
    if not meta.get("genes") or not isinstance(meta.get("encoder"), dict) and not get_model_entry(meta["model"]).inputs.pixels:
        raise CheckpointError(f"{Path(model_dir) / 'model.json'} names no genes or no encoder: prediction needs both to "
                              "label its outputs and extract the features; use a model folder written by gcmoe train")
    image = open_image(slide)
    mpp, _ = resolve_image_mpp(slide, mpp, Path(slide).stem)
    inputs = get_model_entry(meta["model"]).inputs
    geometry = model.input_geometry()
    # a raw-pixel model (GHIST*) reads the slide at its own working pixel size and uses no encoder features
    target_mpp = float(geometry.pixels.mpp) if inputs.pixels else float(meta["encoder"]["target_mpp"])
    factor = mpp / target_mpp
    trained_at = [float(v) for v in (meta.get("training_data") or {}).get("mpp", {}).values()]
    like_training = any(abs(mpp / t - 1) <= 0.25 for t in trained_at)
    if like_training and not 1 / MAX_RESAMPLING <= factor <= MAX_RESAMPLING:
        log.warning("the slide's pixel size (%g um/px) is %.2fx the encoder's (%g um/px), as the model's training "
                    "slides were (%s um/px): predicting as it was trained", mpp, factor, target_mpp,
                    ", ".join(f"{t:g}" for t in trained_at))
    elif not 1 / MAX_RESAMPLING <= factor <= MAX_RESAMPLING:
        raise InvalidSampleError(
            f"the slide's pixel size ({mpp} um/px) is {factor:.2f}x the model encoder's ({target_mpp} um/px); "
            f"resampling by more than {MAX_RESAMPLING:g}x would invent or discard the detail the model was trained "
            "on: scan or export the slide at a closer magnification (or check --mpp); a model trained on slides of "
            "this pixel size predicts on them"
        )
    _check_slide_size(image.shape, mpp, target_mpp, int(geometry.pixels.tile_size) if inputs.pixels else
                      int(meta["encoder"].get("tile_size") or _default_tile(meta["encoder"]["name"])), slide)
    if detect:
        xy = detect_nuclei(image, mpp, progress=progress)
        ids = [f"cell_{i}" for i in range(len(xy))]
        source = "detect_nuclei"
        if len(xy) == 0:
            raise InvalidSampleError(f"no nuclei were detected in {slide}: is it an H&E image with tissue?")
    else:
        xy, ids = centres_on_slide(cells, coords, image.shape, mpp, Path(slide).stem)
        source = str(cells)
    sample = Sample.from_arrays(
        np.zeros((len(xy), 0), dtype=np.float32), xy, image, mpp, [], Path(slide).stem, cell_ids=ids,
        provenance={"slide": str(slide), "cells": source},
    )
    if inputs.pixels:
        feats = np.zeros((len(xy), int(meta["in_dim"])), dtype=np.float32)
    else:
        card = meta["encoder"]
        _check_encoder_weights(card, model_dir)
        settings = FeatureConfig(encoder=card["name"], weights=card.get("weights"), tile_size=card.get("tile_size"),
                                 batch_size=batch_size, device=device, cache_dir=None if cache_dir is None else str(cache_dir))
        feats = extract_features(sample, settings, progress=progress)
    if feats.shape[1] != meta["in_dim"]:
        raise InvalidSampleError(f"the encoder gave {feats.shape[1]} features, the model expects {meta['in_dim']}")
    xy_um = sample.spatial * mpp
    neighbours = None
    if inputs.neighbours:
        nb = meta["neighbours"]
        neighbours = torch.from_numpy(window_neighbours(xy_um, nb["window_um"], nb["max_neighbours"]))
    data = cell_data(inputs, geometry, torch.from_numpy(feats), torch.zeros(len(xy), 0), xy_um, [sample],
                     neighbours=neighbours)
    idx = np.arange(len(xy))
    prediction = predict(model, data, idx)
    bad = ~np.isfinite(prediction).all(axis=1)
    if bad.any():  # never written silently: NaN predictions come from NaN features or weights
        raise InvalidSampleError(
            f"{model_dir} predicts NaN or infinite values for {int(bad.sum())} of {len(bad)} cells of {slide} (e.g. "
            f"cell {ids[int(np.flatnonzero(bad)[0])]}); the image features or the model weights hold non-finite values: "
            "check the slide and the model folder; nothing was written")
    adata = anndata.AnnData(X=prediction.astype(np.float32), obs=pd.DataFrame(index=pd.Index(ids, dtype=str)))
    adata.var_names = pd.Index(meta["genes"])
    adata.obsm[Key.SPATIAL] = sample.spatial
    types = list(meta.get("cell_types") or [])
    if model.routes:
        routing = collect(model, data, idx, lambda m, b: m.routing(**b))
        adata.obsm["routing"] = routing.astype(np.float32)
        adata.obs["expert"] = pd.Categorical.from_codes(routing.argmax(axis=1), categories=types)
    adata.uns[Key.UNS] = plain_values({
        "model": {k: meta[k] for k in ("model", "display_name", "genes", "encoder", "training_data", "metrics")
                  if k in meta},
        "routing_types": types,
        "target": meta.get("targets", {}),
        "slide": str(Path(slide).resolve()),
        "mpp": float(mpp),
        "cells": source,
        "gcmoe_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }, h5ad=True)
    write_h5ad(adata, out)
    log.info("predicted %d genes for %d cells; wrote %s", adata.n_vars, adata.n_obs, out)
    return adata

