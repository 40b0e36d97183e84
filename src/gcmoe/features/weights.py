"""Foundation-model weights from local files: reading them, checking their keys, building the model around them.

Nothing is downloaded: a model is built with random initialisation (on the meta device when the
architecture allows, so a ViT-L costs no initialisation time) and filled from the named local file, whose
keys must match the architecture exactly (:class:`EncoderWeightsError` lists missing and unexpected keys).
The optional packages (timm, open_clip_torch) are imported through :func:`import_extra`, which says how to
get them when they are missing.
"""

from __future__ import annotations

import importlib
import itertools
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from gcmoe.errors import ConfigError

__all__ = ["EncoderWeightsError", "MissingExtraError", "build_and_load", "import_extra", "key_listing",
           "load_weights_file"]

_TORCH_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt")
_INSTALL_HINT = (
    "The foundation-model encoders need the optional extras timm and open_clip_torch, which cannot be "
    "installed into the core environment (they pull torchvision, which replaces the pinned CPU torch 2.13.0). "
    "Use the encoders environment instead: `make test-encoders` creates .venv-encoders with torch 2.14.1, "
    "torchvision 0.29.1, timm, open_clip_torch and gcmoe; run gcmoe there (.venv-encoders/bin/gcmoe). "
    "See docs/features.md, 'Foundation-model encoders'."
)


class MissingExtraError(ConfigError, ImportError):
    """An encoder needs an optional package (timm, open_clip_torch) that is not installed."""


class EncoderWeightsError(ConfigError):
    """A weights file cannot be read or does not match the encoder's architecture."""


def import_extra(module: str, package: str, encoder: str) -> ModuleType:
    """Import an optional package of an encoder, or raise :class:`MissingExtraError` saying how to get it."""
    try:
        return importlib.import_module(module)
    except (ImportError, RuntimeError, OSError) as exc:
        # RuntimeError: torchvision built for another torch fails at import ("operator torchvision::nms ...")
        raise MissingExtraError(
            f"encoder '{encoder}' needs the Python package '{package}', which is not installed or does not "
            f"import here ({type(exc).__name__}: {exc}). {_INSTALL_HINT}"
        ) from exc


def load_weights_file(path: str | os.PathLike, encoder: str) -> dict[str, torch.Tensor]:
    """Read a state dict from a local file, never unpickling arbitrary objects.

    ``.safetensors`` through safetensors; ``.bin``/``.pth``/``.pt``/``.ckpt`` through
    ``torch.load(map_location="cpu", weights_only=True)``. A checkpoint that wraps its weights in a
    ``"state_dict"`` entry is unwrapped, and a ``module.`` prefix (DataParallel) on every key is removed.

    Raises
    ------
    EncoderWeightsError
        The file has another suffix, cannot be read, or holds something other than named tensors.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        elif suffix in _TORCH_SUFFIXES:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise EncoderWeightsError(
                f"encoder '{encoder}': cannot read weights from {path}: expected a .safetensors file or a "
                f"PyTorch state dict ({', '.join(_TORCH_SUFFIXES)})"
            )
    except EncoderWeightsError:
        raise
    except Exception as exc:  # pickle, zip, safetensors header and EOF errors all mean "not a weights file"
        raise EncoderWeightsError(
            f"encoder '{encoder}': {path} is not a readable weights file ({type(exc).__name__}: {exc}). "
            "Give the published state dict (pytorch_model.bin, *.safetensors); full training checkpoints "
            "with pickled Python objects are refused (weights_only=True)."
        ) from exc
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise EncoderWeightsError(
            f"encoder '{encoder}': {path} does not hold a state dict (a mapping of parameter names to tensors)"
        )
    state = dict(obj)
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def key_listing(keys: list[str], limit: int = 8) -> str:
    """The first ``limit`` keys, comma-separated, and how many more there are (for error messages)."""
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _check_keys(model: torch.nn.Module, state: Mapping[str, torch.Tensor], encoder: str, path: Path) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(
        f"{k} (file {tuple(state[k].shape)}, model {expected[k]})"
        for k in set(expected) & set(state)
        if tuple(state[k].shape) != expected[k]
    )
    if missing or unexpected or wrong:
        parts = [f"{len(missing)} missing", f"{len(unexpected)} unexpected", f"{len(wrong)} of another shape"]
        detail = [
            f"missing: {key_listing(missing)}" if missing else "",
            f"unexpected: {key_listing(unexpected)}" if unexpected else "",
            f"other shape: {key_listing(wrong)}" if wrong else "",
        ]
        raise EncoderWeightsError(
            f"encoder '{encoder}': the weights in {path} do not match its architecture "
            f"({', '.join(parts)} keys). " + "; ".join(d for d in detail if d) + ". Check that the file is the "
            "published checkpoint of this model (docs/features.md lists file names and key layouts)."
        )


def _has_meta(model: torch.nn.Module) -> bool:
    return any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers()))


def build_and_load(
    build: Callable[[], torch.nn.Module], state: Mapping[str, torch.Tensor], encoder: str, path: Path
) -> torch.nn.Module:
    """Build a module and fill it strictly from ``state``.

    Built on the meta device first (no random initialisation of hundreds of millions of parameters) and
    filled with ``assign=True``; an architecture whose constructor cannot run on meta, or that keeps
    buffers outside its state dict, is built on the CPU instead.
    """
    try:
        with torch.device("meta"):
            model = build()
    except Exception:  # noqa: BLE001 - a constructor that computes on tensors cannot run on meta; retry below
        model = None
    if model is not None:
        _check_keys(model, state, encoder, path)
        target = model.state_dict()
        cast = {k: v.to(target[k].dtype) if v.is_floating_point() else v for k, v in state.items()}
        model.load_state_dict(cast, strict=True, assign=True)
        if not _has_meta(model):
            return model
    model = build()
    _check_keys(model, state, encoder, path)
    model.load_state_dict(dict(state), strict=True)
    return model
