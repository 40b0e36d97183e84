"""Typed settings, one dataclass per concern, loaded from YAML.

Precedence: the defaults written here < a YAML file (``gcmoe cv --config FILE``) < command-line flags.
Every run writes the resolved settings beside its results (``config.yaml``). docs/configuration.md lists
every field; an unknown key in a file is an error that names the valid ones.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gcmoe.errors import ConfigError

PAPER_CELL_TYPES = ("neoplastic", "inflammatory", "connective", "epithelial")


@dataclass
class TissueConfig:
    """The virtual tissue (docs/virtual_tissue.md). Deterministic given these values."""

    seed: int = 0
    n_cells: int = 10_000  # cells placed in the tissue
    height: int = 2_400  # image height, pixels
    width: int = 2_400  # image width, pixels
    mpp: float = 0.5  # micrometres per pixel
    n_cell_types: int = 4  # routing types; 4 uses the paper's names
    n_genes: int = 150  # genes in the panel (>= 50 so the top-50 HVG exist)
    noise: float = 1.0  # scales biological over-dispersion (1 = calibrated to real Xenium breast)
    dropout: float = 1.0  # scales technical dropout (1 = calibrated; 0 = none)
    morphology_contrast: float = 1.0  # scales how far cell types differ in the image (difficulty)
    n_reference_cells: int = 5_000  # cells in the matching reference scRNA-seq set
    sample_id: str = "virtual_tissue"
    program_seed: int = 0  # seeds the gene programs only: tissues with different `seed` share their biology
    neighbourhood_effect: float = 1.0  # scales the genes induced by a cell's neighbours (0 = none)
    spill: float = 1.0  # scales the neighbours' transcripts captured by a cell's segment (0 = none)
    stain: Literal["standard", "alternate"] = "standard"  # H&E stain/scanner preset of the renderer


@dataclass
class FeatureConfig:
    """Image features at cell centres (docs/features.md)."""

    encoder: str = "morphology"  # a name from `gcmoe.features.list_encoders()`
    weights: str | None = None  # local weights file for foundation-model encoders; never downloaded
    tile_size: int | None = None  # encoder input tile, pixels at the encoder's mpp; None = the encoder's default
    batch_size: int = 4  # tiles per encoder pass
    device: str = "cpu"
    cache_dir: str | None = None  # None: <out>/cache
    stain_norm: Literal["none", "reinhard"] = "none"  # reinhard: each slide's Lab tissue colours moved to a fixed target before encoding


@dataclass
class TargetConfig:
    """What the models predict and which genes are evaluated."""

    transform: Literal["log1p", "none"] = "log1p"
    normalize_total: float | None = None  # library-size normalisation to this total before log1p; None = off
    n_top_genes: int = 50  # evaluated genes: top highly variable genes of the training cells (scanpy)
    hvg_flavor: Literal["seurat", "cell_ranger"] = "seurat"
    genes: list[str] | None = None  # an explicit gene list instead of HVG selection


@dataclass
class TrainConfig:
    """The shared trainer (same for every model)."""

    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 1024  # cells per mini-batch
    max_epochs: int = 1000
    patience: int = 50  # epochs without validation improvement before stopping
    min_delta: float = 1e-4  # improvement in validation PCC that counts
    val_fraction: float = 0.1  # of the training cells, in spatial blocks, for early stopping
    mse_weight: float = 0.0  # weight of an MSE term added to 1 - PCC
    seed: int = 0
    ensemble: int = 1  # models trained from different seeds and averaged (a seed ensemble; docs/gcmoe.md)
    device: str = "cpu"
    num_threads: int | None = None  # torch CPU threads; None = torch's default
    checkpoint_every: int = 10  # epochs between resumable checkpoints (gcmoe train); 0 = only at the end
    amp: bool = False  # automatic mixed precision: float16 + loss scaling on CUDA, bfloat16 on the CPU
    stream: bool = False  # train from an on-disk cell store in shuffled chunks, never all features in memory
    buffer_chunks: int = 4  # with stream: chunks of 16,384 cells per shuffled buffer (memory ~ this x chunk x D)


@dataclass
class CVConfig:
    """Cross-validation: vertical strips within one slide, or leave one slide out."""

    scheme: Literal["auto", "strips", "leave_one_slide_out"] = "auto"  # auto: strips for one slide, else LOSO
    n_folds: int = 5


@dataclass
class DataConfig:
    """Where the cells come from: a virtual tissue, or slides read by gcmoe.data.readers (docs/data.md)."""

    source: Literal["virtual", "samples"] = "virtual"
    tissue: TissueConfig = field(default_factory=TissueConfig)
    samples: list[str] = field(default_factory=list)  # paths when source = "samples": .h5ad, Xenium folder, HEST root
    format: Literal["auto", "sample", "hest", "xenium", "visium_hd", "ghist", "spatialdata", "h5ad"] = "auto"  # reader of `samples`; auto: by layout
    sample_ids: list[str] | None = None  # HEST: the sample ids to read from the root (None: its only sample)
    image: str | None = None  # h5ad/xenium: the H&E image the cells lie on
    mpp: float | None = None  # micrometres per H&E pixel; None: from the file (uns, metadata, alignment, TIFF tags)
    cell_type_key: str | None = None  # obs column with cell types, copied to obs["cell_type"]
    coords: Literal["auto", "px", "um"] = "auto"  # h5ad/spatialdata: unit of the centres; auto: um for spatialdata-io tables
    xy_columns: list[str] | None = None  # h5ad: obs columns [x, y] (image column, row) instead of obsm["spatial"]
    alignment: str | None = None  # xenium: H&E alignment file, or "identity"; None: found in the folder, else an error
    keypoint_units: Literal["auto", "um", "px"] = "auto"  # xenium: unit of a keypoints CSV's fixedX/fixedY
    min_qv: float = 20.0  # HEST: transcripts below this Phred quality are dropped
    segmentation: Literal["cell", "nucleus", "cellvit", "none"] = "cell"  # HEST/Visium HD: which polygons make the cells
    reference: str | None = None  # labelled reference scRNA-seq .h5ad (CAP priors, label transfer); virtual: generated
    routing_labels: Literal["auto", "obs", "transfer"] = "auto"  # auto: obs["cell_type"] when every sample has it
    name: str | None = None  # dataset name in the tables; None = derived from the source
    qc: bool = True  # samples: check each slide's registration and pixel size first (gcmoe qc) and stop on a failure


@dataclass
class NeighbourConfig:
    """C2CA's neighbourhood: the cells in a square window around each cell."""

    window_um: float = 64.0  # side S of the square window, micrometres
    max_neighbours: int = 32  # M, nearest first


