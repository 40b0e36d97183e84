"""Does C2CA help where the neighbourhood matters? The demo's comparison on the neighbourhood-induced genes.

On the default virtual tissue, the top-50 HVGs the demo evaluates are markers and proliferation genes; the
genes the generator induces from a cell's neighbourhood (var["gene_role"] = "neighbourhood:*": 16 genes,
docs/virtual_tissue.md) are never among them, so the demo cannot show what C2CA (attention over the
neighbours) adds. This runs the demo's settings (5 vertical strips, max 400 epochs, patience 30) with
`targets.genes` set to those 16 genes, for ST-Net*, GC-MoE without CAP and C2CA, GC-MoE without C2CA, and
GC-MoE, and reports the mean PCC over the 16 genes per fold, with the ceiling.

Run (alone): .venv/bin/python benchmarks/neighbourhood_genes.py [--out /tmp/gcmoe_neighbourhood]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write  # noqa: E402

MODELS = ["stnet", "gcmoe_no_cap_c2ca", "gcmoe_no_c2ca", "gcmoe"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/gcmoe_neighbourhood")
    args = ap.parse_args()

    from gcmoe.data.virtual_tissue import simulate_tissue
    from gcmoe.pipeline import demo_config, run_cv

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    config = demo_config(out)
    config.models = list(MODELS)
    roles = simulate_tissue(config.data.tissue).sample.adata.var["gene_role"].astype(str)
    genes = [g for g, r in roles.items() if r.startswith("neighbourhood:")]
    config.targets.genes = genes
    t0 = time.perf_counter()
    results = run_cv(config, progress=False)
    seconds = time.perf_counter() - t0
    d = results["datasets"]["virtual_tissue"]
    folds = d["fold_names"]
    lines = ["| model | " + " | ".join(folds) + " | mean |", "|---|" + "---:|" * (len(folds) + 1)]
    for name, rec in d["models"].items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in rec["folds"]) + f" | **{rec['mean']:.3f}** |")
    lines.append("| *ceiling* | " + " | ".join(f"{v:.3f}" for v in d["ceiling_folds"]) + f" | {d['ceiling']:.3f} |")
    st = d["models"]["ST-Net*"]["folds"]
    gains = {name: [a - b for a, b in zip(rec["folds"], st)] for name, rec in d["models"].items() if name != "ST-Net*"}
    gain_lines = [f"- {name}: {sum(g) / len(g):+.3f} against ST-Net* on average, ahead on "
                  f"{sum(x > 0 for x in g)} of {len(g)} folds" for name, g in gains.items()]
    md = ("# The neighbourhood-induced genes: does C2CA help where the neighbourhood matters?\n\n"
          f"Command: `.venv/bin/python benchmarks/neighbourhood_genes.py` (2 CPU cores, run alone, "
          f"{seconds / 60:.1f} min). Default virtual tissue (10,000 cells), the demo's settings (5 vertical strips, "
          f"max 400 epochs, patience 30), evaluated genes = the {len(genes)} neighbourhood-induced genes "
          f"({', '.join(genes)}); mean test PCC over those genes per fold.\n\n"
          + "\n".join(lines) + "\n\n" + "\n".join(gain_lines) + "\n")
    write("neighbourhood_genes", {"genes": genes, "seconds": round(seconds, 1), "results": d}, md)


if __name__ == "__main__":
    main()
