"""Result tables in the layout of the paper's Table 1: one row per method, one column per dataset.

Cells read ``mean ± std`` of the per-fold mean PCC; the best method of each dataset is in bold (the
ceiling row is a bound, not a method, and is never bolded); with several datasets an Average column is added.
Methods trained on raw pixels instead of the cached encoder features (``raw_pixels`` in results.json, GHIST*)
are marked with a dagger and a footnote.
"""

from __future__ import annotations

from typing import Any

import numpy as np

CEILING = "ceiling"
RAW_PIXELS_MARK = "†"
RAW_PIXELS_NOTE = f"{RAW_PIXELS_MARK} trained end to end on raw H&E pixels; does not use the cached encoder features."


def raw_pixel_methods(results: dict[str, Any]) -> set[str]:
    """Display names of the methods of ``results`` that read raw pixels instead of the cached features."""
    return {m for d in results["datasets"].values() for m, e in d["models"].items() if e.get("raw_pixels")}


def _fmt(mean: float | None, std: float | None, bold: bool = False) -> str:
    if mean is None or not np.isfinite(mean):
        return "n/a"
    text = f"{mean:.3f} ± {std:.3f}" if std is not None and np.isfinite(std) else f"{mean:.3f}"
    return f"**{text}**" if bold else text


def method_table(results: dict[str, Any]) -> str:
    """Markdown Table 1 from a results.json mapping (``{"datasets": {name: {...}}}``)."""
    datasets = results["datasets"]
    names = list(datasets)
    methods: list[str] = []
    for d in datasets.values():
        for m in d["models"]:
            if m not in methods:
                methods.append(m)
    best = {}
    for name in names:
        scores = {m: datasets[name]["models"][m]["mean"] for m in datasets[name]["models"]}
        finite = {m: s for m, s in scores.items() if s is not None and np.isfinite(s)}
        best[name] = max(finite, key=finite.get) if finite else None
    averages = {}
    if len(names) > 1:
        for m in methods:
            vals = [datasets[n]["models"].get(m, {}).get("mean") for n in names]
            averages[m] = float(np.mean(vals)) if all(v is not None and np.isfinite(v) for v in vals) else None
        finite_avg = {m: v for m, v in averages.items() if v is not None}
        best_avg = max(finite_avg, key=finite_avg.get) if finite_avg else None
    header = ["Method", *names] + (["Average"] if len(names) > 1 else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + [":---:"] * (len(header) - 1)) + "|"]
    raw = raw_pixel_methods(results)
    for m in methods:
        row = [f"{m} {RAW_PIXELS_MARK}" if m in raw else m]
        for n in names:
            entry = datasets[n]["models"].get(m)
            row.append(_fmt(entry["mean"], entry["std"], bold=(m == best[n])) if entry else "–")
        if len(names) > 1:
            row.append(_fmt(averages[m], None, bold=(m == best_avg)))
        lines.append("| " + " | ".join(row) + " |")
    ceilings = [datasets[n].get(CEILING) for n in names]
    if any(c is not None for c in ceilings):
        row = [f"*{CEILING}*"] + [_fmt(c, datasets[n].get("ceiling_std")) for c, n in zip(ceilings, names)]
        if len(names) > 1:
            row.append(_fmt(float(np.mean(ceilings)), None) if all(c is not None for c in ceilings) else "n/a")
        lines.append("| " + " | ".join(row) + " |")
    if raw:
        lines += ["", RAW_PIXELS_NOTE]
    return "\n".join(lines)


