"""What averaging a model's predictions over trainer seeds gains, from the runs of benchmarks/suite.py.

No training: it reads the suite's saved test predictions (``runs/<tissue>/seed<k>/<group>/predictions/<fold>.h5ad``)
and, per tissue and fold, scores each seed's prediction and the mean of the seeds' predictions with the
package's metric (mean per-gene PCC over test cells). Each seed selects its top-50 HVG from its own training cells
(the validation blocks depend on the seed), so both are scored on the genes every seed selected.

    .venv/bin/python benchmarks/seed_averaging.py --out /tmp/gcmoe_suite [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write  # noqa: E402
from suite import TISSUES  # noqa: E402

MODELS = {"gcmoe": ("gcmoe", "GC-MoE"), "stnet": ("others", "ST-Net*"), "gcmoe_no_c2ca": ("others", "Ours w/o C2CA")}


def score(out: Path, tissue: str, seeds: list[int], model: str) -> dict | None:
    """Per fold: the seeds' mean single-seed PCC and the PCC of their averaged prediction; None when runs are missing."""
    import anndata

    from gcmoe.evaluation.metrics import pearson_per_gene

    group, _ = MODELS[model]
    folder = out / "runs" / tissue / f"seed{seeds[0]}" / group / "predictions"
    if not folder.is_dir():
        return None
    single, averaged, n_genes = [], [], []
    for fold in sorted(p.name for p in folder.glob("*.h5ad")):
        runs = [anndata.read_h5ad(out / "runs" / tissue / f"seed{s}" / group / "predictions" / fold) for s in seeds]
        shared = [g for g in runs[0].var_names if all(g in r.var_names for r in runs[1:])]
        preds = [np.asarray(r[:, shared].layers[model], dtype=np.float64) for r in runs]
        truth = np.asarray(runs[0][:, shared].X, dtype=np.float64)
        single.append(float(np.mean([np.nanmean(pearson_per_gene(p, truth)) for p in preds])))
        averaged.append(float(np.nanmean(pearson_per_gene(np.mean(preds, axis=0), truth))))
        n_genes.append(len(shared))
    gain = np.subtract(averaged, single)
    return {"single": float(np.mean(single)), "averaged": float(np.mean(averaged)), "gain": float(gain.mean()),
            "gain_sd": float(gain.std(ddof=1)), "folds_ahead": int((gain > 0).sum()), "n_folds": len(gain),
            "genes_scored": n_genes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/gcmoe_suite", help="the suite's --out folder")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--name", default="seed_averaging")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    results = {t: {m: score(Path(args.out), t, seeds, m) for m in MODELS} for t in TISSUES}
    results = {t: r for t, r in results.items() if all(v is not None for v in r.values())}
    lines = ["# Averaging predictions over trainer seeds", "",
             f"Command: `python benchmarks/seed_averaging.py --out {args.out} --seeds {args.seeds}` on the runs of "
             "benchmarks/suite.py (results/suite.md). No training: the saved test predictions of each seed, and "
             f"their mean over seeds {seeds}, scored per fold on the genes every seed selected (each seed picks its "
             "top-50 HVG from its own training cells). Mean over the 5 strips; gain ± its sd over strips (strips "
             "ahead).", "",
             "| tissue | " + " | ".join(f"{MODELS[m][1]}: one seed -> mean of seeds" for m in MODELS) + " |",
             "|---|" + ":---:|" * len(MODELS)]
    for tissue, r in results.items():
        cells = [f"{v['single']:.3f} -> {v['averaged']:.3f} ({v['gain']:+.4f} ± {v['gain_sd']:.4f}, "
                 f"{v['folds_ahead']}/{v['n_folds']})" for v in r.values()]
        lines.append(f"| {tissue} | " + " | ".join(cells) + " |")
    write(args.name, {"seeds": seeds, "results": results}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
