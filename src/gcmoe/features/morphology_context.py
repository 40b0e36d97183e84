"""Opt-in encoder ``morphology_context``: the 42 morphology channels, each also relative to its tissue
context and as that wider context (docs/features.md, benchmarks/real_he.py).

On real H&E (BRCA-M2C) the default channels separate cell types within a slide far better than across
slides (train-split accuracy 0.79, test-split 0.66): the absolute stain and texture levels vary from slide
to slide. A cell's features relative to its neighbourhood, and the neighbourhood itself, carry part of the
type signal that survives the change of slide.

From the morphology feature map ``f`` (42 channels at 2 um/px, normalised) and its tissue fraction ``t``
(the raw ``tissue_2um`` channel, 0 on white glass), a tissue-weighted context at sigma ``s``:
``ctx_s = G_s(f t) / (G_s(t) + 1e-3)``, computed on a 4 x 4 mean-pooled grid (8 um/px) and read back to
2 um/px by bilinear interpolation. Output, 126 channels at stride 4:
``[f, f - ctx_16um, ctx_32um]``, named ``<channel>``, ``<channel>_rel16um``, ``<channel>_ctx32um``.

Receptive field: the morphology channels' 64 px plus the 32 um context truncated at 3 sigma (192 px), the
pooling cell and the bilinear read (16 px each): under 300 px; margin 320 px (160 um), tile 2048 px.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gcmoe.errors import ConfigError
from gcmoe.features.morphology import _CHANNELS, MORPHOLOGY_CHANNELS, STRIDE, TARGET_MPP, MorphologyEncoder, _blur
from gcmoe.features.registry import EncoderConfig, register_encoder

__all__ = ["CONTEXT_CHANNELS", "MorphologyContextEncoder", "morphology_context", "morphology_context_config"]

POOL = 4  # feature pixels (2 um) per context pixel: 8 um
REL_SIGMA_UM, CTX_SIGMA_UM = 16.0, 32.0
MARGIN = 320
DEFAULT_TILE = 2048
ALIGN = STRIDE * POOL
_TISSUE = MORPHOLOGY_CHANNELS.index("tissue_2um")
CONTEXT_CHANNELS: tuple[str, ...] = (
    MORPHOLOGY_CHANNELS
    + tuple(f"{c}_rel16um" for c in MORPHOLOGY_CHANNELS)
    + tuple(f"{c}_ctx32um" for c in MORPHOLOGY_CHANNELS)
)


class MorphologyContextEncoder(MorphologyEncoder):
    """Morphology channels, relative to their 16 um tissue context, and their 32 um context (module docs)."""

    channel_names = CONTEXT_CHANNELS

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.output_size(x.shape[2], x.shape[3])
        raw = self.raw_features(x)[:, :, :h, :w]
        f = (raw - self.offset.to(raw.dtype)) / self.scale.to(raw.dtype)
        t = raw[:, _TISSUE : _TISSUE + 1].clamp(0.0, 1.0)
        ph, pw = (-h) % POOL, (-w) % POOL
        ft = F.pad(torch.cat([f * t, t], 1), (0, pw, 0, ph))  # zero weight beyond the edge
        coarse = F.avg_pool2d(ft, POOL)
        um_per_px = TARGET_MPP * STRIDE * POOL
        ctx = []
        for sigma in (REL_SIGMA_UM, CTX_SIGMA_UM):
            b = _blur(coarse, sigma / um_per_px)
            c = b[:, :-1] / (b[:, -1:] + 1e-3)
            ctx.append(F.interpolate(c, scale_factor=POOL, mode="bilinear", align_corners=False)[:, :, :h, :w])
        return torch.cat([f, f - ctx[0], ctx[1]], 1)


def morphology_context_config(tile_size: int = DEFAULT_TILE) -> EncoderConfig:
    """The config; ``tile_size`` in pixels at 0.5 um/px (a multiple of 16, larger than 640)."""
    return EncoderConfig(
        name="morphology_context",
        target_mpp=TARGET_MPP,
        tile_size=int(tile_size),
        stride=STRIDE,
        feature_dim=3 * len(_CHANNELS),
        margin=MARGIN,
        align=ALIGN,
        version="1",
    )


@register_encoder("morphology_context")
def morphology_context(tile_size: int = DEFAULT_TILE) -> MorphologyContextEncoder:
    """Morphology features plus their tissue context (126 channels at stride 4, 0.5 um/px); no weights."""
    if isinstance(tile_size, bool) or not isinstance(tile_size, int):
        raise ConfigError(f"encoder 'morphology_context': tile_size must be an integer, got {tile_size!r}")
    return MorphologyContextEncoder(morphology_context_config(tile_size))
