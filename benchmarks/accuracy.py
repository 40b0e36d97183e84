"""Table 1 and Table 2 over several virtual tissues, with the ceiling and the wall clock of every model.

Each tissue differs in seed, cell count and difficulty (count noise, dropout, morphology contrast); every
registered model (`--models all`: the baselines, GC-MoE and its ablations) runs through the same features,
folds, genes and trainer as `gcmoe cv`. One run folder per tissue is kept under --out (results.json there);
the merged tables go to benchmarks/results/accuracy.{json,md}.

Run (alone: two torch processes on 2 cores slow each other many times over):
    .venv/bin/python benchmarks/accuracy.py [--models all] [--out /tmp/gcmoe_accuracy] [--patience 20]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write  # noqa: E402

# name -> TissueConfig fields; cell density is the default tissue's (10,000 cells on 2,400 x 2,400 px)
TISSUES: dict[str, dict] = {
    "vt_hard_3k": {"seed": 11, "n_cells": 3_000, "height": 1_316, "width": 1_316,
                   "noise": 1.5, "dropout": 1.5, "morphology_contrast": 0.7},
    "vt_default_5k": {"seed": 1, "n_cells": 5_000, "height": 1_698, "width": 1_698},
    "vt_easy_7k": {"seed": 22, "n_cells": 7_000, "height": 2_008, "width": 2_008,
                   "noise": 0.7, "dropout": 0.7, "morphology_contrast": 1.3},
}


def _config(name: str, fields: dict, models: list[str], out: Path, max_epochs: int, patience: int):
    from gcmoe.config import RunConfig, TissueConfig

    config = RunConfig(out=str(out / name), models=models)
    config.data.tissue = TissueConfig(**fields, sample_id=name)
    config.data.name = name
    config.train.max_epochs = max_epochs
    config.train.patience = patience
    return config


def _wall_table(results: dict) -> str:
    datasets = results["datasets"]
    names = list(datasets)
    methods = list(dict.fromkeys(m for d in datasets.values() for m in d["models"]))
    lines = ["| Method | " + " | ".join(f"{n} (s)" for n in names) + " | total (s) | best epochs (range) |",
             "|---|" + "|".join([":---:"] * (len(names) + 2)) + "|"]
    for m in methods:
        secs = [sum(datasets[n]["models"][m]["seconds"]) if m in datasets[n]["models"] else None for n in names]
        epochs = [e for n in names for e in datasets[n]["models"].get(m, {}).get("best_epochs", [])]
        lines.append(f"| {m} | " + " | ".join("–" if s is None else f"{s:.0f}" for s in secs)
                     + f" | {sum(s for s in secs if s):.0f} | {min(epochs)}–{max(epochs)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="all", help="comma-separated model names, or all")
    ap.add_argument("--tissues", default=",".join(TISSUES), help=f"comma-separated, from {', '.join(TISSUES)}")
    ap.add_argument("--out", default="/tmp/gcmoe_accuracy")
    ap.add_argument("--max-epochs", type=int, default=400)
    ap.add_argument("--patience", type=int, default=15)
    ap.add_argument("--name", default="accuracy", help="results file stem under benchmarks/results/")
    args = ap.parse_args()

    from gcmoe.evaluation.tables import results_markdown
    from gcmoe.pipeline import run_cv

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    out = Path(args.out)
    merged: dict = {"datasets": {}}
    tissue_info, wall = {}, {}
    for name in [t.strip() for t in args.tissues.split(",") if t.strip()]:
        config = _config(name, TISSUES[name], models, out, args.max_epochs, args.patience)
        t0 = time.perf_counter()
        run_cv(config, progress=False)
        wall[name] = round(time.perf_counter() - t0, 1)
        merged["datasets"].update(json.loads((Path(config.out) / "results.json").read_text())["datasets"])
        tissue_info[name] = TISSUES[name]
        print(f"{name}: {wall[name]:.0f} s", flush=True)
    table = results_markdown(merged).replace("# Results\n", "")
    settings = ", ".join(f"`{n}`: " + (", ".join(f"{k}={v}" for k, v in f.items()) or "the defaults")
                         for n, f in tissue_info.items())
    md = (
        "# Accuracy over virtual tissues\n\n"
        f"Command: `.venv/bin/python benchmarks/accuracy.py --models {args.models} --patience {args.patience} "
        f"--max-epochs {args.max_epochs}` (2 CPU cores, run alone). Tissues (TissueConfig fields): {settings}. "
        "5 vertical strips per tissue, top-50 HVG of each fold's training cells, the shared trainer "
        f"(Adam, batch 1024, early stopping with patience {args.patience} on spatial validation blocks).\n\n"
        f"Wall clock per tissue (features, folds, all models): "
        + ", ".join(f"{n} {s:.0f} s" for n, s in wall.items()) + ".\n\n"
        + table
        + "\n## Training time per model (sum over the 5 folds, seconds)\n\n" + _wall_table(merged) + "\n"
    )
    write(args.name, {"tissues": tissue_info, "wall_seconds": wall, "results": merged}, md)


if __name__ == "__main__":
    main()
