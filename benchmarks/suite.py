"""The model suite: GC-MoE, its ablations and ST-Net* over tissues that differ where the default tissue is uniform.

Tissues (each written as a Sample .h5ad + H&E TIFF + reference .h5ad, then run as a user would, through
`gcmoe.pipeline.run_cv` with `data.source: samples`, 5 vertical strips, top-50 HVG, the package's trainer with
early-stopping patience 20, `--patience`, so that the suite fits in about an hour on 2 cores):

| tissue | what differs |
|---|---|
| small_3k | small data: 3,000 cells, the paper's 4 types |
| fine9_025 | 9 fine routing types with look-alike pairs (T / B / plasma cells, luminal / myoepithelial) at 0.25 um/px |
| nbhd_none | neighbours carry no expression signal beyond type (no induced genes, no spill-over) |
| nbhd_strong | neighbours carry strong signal (induced genes x3, spill-over x1.5) at 0.4 um/px |
| stain_alt | a second stain and scanner (other stain vectors, stronger haematoxylin, softer optics), 5 types, 0.4 um/px |
| hard_4k | weak morphology contrast, noisier counts |
| real_xenium_breast | real 10x Xenium breast expression (GHIST's demo crop: 280 genes, 9 types) placed by type and rendered |

Every model runs with each seed (the trainer's seed: initialisation, batches, validation blocks); the tables
give the mean over folds and seeds, and GC-MoE's paired per-(fold, seed) differences against each other model
with their sd. Oracles, from the true cell types: the training cells' type mean, and the type mean plus a
per-type linear fit on log nucleus area ("type + nucleus size").

The real tissue needs GHIST's public demo expression (https://github.com/SydneyBioX/GHIST, folder data_demo/:
expr_mat_breast_demo.csv, cell_types_breast_demo.csv, nuclei_sizes_breast_demo.csv; GPL-3.0): pass the
folder with --ghist-demo or GCMOE_GHIST_DEMO; without it that tissue is skipped and the output says so.

Run (alone on the machine; GC-MoE and the other models train in separate runs, so two processes, one with
`--models gcmoe` and one with the rest, `OMP_NUM_THREADS=1` each, share 2 cores well, and a change of GC-MoE's
settings reruns GC-MoE alone; `--collect` then summarises every finished run):
    .venv/bin/python benchmarks/suite.py --ghist-demo ~/GHIST/data_demo [--seeds 0,1,2] [--out /tmp/gcmoe_suite]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write  # noqa: E402

# name -> (TissueConfig fields, what it tests). Cell density is the default tissue's (10,000 cells on
# 1,200 x 1,200 um), so the image side in um is sqrt(n_cells / 10,000) * 1,200.
TISSUES: dict[str, tuple[dict, str]] = {
    "small_3k": ({"seed": 11, "n_cells": 3_000, "height": 1_316, "width": 1_316}, "small data, 4 types"),
    "fine9_025": ({"seed": 12, "n_cells": 4_000, "height": 3_036, "width": 3_036, "mpp": 0.25, "n_cell_types": 9,
                   "morphology_contrast": 0.85}, "9 fine types with look-alike pairs, 0.25 um/px"),
    "nbhd_none": ({"seed": 13, "n_cells": 3_500, "height": 1_420, "width": 1_420, "neighbourhood_effect": 0.0,
                   "spill": 0.0}, "neighbours carry no signal beyond type"),
    "nbhd_strong": ({"seed": 14, "n_cells": 3_500, "height": 1_775, "width": 1_775, "mpp": 0.4,
                     "neighbourhood_effect": 3.0, "spill": 1.5}, "strong neighbourhood signal, 0.4 um/px"),
    "stain_alt": ({"seed": 15, "n_cells": 3_500, "height": 1_775, "width": 1_775, "mpp": 0.4, "n_cell_types": 5,
                   "stain": "alternate", "noise": 1.3}, "second stain/scanner, 5 types, 0.4 um/px"),
    "hard_4k": ({"seed": 16, "n_cells": 4_000, "height": 1_518, "width": 1_518, "morphology_contrast": 0.6,
                 "noise": 1.5, "dropout": 1.5}, "weak morphology contrast, noisy counts"),
    "real_xenium_breast": ({"seed": 17, "n_cells": 6_000, "height": 1_860, "width": 1_860},
                           "real Xenium breast expression (9 types, 280 genes), rendered"),
}
MODELS = "stnet,gcmoe_no_moe_cap_c2ca,gcmoe_no_cap_c2ca,gcmoe_no_c2ca,gcmoe"
FULL = "GC-MoE"


def build_tissue(name: str, data_dir: Path, ghist: Path | None) -> tuple[Path, Path] | None:
    """Write tissue ``name`` (Sample .h5ad + image, reference .h5ad) under ``data_dir`` once; its paths."""
    from gcmoe.config import TissueConfig
    from gcmoe.files import write_h5ad

    fields, _ = TISSUES[name]
    sample_path, ref_path = data_dir / name / f"{name}.h5ad", data_dir / name / "reference.h5ad"
    if sample_path.is_file() and ref_path.is_file():
        return sample_path, ref_path
    config = TissueConfig(**fields, sample_id=name)
    if name.startswith("real_"):
        if ghist is None:
            return None
        from gcmoe.data.readers.ghist import read_ghist_expression
        from gcmoe.data.virtual_tissue.transplant import transplant_expression

        tissue = transplant_expression(config, read_ghist_expression(ghist), reference_fraction=0.2)
        (data_dir / name).mkdir(parents=True, exist_ok=True)
        (data_dir / name / "transplant.json").write_text(json.dumps(tissue.report, indent=2))
    else:
        from gcmoe.data.virtual_tissue import simulate_tissue

        tissue = simulate_tissue(config)
    write_h5ad(tissue.reference, ref_path)
    tissue.sample.write(sample_path)
    return sample_path, ref_path


def run_tissue(name: str, paths: tuple[Path, Path], seed: int, models: list[str], out: Path,
               model_params: dict, run: bool = True, patience: int = 20, ensemble: int = 1) -> dict | None:
    """`gcmoe cv` runs of ``models`` on a written tissue with trainer seed ``seed``, merged into one results mapping.

    GC-MoE runs apart from the other models (``runs/<tissue>/seed<k>/<group>/``), so a change of its settings
    reruns it alone; every run's results.json is reused when present. With ``run`` False, only finished runs
    are read: None when one is missing.
    """
    groups = [[m for m in models if m != "gcmoe"], [m for m in models if m == "gcmoe"]]
    merged: dict = {}
    for group in (g for g in groups if g):
        results = _run_group(name, paths, seed, group, out, model_params, run, patience, ensemble)
        if results is None:
            return None
        merged = _merge(merged, results)
    return merged


def _run_group(name: str, paths: tuple[Path, Path], seed: int, models: list[str], out: Path,
               model_params: dict, run: bool = True, patience: int = 20, ensemble: int = 1) -> dict | None:
    from gcmoe.config import RunConfig
    from gcmoe.pipeline import run_cv

    run_dir = out / "runs" / name / f"seed{seed}" / ("gcmoe" if models == ["gcmoe"] else "others")
    if (run_dir / "results.json").is_file():
        import yaml

        train = yaml.safe_load((run_dir / "config.yaml").read_text())["train"]
        ran_with, wanted = (train["patience"], train.get("ensemble", 1)), (patience, ensemble)
        if ran_with != wanted:
            raise SystemExit(f"{run_dir} ran with (patience, ensemble) {ran_with}, not {wanted}: use another --out")
        return json.loads((run_dir / "results.json").read_text())
    if not run:
        return None
    config = RunConfig(out=str(run_dir), models=models, model_params=model_params)
    config.data.source = "samples"
    config.data.samples = [str(paths[0])]
    config.data.reference = str(paths[1])
    config.data.name = name
    config.features.cache_dir = str(out / "cache")
    config.train.seed = seed
    config.train.patience = patience
    config.train.ensemble = ensemble
    return run_cv(config, progress=False)


def _merge(a: dict, b: dict) -> dict:
    """Two results mappings of one tissue as one: models side by side, run times added."""
    if not a:
        return json.loads(json.dumps(b))
    for name, dataset in b["datasets"].items():
        a["datasets"][name]["models"].update(dataset["models"])
    a["seconds"]["total"] += b["seconds"]["total"]
    return a


def oracles(sample_path: Path, run_dir: Path) -> dict[str, list[float]]:
    """Per fold: PCC of the training cells' type means, and of type means + per-type fit on log nucleus area."""
    import anndata

    from gcmoe.evaluation.metrics import score_genes

    adata = anndata.read_h5ad(sample_path)
    types = adata.obs["cell_type"].astype(str).to_numpy()
    log_area = np.log(adata.obs["nucleus_area_um2"].to_numpy(dtype=float))
    out: dict[str, list[float]] = {"type_mean": [], "type_size": []}
    for fold_file in sorted((run_dir / "predictions").glob("*.h5ad")):
        fold = anndata.read_h5ad(fold_file)
        test = adata.obs_names.get_indexer(fold.obs_names)  # predictions/<fold>.h5ad: test cells, X = measured
        genes = list(fold.var_names)
        measured = np.asarray(fold.X, dtype=np.float64)
        train = np.setdiff1d(np.arange(adata.n_obs), test)
        cols = [list(adata.var_names).index(g) for g in genes]
        counts = adata.layers["counts"]
        y = np.log1p(np.asarray(counts[:, cols].toarray() if hasattr(counts, "toarray") else counts[:, cols],
                                dtype=np.float64))
        mean_pred = np.zeros_like(measured)
        size_pred = np.zeros_like(measured)
        overall = y[train].mean(0)
        for t in np.unique(types):
            tr, te = train[types[train] == t], np.flatnonzero(types[test] == t)
            if not te.size:
                continue
            mu = y[tr].mean(0) if tr.size else overall
            mean_pred[te] = mu
            if tr.size > 2 and log_area[tr].std() > 0:
                x = log_area[tr] - log_area[tr].mean()
                slope = (x[:, None] * (y[tr] - mu)).sum(0) / (x**2).sum()
                size_pred[te] = mu + (log_area[test[te]] - log_area[tr].mean())[:, None] * slope
            else:
                size_pred[te] = mu
        out["type_mean"].append(score_genes(mean_pred, measured, genes).mean)
        out["type_size"].append(score_genes(size_pred, measured, genes).mean)
    return out


