"""A trained model as a folder that prediction needs nothing beyond: safetensors weights + JSON.

    model.safetensors   every parameter and buffer (feature mean/std, co-expression graphs, ...)
    model.json          how to rebuild it: registry name, constructor parameters, input/output sizes, genes,
                        routing types, encoder, pixel size, target transform, training data and metrics,
                        and a SHA-256 of the weights file
    README.md           the model card, for people
    SHA256SUMS          SHA-256 of every other file (``sha256sum -c`` reads it): model.json too, since its gene
                        list and settings decide what each output means

Nothing is pickled: loading never runs code from the folder. Files are written under temporary names and
renamed; the checksum detects a damaged or swapped weights file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gcmoe import __version__
from gcmoe.errors import GcmoeError
from gcmoe.files import atomic_path, file_sha256, write_text
from gcmoe.models import create_model, get_model_entry
from gcmoe.models.ensemble import SeedEnsemble

FORMAT = "gcmoe-model/1"


class CheckpointError(GcmoeError, OSError):
    """A model folder is missing a file, damaged, or of another format."""


def save_model(
    model: torch.nn.Module, folder: str | os.PathLike, name: str, params: dict[str, Any], metadata: dict[str, Any]
) -> Path:
    """Write ``model`` (built by ``create_model(name, **params)``) and its card into ``folder``.

    Tensor-valued parameters (e.g. GC-MoE's ``adjacency``) are not written to the JSON: they are buffers of
    the model and travel in the weights; the JSON records their shapes so the model can be rebuilt.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plain = {k: v for k, v in params.items() if not isinstance(v, Tensor)}
    tensor_shapes = {k: list(v.shape) for k, v in params.items() if isinstance(v, Tensor)}
    weights = folder / "model.safetensors"
    with atomic_path(weights) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    entry = get_model_entry(name)
    meta = {
        "format": FORMAT,
        "model": name,
        "display_name": entry.display_name,
        "in_dim": int(model.in_dim),
        "n_genes": int(model.n_genes),
        "params": plain,
        "tensor_params": tensor_shapes,
        "weights_sha256": file_sha256(weights),
        **metadata,
    }
    write_text(folder / "model.json", json.dumps(meta, indent=2))
    write_text(folder / "README.md", card_markdown(meta))
    seal_model(folder)
    return folder


SUMS_NAME = "SHA256SUMS"
_SEALED = ("model.json", "model.safetensors", "README.md")


def seal_model(folder: str | os.PathLike) -> Path:
    """Write ``folder/SHA256SUMS`` for the folder's files as they are now (after an edit made on purpose)."""
    folder = Path(folder)
    lines = [f"{file_sha256(folder / name)}  {name}" for name in _SEALED if (folder / name).is_file()]
    return write_text(folder / SUMS_NAME, "\n".join(lines) + "\n")


def _check_sums(folder: Path) -> None:
    """Raise CheckpointError when a file differs from SHA256SUMS; a folder without one (saved by gcmoe before
    0.x added it) is loaded with a warning."""
    import logging

    sums = folder / SUMS_NAME
    if not sums.is_file():
        logging.getLogger(__name__).warning(
            "%s has no %s (saved by an older gcmoe): model.json's gene list and settings are not checksummed; "
            "gcmoe.training.checkpoint.seal_model(folder) adds it", folder, SUMS_NAME)
        return
    expected = {}
    for line in sums.read_text(encoding="utf-8", errors="replace").splitlines():
        digest, _, name = line.partition("  ")
        if line.strip():
            expected[name.strip()] = digest.strip()
    for name in ("model.json", "model.safetensors"):
        if name not in expected:
            raise CheckpointError(f"{sums} lists no checksum of {name}: the folder is damaged; retrain, or re-seal it "
                                  "with gcmoe.training.checkpoint.seal_model(folder) if you trust its files")
    for name, digest in expected.items():
        path = folder / name
        if name not in _SEALED:
            raise CheckpointError(f"{sums} names {name!r}, not a file of a gcmoe model folder: the folder is damaged")
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: {folder} is not a complete gcmoe model folder")
        if file_sha256(path) != digest:
            raise CheckpointError(
                f"{path} does not match its checksum in {SUMS_NAME}: the file is damaged or was edited (model.json's "
                "gene list and settings decide what each prediction means). Restore the folder; if you edited it on "
                "purpose (a setting an error asked for), re-seal it with gcmoe.training.checkpoint.seal_model(folder)")


def load_model(folder: str | os.PathLike, device: str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the model saved in ``folder`` and load its weights; returns (model in eval mode, metadata)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    meta_path, weights = folder / "model.json", folder / "model.safetensors"
    for path in (meta_path, weights):
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: {folder} is not a complete gcmoe model folder")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{meta_path} is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{folder}: unknown model format {found!r} (this gcmoe reads {FORMAT})")
    _check_sums(folder)
    if file_sha256(weights) != meta.get("weights_sha256"):
        raise CheckpointError(f"{weights} does not match the checksum in model.json: the file is damaged or was replaced")
    _check_card(meta, meta_path)
    params = dict(meta["params"]) | {k: torch.zeros(shape) for k, shape in meta.get("tensor_params", {}).items()}
    try:
        members = [create_model(meta["model"], meta["in_dim"], meta["n_genes"], **params)
                   for _ in range(ensemble_size(meta))]
    except GcmoeError as exc:
        raise CheckpointError(f"{meta_path}: {exc}") from None
    model = members[0] if len(members) == 1 else SeedEnsemble(members)
    try:
        state = load_file(str(weights), device="cpu")
        model.load_state_dict(state, strict=True)
    except (SafetensorError, RuntimeError) as exc:
        raise CheckpointError(
            f"{weights} cannot be loaded into {meta['model']} as this gcmoe ({__version__}) builds it; the folder was "
            f"written by gcmoe {meta.get('gcmoe_version', '?')}. A model saved before a default changed needs that "
            "setting in model.json's params (GC-MoE saved with one C2CA block per expert: \"c2ca_shared\": false), "
            f"or retraining ({exc})") from exc
    return model.to(device).eval(), meta


def ensemble_size(meta: dict[str, Any]) -> int:
    """How many seed-ensemble members a model card describes (1: a single model)."""
    ensemble = meta.get("ensemble")
    return 1 if ensemble is None else int(ensemble["members"])


def _check_card(meta: dict[str, Any], meta_path: Path) -> None:
    """Raise CheckpointError naming the field when model.json lacks what rebuilding and labelling need."""
    problems = []
    if not isinstance(meta.get("model"), str):
        problems.append("'model' (the registry name) is missing")
    for key in ("in_dim", "n_genes"):
        if not isinstance(meta.get(key), int) or isinstance(meta.get(key), bool) or meta[key] <= 0:
            problems.append(f"{key!r} must be a positive whole number, got {meta.get(key)!r}")
    if not isinstance(meta.get("params"), dict):
        problems.append(f"'params' (the model's constructor settings) must be a mapping, got {meta.get('params')!r}")
    tensor_params = meta.get("tensor_params", {})
    if not isinstance(tensor_params, dict) or not all(
            isinstance(v, list) and all(isinstance(d, int) and d >= 0 for d in v) for v in tensor_params.values()):
        problems.append("'tensor_params' must map names to shapes (lists of whole numbers)")
    genes = meta.get("genes")
    if genes is not None and (not isinstance(genes, list) or not all(isinstance(g, str) for g in genes)
                              or isinstance(meta.get("n_genes"), int) and len(genes) != meta["n_genes"]):
        problems.append(f"'genes' must list the model's {meta.get('n_genes')} gene names, got "
                        f"{len(genes) if isinstance(genes, list) else type(genes).__name__} entries")
    elif genes is not None and len(set(genes)) != len(genes):
        problems.append("'genes' names a gene twice")
    ensemble = meta.get("ensemble")
    if ensemble is not None and not (isinstance(ensemble, dict) and isinstance(ensemble.get("members"), int)
                                     and not isinstance(ensemble["members"], bool) and 1 <= ensemble["members"] <= 1000):
        problems.append(f"'ensemble' must be a mapping whose 'members' is a whole number from 1 to 1000, got {ensemble!r}")
    if problems:
        raise CheckpointError(f"{meta_path} is not a usable model card: {'; '.join(problems)}; the folder is damaged "
                              "or was edited: use the folder as gcmoe train wrote it, or retrain")


def card_markdown(meta: dict[str, Any]) -> str:
    """The model folder's README: what the model predicts, from what, trained on what, how well."""
    lines = [
        f"# {meta['display_name']} (`{meta['model']}`)",
        "",
        f"Predicts {meta['n_genes']} genes per cell from {meta.get('encoder', {}).get('name', '?')} image features "
        f"({meta['in_dim']} dims) sampled at cell centres.",
        "",
        "| | |",
        "|---|---|",
        f"| genes | {', '.join(meta.get('genes', [])[:20])}{' ...' if len(meta.get('genes', [])) > 20 else ''} |",
        f"| routing types | {', '.join(meta.get('cell_types', [])) or '–'} |",
        f"| pixel size the encoder expects | {meta.get('encoder', {}).get('target_mpp', '?')} um/px |",
        f"| target | {meta.get('targets', {})} |",
        f"| training data | {meta.get('training_data', '?')} |",
        f"| validation PCC | {meta.get('metrics', {}).get('val_pcc', '?')} |",
        f"| seed ensemble | {ensemble_size(meta)} model(s) averaged |",
        "",
        "Load with `gcmoe.training.checkpoint.load_model(folder)`.",
    ]
    return "\n".join(lines) + "\n"

