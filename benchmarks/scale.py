"""GC-MoE training at 100k, 500k and 2M cells: cells/s and peak memory, streaming from a cell store vs in memory.

For each size a cell store (the on-disk format of `gcmoe.training.streaming`: float16 features, float32
targets, neighbour indices, chunked zarr) is written with synthetic data in its own process: cells on a
jittered grid (one slide, 10 um spacing), Z-ordered, C2CA neighbours from the real KD-tree code (64 um
window, M = 32), features N(0, 1) of dimension --dim, targets a linear map of the cell's features and
the mean of its neighbours' features within its chunk, plus noise. Then, in a fresh process per (size, mode), GC-MoE (K = 4 experts, CAP with
random graphs, C2CA) trains --epochs epochs with the shared trainer (batch 1024; 5% of cells for
validation) and the process reports the trainer's training cells/s and its peak resident memory (VmHWM).

Modes: `stream` reads the store in shuffled buffers of 4 chunks (16,384 cells each); `memory` loads
everything into a CellData first (what `gcmoe cv` does today).

Run (alone): .venv/bin/python benchmarks/scale.py [--sizes 100000,500000,2000000] [--modes stream,memory]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import largest_to_smallest, peak_rss_mb, size_args, write  # noqa: E402

GENES = 50
TYPES = 4


def make_store(path: Path, n: int, dim: int, seed: int = 0) -> None:
    import numpy as np

    from gcmoe.features.neighbours import window_neighbours
    from gcmoe.training.streaming import CellStoreWriter, spatial_order

    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n)))
    grid = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)[:n]
    xy = (grid * 10.0 + rng.uniform(-3, 3, size=(n, 2))).astype(np.float32)
    xy = xy[spatial_order(xy)]
    nbr = window_neighbours(xy, 64.0, 32).astype(np.int32)
    w_own = rng.normal(size=(dim, GENES)).astype(np.float32) / np.sqrt(dim)
    w_nbr = rng.normal(size=(dim, GENES)).astype(np.float32) / np.sqrt(dim)
    types = rng.integers(0, TYPES, n)
    writer = CellStoreWriter(path, n, dim, [f"g{i}" for i in range(GENES)], 32, [f"t{i}" for i in range(TYPES)])
    block = writer.chunk
    # features are drawn per chunk from a seeded stream so the writer never holds N x D float32
    for start in range(0, n, block):
        stop = min(n, start + block)
        f = np.random.default_rng([seed, start]).standard_normal((stop - start, dim), dtype=np.float32)
        # the neighbour term uses the neighbours inside the same chunk (the others would need their chunk's draw)
        own_nbr = nbr[start:stop]
        nb_mean = np.zeros((stop - start, dim), np.float32)
        counts = np.maximum((own_nbr >= 0).sum(1, keepdims=True), 1)
        inside = (own_nbr >= start) & (own_nbr < stop)
        rows, cols = np.nonzero(inside)
        np.add.at(nb_mean, rows, f[own_nbr[rows, cols] - start])
        nb_mean /= counts
        y = f @ w_own + 0.5 * nb_mean @ w_nbr + 0.5 * rng.standard_normal((stop - start, GENES), dtype=np.float32)
        writer.append(f, y, own_nbr, xy[start:stop], types[start:stop])
    writer.close()


def train(path: Path, mode: str, epochs: int, threads: int | None, device: str = "cpu", amp: bool = False) -> dict:
    import numpy as np
    import torch

    from gcmoe.config import TrainConfig
    from gcmoe.models.gcmoe import GCMoE
    from gcmoe.training.streaming import CellStore, StreamingCells
    from gcmoe.training.cells import CellData
    from gcmoe.training.trainer import fit

    store = CellStore(path)
    n, dim = store.n_cells, store.meta["feature_dim"]
    rss_start = peak_rss_mb()
    if mode == "stream":
        data = StreamingCells(store, buffer_chunks=4)
    else:
        data = CellData(
            torch.from_numpy(store.rows("features", 0, n).astype(np.float32)),
            torch.from_numpy(store.rows("targets", 0, n)),
            cell_type=torch.from_numpy(store.rows("cell_type", 0, n).astype(np.int64)),
            neighbours=torch.from_numpy(store.rows("neighbours", 0, n).astype(np.int64)),
            positions=torch.from_numpy(store.rows("positions", 0, n)),
        )
    rng = np.random.default_rng(0)
    adjacency = torch.from_numpy((rng.random((TYPES, GENES, GENES)) < 0.1).astype(np.float32))
    adjacency = ((adjacency + adjacency.transpose(1, 2)) > 0).float() * (1 - torch.eye(GENES))
    model = GCMoE(dim, GENES, adjacency=adjacency, n_types=TYPES)
    # validation: 5% of the cells in contiguous store blocks (spatial blocks, as the pipeline carves them)
    block = max(1, n // 200)
    val_blocks = rng.choice(200, size=10, replace=False)
    is_val = np.zeros(n, bool)
    for b in val_blocks:
        is_val[b * block:(b + 1) * block] = True
    config = TrainConfig(max_epochs=epochs, patience=epochs + 1, batch_size=1024, num_threads=threads, device=device,
                         amp=amp)
    t0 = time.perf_counter()
    res = fit(model, data, np.flatnonzero(~is_val), np.flatnonzero(is_val), config)
    return {"cells": n, "dim": dim, "mode": mode, "epochs": res.epochs_run,
            "train_cells_per_s": round(res.train_cells_per_s), "fit_seconds": round(time.perf_counter() - t0, 1),
            "val_pcc": round(res.best_val_pcc, 4), "peak_rss_mb": round(peak_rss_mb()),
            "rss_before_data_mb": round(rss_start), "torch_threads": torch.get_num_threads(), "device": device,
            "amp": amp}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size_args(ap)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="torch device of the training (cpu, cuda)")
    ap.add_argument("--amp", action="store_true", help="automatic mixed precision (train.amp)")
    ap.add_argument("--dir", default="/tmp/gcmoe_scale", help="where the cell stores are written (GBs at 2M cells)")
    ap.add_argument("--name", default="scale")
    ap.add_argument("--_make", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--_train", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._make:
        make_store(Path(args._make[0]), int(args._make[1]), args.dim)
        return
    if args._train:
        print(json.dumps(train(Path(args._train[0]), args._train[1], args.epochs, args.threads, args.device, args.amp)))
        return

    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        path = Path(args.dir) / f"store_{n}_{args.dim}"
        t0 = time.perf_counter()
        if not (path / "meta.json").is_file():
            subprocess.run([sys.executable, __file__, "--dim", str(args.dim), "--_make", str(path), str(n)], check=True)
        made = time.perf_counter() - t0
        for mode in args.modes.split(","):
            cmd = [sys.executable, __file__, "--epochs", str(args.epochs), "--device", args.device,
                   "--_train", str(path), mode] + (["--amp"] if args.amp else [])
            if args.threads:
                cmd[2:2] = ["--threads", str(args.threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            row = json.loads(out) | {"store_seconds": round(made, 1),
                                     "store_mb": round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20)}
            print(row, flush=True)
            rows.append(row)
    lines = ["| cells | mode | training cells/s | peak RSS (MiB) | fit (s) | store on disk (MiB) |", "|---:|---|---:|---:|---:|---:|"]
    lines += [f"| {r['cells']:,} | {r['mode']} | {r['train_cells_per_s']:,} | {r['peak_rss_mb']:,} | {r['fit_seconds']} | "
              f"{r['store_mb']:,} |" for r in rows]
    rss, speed = largest_to_smallest(rows, "peak_rss_mb"), largest_to_smallest(rows, "train_cells_per_s")
    flat = {m: {"peak_rss_ratio_largest_to_smallest": rss[m], "cells_per_s_ratio_largest_to_smallest": speed[m]}
            for m in rss}
    md = ("# Scale: GC-MoE training from a cell store\n\n"
          f"Command: `.venv/bin/python benchmarks/scale.py --sizes {args.sizes} --modes {args.modes} --dim {args.dim} "
          f"--epochs {args.epochs}{' --device ' + args.device if args.device != 'cpu' else ''}{' --amp' if args.amp else ''}` "
          f"({'2 CPU cores' if args.device == 'cpu' else args.device}, run alone). Synthetic cells (see the script's docstring), "
          f"{args.dim}-dim float16 features, 50 genes, GC-MoE with K = 4, M = 32, {args.epochs} epoch(s).\n\n"
          + "\n".join(lines) + "\n\n"
          + "".join(f"- {m}: peak RSS largest/smallest = {v['peak_rss_ratio_largest_to_smallest']}, cells/s "
                    f"largest/smallest = {v['cells_per_s_ratio_largest_to_smallest']}\n" for m, v in sorted(flat.items())))
    write(args.name, {"rows": rows, "ratios": flat, "dim": args.dim, "epochs": args.epochs}, md)


if __name__ == "__main__":
    main()
