"""H&E rendering through the Beer-Lambert law.

Two optical-density maps are painted, haematoxylin H(x, y) and eosin E(x, y) (natural-log OD), then

    RGB(x, y) = I0 * exp(-(H(x, y) * h + E(x, y) * e)) + sensor noise,

with h, e the stain vectors (OD per unit stain in R, G, B; close to the Macenko reference vectors) and I0 the light
through bare glass. E holds the region backgrounds (eosinophilic cytoplasm sheets in the nests, collagen fibres
oriented along the layout's fibre field with clefts between bundles, adipocyte membranes, red cells in the
vessels) and every cell's cytoplasm; H holds the nuclei (shape, density, chromatin texture, margination,
nucleoli) and a faint background. Both maps are blurred by the optics before the light is computed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.fft
from scipy import ndimage
from scipy.spatial import cKDTree
from scipy.special import expit

from gcmoe.data.virtual_tissue.fields import periodic_texture, resize, smooth_field
from gcmoe.data.virtual_tissue.layout import (BACKGROUND, EPITHELIUM, FAT, IMMUNE, LUMEN, STROMA, TUMOUR, VESSEL,
                                              Layout)
from gcmoe.data.virtual_tissue.morphology import TEXTURE_TILE, Morphology, boundary_radius

log = logging.getLogger(__name__)

STAIN_H = np.array([0.55, 0.76, 0.34], dtype=np.float32)  # haematoxylin OD per unit, (R, G, B)
STAIN_E = np.array([0.2159, 0.8012, 0.5581], dtype=np.float32)  # eosin OD per unit, (R, G, B)
GLASS = np.array([243.0, 241.0, 245.0], dtype=np.float32)  # light through bare glass
NOISE_SD = 2.0  # sensor noise, grey levels
BLUR_UM = 0.35  # optical blur, micrometres (Gaussian sigma)
# background per region: eosin OD, haematoxylin OD, weight of the collagen-fibre texture
_REGION_OD = {
    BACKGROUND: (0.0, 0.0, 0.0),
    FAT: (0.0, 0.0, 0.0),
    STROMA: (0.0, 0.03, 1.0),
    TUMOUR: (0.30, 0.07, 0.0),
    IMMUNE: (0.10, 0.05, 0.45),
    EPITHELIUM: (0.28, 0.05, 0.0),
    LUMEN: (0.03, 0.0, 0.0),
    VESSEL: (0.10, 0.0, 0.0),
}



@dataclass(frozen=True)
class StainPreset:
    """How one lab's staining and one scanner's optics look: stain vectors, stain strength, blur, glass."""

    stain_h: tuple[float, float, float]  # haematoxylin OD per unit, (R, G, B)
    stain_e: tuple[float, float, float]  # eosin OD per unit, (R, G, B)
    h_scale: float  # multiplies the haematoxylin optical density
    e_scale: float  # multiplies the eosin optical density
    blur_um: float  # optical blur, micrometres (Gaussian sigma)
    glass: tuple[float, float, float]  # light through bare glass


# "standard": the vectors above, sharp optics. "alternate": Ruifrok and Johnston's vectors (a bluer
# haematoxylin, a redder eosin), stronger haematoxylin and weaker eosin, softer optics and a warmer glass,
# as a second lab and scanner would give.
STAIN_PRESETS: dict[str, StainPreset] = {
    "standard": StainPreset(tuple(STAIN_H), tuple(STAIN_E), 1.0, 1.0, BLUR_UM, tuple(GLASS)),
    "alternate": StainPreset((0.650, 0.704, 0.286), (0.072, 0.990, 0.105), 1.3, 0.75, 0.6, (238.0, 233.0, 226.0)),
}
_BATCH = 384  # cells stamped per vectorised batch

StampFn = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]


def _stamp(acc: tuple[np.ndarray, np.ndarray, np.ndarray], xy: np.ndarray, radius_px: np.ndarray, fn: StampFn,
           mpp: float) -> None:
    """Add per-object patches to the (H, E, cover) accumulators.

    Objects are grouped by patch size and sorted by row, so each batch touches a band of the image only.
    ``fn(index, dx_um, dy_um)`` returns the (H, E, cover) patches of the objects ``index`` given pixel offsets
    from their centres, shapes (B, P, 1) and (B, 1, P) broadcasting to (B, P, P).
    """
    h_acc, e_acc, c_acc = acc
    height, width = h_acc.shape
    size_class = np.ceil(radius_px / 4.0).astype(np.int64)
    for cls in np.unique(size_class):
        members = np.flatnonzero(size_class == cls)
        members = members[np.argsort(xy[members, 1], kind="stable")]
        r = int(cls) * 4
        off = np.arange(-r, r + 1)
        for start in range(0, members.size, _BATCH):
            idx = members[start : start + _BATCH]
            ix = np.floor(xy[idx, 0] + 0.5).astype(np.int64)
            iy = np.floor(xy[idx, 1] + 0.5).astype(np.int64)
            dx = ((ix - xy[idx, 0])[:, None, None] + off[None, None, :]) * mpp
            dy = ((iy - xy[idx, 1])[:, None, None] + off[None, :, None]) * mpp
            h, e, c = fn(idx, dx, dy)
            gy = iy[:, None, None] + off[None, :, None]
            gx = ix[:, None, None] + off[None, None, :]
            y0 = max(int(gy.min()), 0)
            y1 = min(int(gy.max()) + 1, height)
            valid = (gy >= 0) & (gy < height) & (gx >= 0) & (gx < width)
            flat = ((gy - y0) * width + gx)
            flat, valid = np.broadcast_arrays(flat, valid)
            flat = flat[valid]
            n = (y1 - y0) * width
            for a, val in ((h_acc, h), (e_acc, e), (c_acc, c)):
                val = np.broadcast_to(val, valid.shape)[valid]
                a[y0:y1] += np.bincount(flat, val, minlength=n).reshape(y1 - y0, width).astype(np.float32)


def _cell_stamp(morph: Morphology, textures: tuple[np.ndarray, np.ndarray], mpp: float) -> StampFn:
    fine, coarse = textures
    soft = 0.45 * mpp  # boundary softness, um (about half a pixel)

    def fn(idx: np.ndarray, dx: np.ndarray, dy: np.ndarray):
        col = lambda a: a[idx].astype(np.float32)[:, None, None]  # noqa: E731
        dx, dy = dx.astype(np.float32), dy.astype(np.float32)
        ca, sa = np.cos(col(morph.angle)), np.sin(col(morph.angle))
        u, v = dx * ca + dy * sa, -dx * sa + dy * ca
        rho = np.sqrt(u * u + v * v) + np.float32(1e-6)
        rb = boundary_radius(u / rho, v / rho, col(morph.major), col(morph.minor),
                             morph.harm_amp[idx].astype(np.float32)[:, None, None, :],
                             morph.harm_phase[idx].astype(np.float32)[:, None, None, :])
        inside = expit((rb - rho) / soft)
        p = dx.shape[-1]
        ty = (morph.texture_offset[idx, 0][:, None, None] + np.arange(p)[None, :, None]) % TEXTURE_TILE
        tx = (morph.texture_offset[idx, 1][:, None, None] + np.arange(p)[None, None, :]) % TEXTURE_TILE
        w = col(morph.coarse)
        chrom = 1.0 + col(morph.texture) * ((1 - w) * fine[ty, tx] + w * coarse[ty, tx])
        radial = np.clip(rho / rb, 0.0, 1.0)
        rim = col(morph.rim)
        chrom = chrom * (1.0 - 0.55 * rim + 1.4 * rim * radial**6)
        h_nuc = col(morph.h_density) * inside * np.clip(chrom, 0.15, None)
        nx, ny = morph.nucleolus_offset[idx, 0][:, None, None], morph.nucleolus_offset[idx, 1][:, None, None]
        blob = np.exp(-((u - nx) ** 2 + (v - ny) ** 2) / (2 * 0.5**2)) * inside
        nucleolus = col(morph.nucleolus) * blob
        # cytoplasm: an ellipse around the nucleus, shifted so the nucleus sits eccentrically
        cs = col(morph.cyto_scale)
        shift = col(morph.eccentric) * cs * col(morph.minor)
        ea = col(morph.eccentric_angle)
        dxc, dyc = dx + shift * np.cos(ea), dy + shift * np.sin(ea)
        uc, vc = dxc * ca + dyc * sa, -dxc * sa + dyc * ca
        ac, bc = col(morph.major) * cs + 0.6, col(morph.minor) * cs + 0.6
        q = np.sqrt((uc / ac) ** 2 + (vc / bc) ** 2)
        cyto = expit((1.0 - q) * bc / 0.5) * (1.0 - inside)
        grain = 1.0 + 0.15 * fine[(ty + 97) % TEXTURE_TILE, (tx + 41) % TEXTURE_TILE]
        h = h_nuc + 0.9 * nucleolus + col(morph.cyto_h) * cyto
        e = col(morph.cyto_eosin) * cyto * grain + 0.22 * inside + 0.45 * nucleolus
        return h.astype(np.float32), e.astype(np.float32), inside.astype(np.float32)

    return fn


def _rbc_stamp(radius_um: np.ndarray, mpp: float) -> StampFn:
    def fn(idx: np.ndarray, dx: np.ndarray, dy: np.ndarray):
        rho = np.hypot(dx, dy) / radius_um[idx][:, None, None]
        disc = expit((1.0 - rho) * 6.0)
        e = 1.25 * disc * (0.75 + 0.25 * np.clip(rho, 0, 1) ** 2)  # central pallor
        return (0.02 * disc).astype(np.float32), e.astype(np.float32), np.zeros_like(e, dtype=np.float32)

    return fn


def _fibres(angle_grid: np.ndarray, shape: tuple[int, int], mpp: float, rng: np.random.Generator,
            n_orient: int = 8) -> np.ndarray:
    """Collagen texture: noise filtered into long streaks along the local fibre direction, about N(0, 1).

    One filter per orientation bin (bundles a few micrometres wide plus fine fibrils, both elongated along
    the fibre); each pixel blends the two bins nearest to its fibre direction.
    """
    height, width = shape
    noise = rng.standard_normal(shape, dtype=np.float32)
    spectrum = scipy.fft.rfft2(noise, workers=2)
    ky = (scipy.fft.fftfreq(height) / mpp).astype(np.float32)[:, None]  # cycles per um
    kx = (scipy.fft.rfftfreq(width) / mpp).astype(np.float32)[None, :]
    c2 = resize(np.cos(2 * angle_grid), shape)
    s2 = resize(np.sin(2 * angle_grid), shape)
    t = (np.mod(0.5 * np.arctan2(s2, c2), np.pi) / (np.pi / n_orient)).astype(np.float32)
    out = np.zeros(shape, dtype=np.float32)
    for o in range(n_orient):
        th = o * np.pi / n_orient
        k_par = kx * np.float32(np.cos(th)) + ky * np.float32(np.sin(th))
        k_perp = np.abs(-kx * np.float32(np.sin(th)) + ky * np.float32(np.cos(th)))
        bundles = np.exp(-0.5 * (k_par * np.float32(2 * np.pi * 15.0)) ** 2 - 0.5 * ((k_perp - 0.05) / 0.1) ** 2)
        fibrils = np.exp(-0.5 * (k_par * np.float32(2 * np.pi * 20.0)) ** 2 - 0.5 * (k_perp / 0.2) ** 2)
        resp = scipy.fft.irfft2(spectrum * (bundles + 0.8 * fibrils), s=shape, workers=2)
        resp /= resp.std() + 1e-12
        dist = np.abs(np.mod(t - o + n_orient / 2, n_orient) - n_orient / 2)
        out += np.clip(1.0 - dist, 0.0, 1.0) * resp
    return out


def _fat_membranes(fat_w: np.ndarray, adipocytes_px: np.ndarray, mpp: float) -> np.ndarray:
    """Eosin OD of adipocyte membranes (the Voronoi edges of the fat-cell centres), inside the fat region."""
    out = np.zeros(fat_w.shape, dtype=np.float32)
    ys, xs = np.nonzero(fat_w > 0.02)
    if len(adipocytes_px) < 2 or ys.size == 0:
        return out
    d, _ = cKDTree(adipocytes_px).query(np.column_stack([xs, ys]).astype(np.float32), k=2)
    half_gap = (d[:, 1] - d[:, 0]) * 0.5 * mpp
    out[ys, xs] = 0.7 * np.exp(-((half_gap / 0.8) ** 2)) * fat_w[ys, xs]
    return out


def render_he(layout: Layout, morph: Morphology, shape: tuple[int, int], mpp: float,
              rng: np.random.Generator, stain: str = "standard") -> np.ndarray:
    """Paint the tissue and its cells; returns the RGB image, uint8 (height, width, 3).

    Parameters
    ----------
    layout
        Regions, cell centres, fibre directions, red cells and adipocytes.
    morph
        Morphology of every cell of the layout.
    shape
        (height, width) in pixels.
    mpp
        Micrometres per pixel.
    rng
        Random generator (the renderer's own stream).
    stain
        A key of ``STAIN_PRESETS``.
    """
    preset = STAIN_PRESETS[stain]
    table = np.zeros((max(_REGION_OD) + 1, 3), dtype=np.float32)
    for code, vals in _REGION_OD.items():
        table[code] = vals
    grid = ndimage.gaussian_filter(table[layout.region_map], (0.6, 0.6, 0))  # soft region borders
    e_bg, h_bg, fibre_w = (resize(grid[..., k], shape) for k in range(3))
    fat_w = resize(ndimage.gaussian_filter((layout.region_map == FAT).astype(np.float32), 0.6), shape)
    gshape = layout.region_map.shape
    # collagen: bundles (bright pink) and clefts (pale), looser and denser stroma
    collagen = expit(2.0 * (_fibres(layout.fibre_angle, shape, mpp, rng) + 0.5))
    density = resize(0.85 + 0.15 * smooth_field(gshape, 25.0 / (layout.step * mpp), rng), shape)
    e_bg += fibre_w * (0.06 + 0.85 * collagen * density)
    e_bg += _fat_membranes(fat_w, layout.adipocyte_xy, mpp)

    h_cells = np.zeros(shape, dtype=np.float32)
    e_cells = np.zeros(shape, dtype=np.float32)
    cover = np.zeros(shape, dtype=np.float32)
    acc = (h_cells, e_cells, cover)
    textures = (periodic_texture(TEXTURE_TILE, 0.3 / mpp, rng), periodic_texture(TEXTURE_TILE, 0.8 / mpp, rng))
    _stamp(acc, layout.xy, morph.extent_um() / mpp + 1.0, _cell_stamp(morph, textures, mpp), mpp)
    if len(layout.rbc_xy):
        rbc_r = rng.uniform(3.2, 3.8, len(layout.rbc_xy))
        _stamp(acc, layout.rbc_xy, rbc_r * 1.3 / mpp + 1.0, _rbc_stamp(rbc_r, mpp), mpp)

    np.clip(cover, 0.0, 1.0, out=cover)
    h_map = h_bg * (1.0 - cover) + h_cells
    e_map = e_bg * (1.0 - 0.8 * cover) + e_cells
    # slide-level stain variation, optics
    h_map *= resize(1.0 + 0.07 * smooth_field(gshape, 300.0 / (layout.step * mpp), rng), shape)
    e_map *= resize(1.0 + 0.08 * smooth_field(gshape, 300.0 / (layout.step * mpp), rng), shape)
    h_map *= preset.h_scale
    e_map *= preset.e_scale
    sigma = preset.blur_um / mpp
    h_map = ndimage.gaussian_filter(h_map, sigma)
    e_map = ndimage.gaussian_filter(e_map, sigma)
    log.debug("rendered %d cells and %d red cells on %dx%d px", len(layout.xy), len(layout.rbc_xy), shape[1], shape[0])
    rgb = np.empty((*shape, 3), dtype=np.uint8)
    for ch in range(3):
        light = preset.glass[ch] * np.exp(-(h_map * preset.stain_h[ch] + e_map * preset.stain_e[ch]))
        light += rng.normal(0.0, NOISE_SD, shape).astype(np.float32)
        rgb[..., ch] = np.clip(np.rint(light), 0, 255).astype(np.uint8)
    return rgb