def ablation_table(results: dict[str, Any]) -> str | None:
    """Markdown Table 2 (GC-MoE ablations present in the results), or None when there are none.

    Columns: the components (CS-MoE, CAP, C2CA), PCC per dataset (best in bold), routing accuracy against the
    routing labels, and the share of the ceiling reached.
    """
    from gcmoe.models.ablations import ABLATIONS

    datasets = results["datasets"]
    rows = [(display, sw) for display, sw in ABLATIONS.values() if any(display in d["models"] for d in datasets.values())]
    if not rows:
        return None
    names = list(datasets)
    header = ["Method", "CS-MoE", "CAP", "C2CA", *names, "routing accuracy", "share of ceiling"]
    lines = ["| " + " | ".join(header) + " |", "|---|:---:|:---:|:---:|" + "|".join([":---:"] * (len(names) + 2)) + "|"]
    best = {}
    for n in names:
        scores = {d: datasets[n]["models"][d]["mean"] for d, _ in rows if d in datasets[n]["models"]}
        finite = {m: s for m, s in scores.items() if s is not None and np.isfinite(s)}
        best[n] = max(finite, key=finite.get) if finite else None
    for display, sw in rows:
        row = [display] + ["✓" if sw[c] else "" for c in ("moe", "cap", "c2ca")]
        accs, shares = [], []
        for n in names:
            e = datasets[n]["models"].get(display)
            row.append(_fmt(e["mean"], e["std"], bold=(display == best[n])) if e else "–")
            if e and e.get("routing_accuracy") is not None:
                accs.append(e["routing_accuracy"])
            if e and e.get("share_of_ceiling") is not None:
                shares.append(e["share_of_ceiling"])
        row.append(f"{np.mean(accs):.3f}" if accs else "–")
        row.append(f"{100 * np.mean(shares):.0f}%" if shares else "–")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def fold_table(name: str, dataset: dict[str, Any]) -> str:
    """Markdown table of per-fold mean PCC for one dataset (methods in rows, folds in columns)."""
    folds = dataset.get("fold_names") or [f"fold {i + 1}" for i in range(len(next(iter(dataset["models"].values()))["folds"]))]
    lines = ["| Method | " + " | ".join(folds) + " |", "|---|" + "|".join([":---:"] * len(folds)) + "|"]
    for m, entry in dataset["models"].items():
        lines.append(f"| {m} | " + " | ".join(f"{v:.3f}" for v in entry["folds"]) + " |")
    if dataset.get("ceiling_folds"):
        lines.append(f"| *{CEILING}* | " + " | ".join(f"{v:.3f}" for v in dataset["ceiling_folds"]) + " |")
    return "\n".join(lines)


def type_table(dataset: dict[str, Any]) -> str | None:
    """Markdown table of the PCC within each routing type's test cells (mean over folds), or None without types.

    Columns: the routing types, with their cell counts; a blank where a type had under 10 test cells in
    every fold.
    """
    types = sorted({t for e in dataset["models"].values() for t in e.get("per_type", {})})
    if not types:
        return None
    cells = dataset.get("routing", {}).get("cells_per_type", {})
    head = [f"{t} ({cells[t]})" if t in cells else t for t in types]
    lines = ["| Method | " + " | ".join(head) + " |", "|---|" + "|".join([":---:"] * len(types)) + "|"]
    for m, e in dataset["models"].items():
        per = e.get("per_type")
        if per:
            lines.append(f"| {m} | " + " | ".join(f"{per[t]:.3f}" if t in per else "–" for t in types) + " |")
    return "\n".join(lines)


def results_markdown(results: dict[str, Any]) -> str:
    """The whole results.md: Table 1, per-fold detail and notes on excluded genes."""
    parts = [
        "# Results",
        "",
        "Mean per-gene Pearson correlation (PCC) between predicted and measured expression over the evaluated "
        "genes, on held-out cells; mean ± standard deviation over folds. *ceiling*: the same metric for the "
        "noise-free expected expression of the virtual tissue, the physical limit for any model.",
        "",
        "## Table 1",
        "",
        method_table(results),
    ]
    table2 = ablation_table(results)
    if table2:
        parts += ["", "## Table 2: ablation of GC-MoE", "",
                  "Routing accuracy: the router's most probable type against the routing labels on test cells.", "",
                  table2]
    for name, d in results["datasets"].items():
        parts += [
            "",
            f"## {name}: per fold",
            "",
            f"{d['n_cells']} cells, {d['n_genes_eval']} evaluated genes per fold, scheme `{d.get('scheme', '?')}`.",
            "",
            fold_table(name, d),
        ]
        by_type = type_table(d)
        if by_type:
            parts += ["", f"## {name}: PCC within each cell type", "",
                      "Mean over folds of the per-gene PCC among the test cells of one routing type (its label, not "
                      "the router's guess; cells per type in brackets): how well a model orders the cells of a "
                      "type, which the overall PCC, dominated by differences between types, does not show.", "",
                      by_type]
        for warning in d.get("warnings", []):
            parts += ["", f"Warning: {warning}"]
        excluded = {m: sorted({g for fold in e.get("excluded_genes", []) for g in fold}) for m, e in d["models"].items()}
        excluded = {m: genes for m, genes in excluded.items() if genes}
        if excluded:
            parts += ["", "Genes excluded (constant in a test fold):"]
            parts += [f"- {m}: {', '.join(genes)}" for m, genes in excluded.items()]
    return "\n".join(parts) + "\n"
