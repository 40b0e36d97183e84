"""Cell types of the virtual tissue: the finer subtypes, how they look, and how they map to routing types.

Nine biological subtypes (a breast carcinoma's usual cast) carry the morphology and the expression programs.
The K routing types the models see are groups of them: K = 4 gives the paper's neoplastic / inflammatory /
connective / epithelial; K = 1..9 merge or split along the biological hierarchy; K > 9 adds variant subtypes
(e.g. a second malignant clone), each becoming a routing type of its own.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from gcmoe.config import PAPER_CELL_TYPES
from gcmoe.errors import ConfigError

# Families drive the neighbourhood effects and the shared ("family") marker genes; they do not depend on K.
TUMOUR, EPITHELIAL, LYMPHOID, MYELOID, STROMAL = "tumour", "epithelial", "lymphoid", "myeloid", "stromal"
IMMUNE_FAMILIES = (LYMPHOID, MYELOID)


@dataclass(frozen=True)
class SubtypeSpec:
    """One finer cell type: its morphology (type means; the state and noise vary around them) and depth.

    Sizes are micrometres, stain densities natural-log optical densities (Beer-Lambert).
    """

    name: str
    family: str
    area: float  # median nucleus area, um^2
    area_sd: float  # sd of log nucleus area within the type, beyond the state
    aspect: float  # median major/minor axis ratio of the nucleus
    aspect_sd: float  # sd of log aspect
    irregularity: float  # amplitude of the boundary's harmonics 2-5 (0 = smooth ellipse)
    h_density: float  # haematoxylin optical density of the nucleus
    h_sd: float  # sd of log haematoxylin density
    texture: float  # chromatin texture amplitude, relative to h_density
    coarse: float  # share of coarse (clumped) chromatin in the texture, 0-1
    rim: float  # chromatin margination (dark rim, pale centre: vesicular nuclei), 0-1
    nucleolus: float  # prominence of the nucleolus, optical density
    cyto_scale: float  # cytoplasm radius / nucleus radius
    cyto_eosin: float  # eosin optical density of the cytoplasm
    cyto_h: float  # haematoxylin tint of the cytoplasm (amphophilic plasma cells)
    eccentric: float  # nucleus offset from the cytoplasm centre, fraction of the cytoplasm radius
    library: float  # median expected total counts of the cell's own transcripts (Xenium-like panel)


BASE_SUBTYPES: tuple[SubtypeSpec, ...] = (
    SubtypeSpec("malignant", TUMOUR, 72.0, 0.30, 1.30, 0.14, 0.11, 1.20, 0.14, 0.32, 0.55, 0.35, 0.80,
                1.50, 0.42, 0.08, 0.00, 144.0),
    SubtypeSpec("luminal", EPITHELIAL, 38.0, 0.22, 1.40, 0.14, 0.04, 1.25, 0.12, 0.18, 0.30, 0.15, 0.15,
                1.60, 0.38, 0.05, 0.00, 113.0),
    SubtypeSpec("myoepithelial", EPITHELIAL, 26.0, 0.22, 2.30, 0.20, 0.04, 1.60, 0.12, 0.14, 0.30, 0.05, 0.00,
                1.35, 0.30, 0.03, 0.00, 87.0),
    SubtypeSpec("T_cell", LYMPHOID, 21.0, 0.16, 1.10, 0.07, 0.04, 2.05, 0.12, 0.16, 0.50, 0.05, 0.00,
                1.22, 0.16, 0.04, 0.00, 34.0),
    SubtypeSpec("B_cell", LYMPHOID, 23.5, 0.16, 1.10, 0.07, 0.03, 1.95, 0.12, 0.18, 0.60, 0.05, 0.00,
                1.22, 0.16, 0.05, 0.00, 41.0),
    SubtypeSpec("plasma_cell", LYMPHOID, 26.0, 0.16, 1.15, 0.08, 0.03, 1.85, 0.12, 0.32, 0.90, 0.30, 0.00,
                1.80, 0.32, 0.22, 0.35, 70.0),
    SubtypeSpec("macrophage", MYELOID, 38.0, 0.25, 1.45, 0.20, 0.12, 1.10, 0.12, 0.16, 0.20, 0.10, 0.05,
                2.00, 0.30, 0.05, 0.20, 70.0),
    SubtypeSpec("fibroblast", STROMAL, 30.0, 0.25, 3.20, 0.28, 0.05, 1.55, 0.12, 0.12, 0.30, 0.05, 0.00,
                1.30, 0.22, 0.02, 0.00, 70.0),
    SubtypeSpec("endothelial", STROMAL, 24.0, 0.20, 2.60, 0.25, 0.04, 1.45, 0.10, 0.10, 0.30, 0.05, 0.00,
                1.25, 0.22, 0.02, 0.00, 56.0),
)
BASE_NAMES: tuple[str, ...] = tuple(s.name for s in BASE_SUBTYPES)

# How the nine subtypes group into K routing types, K = 1..9 (each K refines the coarser one).
_PARTITIONS: dict[int, list[list[str]]] = {
    1: [list(BASE_NAMES)],
    2: [["malignant", "luminal", "myoepithelial"],
        ["T_cell", "B_cell", "plasma_cell", "macrophage", "fibroblast", "endothelial"]],
    3: [["malignant", "luminal", "myoepithelial"], ["T_cell", "B_cell", "plasma_cell", "macrophage"],
        ["fibroblast", "endothelial"]],
    4: [["malignant"], ["T_cell", "B_cell", "plasma_cell", "macrophage"], ["fibroblast", "endothelial"],
        ["luminal", "myoepithelial"]],
    5: [["malignant"], ["T_cell", "B_cell", "plasma_cell"], ["macrophage"], ["fibroblast", "endothelial"],
        ["luminal", "myoepithelial"]],
    6: [["malignant"], ["T_cell", "B_cell", "plasma_cell"], ["macrophage"], ["fibroblast"], ["endothelial"],
        ["luminal", "myoepithelial"]],
    7: [["malignant"], ["T_cell", "B_cell", "plasma_cell"], ["macrophage"], ["fibroblast"], ["endothelial"],
        ["luminal"], ["myoepithelial"]],
    8: [["malignant"], ["T_cell"], ["B_cell", "plasma_cell"], ["macrophage"], ["fibroblast"], ["endothelial"],
        ["luminal"], ["myoepithelial"]],
    9: [[n] for n in ("malignant", "T_cell", "B_cell", "plasma_cell", "macrophage", "fibroblast", "endothelial",
                      "luminal", "myoepithelial")],
}
# Base subtypes cloned, in this order, into variant subtypes when K > 9.
_VARIANT_ORDER = ("malignant", "fibroblast", "T_cell", "macrophage", "luminal", "B_cell", "endothelial",
                  "myoepithelial", "plasma_cell")

# Morphology fields scaled in log space / linearly by `morphology_contrast`.
_LOG_FIELDS = ("area", "aspect", "h_density", "cyto_scale", "cyto_eosin")
_LINEAR_FIELDS = ("irregularity", "texture", "coarse", "rim", "nucleolus", "cyto_h", "eccentric")


@dataclass(frozen=True)
class TypeSet:
    """The subtypes of one tissue and their routing types.

    Attributes
    ----------
    subtypes
        Subtype specs, morphology already scaled by the contrast.
    base_index
        For each subtype, the index of the base subtype it derives from (itself for the nine base ones);
        placement in the tissue follows the base subtype.
    routing_names
        The K routing type names.
    routing_of
        For each subtype, the index of its routing type.
    """

    subtypes: tuple[SubtypeSpec, ...]
    base_index: np.ndarray
    routing_names: tuple[str, ...]
    routing_of: np.ndarray

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.subtypes]

    @property
    def mapping(self) -> dict[str, str]:
        """{subtype name: routing type name}."""
        return {s.name: self.routing_names[k] for s, k in zip(self.subtypes, self.routing_of)}

    def index(self, name: str) -> int:
        return self.names.index(name)

    def family_mask(self, families: tuple[str, ...] | str) -> np.ndarray:
        """Boolean (n_subtypes,): subtypes whose family is among ``families``."""
        families = (families,) if isinstance(families, str) else families
        return np.array([s.family in families for s in self.subtypes])


def _scale_contrast(specs: list[SubtypeSpec], contrast: float) -> list[SubtypeSpec]:
    """Move every subtype's morphology towards (contrast < 1) or away from (> 1) the mean over subtypes."""
    out = []
    means = {f: np.mean([np.log(getattr(s, f)) for s in specs]) for f in _LOG_FIELDS}
    means |= {f: np.mean([getattr(s, f) for s in specs]) for f in _LINEAR_FIELDS}
    for s in specs:
        changes = {}
        for f in _LOG_FIELDS:
            changes[f] = float(np.exp(means[f] + contrast * (np.log(getattr(s, f)) - means[f])))
        for f in _LINEAR_FIELDS:
            changes[f] = float(max(0.0, means[f] + contrast * (getattr(s, f) - means[f])))
        changes["aspect"] = max(1.0, changes["aspect"])
        changes["coarse"] = min(1.0, changes["coarse"])
        changes["rim"] = min(1.0, changes["rim"])
        changes["eccentric"] = min(0.6, changes["eccentric"])
        changes["cyto_scale"] = max(1.05, changes["cyto_scale"])
        out.append(dataclasses.replace(s, **changes))
    return out


