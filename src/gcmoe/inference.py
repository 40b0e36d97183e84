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
from gcmoe.errors import ConfigError, InvalidSampleError
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


class Predictor:
    """A trained model ready to predict slide after slide: the model, its card, and the encoder that made its
    training features, built once and checked against the card (:func:`load_predictor`)."""

    def __init__(self, model_dir: str | os.PathLike, device: str = "cpu", weights: str | os.PathLike | None = None) -> None:
        from gcmoe.models import get_model_entry
        from gcmoe.training.checkpoint import CheckpointError, load_model

        self.model_dir = Path(model_dir)
        self.device = device
        self.model, self.meta = load_model(model_dir, device=device)
        self.inputs = get_model_entry(self.meta["model"]).inputs
        if not self.meta.get("genes") or not isinstance(self.meta.get("encoder"), dict) and not self.inputs.pixels:
            raise CheckpointError(f"{self.model_dir / 'model.json'} names no genes or no encoder: prediction needs both "
                                  "to label its outputs and extract the features; use a model folder written by gcmoe "
                                  "train")
        self.geometry = self.model.input_geometry()
        self.encoder = None if self.inputs.pixels else model_encoder(self.meta, self.model_dir, weights)

    @property
    def target_mpp(self) -> float:
        """The pixel size the model reads slides at (its encoder's, or a raw-pixel model's own)."""
        if self.inputs.pixels:  # a raw-pixel model (GHIST*) reads the slide at its own working pixel size
            return float(self.geometry.pixels.mpp)
        return float(self.meta["encoder"]["target_mpp"])

    @property
    def genes(self) -> list[str]:
        return list(self.meta["genes"])

    @property
    def cell_types(self) -> list[str]:
        return list(self.meta.get("cell_types") or [])

    @property
    def fingerprint(self) -> dict[str, str]:
        """What identifies the predictions: the model's weights and its encoder's config (with weights) hashes."""
        out = {"model_weights_sha256": str(self.meta.get("weights_sha256"))}
        if self.encoder is not None:
            out["encoder_config_hash"] = self.encoder.config.hash()
        return out

    def check_pixel_size(self, mpp: float, slide: str | os.PathLike) -> None:
        """Refuse a slide whose pixel size is more than :data:`MAX_RESAMPLING` times the model's either way, unless the
        model was trained on slides of that pixel size (within 25%; the card records them)."""
        factor = mpp / self.target_mpp
        if 1 / MAX_RESAMPLING <= factor <= MAX_RESAMPLING:
            return
        trained_at = [float(v) for v in (self.meta.get("training_data") or {}).get("mpp", {}).values()]
        if any(abs(mpp / t - 1) <= 0.25 for t in trained_at):
            log.warning("%s: the slide's pixel size (%g um/px) is %.2fx the encoder's (%g um/px), as the model's "
                        "training slides were (%s um/px): predicting as it was trained", slide, mpp, factor,
                        self.target_mpp, ", ".join(f"{t:g}" for t in trained_at))
            return
        raise InvalidSampleError(
            f"{slide}: the slide's pixel size ({mpp} um/px) is {factor:.2f}x the model encoder's "
            f"({self.target_mpp} um/px); resampling by more than {MAX_RESAMPLING:g}x would invent or discard the "
            "detail the model was trained on: scan or export the slide at a closer magnification (or check --mpp); "
            "a model trained on slides of this pixel size predicts on them"
        )

    def check_slide_size(self, shape: tuple[int, int], mpp: float, slide: str | os.PathLike) -> None:
        """Refuse a slide so small that every tile the model reads would be mostly padding (a 1 x 1 px image)."""
        tile = int(self.geometry.pixels.tile_size) if self.inputs.pixels else int(self.encoder.config.tile_size)
        height, width = shape[:2]
        need = tile * self.target_mpp / mpp / 4  # slide pixels: a quarter of the tile's side
        if min(height, width) < need:
            raise InvalidSampleError(
                f"{slide} is {width} x {height} px ({width * mpp:.1f} x {height * mpp:.1f} um): smaller than a quarter "
                f"of the {tile} px tile the model reads at {self.target_mpp} um/px ({need * 4:.0f} slide px), so its "
                "features would come mostly from padding; give the whole slide (or a crop of at least that size), and "
                "check --mpp")

    def predict(self, image, mpp: float, xy: np.ndarray, ids: list[str], sample_id: str, provenance: dict,
                batch_size: int = 4, cache_dir: str | os.PathLike | None = None, progress: bool = True,
                stats: dict | None = None):
        """An AnnData of the predictions for cells ``xy`` (full-resolution pixels) of ``image``; ``stats``, when
        given, receives the feature extraction's :class:`gcmoe.features.extract.FeatureStats` as a dict."""
        import anndata
        import pandas as pd
        import torch

        from gcmoe import features
        from gcmoe.config import FeatureConfig
        from gcmoe.data.sample import Sample
        from gcmoe.features.neighbours import window_neighbours
        from gcmoe.pipeline.inputs import cell_data
        from gcmoe.training.trainer import collect, predict

        meta, model = self.meta, self.model
        sample = Sample.from_arrays(np.zeros((len(xy), 0), dtype=np.float32), xy, image, mpp, [], sample_id,
                                    cell_ids=ids, provenance=provenance)
        if self.inputs.pixels:
            feats = np.zeros((len(xy), int(meta["in_dim"])), dtype=np.float32)
        else:
            settings = FeatureConfig(encoder=self.encoder.config.name, tile_size=self.encoder.config.tile_size,
                                     stain_norm=self.encoder.config.stain_norm, batch_size=batch_size, device=self.device,
                                     cache_dir=None if cache_dir is None else str(cache_dir))
            result = features.extract_features_with_stats(sample, settings, encoder=self.encoder, progress=progress)
            feats = result.features
            if stats is not None:
                stats.update(result.stats.to_dict())
        if feats.shape[1] != meta["in_dim"]:
            raise InvalidSampleError(f"the encoder gave {feats.shape[1]} features, the model expects {meta['in_dim']}")
        xy_um = sample.spatial * mpp
        neighbours = None
        if self.inputs.neighbours:
            nb = meta["neighbours"]
            neighbours = torch.from_numpy(window_neighbours(xy_um, nb["window_um"], nb["max_neighbours"]))
        data = cell_data(self.inputs, self.geometry, torch.from_numpy(feats), torch.zeros(len(xy), 0), xy_um,
                         [sample], neighbours=neighbours)
        del feats
        idx = np.arange(len(xy))
        prediction = predict(model, data, idx) if len(xy) else np.zeros((0, len(self.genes)), dtype=np.float32)
        bad = ~np.isfinite(prediction).all(axis=1)
        if bad.any():  # never written silently: NaN predictions come from NaN features or weights
            raise InvalidSampleError(
                f"{self.model_dir} predicts NaN or infinite values for {int(bad.sum())} of {len(bad)} cells of "
                f"{sample_id} (e.g. cell {ids[int(np.flatnonzero(bad)[0])]}); the image features or the model weights "
                "hold non-finite values: check the slide and the model folder; nothing was written")
        adata = anndata.AnnData(X=prediction.astype(np.float32), obs=pd.DataFrame(index=pd.Index(ids, dtype=str)))
        adata.var_names = pd.Index(self.genes)
        adata.obsm[Key.SPATIAL] = sample.spatial
        types = self.cell_types
        if model.routes:
            routing = (collect(model, data, idx, lambda m, b: m.routing(**b)) if len(xy)
                       else np.zeros((0, len(types)), dtype=np.float32))
            adata.obsm["routing"] = routing.astype(np.float32)
            adata.obs["expert"] = pd.Categorical.from_codes(routing.argmax(axis=1), categories=types)
        adata.uns[Key.UNS] = plain_values({
            "model": {k: meta[k] for k in ("model", "display_name", "genes", "encoder", "training_data", "metrics")
                      if k in meta} | {"weights_sha256": meta.get("weights_sha256")},
            "routing_types": types,
            "target": meta.get("targets", {}),
            "mpp": float(mpp),
            "gcmoe_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        } | provenance, h5ad=True)
        return adata


def load_predictor(model_dir: str | os.PathLike, device: str = "cpu",
                   weights: str | os.PathLike | None = None) -> Predictor:
    """The model of ``model_dir`` with the encoder of its card, checked (:func:`model_encoder`)."""
    return Predictor(model_dir, device=device, weights=weights)


def model_encoder(meta: dict, model_dir: str | os.PathLike, weights: str | os.PathLike | None = None):
    """The encoder the model's card names, built as its training features were (name, weights, tile size, stain
    normalisation: its config is the run's, :func:`gcmoe.features.extract.run_encoder_config`) and checked
    against the card: pixel size, feature dimension, the weights file's SHA-256 and the hash of the whole encoder
    config, where the card records them (models saved before they were recorded are checked on what they have;
    a card without ``stain_norm`` was made before the setting existed, without normalisation). ``weights``
    replaces the card's weights path (the file moved); its hash must still match."""
    from gcmoe.config import FeatureConfig
    from gcmoe.features import create_encoder
    from gcmoe.features.extract import run_encoder_config

    card = meta.get("encoder") or {}
    where = Path(model_dir) / "model.json"
    path = weights if weights is not None else card.get("weights")
    if path is not None and not Path(path).is_file():
        raise InvalidSampleError(
            f"the encoder weights the model was trained with ({path}, {where}) are not found: give their current "
            f"location with --encoder-weights")
    encoder = create_encoder(card["name"], weights=path)
    tile_size = None if card.get("tile_size") is None else int(card["tile_size"])
    stain_norm = card.get("stain_norm", "none")  # absent from cards written before the setting existed
    try:
        encoder.config = run_encoder_config(encoder.config, FeatureConfig(tile_size=tile_size, stain_norm=stain_norm))
    except ConfigError as exc:
        raise InvalidSampleError(f"{where}: encoder.stain_norm {stain_norm!r} is not known to this gcmoe ({exc}); "
                                 "use the gcmoe version that trained the model") from None
    config = encoder.config
    checks = [("target_mpp", config.target_mpp, card.get("target_mpp")),
              ("feature_dim", config.feature_dim, card.get("feature_dim")),
              ("weights_sha256", config.weights_sha256, card.get("weights_sha256", config.weights_sha256)),
              ("config_hash", config.hash(), card.get("config_hash", config.hash()))]
    for name, have, want in checks:
        if want is not None and have != (type(have)(want) if have is not None else want):
            raise InvalidSampleError(
                f"the encoder '{card['name']}' built here differs from the one the model was trained with "
                f"({where}, encoder.{name}: {want!r} there, {have!r} here): use the same weights file "
                "(--encoder-weights) and gcmoe version, or retrain the model")
    return encoder


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
    from gcmoe.data.detection import detect_nuclei
    from gcmoe.data.image import open_image
    from gcmoe.data.readers import resolve_image_mpp

    out = Path(out)
    if out.suffix != ".h5ad":
        raise InvalidSampleError(f"the prediction is written as .h5ad; got {out}")
    if (cells is None) == (not detect):
        raise InvalidSampleError("give exactly one source of cells: a cell file (--cells) or --detect")
    predictor = load_predictor(model_dir, device=device)
    image = open_image(slide)
    mpp, _ = resolve_image_mpp(slide, mpp, Path(slide).stem)
    predictor.check_pixel_size(mpp, slide)
    predictor.check_slide_size(image.shape, mpp, slide)
    if detect:
        xy = detect_nuclei(image, mpp, progress=progress)
        ids = [f"cell_{i}" for i in range(len(xy))]
        source = "detect_nuclei"
        if len(xy) == 0:
            raise InvalidSampleError(f"no nuclei were detected in {slide}: is it an H&E image with tissue?")
    else:
        xy, ids = centres_on_slide(cells, coords, image.shape, mpp, Path(slide).stem)
        source = str(cells)
    adata = predictor.predict(image, mpp, xy, ids, Path(slide).stem,
                              {"slide": str(Path(slide).resolve()), "cells": source},
                              batch_size=batch_size, cache_dir=cache_dir, progress=progress)
    write_h5ad(adata, out)
    log.info("predicted %d genes for %d cells; wrote %s", adata.n_vars, adata.n_obs, out)
    return adata