@dataclass
class PriorConfig:
    """CAP's co-expression graphs from the reference (docs/gcmoe.md)."""

    tau: float = 0.2  # edge where the Pearson correlation exceeds tau
    type_key: str = "cell_type"  # the reference's cell-type column
    mapping: dict[str, str] | None = None  # reference type -> routing type; None: the reference's own, or identity


@dataclass
class RunConfig:
    """Everything one `gcmoe cv` / `gcmoe demo` run needs."""

    data: DataConfig = field(default_factory=DataConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    targets: TargetConfig = field(default_factory=TargetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cv: CVConfig = field(default_factory=CVConfig)
    neighbours: NeighbourConfig = field(default_factory=NeighbourConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    models: list[str] = field(default_factory=lambda: ["stnet"])  # names from `gcmoe.models.list_models()`
    model_params: dict[str, dict[str, Any]] = field(default_factory=dict)  # per model name, passed to its factory
    out: str = "gcmoe_out"


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check/convert one YAML value against a field annotation (dataclasses, lists, unions, literals)."""
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(annotation, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not one of {list(allowed)}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(annotation) or (Any,)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is Any:
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type, values: dict[str, Any], where: str = "config") -> Any:
    """Build settings dataclass ``cls`` from a nested mapping; unknown keys raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {unknown}; valid ones are {names}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in values.items()}
    return cls(**kwargs)


def load_config(path: str | os.PathLike) -> RunConfig:
    """Read a RunConfig from a YAML file; missing keys keep their defaults."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (data, features, ...)")
    return from_dict(RunConfig, values, where=str(path))


def to_dict(config: Any) -> dict[str, Any]:
    """A settings dataclass as plain nested dicts (for YAML/JSON)."""
    return dataclasses.asdict(config)


def save_config(config: Any, path: str | os.PathLike) -> Path:
    """Write the resolved settings as YAML, atomically."""
    import yaml

    from gcmoe.files import write_text

    return write_text(path, yaml.safe_dump(to_dict(config), sort_keys=False))
