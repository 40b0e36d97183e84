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
    from gcmoe.pipeline.inputs import cell_data
    from gcmoe.training.trainer import fit, seed_everything

    from gcmoe.features.neighbours import window_neighbours
    from gcmoe.models import get_model_entry

    rng = np.random.default_rng(0)
    x = rng.normal(size=(n_cells, dim)).astype(np.float32)
    w = rng.normal(size=(dim, n_genes)).astype(np.float32) / np.sqrt(dim)
    y = (np.tanh(x @ w) + 0.5 * rng.normal(size=(n_cells, n_genes))).astype(np.float32)
    inputs = get_model_entry(model).inputs
    params = {}
    # cells scattered at breast-tissue density (~1 per 100 um^2): about 30 of 32 window slots filled
    side = np.sqrt(n_cells * 100.0)
    pos = rng.uniform(0, side, size=(n_cells, 2)) if inputs.positions else np.zeros((n_cells, 2))
    cell_type = torch.from_numpy(rng.integers(0, 4, n_cells)) if inputs.cell_types else None
    if inputs.coexpression:
        params["adjacency"] = torch.from_numpy((rng.random((4, n_genes, n_genes)) < 0.05).astype(np.float32))
    nbr = torch.from_numpy(window_neighbours(pos, 64.0, 32)) if inputs.neighbours else None
    geometry = create_model(model, dim, n_genes, **params).input_geometry()
    data = cell_data(inputs, geometry, torch.from_numpy(x), torch.from_numpy(y), pos, [], neighbours=nbr,
                     cell_type=cell_type)
    idx = np.arange(n_cells)
    n_val = max(n_cells // 10, 2)
    seed_everything(0)
    m = create_model(model, dim, n_genes, **params)
    res = fit(m, data, idx[n_val:], idx[:n_val], TrainConfig(max_epochs=epochs, patience=epochs + 1))
    n_params = sum(p.numel() for p in m.parameters())
    mean_neighbours = float((nbr >= 0).sum(1).float().mean()) if nbr is not None else 0.0
    return {"n_cells": n_cells, "train_cells_per_s": round(res.train_cells_per_s), "epochs": res.epochs_run,
            "mean_neighbours": round(mean_neighbours, 1),
            "seconds_total": round(res.seconds, 2), "peak_rss_mb": round(peak_rss_mb(), 1), "parameters": n_params,
            "flops_per_cell_train": flops_per_cell(m, model, dim, n_genes, mean_neighbours)}


def flops_per_cell(m, model: str, dim: int, n_genes: int, mean_neighbours: float) -> int:
    """Training FLOPs per cell (forward + backward ~ 3x forward) of the per-cell work.

    Dense layers cost 2 * in * out per cell. GC-MoE's per-batch terms (the GCN over genes) are spread over
    the batch of 1,024 and left out; its attention costs 2 * K * M * (D + P) per cell for scores and sums.
    """
    import torch

    total = 0
    for mod in m.modules():
        if isinstance(mod, torch.nn.Linear):
            total += 2 * mod.in_features * mod.out_features
    for name, p in m.named_parameters():
        if p.dim() == 3 and not name.startswith("gcn"):  # (K, in, out) expert weights, one product per cell
            total += 2 * p.shape[0] * p.shape[1] * p.shape[2]
    if getattr(m, "c2ca", False):
        k = m.n_experts
        total += 2 * 2 * k * int(round(mean_neighbours)) * (dim + 19)
    if hasattr(m, "gene_bias"):  # expert outputs <w_kg, g_ik> for K experts
        total += 2 * m.n_experts * n_genes * m.ffn.fc2.weight.shape[-1]
    return 3 * total


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
        f"Command: `.venv/bin/python benchmarks/training.py --sizes {' '.join(map(str, args.sizes))} --epochs {args.epochs} --model {args.model}`",
        "",
        f"{args.dim} features, {args.genes} genes, batch 1,024, Adam, CPU; cells/s counts optimisation steps only. "
        "Neighbours (GC-MoE with C2CA): random positions at ~1 cell / 100 um^2, window 64 um, at most 32.",
        "",
        "| cells | train cells/s | epochs | seconds | peak RSS (MiB) | params | train FLOPs/cell | GFLOP/s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    md += [f"| {r['n_cells']:,} | {r['train_cells_per_s']:,} | {r['epochs']} | {r['seconds_total']} | {r['peak_rss_mb']} | "
           f"{r['parameters']:,} | {r['flops_per_cell_train']:,} | {r['train_cells_per_s'] * r['flops_per_cell_train'] / 1e9:.1f} |"
           for r in rows]
    write(f"training_{args.model}", {"model": args.model, "dim": args.dim, "genes": args.genes, "rows": rows}, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
