"""Cell features from the H&E image: encoders by name, tiling, sampling at cell centres, a disk cache.

``extract_features(sample)`` is the entry point; see docs/features.md. Submodules load on first use of
one of their names, so ``import gcmoe.features`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gcmoe.features.cache import FeatureCache, cache_key
    from gcmoe.features.extract import (
        FeatureResult,
        FeatureStats,
        extract_features,
        extract_features_with_stats,
        read_tiles,
    )
    from gcmoe.features.morphology import MORPHOLOGY_CHANNELS, MorphologyEncoder
    from gcmoe.features.registry import Encoder, EncoderConfig, create_encoder, list_encoders, register_encoder
    from gcmoe.features.sampling import sample_feature_map
    from gcmoe.features.tiling import Tile, TileGrid, make_tile_grid

_EXPORTS = {
    "Encoder": "registry",
    "EncoderConfig": "registry",
    "create_encoder": "registry",
    "list_encoders": "registry",
    "register_encoder": "registry",
    "MORPHOLOGY_CHANNELS": "morphology",
    "MorphologyEncoder": "morphology",
    "Tile": "tiling",
    "TileGrid": "tiling",
    "make_tile_grid": "tiling",
    "sample_feature_map": "sampling",
    "FeatureCache": "cache",
    "cache_key": "cache",
    "FeatureResult": "extract",
    "FeatureStats": "extract",
    "extract_features": "extract",
    "extract_features_with_stats": "extract",
    "read_tiles": "extract",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gcmoe.features' has no attribute '{name}'")
    value = getattr(importlib.import_module(f"gcmoe.features.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
