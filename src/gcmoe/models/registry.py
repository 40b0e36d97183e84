"""Models by name (timm's pattern): ``register_model``, ``create_model``, ``list_models``.

Each name carries the display name used in result tables (the paper's names, e.g. "ST-Net*").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gcmoe.errors import UnknownNameError
from gcmoe.models.inputs import ModelInputs


@dataclass(frozen=True)
class ModelEntry:
    name: str
    display_name: str
    factory: Callable[..., Any]
    description: str
    inputs: ModelInputs = ModelInputs()  # what the run must supply beyond cell features


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, display_name: str, description: str = "", inputs: ModelInputs = ModelInputs()) -> Callable:
    """Decorator: register ``factory(in_dim, n_genes, **params) -> CellModel`` under ``name``.

    ``inputs``: what the model needs beyond cell features (the model class's ``inputs``).
    """

    def wrap(factory: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = ModelEntry(
            name, display_name, factory, description or (factory.__doc__ or "").strip(), inputs
        )
        return factory

    return wrap


def _load_builtin() -> None:
    from gcmoe.models import bleep, gcmoe, ghist, histogene, stnet, triplex  # noqa: F401  (register on import)


# the order of methods in tables (the paper's Table 1, then the ablations of Table 2, the full model last)
TABLE_ORDER = ("stnet", "histogene", "bleep", "triplex", "ghist", "gcmoe_no_moe_cap_c2ca", "gcmoe_no_cap_c2ca", "gcmoe_no_c2ca", "gcmoe")


def models_in_table_order() -> list[str]:
    """Every registered model, in the tables' order (unlisted names after, alphabetically)."""
    return sorted(list_models(), key=lambda n: (TABLE_ORDER.index(n) if n in TABLE_ORDER else len(TABLE_ORDER), n))


def list_models() -> list[str]:
    """Names of all registered models."""
    _load_builtin()
    return sorted(_REGISTRY)


def get_model_entry(name: str) -> ModelEntry:
    """The registry entry of ``name`` (factory, display name, inputs); an unknown name lists the valid ones."""
    _load_builtin()
    if name not in _REGISTRY:
        raise UnknownNameError(f"unknown model {name!r}; available models: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def create_model(name: str, in_dim: int, n_genes: int, **params: Any):
    """Build a registered model for ``in_dim`` features and ``n_genes`` targets."""
    import inspect

    from gcmoe.errors import ConfigError

    entry = get_model_entry(name)
    signature = inspect.signature(entry.factory)
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
    valid = sorted(k for k, p in signature.parameters.items()
                   if k not in ("self", "in_dim", "n_genes") and p.kind is not inspect.Parameter.VAR_KEYWORD)
    unknown = sorted(set(params) - set(valid))
    if unknown and not takes_any:  # only a misspelt name is the user's; any other TypeError is a bug
        raise ConfigError(f"model {name!r} has no parameter(s) {unknown} (model_params); its parameters: {valid}")
    return entry.factory(in_dim=in_dim, n_genes=n_genes, **params)
