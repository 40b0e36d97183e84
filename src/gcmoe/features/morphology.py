"""The default encoder: hand-made H&E morphology features, deterministic, no weights (docs/features.md).

Everything is written with torch ops, so it runs batched on CPU or GPU. From an RGB tile in [0, 1] at
0.5 um/px:

1. Colour deconvolution (Ruifrok & Johnston 2001, the stain vectors of ``skimage.color.rgb2hed``):
   optical density ``OD = -ln(max(rgb, 1/255))`` per channel, then ``[H, E, D] = OD @ inv(M)`` with
   ``M`` the rows H = (0.65, 0.70, 0.29), E = (0.07, 0.99, 0.11), DAB/residual = (0.27, 0.57, 0.78),
   each clipped at 0. (skimage divides by ``-ln(1e-6)``; we keep natural-log optical density.) A tissue
   map ``T = clip((OD_r + OD_g + OD_b - 0.1) / 0.3, 0, 1)`` is 0 on white glass and 1 on stained tissue.
2. A small pyramid: level 1 = 2 x 2 means (1 um/px), level 2 = 4 x 4 means (2 um/px) = the output grid
   (stride 4). Squares ``H**2``, ``E**2`` are pooled from full resolution so the local standard
   deviations keep sub-micrometre chromatin texture.
3. On it (scales sigma in micrometres; Gaussians truncated at 3 sigma, zero padding = white glass):
   smoothed stain maps; scale-normalised difference-of-Gaussians blob responses on H at
   sigma = 1, 1.41, 2, 2.83, 4, 5.66 um (a nucleus of radius r answers most near sigma = r / 1.4) with
   their maximum and a soft arg-max scale; Hessian anisotropy (orientation-free elongation) at the
   nuclear scales; structure-tensor coherence and gradient energy of H and E; local standard deviations;
   a nucleus-density context (positive blob responses averaged over 6 um); and 6 um max / min filters.
4. Each channel c is mapped by a fixed affine ``(raw_c - OFFSET_c) / SCALE_c`` (constants below, set
   once from synthetic H&E at 0.5 um/px), so channel magnitudes are O(1) and identical on every slide:
   nothing depends on the data being encoded.

Receptive field: a feature depends on input pixels at most about 64 px (32 um) from its point, so the
config's margin (80 px = 40 um, including the bilinear read) keeps every cell clear of tile borders.

Shapes:
    input ``(B, 3, H, W)`` RGB in [0, 1]; output ``(B, 42, H // 4, W // 4)``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from gcmoe.errors import ConfigError
from gcmoe.features.registry import Encoder, EncoderConfig, register_encoder

__all__ = ["MORPHOLOGY_CHANNELS", "MorphologyEncoder", "morphology", "morphology_config", "rgb_to_hed"]

# Ruifrok-Johnston stain vectors (rows: haematoxylin, eosin, DAB), as skimage.color.rgb_from_hed.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
OD_MIN_RGB = 1.0 / 255.0  # rgb clipped here before the log: black reads as OD 5.5, not infinity
TISSUE_OD = (0.1, 0.4)  # summed OD mapped linearly to tissue fraction 0..1

BLOB_SIGMAS = (1.0, 2**0.5, 2.0, 2 * 2**0.5, 4.0, 4 * 2**0.5)  # um; DoG between sigma and sigma * sqrt(2)

# (name, offset, scale) of each output channel: out = (raw - offset) / scale. Set once, by hand, from
# the raw channels' median and (p90 - p10) / 2.56 on two synthetic H&E sources at 0.5 um/px (the virtual
# tissue, rendered with Macenko's reference stain vectors, and the painted slide of benchmarks/features.py,
# rendered with Ruifrok's; `benchmarks/features.py --calibrate`), rounded, shared within a family of
# channels so that scales stay comparable. Changing a value changes the features: bump the config version.
_CHANNELS: tuple[tuple[str, float, float], ...] = (
    ("h_1um", 0.7, 0.45),
    ("h_2um", 0.6, 0.4),
    ("h_4um", 0.5, 0.3),
    ("h_8um", 0.45, 0.25),
    ("e_1um", 0.25, 0.1),
    ("e_2um", 0.25, 0.1),
    ("e_4um", 0.25, 0.09),
    ("e_8um", 0.25, 0.08),
    ("d_2um", 0.4, 0.2),
    ("d_8um", 0.4, 0.18),
    ("tissue_2um", 0.75, 0.25),
    ("tissue_8um", 0.75, 0.25),
    ("h_fraction_2um", 0.65, 0.2),
    ("h_fraction_8um", 0.6, 0.15),
    ("blob_1.0um", 0.03, 0.065),
    ("blob_1.4um", 0.03, 0.065),
    ("blob_2.0um", 0.03, 0.065),
    ("blob_2.8um", 0.03, 0.065),
    ("blob_4.0um", 0.03, 0.065),
    ("blob_5.7um", 0.03, 0.065),
    ("blob_max", 0.07, 0.07),
    ("blob_log2_scale", 1.25, 0.5),
    ("h_anisotropy_2.0um", 0.13, 0.1),
    ("h_anisotropy_2.8um", 0.13, 0.1),
    ("h_anisotropy_4.0um", 0.13, 0.1),
    ("h_hessian_det_2.8um", 0.005, 0.02),
    ("h_coherence_2um", 0.4, 0.25),
    ("h_coherence_4um", 0.3, 0.2),
    ("h_log_grad_energy_2um", -4.0, 2.0),
    ("h_log_grad_energy_4um", -4.0, 1.4),
    ("e_coherence_4um", 0.3, 0.2),
    ("e_coherence_8um", 0.2, 0.2),
    ("e_log_grad_energy_4um", -6.3, 0.75),
    ("e_log_grad_energy_8um", -6.3, 0.65),
    ("h_std_2um", 0.28, 0.2),
    ("h_std_8um", 0.38, 0.15),
    ("e_std_2um", 0.09, 0.035),
    ("e_std_8um", 0.11, 0.033),
    ("nuclear_density_1.4um_6um", 0.022, 0.013),
    ("nuclear_density_2.8um_6um", 0.024, 0.014),
    ("h_max_6um", 0.8, 0.5),
    ("tissue_min_6um", 0.85, 0.2),
)
MORPHOLOGY_CHANNELS: tuple[str, ...] = tuple(name for name, _, _ in _CHANNELS)

TARGET_MPP = 0.5
STRIDE = 4
MARGIN = 80
DEFAULT_TILE = 1024
_EPS_ENERGY = 1e-4  # added to gradient energy before the log (OD per um, squared)
_EPS_COHERENCE = 1e-4


def rgb_to_hed(x: torch.Tensor) -> torch.Tensor:
    """Haematoxylin, eosin and DAB/residual concentrations, (B, 3, H, W) RGB in [0, 1] -> (B, 3, H, W).

    Natural-log optical density of ``max(rgb, 1/255)`` times ``inv(RGB_FROM_HED)``, clipped at 0: equal to
    ``skimage.color.rgb2hed(rgb) * -ln(1e-6)`` wherever every channel is >= 1/255.
    """
    od = torch.log(x.clamp(min=OD_MIN_RGB, max=1.0)).neg()
    m = torch.tensor(HED_FROM_RGB, dtype=x.dtype, device=x.device)
    return torch.einsum("bchw,cd->bdhw", od, m).clamp(min=0.0)


def _gaussian_1d(sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    radius = int(math.ceil(3.0 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).to(dtype=dtype, device=device)


def _separable(x: torch.Tensor, kx: torch.Tensor, ky: torch.Tensor) -> torch.Tensor:
    """Depthwise separable convolution with 1-D kernels, zero padding, same size.

    Runs in channels-last layout (oneDNN's depthwise kernels are an order of magnitude faster there on
    CPU); a single channel is doubled for the same reason and the copy dropped after.
    """
    c = x.shape[1]
    if c == 1:
        return _separable(x.expand(-1, 2, -1, -1), kx, ky)[:, :1]
    x = x.contiguous(memory_format=torch.channels_last)
    rx, ry = kx.numel() // 2, ky.numel() // 2
    x = F.conv2d(x, kx.view(1, 1, 1, -1).expand(c, 1, 1, -1), padding=(0, rx), groups=c)
    return F.conv2d(x, ky.view(1, 1, -1, 1).expand(c, 1, -1, 1), padding=(ry, 0), groups=c)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of every channel (sigma in pixels of x's level)."""
    k = _gaussian_1d(sigma, x.dtype, x.device)
    return _separable(x, k, k)


