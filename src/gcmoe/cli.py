"""The ``gcmoe`` command line. Each command parses, calls one library function, and reports.

Heavy libraries (torch, scanpy) are imported inside the commands so ``gcmoe --help`` answers at once.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from gcmoe.errors import GcmoeError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Predict single-cell gene expression from H&E slides (GC-MoE and baselines).",
)


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(show_path=False, show_time=False)],
        force=True,
    )
    for noisy in ("numba", "h5py", "matplotlib", "PIL", "fsspec", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _print_table(results: dict, out: Path) -> None:
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
CoordsOpt = Annotated[Optional[str], typer.Option("--coords", help="h5ad: unit of the cell centres: px (pixels of --image), um (micrometres, divided by the pixel size) or auto (um for a spatialdata-io table, else px).")]
XyColumnsOpt = Annotated[Optional[str], typer.Option("--xy-columns", help="h5ad: two obs columns holding the centres, x (image column) then y (image row), e.g. y_pixel,x_pixel; default obsm['spatial'].")]
AlignmentOpt = Annotated[Optional[str], typer.Option("--alignment", help="xenium: the H&E alignment (10x *_he_imagealignment.csv, Xenium Explorer *_matrix.csv, *_alignment_files.zip or keypoints CSV), or identity if the H&E is the morphology image's pixel grid; default: found in the folder.")]
KeypointUnitsOpt = Annotated[Optional[str], typer.Option("--keypoint-units", help="xenium: unit of a keypoints CSV's fixedX/fixedY: um, px (morphology pixels) or auto (from the pixel sizes each implies).")]
SegmentationOpt = Annotated[Optional[str], typer.Option("--segmentation", help="HEST: which polygons make the cells: cell or nucleus (10x's, xenium_seg/), cellvit (CellViT's nuclei on the H&E, cellvit_seg/) or none; Visium HD: cell or nucleus (the centres).")]
CellTypeKeyOpt = Annotated[Optional[str], typer.Option("--cell-type-key", help="obs column holding cell types (any names, any number).")]
StreamOpt = Annotated[bool, typer.Option("--stream", help="Train from an on-disk cell store in shuffled chunks (flat memory; ST-Net* and GC-MoE models): docs/scale.md.")]


def _run_config(config: Path | None, data: list[Path] | None, reference: Path | None, out: Path | None,
                models: str | None = None, *, fmt: str | None = None, sample_ids: list[str] | None = None,
                image: Path | None = None, mpp: float | None = None, cell_type_key: str | None = None,
                stream: bool = False, coords: str | None = None, xy_columns: str | None = None,
                alignment: str | None = None, keypoint_units: str | None = None, segmentation: str | None = None):
    """Settings from the YAML file (or the defaults), overridden by the command-line flags."""
    from gcmoe.config import RunConfig, from_dict, load_config, to_dict

    run_config = load_config(config) if config else RunConfig()
    if data:
        run_config.data.source = "samples"
        run_config.data.samples = [str(p) for p in data]
    flags = {"format": fmt, "sample_ids": sample_ids or None, "image": str(image) if image else None, "mpp": mpp,
             "cell_type_key": cell_type_key, "coords": coords, "xy_columns": _split(xy_columns) if xy_columns else None,
             "alignment": alignment, "keypoint_units": keypoint_units, "segmentation": segmentation}
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
    return run_config


def _fail(exc: GcmoeError) -> None:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("gcmoe_demo"),
    quick: Annotated[bool, typer.Option("--quick", help="A tiny tissue and short training (well under a minute).")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """The whole pipeline on the embedded virtual tissue: simulate, extract features, cross-validate, report."""
    _setup_logging(verbose)
    from gcmoe.pipeline import demo_config, run_cv

    try:
        results = run_cv(demo_config(out, quick=quick))
    except GcmoeError as exc:
        _fail(exc)
    _print_table(results, out)
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
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Cross-validated comparison of models on a virtual tissue or on Samples; writes results.md/json."""
    _setup_logging(verbose)
    from gcmoe.pipeline import run_cv

    try:
        run_config = _run_config(config, data, reference, out, models, fmt=fmt, sample_ids=sample_id, image=image,
                                 mpp=mpp, cell_type_key=cell_type_key, stream=stream, coords=coords, xy_columns=xy_columns,
                                 alignment=alignment, keypoint_units=keypoint_units, segmentation=segmentation)
        results = run_cv(run_config, resume=resume)
    except GcmoeError as exc:
        _fail(exc)
    _print_table(results, Path(run_config.out))


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
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Train one model on all cells (early stopping on spatial validation blocks) and save its model folder."""
    _setup_logging(verbose)
    from gcmoe.pipeline import train_model
    from gcmoe.training.distributed import init_from_env, is_main_process

    try:
        run_config = _run_config(config, data, reference, out, fmt=fmt, sample_ids=sample_id, image=image, mpp=mpp,
                                 cell_type_key=cell_type_key, stream=stream, coords=coords, xy_columns=xy_columns,
                                 alignment=alignment, keypoint_units=keypoint_units, segmentation=segmentation)
        run_config.train.device = init_from_env(run_config.train.device)  # under torchrun: join the group
        folder = train_model(run_config, model, resume=resume)
    except GcmoeError as exc:
        _fail(exc)
    if is_main_process():
        typer.echo(f"model saved to {folder} (model.safetensors, model.json, README.md)")


@app.command()
def prior(
    reference: Annotated[Path, typer.Option(help="Labelled reference scRNA-seq .h5ad (raw counts).")],
    out: Annotated[Path, typer.Option(help="Where to write the prior (.npz).")] = Path("prior.npz"),
    genes: Annotated[Optional[str], typer.Option(help="Comma-separated target genes, or @FILE with one per line.")] = None,
    sample: Annotated[Optional[Path], typer.Option(help="Take the target genes from this Sample .h5ad.")] = None,
    types: Annotated[Optional[str], typer.Option(help="Comma-separated routing types (default: the mapping's).")] = None,
    mapping: Annotated[Optional[Path], typer.Option(help="YAML {reference type: routing type}.")] = None,
    type_key: Annotated[str, typer.Option(help="The reference's cell-type column.")] = "cell_type",
    tau: Annotated[float, typer.Option(help="Edge where the gene-gene correlation exceeds tau.")] = 0.2,
) -> None:
    """Build cell-type-specific co-expression graphs from a reference and print their summary."""
    _setup_logging(False)
    import anndata
    import yaml

    from gcmoe.data.cell_types import ordered_types
    from gcmoe.prior.coexpression import build_coexpression_prior

    try:
        ref = anndata.read_h5ad(reference)
        if genes:
            names = Path(genes[1:]).read_text().split() if genes.startswith("@") else [g.strip() for g in genes.split(",")]
        elif sample:
            names = list(map(str, anndata.read_h5ad(sample, backed="r").var_names))
        else:
            names = list(map(str, ref.var_names))
        type_map = yaml.safe_load(mapping.read_text()) if mapping else None
        if types:
            routing = [t.strip() for t in types.split(",")]
        elif type_map:
            routing = ordered_types(type_map.values())
        else:
            routing = ordered_types(dict(ref.uns.get("gcmoe", {}).get("type_mapping", {})).values()) or ordered_types(
                ref.obs[type_key].astype(str))
        result = build_coexpression_prior(ref, names, routing, type_key=type_key, mapping=type_map, tau=tau)
        result.save(out)
    except GcmoeError as exc:
        _fail(exc)
    summary = result.summary()
    typer.echo(f"wrote {out}: {summary['n_genes']} genes, tau {tau}, {len(summary['missing_genes'])} genes missing from the reference")
    for t, v in summary["types"].items():
        typer.echo(f"  {t:14s} {v['reference_cells']:6d} cells  {v['edges']:6d} edges  {v['genes_covered']:4d} genes covered")
    typer.echo("edge overlap between types (Jaccard):")
    names = list(summary["types"])
    for t, row in zip(names, summary["edge_jaccard_between_types"]):
        typer.echo(f"  {t:14s} " + " ".join(f"{v:5.2f}" for v in row))


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
    device: Annotated[str, typer.Option()] = "cpu",
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Predict the expression of every cell of a new slide with a trained model."""
    _setup_logging(verbose)
    from gcmoe.inference import predict_slide

    try:
        adata = predict_slide(model, slide, out, cells=cells, detect=detect, mpp=mpp, cache_dir=cache_dir, device=device,
                              coords=coords)
    except GcmoeError as exc:
        _fail(exc)
    typer.echo(f"wrote {out}: {adata.n_obs} cells x {adata.n_vars} genes")