def summarise(runs: dict[str, dict[int, dict]], oracle: dict[str, dict[str, list[float]]]) -> dict:
    """Per tissue: mean over folds and seeds per model, paired GC-MoE differences, routing, oracles, ceiling."""
    summary = {}
    for name, by_seed in runs.items():
        seeds = sorted(by_seed)
        datasets = [by_seed[s]["datasets"][name] for s in seeds]
        methods = list(datasets[0]["models"])
        folds = {m: np.array([d["models"][m]["folds"] for d in datasets]) for m in methods}  # (seeds, folds)
        entry = {"seeds": seeds, "n_cells": datasets[0]["n_cells"], "models": {}, "paired": {},
                 "oracles": {k: float(np.mean(v)) for k, v in oracle.get(name, {}).items()},
                 "ceiling": datasets[0].get("ceiling")}
        for m in methods:
            rec = {"mean": float(folds[m].mean()), "fold_sd": float(folds[m].mean(0).std(ddof=1)),
                   "per_seed": folds[m].mean(1).round(4).tolist()}
            acc = [d["models"][m].get("routing_accuracy") for d in datasets]
            if all(a is not None for a in acc):
                rec["routing_accuracy"] = float(np.mean(acc))
            entry["models"][m] = rec
        if FULL in folds:
            for m in methods:
                if m == FULL:
                    continue
                diff = (folds[FULL] - folds[m]).ravel()
                entry["paired"][m] = {"mean": float(diff.mean()), "sd": float(diff.std(ddof=1)),
                                      "wins": int((diff > 0).sum()), "n": int(diff.size)}
        summary[name] = entry
    return summary


