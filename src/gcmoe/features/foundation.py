"""Foundation-model encoders from local weights: UNI, CONCH, and any timm or open_clip vision model.

Each returns the patch tokens of its last block as a feature map, which the sampler reads like any other:
a ViT with patch size ``p`` maps a ``(B, 3, H, W)`` tile to ``(B, D, H // p, W // p)`` (class and register
tokens dropped), so ``stride = p`` and feature pixel ``(j, i)`` holds the token of input patch
``[i p, (i + 1) p) x [j p, (j + 1) p)``, exactly the geometry :class:`~gcmoe.features.Encoder` promises.
Any tile size that is a multiple of ``p`` works: timm ViTs are built with ``dynamic_img_size=True`` and
open_clip's learned position embedding is interpolated (bicubic) to the tile's patch grid.

Nothing is downloaded: every model is built around a named local weights file (gcmoe.features.weights), whose
keys must match the architecture exactly.
timm and open_clip are optional extras: they pull torchvision, which does not install beside the CPU torch
2.13.0 of the core environment, so they live in ``.venv-encoders`` (``make test-encoders``); without them the
encoders are still listed and raise :class:`MissingExtraError` saying how to get them.

Names: ``"uni"``, ``"conch"``, ``"timm:<model name>"``, ``"open_clip:<model name>"``; see docs/features.md.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from gcmoe.errors import ConfigError, UnknownNameError
from gcmoe.features.registry import Encoder, EncoderConfig, register_encoder
from gcmoe.features.weights import EncoderWeightsError, build_and_load, import_extra, key_listing, load_weights_file

__all__ = [
    "CONCH_TRUNK",
    "CONCH_WEIGHTS_PREFIX",
    "CLIP_MEAN",
    "CLIP_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "OpenClipEncoder",
    "TimmEncoder",
    "UNI_ARCH",
    "conch",
    "default_margin",
    "open_clip_encoder",
    "timm_encoder",
    "uni",
]

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP; CONCH normalises with these
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# UNI (mahmoodlab/UNI, `pytorch_model.bin`): timm ViT-L/16 with LayerScale, no classifier.
UNI_ARCH: dict[str, Any] = {
    "model_name": "vit_large_patch16_224",
    "img_size": 224,
    "patch_size": 16,
    "init_values": 1e-5,
    "num_classes": 0,
    "dynamic_img_size": True,
}
# CONCH (mahmoodlab/CONCH, `pytorch_model.bin` of the `conch_ViT-B-16` CoCa model): its image tower's trunk is
# a timm VisionTransformer with these arguments, stored under `visual.trunk.`; the attentional poolers, the
# text tower and the decoder beside it are not used.
CONCH_TRUNK: dict[str, Any] = {
    "embed_dim": 768,
    "depth": 12,
    "num_heads": 12,
    "mlp_ratio": 4,
    "img_size": 448,
    "patch_size": 16,
    "num_classes": 0,
    "dynamic_img_size": True,
}
CONCH_WEIGHTS_PREFIX = "visual.trunk."


def default_margin(tile_size: int, align: int) -> int:
    """About an eighth of the tile, a multiple of ``align`` (one at least, when the tile allows): how far cells stay from a ViT
    tile's edge. A ViT's tokens see the whole tile, so no margin removes the border's influence; this one
    keeps every cell's context roughly centred at a cost of ``(T / (T - 2 m))**2`` ~ 2 tile passes per area."""
    units = max(1, int(tile_size / (8 * align) + 0.5))
    while units > 0 and 2 * units * align >= tile_size:
        units -= 1
    return units * align


def _tokens_to_map(
    out: torch.Tensor, prefix: int, height: int, width: int, dim: int, encoder: str
) -> torch.Tensor:
    """``(B, prefix + h w, D)`` tokens, or an NCHW / NHWC map, to ``(B, D, h, w)``."""
    batch = out.shape[0]
    if out.ndim == 3 and out.shape[1] == prefix + height * width and out.shape[2] == dim:
        return out[:, prefix:].reshape(batch, height, width, dim).permute(0, 3, 1, 2).contiguous()
    if out.ndim == 4 and tuple(out.shape[1:]) == (dim, height, width):
        return out
    if out.ndim == 4 and tuple(out.shape[1:]) == (height, width, dim):
        return out.permute(0, 3, 1, 2).contiguous()
    raise ConfigError(
        f"encoder '{encoder}': its features have shape {tuple(out.shape)}, not a {dim}-channel grid of "
        f"{height} x {width} (tokens or a map); this model's output cannot be read as a patch-token map"
    )