@app.command()
def simulate(
    out: Annotated[Path, typer.Option(help="Output folder for <sample_id>.h5ad + .tif and reference.h5ad.")] = Path("virtual_tissue"),
    seed: Annotated[int, typer.Option()] = 0,
    n_cells: Annotated[int, typer.Option()] = 10_000,
    height: Annotated[int, typer.Option(help="Image height, pixels.")] = 2_400,
    width: Annotated[int, typer.Option(help="Image width, pixels.")] = 2_400,
    mpp: Annotated[float, typer.Option(help="Micrometres per pixel.")] = 0.5,
    n_cell_types: Annotated[int, typer.Option()] = 4,
    n_genes: Annotated[int, typer.Option()] = 150,
    noise: Annotated[float, typer.Option(help="Scale of biological over-dispersion (1 = calibrated).")] = 1.0,
    dropout: Annotated[float, typer.Option(help="Scale of technical dropout (1 = calibrated).")] = 1.0,
    morphology_contrast: Annotated[float, typer.Option(help="How far cell types differ in the image.")] = 1.0,
    sample_id: Annotated[str, typer.Option()] = "virtual_tissue",
    program_seed: Annotated[int, typer.Option(help="Seeds the gene programs only; tissues sharing it share biology.")] = 0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Generate a virtual H&E tissue with single-cell expression, its reference scRNA-seq and ground truth."""
    _setup_logging(verbose)
    from gcmoe.config import TissueConfig
    from gcmoe.data.virtual_tissue import simulate_tissue
    from gcmoe.pipeline import write_h5ad

    try:
        tissue = simulate_tissue(TissueConfig(
            seed=seed, n_cells=n_cells, height=height, width=width, mpp=mpp, n_cell_types=n_cell_types,
            n_genes=n_genes, noise=noise, dropout=dropout, morphology_contrast=morphology_contrast, sample_id=sample_id,
            program_seed=program_seed,
        ))
        path = tissue.sample.write(out / f"{sample_id}.h5ad")
        write_h5ad(tissue.reference, out / "reference.h5ad")
    except GcmoeError as exc:
        _fail(exc)
    typer.echo(f"wrote {path} (+ .tif image) and {out / 'reference.h5ad'}: {tissue.sample.n_cells} cells, "
               f"{len(tissue.sample.genes)} genes")


@app.command()
def extract(
    sample: Annotated[Path, typer.Argument(help="A Sample .h5ad written by gcmoe.")],
    out: Annotated[Path, typer.Option(help="Where to write the features (.npy, float32, cells x dims).")] = Path("features.npy"),
    encoder: Annotated[str, typer.Option(help="Encoder name (gcmoe list encoders).")] = "morphology",
    weights: Annotated[Optional[Path], typer.Option(help="Local weights file of a foundation-model encoder (uni, conch, timm:*, open_clip:*).")] = None,
    cache_dir: Annotated[Optional[Path], typer.Option(help="Feature cache folder; finished tiles are saved there as they go, so a rerun resumes. Required under torchrun, on storage every process sees.")] = None,
    batch_size: Annotated[int, typer.Option(help="Tiles per encoder pass.")] = 4,
    device: Annotated[str, typer.Option()] = "cpu",
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Extract image features at every cell of a Sample (cached on disk; under torchrun the tiles are split across processes)."""
    _setup_logging(verbose)
    import numpy as np
    import torch

    from gcmoe.data.sample import Sample
    from gcmoe.features import extract_features
    from gcmoe.training.distributed import init_from_env, is_main_process

    try:
        device = init_from_env(device)  # under torchrun: join the group; each rank encodes its share of the tiles
        feats = extract_features(Sample.read(sample), encoder, cache_dir=cache_dir, batch_size=batch_size, device=device,
                                 weights=weights, distributed=True, progress=is_main_process())
    except GcmoeError as exc:
        _fail(exc)
    if is_main_process():
        tmp = out.with_name(f".{out.name}.tmp.npy")
        np.save(tmp, feats)
        tmp.replace(out)
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
    min_qv: Annotated[float, typer.Option(help="HEST: drop transcripts below this quality.")] = 20.0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Read a slide in any supported layout once and write it as a Sample .h5ad (fast to read in later runs)."""
    _setup_logging(verbose)
    from gcmoe.data.readers import read_sample

    try:
        sample = read_sample(data, fmt or "auto", sample_id=sample_id, image=image, mpp=mpp,
                             cell_type_key=cell_type_key, min_qv=min_qv, coords=coords or "auto",
                             xy_columns=_split(xy_columns) if xy_columns else None, alignment=alignment,
                             keypoint_units=keypoint_units or "auto", segmentation=segmentation or "cell")
        path = sample.write(out)
    except GcmoeError as exc:
        _fail(exc)
    typer.echo(f"wrote {path}: sample {sample.sample_id}, {sample.n_cells} cells x {len(sample.genes)} genes, "
               f"mpp {sample.mpp:.4f}, image {sample.image.path}")


# --- figures and the HTML report (docs/figures.md) ---

plot_app = typer.Typer(no_args_is_help=True, help="Figures of a run folder (PNG + SVG); see docs/figures.md.")
app.add_typer(plot_app, name="plot")

RunDirArg = Annotated[Path, typer.Argument(help="A run folder written by gcmoe cv or gcmoe demo.")]
PlotOutOpt = Annotated[Optional[Path], typer.Option("--out", help="File stem; writes STEM.png and STEM.svg (default RUN_DIR/figures/<figure>).")]
FoldOpt = Annotated[Optional[str], typer.Option("--fold", help="One fold (e.g. strip_1); default: all folds' held-out cells.")]
ModelsOpt = Annotated[Optional[str], typer.Option("--models", help="Comma-separated model names (registry or display names).")]


def _split(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _plot(run_dir: Path, figure: str, out: Path | None, make) -> None:
    from gcmoe.plotting import save_figure

    _setup_logging(False)
    try:
        paths = save_figure(make(), out or run_dir / "figures" / figure)
    except GcmoeError as exc:
        _fail(exc)
    typer.echo("wrote " + ", ".join(map(str, paths)))


@plot_app.command("tsne")
def plot_tsne_cmd(
    run_dir: RunDirArg, fold: FoldOpt = None, models: ModelsOpt = None,
    max_cells: Annotated[int, typer.Option(help="Cells drawn (seeded subsample).")] = 3000,
    seed: Annotated[int, typer.Option()] = 0, out: PlotOutOpt = None,
) -> None:
    """t-SNE of measured and predicted expression coloured by cell type (Figure 3)."""
    from gcmoe.plotting import plot_run_tsne

    _plot(run_dir, "tsne", out, lambda: plot_run_tsne(run_dir, fold=fold, models=_split(models), max_cells=max_cells, seed=seed))


@plot_app.command("gene-vectors")
def plot_gene_vectors_cmd(
    run_dir: RunDirArg,
    expert: Annotated[Optional[str], typer.Option(help="Routing type name or index (default the first).")] = None,
    models: Annotated[str, typer.Option(help="Saved GC-MoE variants to compare.")] = "gcmoe,gcmoe_no_cap_c2ca",
    threshold: Annotated[float, typer.Option(help="Link genes whose measured correlation exceeds this.")] = 0.4,
    seed: Annotated[int, typer.Option()] = 0, out: PlotOutOpt = None,
) -> None:
    """t-SNE of one expert's gene-wise vectors with and without CAP, co-expressed genes linked (Figure 4)."""
    from gcmoe.plotting import plot_run_gene_vectors

    _plot(run_dir, "gene_vectors", out, lambda: plot_run_gene_vectors(
        run_dir, expert=expert, models=_split(models) or [], threshold=threshold, seed=seed))


@plot_app.command("spatial")
def plot_spatial_cmd(
    run_dir: RunDirArg,
    genes: Annotated[Optional[str], typer.Option(help="Comma-separated genes (default the best predicted).")] = None,
    models: ModelsOpt = None, fold: FoldOpt = None,
    sample: Annotated[Optional[str], typer.Option(help="Slide to draw (default the first).")] = None,
    max_side: Annotated[int, typer.Option(help="Longest side of the H&E read, pixels.")] = 1200,
    out: PlotOutOpt = None,
) -> None:
    """Maps on the H&E: tissue, cell types, experts, measured vs predicted genes (Figure 5)."""
    from gcmoe.plotting import plot_run_spatial

    _plot(run_dir, "spatial", out, lambda: plot_run_spatial(
        run_dir, genes=_split(genes), models=_split(models), fold=fold, sample=sample, max_side=max_side))


@plot_app.command("pcc")
def plot_pcc_cmd(
    run_dir: RunDirArg, models: ModelsOpt = None,
    max_genes: Annotated[Optional[int], typer.Option(help="Draw only the best this many genes.")] = None,
    out: PlotOutOpt = None,
) -> None:
    """Per-gene PCC bars, averaged over folds, with the ceiling."""
    from gcmoe.plotting import plot_run_gene_pcc

    _plot(run_dir, "gene_pcc", out, lambda: plot_run_gene_pcc(run_dir, models=_split(models), max_genes=max_genes))


@plot_app.command("cv")
def plot_cv_cmd(run_dir: RunDirArg, out: PlotOutOpt = None) -> None:
    """The cross-validation table: per-fold PCC and mean ± std of every method."""
    from gcmoe.plotting import plot_run_cv

    _plot(run_dir, "cv", out, lambda: plot_run_cv(run_dir))


@plot_app.command("prediction")
def plot_prediction_cmd(
    prediction: Annotated[Path, typer.Argument(help="An .h5ad written by gcmoe predict.")],
    genes: Annotated[Optional[str], typer.Option(help="Comma-separated genes (default the most variable).")] = None,
    image: Annotated[Optional[Path], typer.Option(help="The slide, if it moved since the prediction.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="File stem (default: beside the .h5ad).")] = None,
) -> None:
    """Maps of a prediction on its slide: the H&E, the experts and predicted genes."""
    from gcmoe.plotting.spatial import plot_prediction

    _plot(prediction.parent, "prediction", out or prediction.with_suffix(""),
          lambda: plot_prediction(prediction, genes=_split(genes), image=image))


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run folder (gcmoe cv, gcmoe demo) or a prediction .h5ad (gcmoe predict).")],
    out: Annotated[Optional[Path], typer.Option(help="Output .html (default RUN_DIR/report.html, or PRED.html).")] = None,
    max_cells: Annotated[int, typer.Option(help="Cells in the t-SNE (seeded subsample).")] = 3000,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """One self-contained HTML page with the tables and figures of a run, or of a `gcmoe predict` .h5ad."""
    _setup_logging(verbose)
    from gcmoe.report import write_prediction_report, write_report

    try:
        if run_dir.suffix == ".h5ad":
            path = write_prediction_report(run_dir, out)
        else:
            path = write_report(run_dir, out, max_cells=max_cells)
    except GcmoeError as exc:
        _fail(exc)
    typer.echo(f"report: {path}")


@app.command("list")
def list_names(what: Annotated[str, typer.Argument(help="'models' or 'encoders'.")] = "models") -> None:
    """List registered models or encoders."""
    if what == "models":
        from gcmoe.models import get_model_entry, list_models

        for name in list_models():
            e = get_model_entry(name)
            typer.echo(f"{name:12s} {e.display_name:12s} {e.description}")
    elif what == "encoders":
        from gcmoe.features import list_encoders

        for name in list_encoders():
            typer.echo(name)
    else:
        typer.secho("choose 'models' or 'encoders'", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
