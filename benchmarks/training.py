"""Training speed and peak memory of ST-Net* as the number of cells grows.

Each size runs in a fresh subprocess so its peak RSS is its own. Features are random (the morphology
encoder's dimension), targets a noisy function of them; the trainer, batch size (1,024) and model are
the ones `gcmoe cv` uses. Reported: training cells per second per epoch (optimisation only, validation
excluded), and peak resident memory.

Run: .venv/bin/python benchmarks/training.py [--sizes 10000 100000 1000000] [--epochs 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import peak_rss_mb, write  # noqa: E402


def one(n_cells: int, dim: int, n_genes: int, epochs: int, model: str) -> dict:
    import numpy as np
    import torch

    from gcmoe.config import TrainConfig
    from gcmoe.models import create_model
    from gcmoe.training.trainer import CellData, fit, seed_everything

    rng = np.random.default_rng(0)
    x = rng.normal(size=(n_cells, dim)).astype(np.float32)
    w = rng.normal(size=(dim, n_genes)).astype(np.float32) / np.sqrt(dim)
    y = (np.tanh(x @ w) + 0.5 * rng.normal(size=(n_cells, n_genes))).astype(np.float32)
    data = CellData(torch.from_numpy(x), torch.from_numpy(y))
    idx = np.arange(n_cells)
    n_val = max(n_cells // 10, 2)
    seed_everything(0)
    m = create_model(model, dim, n_genes)
    res = fit(m, data, idx[n_val:], idx[:n_val], TrainConfig(max_epochs=epochs, patience=epochs + 1))
    n_params = sum(p.numel() for p in m.parameters())
    return {"n_cells": n_cells, "train_cells_per_s": round(res.train_cells_per_s), "epochs": res.epochs_run,
            "seconds_total": round(res.seconds, 2), "peak_rss_mb": round(peak_rss_mb(), 1), "parameters": n_params,
            "flops_per_cell_train": 6 * n_params}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=None, help="feature dimension (default: the morphology encoder's)")
    ap.add_argument("--genes", type=int, default=50)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--model", default="stnet")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.dim is None:
        from gcmoe.features import create_encoder

        args.dim = create_encoder("morphology").config.feature_dim
    if args.one:
        print(json.dumps(one(args.one, args.dim, args.genes, args.epochs, args.model)))
        return
    rows = []
    for n in args.sizes:
        cmd = [sys.executable, __file__, "--one", str(n), "--dim", str(args.dim), "--genes", str(args.genes),
               "--epochs", str(args.epochs), "--model", args.model]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    md = [
        f"# Training speed: {args.model}",
        "",
        f"Command: `.venv/bin/python benchmarks/training.py --sizes {' '.join(map(str, args.sizes))} --epochs {args.epochs}`",
        "",
        f"{args.dim} features, {args.genes} genes, batch 1,024, Adam, CPU; cells/s counts optimisation steps only.",
        "",
        "| cells | train cells/s | epochs | seconds | peak RSS (MiB) | params | train FLOPs/cell |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    md += [f"| {r['n_cells']:,} | {r['train_cells_per_s']:,} | {r['epochs']} | {r['seconds_total']} | {r['peak_rss_mb']} | "
           f"{r['parameters']:,} | {r['flops_per_cell_train']:,} |" for r in rows]
    write(f"training_{args.model}", {"model": args.model, "dim": args.dim, "genes": args.genes, "rows": rows}, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
