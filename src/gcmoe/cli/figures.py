"""Commands that show results: ``plot`` (figures of a run, docs/figures.md), ``report`` and ``list``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from gcmoe.cli._app import app, fail, setup_logging, split_names
from gcmoe.errors import GcmoeError

plot_app = typer.Typer(no_args_is_help=True, help="Figures of a run folder (PNG + SVG); see docs/figures.md.")
app.add_typer(plot_app, name="plot")

RunDirArg = Annotated[Path, typer.Argument(help="A run folder written by gcmoe cv or gcmoe demo.")]
PlotOutOpt = Annotated[Optional[Path], typer.Option("--out", help="File stem; writes STEM.png and STEM.svg (default RUN_DIR/figures/<figure>).")]
FoldOpt = Annotated[Optional[str], typer.Option("--fold", help="One fold (e.g. strip_1); default: all folds' held-out cells.")]
ModelsOpt = Annotated[Optional[str], typer.Option("--models", help="Comma-separated model names (registry or display names).")]


def plot_to(run_dir: Path, figure: str, out: Path | None, make) -> None:
    """Save the figure ``make()`` draws as ``out`` (default ``run_dir/figures/<figure>``) .png and .svg."""
    from gcmoe.plotting import save_figure

    setup_logging(False)
    try:
        paths = save_figure(make(), out or run_dir / "figures" / figure)
    except GcmoeError as exc:
        fail(exc)
    typer.echo("wrote " + ", ".join(map(str, paths)))


@plot_app.command("tsne")
def plot_tsne_cmd(
    run_dir: RunDirArg, fold: FoldOpt = None, models: ModelsOpt = None,
    max_cells: Annotated[int, typer.Option(help="Cells drawn (seeded subsample).")] = 3000,
    seed: Annotated[int, typer.Option()] = 0, out: PlotOutOpt = None,
) -> None:
    """t-SNE of measured and predicted expression coloured by cell type (Figure 3)."""
    from gcmoe.plotting import plot_run_tsne

    plot_to(run_dir, "tsne", out, lambda: plot_run_tsne(run_dir, fold=fold, models=split_names(models), max_cells=max_cells, seed=seed))


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

    plot_to(run_dir, "gene_vectors", out, lambda: plot_run_gene_vectors(
        run_dir, expert=expert, models=split_names(models) or [], threshold=threshold, seed=seed))


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

    plot_to(run_dir, "spatial", out, lambda: plot_run_spatial(
        run_dir, genes=split_names(genes), models=split_names(models), fold=fold, sample=sample, max_side=max_side))


@plot_app.command("pcc")
def plot_pcc_cmd(
    run_dir: RunDirArg, models: ModelsOpt = None,
    max_genes: Annotated[Optional[int], typer.Option(help="Draw only the best this many genes.")] = None,
    out: PlotOutOpt = None,
) -> None:
    """Per-gene PCC bars, averaged over folds, with the ceiling."""
    from gcmoe.plotting import plot_run_gene_pcc

    plot_to(run_dir, "gene_pcc", out, lambda: plot_run_gene_pcc(run_dir, models=split_names(models), max_genes=max_genes))


@plot_app.command("cv")
def plot_cv_cmd(run_dir: RunDirArg, out: PlotOutOpt = None) -> None:
    """The cross-validation table: per-fold PCC and mean ± std of every method."""
    from gcmoe.plotting import plot_run_cv

    plot_to(run_dir, "cv", out, lambda: plot_run_cv(run_dir))


@plot_app.command("prediction")
def plot_prediction_cmd(
    prediction: Annotated[Path, typer.Argument(help="An .h5ad written by gcmoe predict.")],
    genes: Annotated[Optional[str], typer.Option(help="Comma-separated genes (default the most variable).")] = None,
    image: Annotated[Optional[Path], typer.Option(help="The slide, if it moved since the prediction.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="File stem (default: beside the .h5ad).")] = None,
) -> None:
    """Maps of a prediction on its slide: the H&E, the experts and predicted genes."""
    from gcmoe.plotting.spatial import plot_prediction

    plot_to(prediction.parent, "prediction", out or prediction.with_suffix(""),
          lambda: plot_prediction(prediction, genes=split_names(genes), image=image))


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run folder (gcmoe cv, gcmoe demo) or a prediction .h5ad (gcmoe predict).")],
    out: Annotated[Optional[Path], typer.Option(help="Output .html (default RUN_DIR/report.html, or PRED.html).")] = None,
    max_cells: Annotated[int, typer.Option(help="Cells in the t-SNE (seeded subsample).")] = 3000,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """One self-contained HTML page with the tables and figures of a run, or of a `gcmoe predict` .h5ad."""
    setup_logging(verbose)
    from gcmoe.report import write_prediction_report, write_report

    try:
        if run_dir.suffix == ".h5ad":
            path = write_prediction_report(run_dir, out)
        else:
            path = write_report(run_dir, out, max_cells=max_cells)
    except GcmoeError as exc:
        fail(exc)
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
