"""A trained model as a folder that prediction needs nothing beyond: safetensors weights + JSON.

    model.safetensors   every parameter and buffer (feature mean/std, co-expression graphs, ...)
    model.json          how to rebuild it: registry name, constructor parameters, input/output sizes, genes,
                        routing types, encoder, pixel size, target transform, training data and metrics,
                        and a SHA-256 of the weights file
    README.md           the model card, for people

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
    return folder


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
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{folder}: unknown model format {meta.get('format')!r} (this gcmoe reads {FORMAT})")
    if file_sha256(weights) != meta.get("weights_sha256"):
        raise CheckpointError(f"{weights} does not match the checksum in model.json: the file is damaged or was replaced")
    params = dict(meta["params"]) | {k: torch.zeros(shape) for k, shape in meta.get("tensor_params", {}).items()}
    model = create_model(meta["model"], meta["in_dim"], meta["n_genes"], **params)
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
        "",
        "Load with `gcmoe.training.checkpoint.load_model(folder)`.",
    ]
    return "\n".join(lines) + "\n"

