"""Commands that prepare data: ``simulate``, ``convert``, ``qc``, ``extract`` and ``prior``.

Defaults come from the settings dataclasses (gcmoe.config), so a command and a YAML file agree.
"""

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
    OverwriteOpt,
    SampleIdOpt,
    SegmentationOpt,
    XyColumnsOpt,
    app,
    fail,
    run_config_from,
    setup_logging,
    split_names,
)
from gcmoe.config import DataConfig, FeatureConfig, PriorConfig, TissueConfig
from gcmoe.errors import GcmoeError

@app.command()
def simulate(
    out: Annotated[Path, typer.Option(help="Output folder for <sample_id>.h5ad + .tif and reference.h5ad.")] = Path("virtual_tissue"),
    seed: Annotated[int, typer.Option()] = TissueConfig.seed,
    n_cells: Annotated[int, typer.Option()] = TissueConfig.n_cells,
    height: Annotated[int, typer.Option(help="Image height, pixels.")] = TissueConfig.height,
    width: Annotated[int, typer.Option(help="Image width, pixels.")] = TissueConfig.width,
    mpp: Annotated[float, typer.Option(help="Micrometres per pixel.")] = TissueConfig.mpp,
    n_cell_types: Annotated[int, typer.Option()] = TissueConfig.n_cell_types,
    n_genes: Annotated[int, typer.Option()] = TissueConfig.n_genes,
    noise: Annotated[float, typer.Option(help="Scale of biological over-dispersion (1 = calibrated).")] = TissueConfig.noise,
    dropout: Annotated[float, typer.Option(help="Scale of technical dropout (1 = calibrated).")] = TissueConfig.dropout,
    morphology_contrast: Annotated[float, typer.Option(help="How far cell types differ in the image.")] = TissueConfig.morphology_contrast,
    sample_id: Annotated[str, typer.Option()] = TissueConfig.sample_id,
    program_seed: Annotated[int, typer.Option(help="Seeds the gene programs only; tissues sharing it share biology.")] = TissueConfig.program_seed,
    overwrite: OverwriteOpt = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Generate a virtual H&E tissue with single-cell expression, its reference scRNA-seq and ground truth."""
    setup_logging(verbose)
    from gcmoe.config import TissueConfig
    from gcmoe.data.virtual_tissue import simulate_tissue
    from gcmoe.files import output_folder, write_h5ad

    try:
        with output_folder(out, "simulate", overwrite):
            tissue = simulate_tissue(TissueConfig(
                seed=seed, n_cells=n_cells, height=height, width=width, mpp=mpp, n_cell_types=n_cell_types,
                n_genes=n_genes, noise=noise, dropout=dropout, morphology_contrast=morphology_contrast,
                sample_id=sample_id, program_seed=program_seed,
            ))
            path = tissue.sample.write(out / f"{sample_id}.h5ad")
            write_h5ad(tissue.reference, out / "reference.h5ad")
    except GcmoeError as exc:
        fail(exc)
    typer.echo(f"wrote {path} (+ .tif image) and {out / 'reference.h5ad'}: {tissue.sample.n_cells} cells, "
               f"{len(tissue.sample.genes)} genes")


@app.command()
def extract(
    sample: Annotated[Path, typer.Argument(help="A Sample .h5ad written by gcmoe.")],
    out: Annotated[Path, typer.Option(help="Where to write the features (.npy, float32, cells x dims).")] = Path("features.npy"),
    encoder: Annotated[str, typer.Option(help="Encoder name (gcmoe list encoders).")] = FeatureConfig.encoder,
    weights: Annotated[Optional[Path], typer.Option(help="Local weights file of a foundation-model encoder (uni, conch, timm:*, open_clip:*).")] = None,
    cache_dir: Annotated[Optional[Path], typer.Option(help="Feature cache folder; finished tiles are saved there as they go, so a rerun resumes. Required under torchrun, on storage every process sees.")] = None,
    batch_size: Annotated[int, typer.Option(help="Tiles per encoder pass.")] = FeatureConfig.batch_size,
    device: Annotated[str, typer.Option()] = FeatureConfig.device,
    stain_norm: Annotated[str, typer.Option(help="none | reinhard: each slide's Lab tissue colours moved to a fixed target before encoding (docs/features.md).")] = FeatureConfig.stain_norm,
    overwrite: OverwriteOpt = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Extract image features at every cell of a Sample (cached on disk; under torchrun the tiles are split across processes)."""
    setup_logging(verbose)
    import numpy as np
    import torch

    from gcmoe.data.sample import Sample
    from gcmoe.features import extract_features
    from gcmoe.files import atomic_path, check_output_file
    from gcmoe.training.distributed import init_from_env, is_main_process

    try:
        check_output_file(out, overwrite, "features.npy")
        device = init_from_env(device)  # under torchrun: join the group; each rank encodes its share of the tiles
        settings = FeatureConfig(encoder=encoder, weights=None if weights is None else str(weights),
                                 batch_size=batch_size, device=device, cache_dir=None if cache_dir is None else str(cache_dir),
                                 stain_norm=stain_norm)
        feats = extract_features(Sample.read(sample), settings, distributed=True, progress=is_main_process())
    except GcmoeError as exc:
        fail(exc)
    if is_main_process():
        with atomic_path(out, suffix=".npy") as tmp:
            np.save(tmp, feats)
        typer.echo(f"wrote {out}: {feats.shape[0]} cells x {feats.shape[1]} features")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@app.command()
def convert(
    data: Annotated[Path, typer.Option("--data", help="A Xenium output folder, HEST-1k root or AnnData .h5ad.")],
    out: Annotated[Path, typer.Option(help="The Sample .h5ad to write (the image is referenced, not copied).")],
    fmt: FormatOpt = None,
    sample_id: Annotated[Optional[str], typer.Option("--sample-id", help="HEST: which sample of the root; else the sample's name.")] = None,
    image: ImageOpt = None,
    mpp: MppOpt = None,
    cell_type_key: CellTypeKeyOpt = None,
    coords: CoordsOpt = None,
    xy_columns: XyColumnsOpt = None,
    alignment: AlignmentOpt = None,
    keypoint_units: KeypointUnitsOpt = None,
    segmentation: SegmentationOpt = None,
    min_qv: Annotated[float, typer.Option(help="HEST: drop transcripts below this quality.")] = DataConfig.min_qv,
    overwrite: OverwriteOpt = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Read a slide in any supported layout once and write it as a Sample .h5ad (fast to read in later runs)."""
    setup_logging(verbose)
    from gcmoe.data.readers import read_sample
    from gcmoe.files import check_output_file

    try:
        check_output_file(out, overwrite, "sample.h5ad")
        sample = read_sample(data, fmt or "auto", sample_id=sample_id, image=image, mpp=mpp,
                             cell_type_key=cell_type_key, min_qv=min_qv, coords=coords or DataConfig.coords,
                             xy_columns=split_names(xy_columns), alignment=alignment,
                             keypoint_units=keypoint_units or DataConfig.keypoint_units,
                             segmentation=segmentation or DataConfig.segmentation)
        path = sample.write(out)
    except GcmoeError as exc:
        fail(exc)
    typer.echo(f"wrote {path}: sample {sample.sample_id}, {sample.n_cells} cells x {len(sample.genes)} genes, "
               f"mpp {sample.mpp:.4f}, image {sample.image.path}")


@app.command()
def qc(
    data: Annotated[Path, typer.Argument(help="A slide in any layout of docs/data.md (Sample .h5ad, AnnData + --image, Xenium folder, HEST root, ...).")],
    out: Annotated[Path, typer.Option(help="Folder for <sample_id>.json, .md and the overlay .png/.svg.")] = Path("qc"),
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
    overwrite: OverwriteOpt = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Check a slide's registration and pixel size: cell centres against the nuclei on its H&E (exit 1 on a failure)."""
    setup_logging(verbose)
    from rich.console import Console
    from rich.table import Table

    from gcmoe.data.qc import check_slide
    from gcmoe.files import output_folder
    from gcmoe.pipeline.data import read_data_samples
    from gcmoe.pipeline.qc import write_qc

    colour = {"pass": "green", "warn": "yellow", "fail": "red", "skipped": "dim"}
    console, failed = Console(), []
    try:
        # the slide options go through the same settings as `gcmoe cv`, so both read a slide alike
        settings = run_config_from(None, [data], None, None, fmt=fmt, sample_ids=sample_id, image=image, mpp=mpp,
                                   cell_type_key=cell_type_key, coords=coords, xy_columns=xy_columns,
                                   alignment=alignment, keypoint_units=keypoint_units, segmentation=segmentation)
        samples = read_data_samples(settings.data)
        for sample in samples:
            report = check_slide(sample)
            with output_folder(out, "qc", overwrite):
                written = write_qc(report, sample, out)
            table = Table(title=f"QC of {sample.sample_id}: [{colour[report.verdict]}]{report.verdict}[/]")
            for column in ("check", "verdict", "value", "what it means"):
                table.add_column(column)
            for c in report.checks:
                table.add_row(c.name, f"[{colour[c.verdict]}]{c.verdict}[/]", "–" if c.value is None else f"{c.value:.4g}",
                              c.detail)
            console.print(table)
            console.print(f"overlay and report: {', '.join(str(p) for p in written)}")
            if report.verdict == "fail":
                failed.append(sample.sample_id)
    except GcmoeError as exc:
        fail(exc)
    if failed:
        typer.secho(f"QC failed for {', '.join(failed)}: fix what the failed checks name (gcmoe cv and train stop on "
                    "this unless given --no-qc)", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=1)


@app.command()
def prior(
    reference: Annotated[Path, typer.Option(help="Labelled reference scRNA-seq .h5ad (raw counts).")],
    out: Annotated[Path, typer.Option(help="Where to write the prior (.npz).")] = Path("prior.npz"),
    genes: Annotated[Optional[str], typer.Option(help="Comma-separated target genes, or @FILE with one per line.")] = None,
    sample: Annotated[Optional[Path], typer.Option(help="Take the target genes from this Sample .h5ad.")] = None,
    types: Annotated[Optional[str], typer.Option(help="Comma-separated routing types (default: the mapping's).")] = None,
    mapping: Annotated[Optional[Path], typer.Option(help="YAML {reference type: routing type}.")] = None,
    type_key: Annotated[str, typer.Option(help="The reference's cell-type column.")] = PriorConfig.type_key,
    tau: Annotated[float, typer.Option(help="Edge where the gene-gene correlation exceeds tau.")] = PriorConfig.tau,
    overwrite: OverwriteOpt = False,
) -> None:
    """Build cell-type-specific co-expression graphs from a reference and print their summary."""
    setup_logging(False)
    from gcmoe.prior.coexpression import prior_from_files

    from gcmoe.files import check_output_file

    names = None
    if genes:
        names = Path(genes[1:]).read_text().split() if genes.startswith("@") else split_names(genes)
    try:
        check_output_file(out, overwrite, "prior.npz")
        result = prior_from_files(reference, names, genes_of=sample, mapping=mapping,
                                  routing_types=split_names(types), type_key=type_key, tau=tau)
        result.save(out)
    except GcmoeError as exc:
        fail(exc)
    summary = result.summary()
    typer.echo(f"wrote {out}: {summary['n_genes']} genes, tau {tau}, {len(summary['missing_genes'])} genes missing from the reference")
    for t, v in summary["types"].items():
        typer.echo(f"  {t:14s} {v['reference_cells']:6d} cells  {v['edges']:6d} edges  {v['genes_covered']:4d} genes covered")
    typer.echo("edge overlap between types (Jaccard):")
    names = list(summary["types"])
    for t, row in zip(names, summary["edge_jaccard_between_types"]):
        typer.echo(f"  {t:14s} " + " ".join(f"{v:5.2f}" for v in row))
