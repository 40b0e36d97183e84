"""Commands that run the method: ``demo``, ``cv``, ``train`` and ``predict``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from gcmoe.cli._app import (
    AlignmentOpt,
    CellTypeKeyOpt,
    CoordsOpt,
    FormatOpt,
    ImageOpt,
    KeypointUnitsOpt,
    MppOpt,
    NoQcOpt,
    OverwriteOpt,
    SampleIdOpt,
    SegmentationOpt,
    StreamOpt,
    app,
    fail,
    print_table,
    run_config_from,
    XyColumnsOpt,
    setup_logging,
)
from gcmoe.config import FeatureConfig
from gcmoe.errors import GcmoeError


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("gcmoe_demo"),
    quick: Annotated[bool, typer.Option("--quick", help="A tiny tissue and short training (well under a minute).")] = False,
    overwrite: OverwriteOpt = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """The whole pipeline on the embedded virtual tissue: simulate, extract features, cross-validate, report."""
    setup_logging(verbose)
    from gcmoe.files import output_folder
    from gcmoe.pipeline import demo_config, run_cv

    try:
        with output_folder(out, "demo", overwrite):
            results = run_cv(demo_config(out, quick=quick))
    except GcmoeError as exc:
        fail(exc)
    print_table(results, out)
    from gcmoe.report import write_report

    typer.echo(f"report: {write_report(out)}")


@app.command()
def cv(
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML settings file (see docs/configuration.md).")] = None,
    data: Annotated[Optional[list[Path]], typer.Option("--data", help="A slide: Sample .h5ad, AnnData .h5ad (+ --image), Xenium output folder or HEST-1k root (docs/data.md); repeat for several slides.")] = None,
    models: Annotated[Optional[str], typer.Option(help="Comma-separated model names (gcmoe list models), or all.")] = None,
    reference: Annotated[Optional[Path], typer.Option(help="Labelled reference scRNA-seq .h5ad (GC-MoE's priors).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Output folder (overrides the file's).")] = None,
    fmt: FormatOpt = None,
    sample_id: SampleIdOpt = None,
    image: ImageOpt = None,
    mpp: MppOpt = None,
    cell_type_key: CellTypeKeyOpt = None,
    coords: CoordsOpt = None,
    xy_columns: XyColumnsOpt = None,
    alignment: AlignmentOpt = None,
    keypoint_units: KeypointUnitsOpt = None,
    segmentation: SegmentationOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Reuse the finished (model, fold) pairs and training checkpoints in OUT.")] = False,
    stream: StreamOpt = False,
    no_qc: NoQcOpt = False,
    overwrite: OverwriteOpt = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Cross-validated comparison of models on a virtual tissue or on Samples; writes results.md/json."""
    setup_logging(verbose)
    from gcmoe.files import output_folder
    from gcmoe.pipeline import run_cv

    try:
        run_config = run_config_from(config, data, reference, out, models, fmt=fmt, sample_ids=sample_id, image=image,
                                     mpp=mpp, cell_type_key=cell_type_key, stream=stream, coords=coords,
                                     xy_columns=xy_columns, alignment=alignment, keypoint_units=keypoint_units,
                                     segmentation=segmentation, no_qc=no_qc)
        with output_folder(run_config.out, "cv", overwrite):
            results = run_cv(run_config, resume=resume)
    except GcmoeError as exc:
        fail(exc)
    print_table(results, Path(run_config.out))


@app.command()
def train(
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML settings file.")] = None,
    model: Annotated[str, typer.Option(help="Model name (gcmoe list models).")] = "gcmoe",
    data: Annotated[Optional[list[Path]], typer.Option("--data", help="A slide (any format of docs/data.md); repeat for several slides.")] = None,
    fmt: FormatOpt = None,
    sample_id: SampleIdOpt = None,
    image: ImageOpt = None,
    mpp: MppOpt = None,
    cell_type_key: CellTypeKeyOpt = None,
    coords: CoordsOpt = None,
    xy_columns: XyColumnsOpt = None,
    alignment: AlignmentOpt = None,
    keypoint_units: KeypointUnitsOpt = None,
    segmentation: SegmentationOpt = None,
    reference: Annotated[Optional[Path], typer.Option(help="Labelled reference scRNA-seq .h5ad (GC-MoE's priors).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Output folder; the model goes to OUT/model.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint in OUT/checkpoints.")] = False,
    stream: StreamOpt = False,
    no_qc: NoQcOpt = False,
    overwrite: OverwriteOpt = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Train one model on all cells (early stopping on spatial validation blocks) and save its model folder."""
    setup_logging(verbose)
    from contextlib import nullcontext

    from gcmoe.files import output_folder
    from gcmoe.pipeline import train_model
    from gcmoe.training.distributed import init_from_env, is_main_process

    try:
        run_config = run_config_from(config, data, reference, out, fmt=fmt, sample_ids=sample_id, image=image, mpp=mpp,
                                     cell_type_key=cell_type_key, stream=stream, coords=coords, xy_columns=xy_columns,
                                     alignment=alignment, keypoint_units=keypoint_units, segmentation=segmentation,
                                     no_qc=no_qc)
        run_config.train.device = init_from_env(run_config.train.device)  # under torchrun: join the group
        with output_folder(run_config.out, "train", overwrite) if is_main_process() else nullcontext():
            folder = train_model(run_config, model, resume=resume)
    except GcmoeError as exc:
        fail(exc)
    if is_main_process():
        typer.echo(f"model saved to {folder} (model.safetensors, model.json, README.md)")


@app.command("predict")
def predict_cmd(
    model: Annotated[Path, typer.Option(help="A model folder written by `gcmoe train`.")],
    slide: Annotated[Path, typer.Option(help="The H&E image: TIFF/BigTIFF/OME-TIFF (pyramidal or not), PNG or JPEG.")],
    out: Annotated[Path, typer.Option(help="Output .h5ad.")],
    cells: Annotated[Optional[Path], typer.Option(help="Cell centres: CSV/parquet (x, y px), GeoJSON, HoVer-Net JSON or a label mask.")] = None,
    detect: Annotated[bool, typer.Option("--detect", help="Find nuclei in the image instead of reading a cell file.")] = False,
    mpp: Annotated[Optional[float], typer.Option(help="Micrometres per pixel (default: from the TIFF/OME tags; required for PNG/JPEG).")] = None,
    coords: Annotated[str, typer.Option("--coords", help="Unit of the --cells centres: px (pixels of the slide) or um (micrometres, divided by the pixel size).")] = "px",
    cache_dir: Annotated[Optional[Path], typer.Option(help="Feature cache folder.")] = None,
    device: Annotated[str, typer.Option()] = FeatureConfig.device,
    overwrite: OverwriteOpt = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Predict the expression of every cell of a new slide with a trained model."""
    setup_logging(verbose)
    from gcmoe.files import check_output_file
    from gcmoe.inference import predict_slide

    try:
        check_output_file(out, overwrite, "predictions.h5ad")
        adata = predict_slide(model, slide, out, cells=cells, detect=detect, mpp=mpp, cache_dir=cache_dir, device=device,
                              coords=coords)
    except GcmoeError as exc:
        fail(exc)
    typer.echo(f"wrote {out}: {adata.n_obs} cells x {adata.n_vars} genes")
