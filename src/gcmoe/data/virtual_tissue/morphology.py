"""Per-cell morphology: nucleus shape, size and stain, chromatin, cytoplasm.

Every quantity is the subtype's value (already scaled by ``morphology_contrast``) moved by the cell's
continuous state and by morphological noise that has no effect on expression:

    log area     = log area_t + AREA_ACTIVITY * activity + area_sd_t * e1
    log aspect   = log aspect_t + ASPECT_DIFFERENTIATION * differentiation + aspect_sd_t * e2
    log H        = log H_t + H_ACTIVITY * activity + h_sd_t * e3
    log eosin    = log eosin_t + EOSIN_DIFFERENTIATION * differentiation + 0.15 * e4
    nucleolus    = nucleolus_t * max(0, 1 + 0.6 * activity + 0.3 * e5)

The boundary is an ellipse (semi-axes ``major`` >= ``minor``, in micrometres) whose radius is modulated by
harmonics 2-5: r(phi) = r_ellipse(phi) * (1 + sum_k amp_k cos(k phi + phase_k)); the semi-axes are scaled so
that the area of that curve is exactly the drawn area (``area_um2``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import pandas as pd

from gcmoe.data.virtual_tissue.cell_types import TypeSet

AREA_ACTIVITY = 0.185  # d log nucleus area / d activity
H_ACTIVITY = 0.06  # d log haematoxylin density / d activity (hyperchromasia)
ASPECT_DIFFERENTIATION = 0.10  # d log aspect / d differentiation
EOSIN_DIFFERENTIATION = 0.20  # d log cytoplasm eosin / d differentiation
N_HARMONICS = 4  # boundary harmonics k = 2..5
TEXTURE_TILE = 256  # side of the chromatin texture tiles, pixels
_HARMONIC_WEIGHTS = np.array([1.0, 0.7, 0.5, 0.35])


@dataclass
class Morphology:
    """Morphology of every cell; arrays of length n_cells unless noted. Lengths are micrometres."""

    major: np.ndarray  # nucleus semi-axis along its long axis
    minor: np.ndarray  # nucleus semi-axis across
    angle: np.ndarray  # direction of the long axis, radians in image (x, y)
    harm_amp: np.ndarray  # (n, N_HARMONICS) relative amplitude of boundary harmonics 2..5
    harm_phase: np.ndarray  # (n, N_HARMONICS)
    h_density: np.ndarray  # haematoxylin optical density of the nucleus
    texture: np.ndarray  # chromatin texture amplitude (relative)
    coarse: np.ndarray  # share of coarse chromatin
    rim: np.ndarray  # chromatin margination
    nucleolus: np.ndarray  # nucleolus optical density
    nucleolus_offset: np.ndarray  # (n, 2) nucleolus position in the nucleus frame
    cyto_scale: np.ndarray  # cytoplasm radius / nucleus radius
    cyto_eosin: np.ndarray  # eosin optical density of the cytoplasm
    cyto_h: np.ndarray  # haematoxylin tint of the cytoplasm
    eccentric: np.ndarray  # nucleus offset in the cytoplasm, fraction of the cytoplasm radius
    eccentric_angle: np.ndarray  # direction of that offset, radians
    texture_offset: np.ndarray  # (n, 2) int, where each nucleus reads the chromatin texture tiles
    area_um2: np.ndarray  # nucleus area, um^2 (exact area of the drawn boundary)

    def table(self) -> pd.DataFrame:
        """The scalar per-cell parameters as a DataFrame (one row per cell)."""
        return pd.DataFrame({f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name).ndim == 1})

    def extent_um(self) -> np.ndarray:
        """Radius around the centre that holds the whole cell, micrometres."""
        wobble = 1.0 + self.harm_amp.sum(axis=1)
        return self.major * wobble * (self.cyto_scale + self.eccentric * self.cyto_scale) + 1.5


def boundary_radius(cos_phi: np.ndarray, sin_phi: np.ndarray, major: np.ndarray, minor: np.ndarray,
                    amp: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """Radius of the nucleus boundary in direction (cos phi, sin phi) of its own frame.

    ``amp`` and ``phase`` carry the harmonics in their last axis; the other arrays broadcast together.
    """
    r = major * minor / np.sqrt((minor * cos_phi) ** 2 + (major * sin_phi) ** 2)
    z = cos_phi + 1j * sin_phi
    zk = z * z
    wobble = 1.0
    for k in range(amp.shape[-1]):
        rot = np.exp(1j * phase[..., k]).astype(np.complex64 if zk.dtype == np.complex64 else np.complex128)
        wobble = wobble + amp[..., k] * (zk * rot).real
        zk = zk * z
    return r * np.maximum(wobble, 0.3)


def sample_morphology(types: TypeSet, subtype: np.ndarray, activity: np.ndarray, differentiation: np.ndarray,
                      orientation: np.ndarray, rng: np.random.Generator) -> Morphology:
    """Draw every cell's morphology from its subtype and state.

    Parameters
    ----------
    types
        Subtype specs (morphology scaled by the contrast).
    subtype
        (n,) subtype index of each cell.
    activity, differentiation
        (n,) the visible state of each cell.
    orientation
        (n,) preferred long-axis direction (radians), NaN where free.
    rng
        Random generator (the morphology's own stream).
    """
    n = len(subtype)
    spec = {f: np.array([getattr(s, f) for s in types.subtypes], dtype=float)[subtype]
            for f in ("area", "area_sd", "aspect", "aspect_sd", "irregularity", "h_density", "h_sd", "texture",
                      "coarse", "rim", "nucleolus", "cyto_scale", "cyto_eosin", "cyto_h", "eccentric")}
    e = rng.standard_normal((n, 8))
    area = np.exp(np.log(spec["area"]) + AREA_ACTIVITY * activity + spec["area_sd"] * e[:, 0])
    aspect = np.maximum(1.0, np.exp(np.log(spec["aspect"]) + ASPECT_DIFFERENTIATION * differentiation
                                    + spec["aspect_sd"] * e[:, 1]))
    irregular = spec["irregularity"] * np.exp(0.3 * e[:, 2])
    harm_amp = irregular[:, None] * np.abs(rng.standard_normal((n, N_HARMONICS))) * _HARMONIC_WEIGHTS
    harm_phase = rng.uniform(0, 2 * np.pi, (n, N_HARMONICS))
    # scale the unit-area ellipse so the perturbed boundary encloses exactly `area`
    phi = np.linspace(0, 2 * np.pi, 128, endpoint=False)
    a0, b0 = np.sqrt(aspect), 1 / np.sqrt(aspect)
    r = boundary_radius(np.cos(phi)[None, :], np.sin(phi)[None, :], a0[:, None], b0[:, None], harm_amp[:, None, :],
                        harm_phase[:, None, :])
    unit_area = 0.5 * (r**2).mean(axis=1) * 2 * np.pi
    scale = np.sqrt(area / unit_area)
    angle = np.where(np.isnan(orientation), rng.uniform(0, np.pi, n), orientation)
    nuc_r = np.sqrt(rng.random(n)) * 0.35
    nuc_t = rng.uniform(0, 2 * np.pi, n)
    return Morphology(
        major=a0 * scale,
        minor=b0 * scale,
        angle=angle,
        harm_amp=harm_amp,
        harm_phase=harm_phase,
        h_density=np.exp(np.log(spec["h_density"]) + H_ACTIVITY * activity + spec["h_sd"] * e[:, 3]),
        texture=spec["texture"] * np.exp(0.2 * e[:, 4]),
        coarse=spec["coarse"],
        rim=spec["rim"],
        nucleolus=spec["nucleolus"] * np.maximum(0.0, 1 + 0.6 * activity + 0.3 * e[:, 5]),
        nucleolus_offset=np.column_stack([nuc_r * np.cos(nuc_t), nuc_r * np.sin(nuc_t)]) * (b0 * scale)[:, None],
        cyto_scale=spec["cyto_scale"] * np.exp(0.06 * e[:, 6]),
        cyto_eosin=np.exp(np.log(spec["cyto_eosin"]) + EOSIN_DIFFERENTIATION * differentiation + 0.15 * e[:, 7]),
        cyto_h=spec["cyto_h"],
        eccentric=spec["eccentric"],
        eccentric_angle=rng.uniform(0, 2 * np.pi, n),
        texture_offset=rng.integers(0, TEXTURE_TILE, (n, 2)),
        area_um2=area,
    )


def exclusion_radius_um(types: TypeSet) -> np.ndarray:
    """Per subtype, the radius (um) that neighbouring nuclei keep clear: nucleus plus part of the cytoplasm."""
    area = np.array([s.area for s in types.subtypes])
    cyto = np.array([s.cyto_scale for s in types.subtypes])
    return np.sqrt(area / np.pi) * (0.45 + 0.45 * cyto)