def _variant(base: SubtypeSpec, name: str, rng: np.random.Generator) -> SubtypeSpec:
    """A sibling subtype: same family and placement, shifted morphology and depth."""
    jitter = lambda sd: float(np.exp(rng.normal(0.0, sd)))  # noqa: E731
    return dataclasses.replace(
        base,
        name=name,
        area=base.area * jitter(0.2),
        aspect=max(1.0, base.aspect * jitter(0.15)),
        h_density=base.h_density * jitter(0.12),
        texture=base.texture * jitter(0.3),
        coarse=float(np.clip(base.coarse + rng.normal(0, 0.2), 0, 1)),
        cyto_eosin=base.cyto_eosin * jitter(0.2),
        library=base.library * jitter(0.25),
    )


def resolve_types(n_cell_types: int, morphology_contrast: float = 1.0, program_seed: int = 0) -> TypeSet:
    """The subtypes and routing types for K = ``n_cell_types``.

    K = 4 uses the paper's names (``PAPER_CELL_TYPES``); any other K names them ``type_0 .. type_{K-1}``.
    """
    if n_cell_types < 1:
        raise ConfigError(f"tissue.n_cell_types must be >= 1, got {n_cell_types}")
    specs = list(BASE_SUBTYPES)
    base_index = list(range(len(specs)))
    if n_cell_types <= len(BASE_SUBTYPES):
        groups = [list(g) for g in _PARTITIONS[n_cell_types]]
    else:
        rng = np.random.default_rng(np.random.SeedSequence([program_seed, 1009]))
        groups = [list(g) for g in _PARTITIONS[len(BASE_SUBTYPES)]]
        for j in range(n_cell_types - len(BASE_SUBTYPES)):
            base_name = _VARIANT_ORDER[j % len(_VARIANT_ORDER)]
            name = f"{base_name}_{j // len(_VARIANT_ORDER) + 2}"
            b = BASE_NAMES.index(base_name)
            specs.append(_variant(BASE_SUBTYPES[b], name, rng))
            base_index.append(b)
            groups.append([name])
    routing_names = PAPER_CELL_TYPES if n_cell_types == 4 else tuple(f"type_{k}" for k in range(n_cell_types))
    names = [s.name for s in specs]
    routing_of = np.empty(len(specs), dtype=np.int64)
    for k, group in enumerate(groups):
        for name in group:
            routing_of[names.index(name)] = k
    specs = _scale_contrast(specs, morphology_contrast)
    return TypeSet(tuple(specs), np.asarray(base_index), tuple(routing_names), routing_of)