def _crop_to_stride(x: torch.Tensor, stride: int, encoder: str) -> tuple[torch.Tensor, int, int]:
    height, width = x.shape[-2] // stride, x.shape[-1] // stride
    if height < 1 or width < 1:
        raise ValueError(f"encoder '{encoder}' needs tiles of at least {stride} px, got {tuple(x.shape[-2:])}")
    # rows and columns beyond the last whole patch have no feature pixel (output is H // stride)
    return x[..., : height * stride, : width * stride], height, width


class TimmEncoder(Encoder):
    """A timm model's last feature map: patch tokens of a ViT (prefix tokens dropped) or a CNN's final map.

    Shapes:
        input ``(B, 3, H, W)`` RGB in [0, 1] (normalised by :meth:`Encoder.forward`);
        output ``(B, D, H // stride, W // stride)``, ``D = model.num_features``.
    """

    def __init__(self, config: EncoderConfig, model: torch.nn.Module) -> None:
        super().__init__(config)
        self.model = model
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x, height, width = _crop_to_stride(x, self.config.stride, self.config.name)
        patch_embed = getattr(self.model, "patch_embed", None)
        if patch_embed is not None and not getattr(self.model, "dynamic_img_size", False):
            fixed = tuple(getattr(patch_embed, "img_size", None) or ())
            if fixed and fixed != tuple(x.shape[-2:]):
                raise ConfigError(
                    f"encoder '{self.config.name}' takes only {fixed[0]} x {fixed[1]} px tiles (this timm model "
                    f"has no dynamic image size); set tile_size={fixed[0]}"
                )
        out = self.model.forward_features(x)
        return _tokens_to_map(out, self.num_prefix_tokens, height, width, self.config.feature_dim, self.config.name)


class _OpenClipTokens(torch.nn.Module):
    """Patch tokens of an open_clip VisionTransformer's last block, as an NCHW map."""

    def __init__(self, visual: torch.nn.Module) -> None:
        super().__init__()
        self.visual = visual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # towers with an attentional pooler apply ln_post after pooling (its width differs): raw tokens there
        normalise = getattr(self.visual, "attn_pool", None) is None
        out = self.visual.forward_intermediates(
            x, indices=1, intermediates_only=True, normalize_intermediates=normalise, output_fmt="NCHW"
        )
        return out["image_intermediates"][-1]


class OpenClipEncoder(Encoder):
    """The patch tokens of an open_clip ViT image tower (after ``ln_post``), any tile size.

    The learned position embedding is interpolated (bicubic) from the tower's grid to the tile's patch
    grid for each call, as open_clip does when it loads a checkpoint at another image size.

    Shapes:
        input ``(B, 3, H, W)`` RGB in [0, 1]; output ``(B, width, H // patch, W // patch)``.
    """

    def __init__(self, config: EncoderConfig, visual: torch.nn.Module) -> None:
        super().__init__(config)
        self.tokens = _OpenClipTokens(visual)

    def _position_embedding(self, height: int, width: int) -> torch.Tensor | None:
        visual = self.tokens.visual
        pos = visual.positional_embedding
        grid = tuple(visual.grid_size)
        if grid == (height, width):
            return None
        cls, patches = pos[:1], pos[1:]
        patches = patches.reshape(1, grid[0], grid[1], -1).permute(0, 3, 1, 2)
        patches = F.interpolate(patches.float(), size=(height, width), mode="bicubic", align_corners=False)
        patches = patches.to(pos.dtype).permute(0, 2, 3, 1).reshape(height * width, -1)
        return torch.cat([cls, patches], dim=0)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x, height, width = _crop_to_stride(x, self.config.stride, self.config.name)
        pos = self._position_embedding(height, width)
        if pos is None:
            out = self.tokens(x)
        else:
            out = torch.func.functional_call(self.tokens, {"visual.positional_embedding": pos}, (x,), strict=False)
        return _tokens_to_map(out, 0, height, width, self.config.feature_dim, self.config.name)


def _check_int(value: Any, field: str, encoder: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"encoder '{encoder}': {field} must be an integer, got {value!r}")
    return value


def _config(
    name: str,
    *,
    target_mpp: float,
    tile_size: int,
    stride: int,
    feature_dim: int,
    margin: int | None,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
) -> EncoderConfig:
    tile_size = _check_int(tile_size, "tile_size", name)
    margin = default_margin(tile_size, stride) if margin is None else _check_int(margin, "margin", name)
    if isinstance(target_mpp, bool) or not isinstance(target_mpp, (int, float)):
        raise ConfigError(f"encoder '{name}': target_mpp must be a number (um/px), got {target_mpp!r}")
    return EncoderConfig(
        name=name,
        target_mpp=float(target_mpp),
        tile_size=tile_size,
        stride=stride,
        feature_dim=feature_dim,
        margin=margin,
        align=stride,
        mean=tuple(float(v) for v in mean),  # type: ignore[arg-type]
        std=tuple(float(v) for v in std),  # type: ignore[arg-type]
    )


