"""Image encoders by name (timm's habit): ``@register_encoder``, ``create_encoder``, ``list_encoders``.

An :class:`Encoder` is a frozen ``torch.nn.Module`` that turns an RGB tile into a dense feature map. Its
:class:`EncoderConfig` travels with it: the pixel size it expects, its tile size, its output stride, its
feature dimension, its input normalisation, and (for encoders with weights) a hash of the weights file.
The feature cache is keyed by :meth:`EncoderConfig.hash`.

Geometry (exact, used by tiling and sampling): the input is ``(B, 3, H, W)``; the output is
``(B, D, H // stride, W // stride)``. In continuous input coordinates, where input pixel ``k`` spans
``[k, k + 1)`` and has its centre at ``k + 0.5``, feature-map pixel ``(row j, column i)`` covers input
pixels ``[i * stride, (i + 1) * stride)`` x ``[j * stride, (j + 1) * stride)`` and holds the feature of
the point ``((i + 0.5) * stride, (j + 0.5) * stride)``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import inspect
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from gcmoe.errors import ConfigError, UnknownNameError
from gcmoe.features.stain import STAIN_NORMS
from gcmoe.files import file_sha256

__all__ = [
    "Encoder",
    "EncoderConfig",
    "create_encoder",
    "list_encoders",
    "register_encoder",
    "requires_weights",
]


@dataclass(frozen=True)
class EncoderConfig:
    """What an encoder expects and produces. Frozen: a different value is a different encoder.

    Attributes
    ----------
    name
        The registry name.
    target_mpp
        Micrometres per pixel the encoder expects; slides at another pixel size are resampled to it.
    tile_size
        Default input tile side, pixels at ``target_mpp``.
    stride
        Input pixels per feature-map pixel.
    feature_dim
        Channels D of the feature map.
    margin
        Pixels (at ``target_mpp``) of context on each side of a point that its sampled feature depends
        on, including the bilinear read between feature-map pixels. Tiles overlap by twice this, so no
        cell's feature sees a tile border. ViT-like encoders, whose features depend on the whole tile,
        choose a margin that keeps cells away from the tile's edge.
    align
        Tile origins and sizes are multiples of this (pixels at ``target_mpp``), so that tiles placed
        anywhere on the slide see the same pixel lattice (an encoder with a pyramid of factor 2**L needs
        ``align = 2**L`` for its features not to depend on where the tile starts).
    mean, std
        Per-channel RGB normalisation ``(x - mean) / std`` applied by :meth:`Encoder.forward` to inputs
        in [0, 1]; None when the encoder takes [0, 1] RGB as is.
    version
        Bumped when the encoder's code changes its output, so old cache entries are not reused.
    weights_sha256
        SHA-256 of the weights file, set by :func:`create_encoder` when one is given.
    stain_norm
        The stain normalisation the slide is read through before the encoder (``FeatureConfig.stain_norm``,
        :mod:`gcmoe.features.stain`): not the encoder's own, set for a run by
        :func:`gcmoe.features.extract.run_encoder_config`, so that it is part of the cache key.
    """

    name: str
    target_mpp: float
    tile_size: int
    stride: int
    feature_dim: int
    margin: int
    align: int = 1
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    version: str = "1"
    weights_sha256: str | None = None
    stain_norm: str = "none"

    def __post_init__(self) -> None:
        where = f"encoder '{self.name}'"
        if self.stain_norm not in STAIN_NORMS:
            raise ConfigError(f"{where}: unknown stain_norm {self.stain_norm!r}; choose one of {', '.join(STAIN_NORMS)}")
        for field in ("tile_size", "stride", "feature_dim", "align"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{where}: {field} must be a positive integer, got {value!r}")
        if isinstance(self.margin, bool) or not isinstance(self.margin, int) or self.margin < 0:
            raise ConfigError(f"{where}: margin must be a non-negative integer, got {self.margin!r}")
        if not self.target_mpp > 0:
            raise ConfigError(f"{where}: target_mpp must be > 0 micrometres per pixel, got {self.target_mpp!r}")
        if self.tile_size % self.stride or self.tile_size % self.align:
            raise ConfigError(
                f"{where}: tile_size {self.tile_size} must be a multiple of the stride ({self.stride}) "
                f"and of align ({self.align})"
            )
        if self.margin % self.align:
            raise ConfigError(f"{where}: margin {self.margin} must be a multiple of align ({self.align})")
        if 2 * self.margin >= self.tile_size:
            raise ConfigError(
                f"{where}: tile_size {self.tile_size} leaves no room inside a margin of {self.margin} px on "
                f"each side; use a tile_size larger than {2 * self.margin}"
            )
        for field in ("mean", "std"):
            value = getattr(self, field)
            if value is not None:
                if len(value) != 3:
                    raise ConfigError(f"{where}: {field} must hold 3 values (R, G, B), got {value!r}")
                object.__setattr__(self, field, tuple(float(v) for v in value))
        if self.std is not None and min(self.std) <= 0:
            raise ConfigError(f"{where}: std must be > 0, got {self.std}")

    def with_tile_size(self, tile_size: int) -> EncoderConfig:
        """The same encoder run on tiles of another size (validated)."""
        return dataclasses.replace(self, tile_size=int(tile_size))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples as lists)."""
        out = dataclasses.asdict(self)
        for key in ("mean", "std"):
            if out[key] is not None:
                out[key] = list(out[key])
        return out

    def hash(self) -> str:
        """A 16-hex-digit hash of every field; the feature cache key includes it."""
        fields = self.to_dict()
        if fields["stain_norm"] == "none":  # left out, so that entries and model cards made before it stay valid
            del fields["stain_norm"]
        text = json.dumps(fields, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


class Encoder(torch.nn.Module):
    """A frozen image encoder: RGB tile -> dense feature map.

    Subclasses implement :meth:`forward_features` on normalised input; :meth:`forward` normalises with
    ``config.mean`` / ``config.std`` (when set) and checks shapes.

    Shapes:
        input ``(B, 3, H, W)`` float32 RGB in [0, 1];
        output ``(B, D, H // stride, W // stride)`` with ``D = config.feature_dim``.
    """

    config: EncoderConfig
    channel_names: tuple[str, ...] | None = None  # optional names of the D output channels

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"encoder '{self.config.name}' takes (B, 3, H, W) RGB, got {tuple(x.shape)}")
        if self.config.mean is not None or self.config.std is not None:
            mean = torch.tensor(self.config.mean or (0.0, 0.0, 0.0), dtype=x.dtype, device=x.device)
            std = torch.tensor(self.config.std or (1.0, 1.0, 1.0), dtype=x.dtype, device=x.device)
            x = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
        return self.forward_features(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """Feature-map (h, w) for an input of (height, width) pixels."""
        return height // self.config.stride, width // self.config.stride

    def extra_repr(self) -> str:
        c = self.config
        return f"name={c.name!r}, target_mpp={c.target_mpp}, stride={c.stride}, dim={c.feature_dim}"


EncoderFactory = Callable[..., Encoder]
_FactoryT = TypeVar("_FactoryT", bound=EncoderFactory)

_REGISTRY: dict[str, EncoderFactory] = {}
_BUILTIN_MODULES = ("gcmoe.features.morphology", "gcmoe.features.morphology_context", "gcmoe.features.foundation")


def register_encoder(name: str | _FactoryT | None = None) -> Any:
    """Register an encoder factory under ``name`` (default: the function's name).

    Usable as ``@register_encoder("morphology")``, ``@register_encoder()`` or ``@register_encoder``.
    The factory takes keyword arguments (a ``weights`` path for encoders that load weights) and returns
    an :class:`Encoder`. Registering a name twice raises :class:`~gcmoe.errors.ConfigError`.
    """

    def decorate(factory: _FactoryT, key: str | None) -> _FactoryT:
        key = key or factory.__name__
        if key in _REGISTRY and _REGISTRY[key] is not factory:
            raise ConfigError(f"an encoder named '{key}' is already registered")
        _REGISTRY[key] = factory
        return factory

    if callable(name):
        return decorate(name, None)
    return lambda factory: decorate(factory, name)


def _load_builtins() -> None:
    import importlib

    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def list_encoders(pattern: str | None = None) -> list[str]:
    """Sorted names of the registered encoders, optionally filtered by a shell pattern (``"morph*"``)."""
    _load_builtins()
    names = sorted(_REGISTRY)
    return names if pattern is None else [n for n in names if fnmatch.fnmatch(n, pattern)]


def _lookup(name: str) -> tuple[EncoderFactory, dict[str, Any]]:
    """The factory of ``name`` and the keyword arguments the name itself implies.

    A family registered as ``"<prefix>:*"`` (``"timm:*"``) takes any ``"<prefix>:<model name>"``; its
    factory receives ``model_name``.
    """
    _load_builtins()
    if name in _REGISTRY and not name.endswith(":*"):
        return _REGISTRY[name], {}
    prefix, colon, model_name = name.partition(":")
    if colon and f"{prefix}:*" in _REGISTRY:
        return _REGISTRY[f"{prefix}:*"], {"model_name": model_name}
    raise UnknownNameError(f"unknown encoder '{name}'; registered encoders: {', '.join(sorted(_REGISTRY))}")


def requires_weights(name: str) -> bool:
    """Whether encoder ``name`` cannot be built without a local weights file (its factory's ``weights``
    parameter has no default)."""
    param = inspect.signature(_lookup(name)[0]).parameters.get("weights")
    return param is not None and param.default is inspect.Parameter.empty


def create_encoder(name: str, *, weights: str | os.PathLike | None = None, **kwargs: Any) -> Encoder:
    """Build the encoder registered as ``name``, frozen and in eval mode.

    Parameters
    ----------
    name
        A name from :func:`list_encoders`; an unknown one raises :class:`~gcmoe.errors.UnknownNameError`
        listing the valid names. ``"timm:<model>"`` / ``"open_clip:<model>"`` select a model of the
        ``"timm:*"`` / ``"open_clip:*"`` family.
    weights
        A local weights file for encoders that load weights (never downloaded). Its SHA-256 is stored in
        ``encoder.config.weights_sha256`` so the feature cache tells weights apart.
    **kwargs
        Passed to the factory (e.g. ``tile_size``).
    """
    factory, implied = _lookup(name)
    kwargs = {**kwargs, **implied}
    params = inspect.signature(factory).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    accepted = [p for p in params if params[p].kind is not inspect.Parameter.VAR_KEYWORD]
    unknown = [k for k in kwargs if k not in params and not takes_any]
    if unknown:
        raise ConfigError(f"encoder '{name}' does not take {unknown}; it takes {accepted}")
    sha = None
    if weights is not None:
        if "weights" not in params and not takes_any:
            raise ConfigError(f"encoder '{name}' takes no weights file; remove weights={str(weights)!r}")
        path = Path(weights)
        if not path.is_file():
            raise ConfigError(f"encoder '{name}': weights file not found: {path}")
        sha = file_sha256(path)
        kwargs["weights"] = path
    elif requires_weights(name):
        raise ConfigError(
            f"encoder '{name}' needs a local weights file: create_encoder('{name}', weights='path/to/file') "
            "or features.weights in the settings (nothing is downloaded; docs/features.md names the files)"
        )
    encoder = factory(**kwargs)
    if not isinstance(encoder, Encoder):
        raise TypeError(f"the factory of encoder '{name}' returned {type(encoder).__name__}, not an Encoder")
    if sha is not None:
        encoder.config = dataclasses.replace(encoder.config, weights_sha256=sha)
    encoder.eval()
    encoder.requires_grad_(False)
    return encoder
