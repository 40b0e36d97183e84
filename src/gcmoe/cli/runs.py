"""Commands that run the method: ``demo``, ``cv``, ``train`` and ``predict``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from gcmoe.cli._app import (
    AlignmentOpt,
    CellTypeKeyOpt,
    CoordsOpt,
    EnsembleOpt,
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
from gcmoe.errors import GcmoeError, InvalidSampleError


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
    from gcmoe.pipeline.demo import QUICK_REPORT_CELLS
    from gcmoe.report import write_report

    typer.echo(f"report: {write_report(out, max_cells=QUICK_REPORT_CELLS) if quick else write_report(out)}")


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
    ensemble: EnsembleOpt = None,
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
                                     segmentation=segmentation, no_qc=no_qc, ensemble=ensemble)
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
    ensemble: EnsembleOpt = None,
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
                                     no_qc=no_qc, ensemble=ensemble)
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
    out: Annotated[Path, typer.Option(help="Output .h5ad (--slide), or output folder (--slides).")],
    slide: Annotated[Optional[Path], typer.Option(help="One H&E image: TIFF/BigTIFF/OME-TIFF (pyramidal or not), .svs/.ndpi (openslide extra), PNG or JPEG.")] = None,
    slides: Annotated[Optional[str], typer.Option(help="A cohort: a folder of slides, a quoted glob pattern ('archive/*.svs') or a manifest .csv (columns slide, slide_id, cells, coords, mpp; docs/predict.md).")] = None,
    cells: Annotated[Optional[Path], typer.Option(help="Cell centres: CSV/parquet (x, y px), GeoJSON, HoVer-Net JSON or a label mask (--slide).")] = None,
    detect: Annotated[bool, typer.Option("--detect", help="Find nuclei in the image instead of reading a cell file (--slide; a cohort detects them on the tissue of every slide without a cell file).")] = False,
    mpp: Annotated[Optional[float], typer.Option(help="Micrometres per pixel (default: from the TIFF/OME tags; required for PNG/JPEG).")] = None,
    coords: Annotated[str, typer.Option("--coords", help="Unit of the --cells centres: px (pixels of the slide) or um (micrometres, divided by the pixel size).")] = "px",
    shard: Annotated[Optional[str], typer.Option(help="i/n: predict only the slides i, i+n, i+2n... of the sorted list (0 <= i < n), e.g. $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT.")] = None,
    geojson: Annotated[bool, typer.Option("--geojson/--no-geojson", help="Write each slide's cells as QuPath GeoJSON (--slides).")] = True,
    encoder_weights: Annotated[Optional[Path], typer.Option(help="Where the encoder weights the model was trained with are now (their SHA-256 must match the model card's).")] = None,
    cache_dir: Annotated[Optional[Path], typer.Option(help="Feature cache folder (--slide).")] = None,
    device: Annotated[str, typer.Option()] = FeatureConfig.device,
    overwrite: OverwriteOpt = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Predict the expression of every cell of a new slide, or of a cohort of whole slides, with a trained model."""
    setup_logging(verbose)
    try:
        if (slide is None) == (slides is None):
            raise InvalidSampleError("give one slide (--slide FILE) or a cohort (--slides DIR|'GLOB'|manifest.csv)")
        if slides is None:
            if shard is not None:
                raise InvalidSampleError("--shard shares the slides of a cohort: use it with --slides")
            from gcmoe.files import check_output_file
            from gcmoe.inference import predict_slide

            check_output_file(out, overwrite, "predictions.h5ad")
            adata = predict_slide(model, slide, out, cells=cells, detect=detect, mpp=mpp, cache_dir=cache_dir,
                                  device=device, coords=coords)
            typer.echo(f"wrote {out}: {adata.n_obs} cells x {adata.n_vars} genes")
            return
        if cells is not None or mpp is not None or cache_dir is not None:
            raise InvalidSampleError(
                "--cells, --mpp and --cache-dir are per slide: for a cohort, give cell files and pixel sizes in a "
                "manifest CSV (columns slide, cells, coords, mpp; docs/predict.md)")
        from gcmoe.cohort import list_slides, predict_cohort
        from gcmoe.training.distributed import init_from_env, is_main_process

        jobs = list_slides(slides)
        device = init_from_env(device, timeout_s=COHORT_BARRIER_S)  # under torchrun: join the group
        result = predict_cohort(model, jobs, out, shard=parse_shard(shard), geojson=geojson, device=device,
                                encoder_weights=encoder_weights, distributed=True)
    except GcmoeError as exc:
        fail(exc)
    if is_main_process():
        typer.echo(f"{len(result.done)} slides predicted, {len(result.skipped)} already finished, "
                   f"{len(result.failed)} failed; {len(result.others)} left to other shards or processes")
        if result.table is not None:
            typer.echo(f"cohort table: {result.table} (and .csv); page: {result.html}")
    for slide_id, message in result.failed.items():
        typer.echo(f"failed: {slide_id}: {message}", err=True)
    if result.failed:
        raise typer.Exit(1)


COHORT_BARRIER_S = 7 * 24 * 3600.0  # ranks wait for each other at the end of a cohort: up to a week


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"i/n"`` -> (i, n); None -> (0, 1)."""
    if text is None:
        return 0, 1
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise InvalidSampleError(f"--shard {text!r}: give i/n, e.g. 0/4 for the first of four shards") from None
    if not (n >= 1 and 0 <= i < n):
        raise InvalidSampleError(f"--shard {text}: give i/n with 0 <= i < n (e.g. 0/4 ... 3/4)")
    return i, n