def markdown(summary: dict, command: str, wall: dict, skipped: list[str], patience: int) -> str:
    names = list(summary)
    methods = list(dict.fromkeys(m for s in summary.values() for m in s["models"]))
    head = "| Method | " + " | ".join(names) + " |\n|---|" + "|".join([":---:"] * len(names)) + "|\n"
    rows = []
    for m in methods:
        cells = []
        for n in names:
            rec = summary[n]["models"].get(m)
            best = max(r["mean"] for r in summary[n]["models"].values())
            val = "–" if rec is None else f"{rec['mean']:.3f} ± {rec['fold_sd']:.3f}"
            cells.append(f"**{val}**" if rec is not None and rec["mean"] == best else val)
        rows.append(f"| {m} | " + " | ".join(cells) + " |")
    for key, label in (("type_mean", "*oracle: type mean*"), ("type_size", "*oracle: type + nucleus size*")):
        rows.append(f"| {label} | " + " | ".join(
            f"{summary[n]['oracles'][key]:.3f}" if key in summary[n]["oracles"] else "–" for n in names) + " |")
    rows.append("| *ceiling* | " + " | ".join(
        f"{summary[n]['ceiling']:.3f}" if summary[n]["ceiling"] else "– (real counts)" for n in names) + " |")
    paired_head = "| GC-MoE minus | " + " | ".join(names) + " |\n|---|" + "|".join([":---:"] * len(names)) + "|\n"
    paired_rows = []
    for m in methods:
        if m == FULL:
            continue
        cells = []
        for n in names:
            p = summary[n]["paired"].get(m)
            cells.append("–" if p is None else f"{p['mean']:+.4f} ± {p['sd']:.4f} ({p['wins']}/{p['n']})")
        paired_rows.append(f"| {m} | " + " | ".join(cells) + " |")
    routing_rows = []
    for m in methods:
        vals = [summary[n]["models"].get(m, {}).get("routing_accuracy") for n in names]
        if any(v is not None for v in vals):
            routing_rows.append(f"| {m} | " + " | ".join("–" if v is None else f"{v:.3f}" for v in vals) + " |")
    tissue_lines = "\n".join(f"- `{n}`: {TISSUES[n][1]}; TissueConfig "
                             + ", ".join(f"{k}={v}" for k, v in TISSUES[n][0].items())
                             + f"; {summary[n]['n_cells']} cells" for n in names)
    seeds = {n: v["seeds"] for n, v in summary.items()}
    return (
        "# Model suite\n\n"
        f"Command: `{command}` (2 CPU cores). Run time per tissue (all seeds; features, folds, models): "
        + ", ".join(f"{n} {s:.0f} s" for n, s in wall.items())
        + f"; total {sum(wall.values()):.0f} s.\n\n"
        f"Trainer seeds per tissue: {seeds}; 5 vertical strips; top-50 HVG of each fold's training cells; the default trainer "
        f"(Adam, batch 1,024, early stopping with patience {patience} on spatial validation blocks).\n\n"
        + tissue_lines + "\n"
        + (f"\nSkipped: {', '.join(skipped)} (no --ghist-demo folder).\n" if skipped else "")
        + "\n## Mean PCC over folds and seeds (± sd over folds of the seed-mean)\n\n" + head + "\n".join(rows)
        + "\n\n## GC-MoE's paired differences, per (fold, seed): mean ± sd (GC-MoE ahead in k of n)\n\n"
        + paired_head + "\n".join(paired_rows)
        + "\n\n## Routing accuracy (router's most probable type against the routing labels, test cells)\n\n"
        + head.replace("Method", "Model") + "\n".join(routing_rows) + "\n"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tissues", default=",".join(TISSUES), help=f"comma-separated, from {', '.join(TISSUES)}")
    ap.add_argument("--models", default=MODELS)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default="/tmp/gcmoe_suite")
    ap.add_argument("--ghist-demo", default=os.environ.get("GCMOE_GHIST_DEMO"),
                    help="GHIST's data_demo/ folder (real Xenium breast expression)")
    ap.add_argument("--model-params", default="{}", help="JSON: per model name, settings for its factory")
    ap.add_argument("--name", default="suite", help="results file stem under benchmarks/results/")
    ap.add_argument("--patience", type=int, default=20,
                    help="early-stopping patience (the package's default, 50, needs about twice the time)")
    ap.add_argument("--ensemble", type=int, default=1,
                    help="train.ensemble: models trained from different seeds and averaged (use another --out)")
    ap.add_argument("--collect", action="store_true",
                    help="run nothing: summarise the finished runs under --out (a seed counts where all models ran)")
    args = ap.parse_args()

    out = Path(args.out)
    ghist = Path(args.ghist_demo) if args.ghist_demo else None
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    seeds = [int(s) for s in args.seeds.split(",")]
    runs: dict[str, dict[int, dict]] = {}
    oracle: dict[str, dict] = {}
    wall: dict[str, float] = {}
    skipped = []
    names = [t.strip() for t in args.tissues.split(",") if t.strip()]
    paths = {}
    for name in names:
        found = build_tissue(name, out / "data", ghist)
        if found is None:
            skipped.append(name)
        else:
            paths[name] = found
    for seed in seeds:  # seed after seed over all tissues, so an interrupted suite has every tissue at least once
        for name, found in paths.items():
            result = run_tissue(name, found, seed, models, out, json.loads(args.model_params), run=not args.collect,
                                patience=args.patience, ensemble=args.ensemble)
            if result is not None:
                runs.setdefault(name, {})[seed] = result
                print(f"{name} seed {seed}: {result['seconds']['total']:.0f} s", flush=True)
    for name, found in paths.items():
        if name not in runs:
            continue
        oracle[name] = oracles(found[0], next((out / "runs" / name / f"seed{seeds[0]}").iterdir()))
        # a run's own clock (features, folds, models), so runs reused from an earlier call count too
        wall[name] = round(sum(r["seconds"]["total"] for r in runs[name].values()), 1)
    summary = summarise(runs, oracle)
    command = "python " + " ".join(sys.argv)
    write(args.name, {"tissues": {n: TISSUES[n][0] for n in runs}, "seeds": {n: sorted(r) for n, r in runs.items()}, "models": models,
                      "wall_seconds": wall, "skipped": skipped, "summary": summary}, markdown(summary, command, wall, skipped, args.patience))


if __name__ == "__main__":
    main()