def _gradient(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Central first differences of every channel: d/dx, d/dy (per pixel of x's level)."""
    one = torch.tensor([0.0, 1.0, 0.0], dtype=x.dtype, device=x.device)
    d1 = torch.tensor([-0.5, 0.0, 0.5], dtype=x.dtype, device=x.device)
    return _separable(x, d1, one), _separable(x, one, d1)


def _hessian(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Central second differences of every channel: d2/dx2, d2/dy2, d2/dxdy."""
    one = torch.tensor([0.0, 1.0, 0.0], dtype=x.dtype, device=x.device)
    d1 = torch.tensor([-0.5, 0.0, 0.5], dtype=x.dtype, device=x.device)
    d2 = torch.tensor([1.0, -2.0, 1.0], dtype=x.dtype, device=x.device)
    return _separable(x, d2, one), _separable(x, one, d2), _separable(x, d1, d1)


def _anisotropy(xx: torch.Tensor, yy: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
    """Difference of the eigenvalues of a symmetric 2 x 2 field: orientation-free."""
    return torch.sqrt((xx - yy) ** 2 + 4.0 * xy**2 + 1e-12)


def _coherence(xx: torch.Tensor, xy: torch.Tensor, yy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Structure-tensor coherence (lambda1 - lambda2) / (lambda1 + lambda2) and log gradient energy."""
    trace = xx + yy
    return _anisotropy(xx, yy, xy) / (trace + _EPS_COHERENCE), torch.log(trace + _EPS_ENERGY)


def _pool(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 2)


def _std(mean_sq: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    return torch.sqrt((mean_sq - mean * mean).clamp(min=0.0))


class MorphologyEncoder(Encoder):
    """Stain, nucleus-size, elongation, texture and context features at stride 4 (see the module docs)."""

    channel_names = MORPHOLOGY_CHANNELS

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__(config)
        offset = torch.tensor([o for _, o, _ in _CHANNELS], dtype=torch.float32).view(1, -1, 1, 1)
        scale = torch.tensor([s for _, _, s in _CHANNELS], dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("offset", offset, persistent=False)
        self.register_buffer("scale", scale, persistent=False)

    @staticmethod
    def _unmix(od: torch.Tensor, stain: int) -> torch.Tensor:
        """One stain's concentration from optical density (B, 3, h, w) -> (B, 1, h, w), not clipped."""
        m = HED_FROM_RGB[:, stain]
        return od[:, 0:1] * float(m[0]) + od[:, 1:2] * float(m[1]) + od[:, 2:3] * float(m[2])

    def raw_features(self, x: torch.Tensor) -> torch.Tensor:
        """Channels before the fixed affine normalisation, (B, 42, ceil(H / 4), ceil(W / 4))."""
        _, _, h, w = x.shape
        ph, pw = (-h) % STRIDE, (-w) % STRIDE
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), value=1.0)  # white
        # level 0: optical density; stain concentrations are linear in it, so they are pooled as OD and
        # unmixed at level 1; only the squares (for the local standard deviations) need level-0 stains
        od0 = torch.log(x.contiguous().clamp(min=OD_MIN_RGB, max=1.0)).neg_()
        h0, e0 = self._unmix(od0, 0), self._unmix(od0, 1)
        sq1 = _pool(torch.cat([h0 * h0, e0 * e0], 1))
        od1 = _pool(od0)
        del od0, h0, e0
        # level 1 (1 um/px)
        h1r, e1r, d1r = (self._unmix(od1, k) for k in range(3))
        t1 = ((od1.sum(1, keepdim=True) - TISSUE_OD[0]) / (TISSUE_OD[1] - TISSUE_OD[0])).clamp_(0.0, 1.0)
        h1, e1, d1 = h1r.clamp(min=0.0), e1r.clamp(min=0.0), d1r.clamp(min=0.0)

        gh1, ge1, gt1 = _blur(torch.cat([h1, e1, t1], 1), 1.0).split(1, dim=1)
        gh141 = _blur(h1, BLOB_SIGMAS[1])
        gh2, ge2, gd2, gt2, gh2r, ge2r, ghsq2, gesq2 = _blur(
            torch.cat([h1, e1, d1, t1, h1r, e1r, sq1], 1), 2.0
        ).split(1, dim=1)
        gh283 = _blur(h1, BLOB_SIGMAS[3])

        # Hessian of H at 2 and 2.83 um, scale-normalised by sigma^2 (sigma in level-1 pixels)
        hxx, hyy, hxy = _hessian(torch.cat([gh2, gh283], 1))
        aniso = _anisotropy(hxx, hyy, hxy) * torch.tensor([4.0, 8.0], dtype=x.dtype, device=x.device).view(1, 2, 1, 1)
        det283 = (hxx[:, 1:2] * hyy[:, 1:2] - hxy[:, 1:2] ** 2) * 64.0
        del hxx, hyy, hxy
        # structure tensors from the gradients of H and E at 1 um; H's integrated over 2 um at level 1
        gx, gy = _gradient(torch.cat([gh1, ge1], 1))
        jxx, jxy, jyy = gx * gx, gx * gy, gy * gy  # each (B, 2 = [H, E], h, w)
        del gx, gy
        jh2 = _blur(torch.cat([jxx[:, 0:1], jxy[:, 0:1], jyy[:, 0:1]], 1), 2.0)
        std2 = _std(torch.cat([ghsq2, gesq2], 1), torch.cat([gh2r, ge2r], 1))

        # level 2 (2 um/px): the output grid
        gh1_2, ge1_2, gt1_2 = _pool(torch.cat([gh1, ge1, gt1], 1)).split(1, dim=1)
        gh141_2, gh2_2, gh283_2 = _pool(torch.cat([gh141, gh2, gh283], 1)).split(1, dim=1)
        ge2_2, gd2_2, gt2_2 = _pool(torch.cat([ge2, gd2, gt2], 1)).split(1, dim=1)
        aniso_2, det283_2 = _pool(aniso), _pool(det283)
        jh2_2 = _pool(jh2).split(1, dim=1)
        std2_2 = _pool(std2)
        h2, e2, d2, t2 = (_pool(v) for v in (h1, e1, d1, t1))
        her2, sq2 = _pool(torch.cat([h1r, e1r], 1)), _pool(sq1)  # unclipped means and squares
        jxx2, jxy2, jyy2 = _pool(jxx), _pool(jxy), _pool(jyy)

        # 4 um: [h, e, J_H xx, xy, yy, J_E xx, xy, yy]
        j4 = [jxx2[:, 0:1], jxy2[:, 0:1], jyy2[:, 0:1], jxx2[:, 1:2], jxy2[:, 1:2], jyy2[:, 1:2]]
        g4 = _blur(torch.cat([h2, e2, *j4], 1), 2.0)
        gh4, ge4 = g4[:, 0:1], g4[:, 1:2]
        gh566 = _blur(h2, BLOB_SIGMAS[5] / 2.0)
        # 8 um: [h, e, d, t, h unclipped, e unclipped, h^2, e^2, J_E xx, xy, yy]
        g8 = _blur(torch.cat([h2, e2, d2, t2, her2, sq2, jxx2[:, 1:2], jxy2[:, 1:2], jyy2[:, 1:2]], 1), 4.0)
        gh8, ge8, gd8, gt8 = g8[:, 0:1], g8[:, 1:2], g8[:, 2:3], g8[:, 3:4]
        std8 = _std(g8[:, 6:8], g8[:, 4:6])

        hxx4, hyy4, hxy4 = _hessian(gh4)
        aniso4 = _anisotropy(hxx4, hyy4, hxy4) * 4.0

        dog = torch.cat(
            [gh1_2 - gh141_2, gh141_2 - gh2_2, gh2_2 - gh283_2, gh283_2 - gh4, gh4 - gh566, gh566 - gh8], 1
        )
        blob_max = dog.amax(1, keepdim=True)
        weight = dog.clamp(min=0.0) ** 2 + 1e-6
        log2_sigma = torch.tensor([math.log2(s) for s in BLOB_SIGMAS], dtype=x.dtype, device=x.device)
        blob_scale = (weight * log2_sigma.view(1, -1, 1, 1)).sum(1, keepdim=True) / weight.sum(1, keepdim=True)
        density = _blur(dog[:, [1, 3]].clamp(min=0.0), 3.0)

        coh_h2, en_h2 = _coherence(*jh2_2)
        coh_h4, en_h4 = _coherence(g4[:, 2:3], g4[:, 3:4], g4[:, 4:5])
        coh_e4, en_e4 = _coherence(g4[:, 5:6], g4[:, 6:7], g4[:, 7:8])
        coh_e8, en_e8 = _coherence(g8[:, 8:9], g8[:, 9:10], g8[:, 10:11])
        h_max = F.max_pool2d(gh1_2, 3, stride=1, padding=1)
        t_min = -F.max_pool2d(-gt1_2, 3, stride=1, padding=1)

        return torch.cat(
            [
                gh1_2, gh2_2, gh4, gh8,
                ge1_2, ge2_2, ge4, ge8,
                gd2_2, gd8,
                gt2_2, gt8,
                gh2_2 / (gh2_2 + ge2_2 + 0.05), gh8 / (gh8 + ge8 + 0.05),
                dog, blob_max, blob_scale,
                aniso_2, aniso4, det283_2,
                coh_h2, coh_h4, en_h2, en_h4,
                coh_e4, coh_e8, en_e4, en_e8,
                std2_2[:, 0:1], std8[:, 0:1], std2_2[:, 1:2], std8[:, 1:2],
                density, h_max, t_min,
            ],
            1,
        )  # fmt: skip

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.output_size(x.shape[2], x.shape[3])
        raw = self.raw_features(x)[:, :, :h, :w]
        return (raw - self.offset.to(raw.dtype)) / self.scale.to(raw.dtype)


def morphology_config(tile_size: int = DEFAULT_TILE) -> EncoderConfig:
    """The morphology encoder's config; ``tile_size`` in pixels at 0.5 um/px (a multiple of 4)."""
    return EncoderConfig(
        name="morphology",
        target_mpp=TARGET_MPP,
        tile_size=int(tile_size),
        stride=STRIDE,
        feature_dim=len(_CHANNELS),
        margin=MARGIN,
        align=STRIDE,
        mean=None,
        std=None,
        version="1",
    )


@register_encoder("morphology")
def morphology(tile_size: int = DEFAULT_TILE) -> MorphologyEncoder:
    """Deterministic H&E morphology features (42 channels at stride 4, 0.5 um/px); needs no weights."""
    if isinstance(tile_size, bool) or not isinstance(tile_size, int):
        raise ConfigError(f"encoder 'morphology': tile_size must be an integer, got {tile_size!r}")
    return MorphologyEncoder(morphology_config(tile_size))
