"""Transcript aggregation (HEST-1k / 10x Xenium readers): transcripts/s and peak memory at 5M and 20M transcripts.

A transcripts parquet in the Xenium layout (feature_name, cell_id, qv, he_x, he_y; 1M-row groups; 313 panel
genes plus negative-control and blank features; 5% unassigned, qv ~ U(10, 40)) is written in its own process,
then `gcmoe.data.readers.transcripts.aggregate_transcripts` counts it per cell (assignment by cell_id) in a
fresh process that reports its wall clock and peak resident memory (VmHWM).

Run (alone): .venv/bin/python benchmarks/transcripts.py [--sizes 5000000,20000000] [--cells 200000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import peak_rss_mb, write  # noqa: E402

GROUP = 1_000_000


def make(path: Path, n: int, cells: int) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    genes = [f"GENE{i:03d}" for i in range(313)] + [f"NegControlProbe_{i:02d}" for i in range(20)] + [
        f"BLANK_{i:04d}" for i in range(20)]
    names = np.array(genes)
    ids = np.array([f"cell_{i:07d}" for i in range(cells)] + ["UNASSIGNED"])
    rng = np.random.default_rng(0)
    tmp = path.with_name(f".{path.name}.tmp")
    with pq.ParquetWriter(tmp, pa.schema([("feature_name", pa.string()), ("cell_id", pa.string()),
                                          ("qv", pa.float32()), ("he_x", pa.float32()), ("he_y", pa.float32())])) as w:
        for start in range(0, n, GROUP):
            m = min(GROUP, n - start)
            cell = np.where(rng.random(m) < 0.05, cells, rng.integers(0, cells, m))
            w.write_table(pa.table({
                "feature_name": names[rng.integers(0, len(genes), m)],
                "cell_id": ids[cell], "qv": rng.uniform(10, 40, m).astype(np.float32),
                "he_x": rng.uniform(0, 40_000, m).astype(np.float32), "he_y": rng.uniform(0, 40_000, m).astype(np.float32),
            }))
    tmp.replace(path)


def aggregate(path: Path) -> dict:
    from gcmoe.data.readers.transcripts import aggregate_transcripts

    t0 = time.perf_counter()
    counts = aggregate_transcripts(path, assign="cell_id", progress=False)
    seconds = time.perf_counter() - t0
    matrix = counts.counts
    return {"seconds": round(seconds, 1), "peak_rss_mb": round(peak_rss_mb()), "nnz": int(matrix.nnz),
            "shape": list(matrix.shape), "total": int(matrix.sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="5000000,20000000")
    ap.add_argument("--cells", type=int, default=200_000)
    ap.add_argument("--dir", default="/tmp/gcmoe_transcripts")
    ap.add_argument("--_make", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--_aggregate", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._make:
        make(Path(args._make[0]), int(args._make[1]), args.cells)
        return
    if args._aggregate:
        print(json.dumps(aggregate(Path(args._aggregate))))
        return
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        path = Path(args.dir) / f"transcripts_{n}_{args.cells}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.is_file():
            subprocess.run([sys.executable, __file__, "--cells", str(args.cells), "--_make", str(path), str(n)], check=True)
        out = subprocess.run([sys.executable, __file__, "--_aggregate", str(path)], check=True, capture_output=True,
                             text=True).stdout.strip().splitlines()[-1]
        row = {"transcripts": n, "cells": args.cells, "file_mb": round(path.stat().st_size / 2**20)} | json.loads(out)
        row["transcripts_per_s"] = round(n / row["seconds"])
        print(row, flush=True)
        rows.append(row)
    lines = ["| transcripts | file (MiB) | seconds | transcripts/s | peak RSS (MiB) | cells x genes kept | counts kept |",
             "|---:|---:|---:|---:|---:|---|---:|"]
    lines += [f"| {r['transcripts']:,} | {r['file_mb']:,} | {r['seconds']} | {r['transcripts_per_s']:,} | "
              f"{r['peak_rss_mb']:,} | {r['shape'][0]:,} x {r['shape'][1]} | {r['total']:,} |" for r in rows]
    md = ("# Transcript aggregation\n\n"
          f"Command: `.venv/bin/python benchmarks/transcripts.py --sizes {args.sizes} --cells {args.cells}` (2 CPU "
          "cores, run alone). Synthetic Xenium-layout parquet (see the script), assignment by cell_id, qv >= 20, "
          "controls and unassigned dropped.\n\n" + "\n".join(lines) + "\n")
    write("transcripts", {"rows": rows}, md)


if __name__ == "__main__":
    main()