def _square_patch(patch_size: Any, encoder: str) -> int:
    sizes = tuple(patch_size) if isinstance(patch_size, (tuple, list)) else (patch_size, patch_size)
    if sizes[0] != sizes[1]:
        raise ConfigError(f"encoder '{encoder}': non-square patches {sizes} are not supported")
    return int(sizes[0])


def _timm_stride(model: torch.nn.Module, encoder: str) -> int:
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is not None and getattr(patch_embed, "patch_size", None) is not None:
        return _square_patch(patch_embed.patch_size, encoder)
    info = getattr(model, "feature_info", None)
    if info:
        return int(info[-1]["reduction"])
    raise ConfigError(f"encoder '{encoder}': cannot tell this timm model's output stride (no patch_embed, no feature_info)")


@register_encoder("uni")
def uni(weights: str | os.PathLike, tile_size: int = 224, margin: int | None = None,
        target_mpp: float = 0.5) -> TimmEncoder:
    """UNI (ViT-L/16, 1024 channels at stride 16, 0.5 um/px, ImageNet mean/std) from its ``pytorch_model.bin``."""
    timm = import_extra("timm", "timm", "uni")
    path = Path(weights)
    state = load_weights_file(path, "uni")
    arch = dict(UNI_ARCH)
    model_name = arch.pop("model_name")
    model = build_and_load(lambda: timm.create_model(model_name, pretrained=False, **arch), state, "uni", path)
    stride = _square_patch(model.patch_embed.patch_size, "uni")
    config = _config("uni", target_mpp=target_mpp, tile_size=tile_size, stride=stride,
                     feature_dim=int(model.num_features), margin=margin, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    return TimmEncoder(config, model)


@register_encoder("conch")
def conch(weights: str | os.PathLike, tile_size: int = 448, margin: int | None = None,
          target_mpp: float = 0.5) -> TimmEncoder:
    """CONCH's image trunk (ViT-B/16, 768 channels at stride 16, 0.5 um/px, OpenAI CLIP mean/std) from the
    ``pytorch_model.bin`` of its CoCa model; only the ``visual.trunk.*`` weights are used."""
    import_extra("timm", "timm", "conch")
    from timm.models.vision_transformer import VisionTransformer

    path = Path(weights)
    full = load_weights_file(path, "conch")
    state = {k[len(CONCH_WEIGHTS_PREFIX) :]: v for k, v in full.items() if k.startswith(CONCH_WEIGHTS_PREFIX)}
    if not state:
        raise EncoderWeightsError(
            f"encoder 'conch': {path} has no '{CONCH_WEIGHTS_PREFIX}*' keys (it has e.g. "
            f"{key_listing(sorted(full), 5)}); give the pytorch_model.bin of MahmoodLab's conch_ViT-B-16"
        )
    model = build_and_load(lambda: VisionTransformer(**CONCH_TRUNK), state, "conch", path)
    stride = _square_patch(model.patch_embed.patch_size, "conch")
    config = _config("conch", target_mpp=target_mpp, tile_size=tile_size, stride=stride,
                     feature_dim=int(model.num_features), margin=margin, mean=CLIP_MEAN, std=CLIP_STD)
    return TimmEncoder(config, model)


def _refuse_hub_name(model_name: str, family: str) -> None:
    if not isinstance(model_name, str) or not model_name:
        raise ConfigError(f"encoder '{family}:<model name>' needs a model name, got {model_name!r}")
    if model_name.split(":")[0].replace("_", "-") in ("hf-hub", "local-dir") or model_name == "*":
        raise ConfigError(
            f"encoder '{family}:{model_name}': give an architecture name from {family}'s list (e.g. "
            f"'{family}:{'vit_base_patch16_224' if family == 'timm' else 'ViT-B-16'}') and the weights file "
            "with weights=; hub names are refused because nothing is downloaded"
        )


@register_encoder("timm:*")
def timm_encoder(model_name: str, weights: str | os.PathLike, tile_size: int | None = None,
                 margin: int | None = None, target_mpp: float = 0.5) -> TimmEncoder:
    """Any timm model by architecture name (``"timm:vit_base_patch16_224"``), weights from a local file in
    timm's key layout; its classifier head, if the file has one, is ignored. Mean/std and the default tile
    come from the model's timm pretrained config; the pixel size is a setting (default 0.5 um/px)."""
    _refuse_hub_name(model_name, "timm")
    name = f"timm:{model_name}"
    timm = import_extra("timm", "timm", name)
    if not timm.is_model(model_name):
        raise UnknownNameError(
            f"encoder '{name}': timm has no model '{model_name}'; see timm.list_models('vit_*') in the encoders env"
        )
    path = Path(weights)
    state = load_weights_file(path, name)

    def build(**extra: Any) -> torch.nn.Module:
        return timm.create_model(model_name, pretrained=False, num_classes=0, **extra)

    def build_dynamic() -> torch.nn.Module:
        try:  # ViT-like models take any multiple of the patch size with this; others do not know the argument
            return build(dynamic_img_size=True)
        except TypeError as exc:
            if "dynamic_img_size" not in str(exc):
                raise
            return build()

    head = str(timm.models.get_pretrained_cfg_value(model_name, "classifier") or "head")
    dropped = sorted(k for k in state if k == head or k.startswith(f"{head}."))
    if dropped:
        log.info("encoder '%s': ignoring the classifier weights in %s: %s", name, path, ", ".join(dropped))
        state = {k: v for k, v in state.items() if k not in dropped}
    model = build_and_load(build_dynamic, state, name, path)
    cfg = model.pretrained_cfg
    stride = _timm_stride(model, name)
    default_tile = int(cfg.get("input_size", (3, 224, 224))[-1])
    config = _config(name, target_mpp=target_mpp, tile_size=default_tile if tile_size is None else tile_size,
                     stride=stride, feature_dim=int(model.num_features), margin=margin,
                     mean=tuple(cfg.get("mean", IMAGENET_MEAN)), std=tuple(cfg.get("std", IMAGENET_STD)))
    return TimmEncoder(config, model)


@register_encoder("open_clip:*")
def open_clip_encoder(model_name: str, weights: str | os.PathLike, tile_size: int | None = None,
                      margin: int | None = None, target_mpp: float = 0.5) -> OpenClipEncoder:
    """The image tower of any open_clip ViT model by name (``"open_clip:ViT-B-16"``), weights from an
    open_clip checkpoint (``visual.*`` keys; the text tower's keys are ignored). Mean/std come from the
    model's open_clip preprocessing config; the pixel size is a setting (default 0.5 um/px)."""
    _refuse_hub_name(model_name, "open_clip")
    name = f"open_clip:{model_name}"
    open_clip = import_extra("open_clip", "open_clip_torch", name)
    if model_name not in open_clip.list_models():
        raise UnknownNameError(
            f"encoder '{name}': open_clip has no model config '{model_name}'; see open_clip.list_models()"
        )
    path = Path(weights)
    full = load_weights_file(path, name)
    state = {k[len("visual.") :]: v for k, v in full.items() if k.startswith("visual.")}
    if not state:
        raise EncoderWeightsError(
            f"encoder '{name}': {path} has no 'visual.*' keys (it has e.g. {key_listing(sorted(full), 5)}); give an "
            "open_clip checkpoint (open_clip_pytorch_model.bin or open_clip_model.safetensors)"
        )
    holder: dict[str, Any] = {}

    def build() -> torch.nn.Module:
        # built where the caller's default device says (meta first, see build_and_load); nothing downloaded.
        # open_clip warns that the model is "initialized randomly": true only until the weights below arrive.
        quiet = logging.Filter()
        quiet.filter = lambda record: not str(record.msg).startswith("No pretrained weights loaded")  # type: ignore[method-assign]
        logging.getLogger().addFilter(quiet)
        try:
            model = open_clip.create_model(model_name, pretrained=None, device=torch.get_default_device())
        finally:
            logging.getLogger().removeFilter(quiet)
        holder["preprocess"] = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
        return model.visual

    visual = build_and_load(build, state, name, path)
    if not hasattr(visual, "forward_intermediates") or not hasattr(visual, "positional_embedding"):
        raise ConfigError(
            f"encoder '{name}': its image tower is a {type(visual).__name__}; only open_clip's own "
            "VisionTransformer towers (with forward_intermediates; tested with open_clip_torch 3.3) are supported. "
            "For a tower built on timm, use 'timm:<model name>' with the tower's trunk weights."
        )
    stride = _square_patch(visual.patch_size, name)
    pre = holder.get("preprocess", {})
    default_tile = int(_square_patch(visual.image_size, name))
    config = _config(name, target_mpp=target_mpp, tile_size=default_tile if tile_size is None else tile_size,
                     stride=stride, feature_dim=int(visual.transformer.width), margin=margin,
                     mean=tuple(pre.get("mean") or CLIP_MEAN), std=tuple(pre.get("std") or CLIP_STD))
    return OpenClipEncoder(config, visual)
