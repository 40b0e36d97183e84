"""What the commands share: the ``app``, logging, error reporting, the slide options and the run settings."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

from gcmoe.errors import GcmoeError

# the base of the command line's own errors (a bad option value: typer reports it with the usage): click's
# ClickException, or the copy of it that typer carries from 0.29 on
_USAGE_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


class _Group(TyperGroup):
    """The command group: a GcmoeError anywhere is reported as by :func:`fail`; any other exception as one line
    naming the file that holds its traceback (the traceback itself with ``gcmoe --debug``)."""

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except (_USAGE_ERROR, typer.Exit, typer.Abort, SystemExit, KeyboardInterrupt):
            raise
        except GcmoeError as exc:
            fail(exc)
        except Exception as exc:
            if DEBUG["on"]:
                raise
            log_path = _write_traceback(exc)
            typer.secho(f"error: unexpected {type(exc).__name__}: {exc} (a bug or an input gcmoe does not check yet; "
                        f"the traceback is in {log_path}; run with --debug for the traceback)",
                        fg=typer.colors.RED, err=True)
            raise typer.Exit(code=1) from None


DEBUG = {"on": False}


def _write_traceback(exc: BaseException) -> Path:
    """Write ``exc``'s traceback to a new file under the temporary folder; its path."""
    import tempfile
    import traceback
    from datetime import datetime, timezone

    folder = Path(tempfile.gettempdir()) / "gcmoe-logs"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    path = folder / f"gcmoe-{stamp}-{os.getpid()}.log"
    path.write_text("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)), encoding="utf-8")
    return path


app = typer.Typer(
    cls=_Group,
    add_completion=False,
    no_args_is_help=True,
    help="Predict single-cell gene expression from H&E slides (GC-MoE and baselines).",
)


@app.callback()
def _options(debug: Annotated[bool, typer.Option("--debug", help="Show the traceback of an unexpected error (otherwise written to a file).")] = False) -> None:
    """Predict single-cell gene expression from H&E slides (GC-MoE and baselines)."""
    DEBUG["on"] = debug


def setup_logging(verbose: bool) -> None:
    """Log to the terminal through rich (DEBUG with ``verbose``), third-party chatter at WARNING."""
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(show_path=False, show_time=False)],
        force=True,
    )
    for noisy in ("numba", "h5py", "matplotlib", "PIL", "fsspec", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def print_table(results: dict, out: Path) -> None:
    """The mean PCC of every method (and the ceiling) of a results mapping, as a terminal table."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for name, d in results["datasets"].items():
        table = Table(title=f"{name}: mean per-gene PCC over {d['n_genes_eval']} genes ({d['n_cells']} cells, "
                      f"{len(d['fold_names'])} folds)")
        table.add_column("Method")
        table.add_column("PCC (mean ± std)", justify="center")
        for model, entry in d["models"].items():
            table.add_row(model, f"{entry['mean']:.3f} ± {entry['std']:.3f}")
        if d.get("ceiling") is not None:
            table.add_row("[italic]ceiling[/italic]", f"{d['ceiling']:.3f} ± {d['ceiling_std']:.3f}")
        console.print(table)
    console.print(f"Results written to [bold]{out}[/bold] (results.md, results.json, per_gene.csv, config.yaml, log.txt)")


# Options shared by the commands that read slides (cv, train, convert); docs/data.md describes the formats.
FormatOpt = Annotated[Optional[str], typer.Option("--format", help="Layout of --data: auto (detect), sample (gcmoe .h5ad), hest (HEST-1k root), xenium (10x output folder), visium_hd (Space Ranger outs/ with segmented_outputs/, + --image), ghist (GHIST config JSON or data folder), spatialdata (SpatialData zarr store), h5ad (AnnData + --image).")]
SampleIdOpt = Annotated[Optional[list[str]], typer.Option("--sample-id", help="HEST: the sample id(s) to read from the root (e.g. TENX95); repeatable.")]
ImageOpt = Annotated[Optional[Path], typer.Option("--image", help="h5ad/xenium: the H&E image the cells lie on (TIFF; .svs/.ndpi with the openslide extra).")]
MppOpt = Annotated[Optional[float], typer.Option("--mpp", help="Micrometres per H&E pixel (default: from the data's metadata or the TIFF tags).")]
CellTypeKeyOpt = Annotated[Optional[str], typer.Option("--cell-type-key", help="obs column holding cell types (any names, any number).")]
CoordsOpt = Annotated[Optional[str], typer.Option("--coords", help="h5ad: unit of the cell centres: px (pixels of --image), um (micrometres, divided by the pixel size) or auto (um for a spatialdata-io table, else px).")]
XyColumnsOpt = Annotated[Optional[str], typer.Option("--xy-columns", help="h5ad: two obs columns holding the centres, x (image column) then y (image row), e.g. y_pixel,x_pixel; default obsm['spatial'].")]
AlignmentOpt = Annotated[Optional[str], typer.Option("--alignment", help="xenium: the H&E alignment (10x *_he_imagealignment.csv, Xenium Explorer *_matrix.csv, *_alignment_files.zip or keypoints CSV), or identity if the H&E is the morphology image's pixel grid; default: found in the folder.")]
KeypointUnitsOpt = Annotated[Optional[str], typer.Option("--keypoint-units", help="xenium: unit of a keypoints CSV's fixedX/fixedY: um, px (morphology pixels) or auto (from the pixel sizes each implies).")]
SegmentationOpt = Annotated[Optional[str], typer.Option("--segmentation", help="HEST: which polygons make the cells: cell or nucleus (10x's, xenium_seg/), cellvit (CellViT's nuclei on the H&E, cellvit_seg/) or none; Visium HD: cell or nucleus (the centres).")]
NoQcOpt = Annotated[bool, typer.Option("--no-qc", help="Skip the slide check (registration, pixel size: gcmoe qc) that otherwise stops the run on a failure.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Write into --out although gcmoe did not make it (a non-empty folder without gcmoe's manifest, or an existing file), replacing files of the names gcmoe writes; no other file is deleted.")]
EnsembleOpt = Annotated[Optional[int], typer.Option("--ensemble", min=1, help="Train each model N times from different seeds and average them (a seed ensemble: N times the training time; docs/gcmoe.md). Default: train.ensemble, 1.")]
StreamOpt = Annotated[bool, typer.Option("--stream", help="Train from an on-disk cell store in shuffled chunks (flat memory; ST-Net* and GC-MoE models): docs/scale.md.")]


def run_config_from(config: Path | None, data: list[Path] | None, reference: Path | None, out: Path | None,
                models: str | None = None, *, fmt: str | None = None, sample_ids: list[str] | None = None,
                image: Path | None = None, mpp: float | None = None, cell_type_key: str | None = None,
                stream: bool = False, coords: str | None = None, xy_columns: str | None = None,
                alignment: str | None = None, keypoint_units: str | None = None, segmentation: str | None = None,
                no_qc: bool = False, ensemble: int | None = None):
    """Settings from the YAML file (or the defaults), overridden by the command-line flags."""
    from gcmoe.config import RunConfig, from_dict, load_config, to_dict

    run_config = load_config(config) if config else RunConfig()
    if data:
        run_config.data.source = "samples"
        run_config.data.samples = [str(p) for p in data]
    flags = {"format": fmt, "sample_ids": sample_ids or None, "image": str(image) if image else None, "mpp": mpp,
             "cell_type_key": cell_type_key, "coords": coords,
             "xy_columns": split_names(xy_columns) if xy_columns else None, "alignment": alignment,
             "keypoint_units": keypoint_units, "segmentation": segmentation}
    flags = {k: v for k, v in flags.items() if v is not None}
    if flags:  # through from_dict so a flag is checked like the same key in a YAML file
        run_config.data = from_dict(type(run_config.data), {**to_dict(run_config.data), **flags}, "command line")
    if reference:
        run_config.data.reference = str(reference)
    if models:
        run_config.models = [m.strip() for m in models.split(",") if m.strip()]
    if out:
        run_config.out = str(out)
    if stream:
        run_config.train.stream = True
    if no_qc:
        run_config.data.qc = False
    if ensemble is not None:
        run_config.train.ensemble = ensemble
    return run_config


def fail(exc: GcmoeError) -> None:
    """Report a user error in red and exit with status 2."""
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def split_names(text: str | None) -> list[str] | None:
    """A comma-separated list as names (None when empty)."""
    return [t.strip() for t in text.split(",") if t.strip()] if text else None
