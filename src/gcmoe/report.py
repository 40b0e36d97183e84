"""``gcmoe report RUN_DIR`` (or ``PRED.h5ad``): one self-contained HTML page with the tables and figures of a
run, or of a prediction on a new slide.

The page (``report.html`` in the run folder) embeds every figure as a base64 PNG and needs no network or
other file to display. A figure the run cannot make (no MoE model, no saved GC-MoE variants, no image, an
older run folder) is replaced by a note saying why.
"""

from __future__ import annotations

import base64
import html
import logging
import os
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from gcmoe import __version__
from gcmoe.errors import GcmoeError
from gcmoe.files import write_text

log = logging.getLogger(__name__)

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1200px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:0.8em 0;font-size:0.92em}
th,td{border:1px solid #ccc;padding:0.25em 0.6em;text-align:center}th{background:#f3f3f3}
td:first-child{text-align:left}figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:0.9em;color:#555}.note{color:#8a5a00;background:#fff7e6;padding:0.4em 0.7em}
pre{background:#f7f7f7;padding:0.8em;overflow:auto;font-size:0.85em}
"""


def _figures(run_dir: Path, max_cells: int, seed: int) -> list[tuple[str, str, str, Callable[[], Any]]]:
    from gcmoe.plotting import plot_run_cv, plot_run_gene_pcc, plot_run_gene_vectors, plot_run_spatial, plot_run_tsne

    return [
        ("cv", "Cross-validation", "Mean per-gene PCC of every method per fold (dots) and over folds (bar, ± std); "
         "the table of the run beside it.", lambda: plot_run_cv(run_dir)),
        ("gene-pcc", "Per-gene PCC", "PCC of each evaluated gene, averaged over the folds that evaluated it; black "
         "ticks: the ceiling (virtual tissue only).", lambda: plot_run_gene_pcc(run_dir)),
        ("tsne", "t-SNE of measured and predicted expression", "Held-out cells of all folds (a seeded subsample), "
         "coloured by cell type; silhouette of the types in each embedding.",
         lambda: plot_run_tsne(run_dir, max_cells=max_cells, seed=seed)),
        ("gene-vectors", "Geometry of the gene-wise vectors", "t-SNE of one expert's gene vectors with and without "
         "CAP (models trained on the first fold); links join genes whose measured correlation exceeds 0.4.",
         lambda: plot_run_gene_vectors(run_dir, seed=seed)),
        ("spatial", "Spatial maps", "The H&E, cell types, expert assignment (router's argmax) and measured vs "
         "predicted expression of the genes best predicted; each expression panel has its own colour scale.",
         lambda: plot_run_spatial(run_dir)),
    ]


def write_report(
    run_dir: str | os.PathLike, out: str | os.PathLike | None = None, *, max_cells: int = 3000, seed: int = 0,
) -> Path:
    """Write the HTML report of the run folder ``run_dir`` (default ``run_dir/report.html``); returns its path.

    ``max_cells`` and ``seed`` set the t-SNE's subsample.
    """
    from gcmoe.plotting._run import load_results
    from gcmoe.plotting._style import figure_png

    run_dir = Path(run_dir)
    results = load_results(run_dir)
    out = Path(out) if out is not None else run_dir / "report.html"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        '<head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>gcmoe report: {_e(run_dir.name)}</title><style>{_CSS}</style></head>",
        "<body>",
        f"<h1>gcmoe report: {_e(run_dir.resolve().name)}</h1>",
        f"<p>Run folder <code>{_e(str(run_dir.resolve()))}</code>, made {_e(str(results.get('created', '?')))} with "
        f"gcmoe {_e(str(results.get('gcmoe_version', '?')))}; {_e(_seconds(results))}. Report written "
        f"{_e(datetime.now(timezone.utc).isoformat(timespec='seconds'))} by gcmoe {_e(__version__)}.</p>",
    ]
    for name, d in results.get("datasets", {}).items():
        parts += _dataset_tables(name, d)
    parts.append('<h2 id="figures">Figures</h2>')
    for key, heading, caption, make in _figures(run_dir, max_cells, seed):
        t0 = time.perf_counter()
        try:
            fig = make()
        except GcmoeError as exc:
            log.info("report: no %s figure (%s)", key, exc)
            parts.append(f'<section id="fig-{key}"><h3>{_e(heading)}</h3><p class="note">Not available for this run: '
                         f"{_e(str(exc))}</p></section>")
            continue
        png = base64.b64encode(figure_png(fig)).decode("ascii")
        log.info("report: %s figure in %.1f s", key, time.perf_counter() - t0)
        parts.append(
            f'<section id="fig-{key}"><h3>{_e(heading)}</h3><figure>'
            f'<img src="data:image/png;base64,{png}" alt="{_e(heading)}"><figcaption>{_e(caption)}</figcaption>'
            "</figure></section>"
        )
    config = run_dir / "config.yaml"
    if config.is_file():
        parts.append(f'<h2 id="config">Settings</h2><details><summary>config.yaml</summary><pre>{_e(config.read_text())}'
                     "</pre></details>")
    parts += ["</body>", "</html>"]
    write_text(out, "\n".join(parts) + "\n")
    return out


def write_prediction_report(prediction: str | os.PathLike, out: str | os.PathLike | None = None, *,
                            image: str | os.PathLike | None = None, n_genes: int = 3) -> Path:
    """Write the HTML report of a `gcmoe predict` output (default: beside it, ``<name>.html``); returns its path.

    The page holds the model and slide, the cells per expert (GC-MoE), the predicted genes' ranges, and the
    maps on the H&E (:func:`gcmoe.plotting.spatial.plot_prediction`), the figure embedded as a PNG.
    """
    import anndata
    import numpy as np

    from gcmoe._constants import Key
    from gcmoe.plotting._style import figure_png
    from gcmoe.plotting.spatial import plot_prediction

    prediction = Path(prediction)
    fig = plot_prediction(prediction, image=image, n_genes=n_genes)  # also checks the file
    adata = anndata.read_h5ad(prediction)
    meta = dict(adata.uns.get(Key.UNS, {}))
    model = dict(meta.get("model", {}))
    out = Path(out) if out is not None else prediction.with_suffix(".html")
    rows = [("model", f"{model.get('display_name', '?')} ({model.get('model', '?')})"),
            ("slide", str(meta.get("slide", image))), ("pixel size", f"{meta.get('mpp', '?')} um/px"),
            ("cells", f"{adata.n_obs} (from {meta.get('cells', '?')})"), ("genes", str(adata.n_vars)),
            ("target scale", str(dict(meta.get("target", {})).get("transform", "?"))),
            ("made", f"{meta.get('created', '?')} with gcmoe {meta.get('gcmoe_version', '?')}")]
    parts = [
        "<!DOCTYPE html>", '<html lang="en">',
        '<head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>gcmoe prediction: {_e(prediction.name)}</title><style>{_CSS}</style></head>", "<body>",
        f"<h1>gcmoe prediction: {_e(prediction.name)}</h1>",
        "<table><tbody>" + "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in rows) + "</tbody></table>",
    ]
    if "expert" in adata.obs:
        counts = adata.obs["expert"].astype(str).value_counts()
        mean_p = np.asarray(adata.obsm["routing"]).max(axis=1).mean() if "routing" in adata.obsm else None
        parts.append('<h2 id="experts">Cells per expert</h2><table><thead><tr><th>expert</th><th>cells</th>'
                     "<th>share</th></tr></thead><tbody>" + "".join(
                         f"<tr><td>{_e(t)}</td><td>{n}</td><td>{_pct(n / adata.n_obs, 1)}</td></tr>"
                         for t, n in counts.items()) + "</tbody></table>"
                     + (f"<p>Mean probability of the chosen expert: {mean_p:.3f}.</p>" if mean_p is not None else ""))
    x = np.asarray(adata.X, dtype=np.float32)
    q = np.percentile(x, [5, 50, 95], axis=0) if adata.n_obs else np.zeros((3, adata.n_vars))
    order = np.argsort(x.std(axis=0))[::-1] if adata.n_obs else np.arange(adata.n_vars)
    parts.append('<h2 id="genes">Predicted genes</h2><details><summary>5th, 50th and 95th percentile of each gene '
                 "over cells, most variable first</summary><table><thead><tr><th>gene</th><th>5%</th><th>50%</th>"
                 "<th>95%</th></tr></thead><tbody>" + "".join(
                     f"<tr><td>{_e(adata.var_names[j])}</td><td>{q[0, j]:.3f}</td><td>{q[1, j]:.3f}</td>"
                     f"<td>{q[2, j]:.3f}</td></tr>" for j in order) + "</tbody></table></details>")
    png = base64.b64encode(figure_png(fig)).decode("ascii")
    parts += ['<h2 id="figures">Maps</h2><section id="fig-prediction"><figure>'
              f'<img src="data:image/png;base64,{png}" alt="Maps on the H&amp;E"><figcaption>The H&amp;E, the expert '
              "each cell is routed to, and the predicted expression of the most variable genes (own colour scale "
              "per panel).</figcaption></figure></section>", "</body>", "</html>"]
    write_text(out, "\n".join(parts) + "\n")
    return out


def _dataset_tables(name: str, d: dict[str, Any]) -> list[str]:
    models = d.get("models", {})
    best = max((e["mean"] for e in models.values() if e.get("mean") is not None), default=None)
    ceiling = d.get("ceiling")
    rows = []
    for m, e in models.items():
        pcc = _pm(e.get("mean"), e.get("std"))
        if e.get("mean") is not None and e.get("mean") == best:
            pcc = f"<b>{pcc}</b>"
        rows.append(f"<tr><td>{_e(m)}</td><td>{pcc}</td><td>{_pct(e.get('share_of_ceiling'), 0)}</td>"
                    f"<td>{_pct(e.get('routing_accuracy'), 1)}</td></tr>")
    if ceiling is not None:
        rows.append(f"<tr><td><i>ceiling</i></td><td>{_pm(ceiling, d.get('ceiling_std'))}</td><td></td><td></td></tr>")
    folds = d.get("fold_names", [])
    fold_rows = [
        f"<tr><td>{_e(m)}</td>" + "".join(f"<td>{_num(v)}</td>" for v in e.get("folds", [])) + "</tr>"
        for m, e in models.items()
    ]
    if d.get("ceiling_folds"):
        fold_rows.append("<tr><td><i>ceiling</i></td>" + "".join(f"<td>{_num(v)}</td>" for v in d["ceiling_folds"]) + "</tr>")
    types = sorted({t for e in models.values() for t in e.get("per_type", {})})
    type_rows = [
        f"<tr><td>{_e(m)}</td>" + "".join(f"<td>{_num(e['per_type'].get(t))}</td>" for t in types) + "</tr>"
        for m, e in models.items() if e.get("per_type")
    ]
    by_type = ([
        "<p>PCC within each cell type (the test cells of one routing type, mean over folds):</p>"
        "<table><thead><tr><th>Method</th>" + "".join(f"<th>{_e(t)}</th>" for t in types) + "</tr></thead><tbody>"
        + "".join(type_rows) + "</tbody></table>"] if type_rows else [])
    warnings = [f"<p><b>Warning:</b> {_e(w)}</p>" for w in d.get("warnings", [])]
    return [
        f'<h2 id="results-{_e(name)}">{_e(name)}</h2>',
        f"<p>{d.get('n_cells', '?')} cells, {d.get('n_genes_eval', '?')} evaluated genes, {len(folds)} folds "
        f"({_e(str(d.get('scheme', '?')))}), encoder {_e(str(d.get('encoder', '?')))} ({d.get('feature_dim', '?')} "
        "dimensions). Metric: per gene, the Pearson correlation between predicted and measured expression over the "
        "test cells, averaged over genes; mean ± std over folds.</p>",
        "<table><thead><tr><th>Method</th><th>PCC (mean ± std)</th><th>share of ceiling</th><th>routing accuracy</th>"
        "</tr></thead><tbody>" + "".join(rows) + "</tbody></table>",
        "<table><thead><tr><th>Method</th>" + "".join(f"<th>{_e(f)}</th>" for f in folds) + "</tr></thead><tbody>"
        + "".join(fold_rows) + "</tbody></table>",
        *by_type,
        *warnings,
    ]


def _e(text: str) -> str:
    return html.escape(str(text), quote=True)


def _num(v: Any) -> str:
    return "–" if v is None else f"{v:.3f}"


def _pm(mean: Any, std: Any) -> str:
    return "–" if mean is None else f"{mean:.3f} ± {0 if std is None else std:.3f}"


def _pct(v: Any, digits: int) -> str:
    return "" if v is None else f"{100 * v:.{digits}f}%"


def _seconds(results: dict[str, Any]) -> str:
    s = results.get("seconds", {})
    return f"{s['total']:.0f} s end to end" if "total" in s else "duration unknown"
