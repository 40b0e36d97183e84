"""What a model needs from a run beyond each cell's image features: one typed description, read everywhere.

Each model class declares its :class:`ModelInputs` (a class attribute, or per instance when settings change
it, as GC-MoE's ablations do) and the registry carries it with the name, so the run knows what to build
before it builds the model: training, streaming, prediction and the result tables all read these fields.
A built model also says the geometry of its wider inputs (:meth:`gcmoe.models.base.CellModel.input_geometry`),
since window and tile sizes are settings of the model.

Kept free of torch, like the registry's names, so tables and the command line can read it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

__all__ = ["ContextSpec", "InputGeometry", "ModelInputs", "PixelSpec", "WindowSpec"]


@dataclass(frozen=True)
class ModelInputs:
    """The inputs a model needs beyond the cached features of its cells.

    Attributes
    ----------
    neighbours
        C2CA neighbours: the cells within the run's ``neighbours.window_um`` square (features and offsets).
    cell_types
        Routing labels in training and their number K (``n_types``).
    coexpression
        Co-expression graphs of the target genes from the reference (``adjacency``).
    windows
        Overlapping windows tiling each slide (:class:`WindowSpec`), each cell predicted in its own window.
    context
        A grid of wide context squares around each cell (:class:`ContextSpec`).
    targets
        The measured targets of the training batch as an input (contrastive or multi-view losses).
    pixels
        Raw H&E tiles owning the batch's cells (:class:`PixelSpec`) instead of the cached encoder features.
    """

    neighbours: bool = False
    cell_types: bool = False
    coexpression: bool = False
    windows: bool = False
    context: bool = False
    targets: bool = False
    pixels: bool = False

    @property
    def positions(self) -> bool:
        """Cell positions go with any spatial input (neighbours, windows, context)."""
        return self.neighbours or self.windows or self.context

    @property
    def in_memory_only(self) -> list[str]:
        """The inputs that need all cells in memory (a cell store's buffers cannot give them)."""
        return [name for name in ("windows", "context", "targets", "pixels") if getattr(self, name)]

    @property
    def streamable(self) -> bool:
        """Whether the model can train from a cell store (``train.stream``)."""
        return not self.in_memory_only

    def names(self) -> list[str]:
        """The names of the inputs asked for, in field order."""
        return [f.name for f in fields(self) if getattr(self, f.name)]

    def __or__(self, other: ModelInputs) -> ModelInputs:
        """Everything either asks for (what a run of several models builds)."""
        return ModelInputs(**{f.name: getattr(self, f.name) or getattr(other, f.name) for f in fields(self)})


@dataclass(frozen=True)
class WindowSpec:
    """Overlapping windows of side ``window_um`` micrometres, at most ``max_cells`` cells each."""

    window_um: float
    max_cells: int


@dataclass(frozen=True)
class ContextSpec:
    """A ``size`` x ``size`` grid of squares of side ``context_um`` micrometres centred on each cell."""

    context_um: float
    size: int


@dataclass(frozen=True)
class PixelSpec:
    """Raw pixel tiles of ``tile_size`` working pixels at ``mpp`` um/px, overlapping by ``2 * margin``; the
    nuclei target has radius ``nucleus_radius_um`` (keyword arguments of
    :func:`gcmoe.features.pixel_tiles.build_pixel_tiles`)."""

    mpp: float
    tile_size: int
    margin: int
    nucleus_radius_um: float


@dataclass(frozen=True)
class InputGeometry:
    """The sizes of a built model's wider inputs; None where the model takes no such input."""

    windows: WindowSpec | None = None
    context: ContextSpec | None = None
    pixels: PixelSpec | None = None
