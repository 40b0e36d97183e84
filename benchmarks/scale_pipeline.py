"""`gcmoe train` end to end at 100k, 500k and 2M cells: peak memory and wall clock, with and without --stream.

Unlike benchmarks/scale.py (the trainer alone on a ready cell store), this runs the whole job the user runs,
`gcmoe.pipeline.train_model` on Sample .h5ad files: reading the slides, pooling counts, gene selection,
routing labels, the co-expression prior, neighbours, (with --stream) writing the run's cell store slide by
slide, training GC-MoE for --epochs epochs, and saving the model folder.

Data, written once per size in its own process: slides of at most 500k cells (2M cells = 4 slides, like
the paper's 1.7M cells over four slides) on a jittered 10 um grid at 2 um/px with a plain TIFF; --dim
dimensional features N(0, 1) written straight into the feature cache (its real format) for a registered
`synthetic<dim>` encoder, so no image is encoded; 50 genes with Poisson counts whose rates follow a linear
map of the features plus a cell-type offset (4 types in obs["cell_type"]); a 2,000-cell labelled reference.

Each (size, mode) then runs in a fresh process that reports its wall clock, peak resident memory (VmHWM)
and the model's validation PCC.

Run (alone): .venv/bin/python benchmarks/scale_pipeline.py [--sizes 100000,500000,2000000] [--modes stream,memory]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import largest_to_smallest, peak_rss_mb, size_args, write  # noqa: E402

GENES = 50
TYPES = ["neoplastic", "inflammatory", "connective", "epithelial"]
MAX_SLIDE = 500_000
MPP = 2.0


def register(dim: int) -> str:
    """Register the synthetic encoder (its features only ever come from the cache) and return its name."""
    from gcmoe.features import Encoder, EncoderConfig, register_encoder

    name = f"synthetic{dim}"

    class Synthetic(Encoder):
        def forward_features(self, x):
            raise RuntimeError("the synthetic encoder's features are pre-written to the cache")

    @register_encoder(name)
    def factory(tile_size: int = 256) -> Encoder:
        return Synthetic(EncoderConfig(name=name, target_mpp=MPP, tile_size=tile_size, stride=16, feature_dim=dim,
                                       margin=16, align=16))

    return name


def make(root: Path, n: int, dim: int) -> None:
    import numpy as np
    import scipy.sparse as sp
    from anndata import AnnData

    from gcmoe.data.sample import Sample
    from gcmoe.features import create_encoder
    from gcmoe.features.cache import FeatureCache

    encoder = create_encoder(register(dim))
    rng = np.random.default_rng(0)
    w = rng.normal(size=(dim, GENES)).astype(np.float32) * (1.5 / np.sqrt(dim))
    offsets = rng.normal(size=(len(TYPES), GENES)).astype(np.float32)
    n_slides = -(-n // MAX_SLIDE)
    for k in range(n_slides):
        m = n // n_slides + (k < n % n_slides)
        side = int(np.ceil(np.sqrt(m)))
        grid = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)[:m]
        xy_um = grid * 10.0 + 10.0 + rng.uniform(-3, 3, size=(m, 2))
        size = int(np.ceil((side * 10.0 + 20.0) / MPP))
        image = np.full((size, size, 3), (235, 180, 210), np.uint8)
        feats = rng.standard_normal((m, dim), dtype=np.float32)
        types = rng.integers(0, len(TYPES), m)
        rate = np.exp(np.clip(feats @ w + offsets[types], -4, 4))
        counts = sp.csr_matrix(rng.poisson(rate).astype(np.float32))
        sample = Sample.from_arrays(counts, xy_um / MPP, image, MPP, [f"G{i:02d}" for i in range(GENES)],
                                    f"slide{k}", cell_type=np.array(TYPES)[types])
        path = sample.write(root / f"slide{k}.h5ad")
        FeatureCache(root / "cache").save(Sample.read(path), encoder.config, feats)
    ref_types = rng.integers(0, len(TYPES), 2000)
    ref_rate = np.exp(np.clip(rng.standard_normal((2000, dim), dtype=np.float32) @ w + offsets[ref_types], -4, 4))
    ref = AnnData(X=sp.csr_matrix(rng.poisson(ref_rate).astype(np.float32)))
    ref.var_names = [f"G{i:02d}" for i in range(GENES)]
    ref.obs["cell_type"] = np.array(TYPES)[ref_types]
    ref.write_h5ad(root / "reference.h5ad")


def run(root: Path, mode: str, dim: int, epochs: int) -> dict:
    from gcmoe.config import RunConfig
    from gcmoe.pipeline import train_model
    from gcmoe.training.checkpoint import load_model

    register(dim)
    cfg = RunConfig(out=str(root / f"out_{mode}"), models=["gcmoe"])
    cfg.data.source = "samples"
    cfg.data.samples = sorted(str(p) for p in root.glob("slide*.h5ad"))
    cfg.data.reference = str(root / "reference.h5ad")
    cfg.features.encoder = f"synthetic{dim}"
    cfg.features.cache_dir = str(root / "cache")
    cfg.train.max_epochs = epochs
    cfg.train.patience = epochs + 1
    cfg.train.stream = mode == "stream"
    cfg.targets.n_top_genes = GENES
    t0 = time.perf_counter()
    folder = train_model(cfg, "gcmoe", progress=False)
    seconds = time.perf_counter() - t0
    _, meta = load_model(folder)
    return {"cells": int(meta["training_data"]["n_cells"]), "slides": len(cfg.data.samples), "mode": mode,
            "seconds": round(seconds, 1), "peak_rss_mb": round(peak_rss_mb()),
            "val_pcc": round(meta["metrics"]["val_pcc"], 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size_args(ap)
    ap.add_argument("--dir", default="/tmp/gcmoe_scale_pipeline", help="where the slides and runs go (GBs at 2M)")
    ap.add_argument("--name", default="scale_pipeline")
    ap.add_argument("--_make", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--_run", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._make:
        make(Path(args._make[0]), int(args._make[1]), args.dim)
        return
    if args._run:
        print(json.dumps(run(Path(args._run[0]), args._run[1], args.dim, args.epochs)))
        return

    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        root = Path(args.dir) / f"cells_{n}_{args.dim}"
        if not (root / "reference.h5ad").is_file():
            subprocess.run([sys.executable, __file__, "--dim", str(args.dim), "--_make", str(root), str(n)], check=True)
        for mode in args.modes.split(","):
            for derived in ("cells", "neighbours"):  # every run builds its own store and neighbours
                shutil.rmtree(root / "cache" / derived, ignore_errors=True)
            shutil.rmtree(root / f"out_{mode}", ignore_errors=True)
            cmd = [sys.executable, __file__, "--dim", str(args.dim), "--epochs", str(args.epochs), "--_run", str(root), mode]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            row = json.loads(out)
            print(row, flush=True)
            rows.append(row)
    lines = ["| cells | slides | mode | peak RSS (MiB) | wall clock (s) | val PCC |", "|---:|---:|---|---:|---:|---:|"]
    lines += [f"| {r['cells']:,} | {r['slides']} | {r['mode']} | {r['peak_rss_mb']:,} | {r['seconds']} | {r['val_pcc']} |"
              for r in rows]
    ratios = largest_to_smallest(rows, "peak_rss_mb")
    md = ("# Scale: `gcmoe train` end to end, in memory and with --stream\n\n"
          f"Command: `.venv/bin/python benchmarks/scale_pipeline.py --sizes {args.sizes} --modes {args.modes} "
          f"--dim {args.dim} --epochs {args.epochs}` (2 CPU cores, run alone). GC-MoE, {args.dim}-dim features "
          f"pre-written to the feature cache, 50 genes, slides of at most {MAX_SLIDE:,} cells, {args.epochs} "
          "epoch(s); the wall clock covers the whole job (see the script's docstring).\n\n"
          + "\n".join(lines) + "\n\n"
          + "".join(f"- {m}: peak RSS largest/smallest = {v}\n" for m, v in ratios.items()))
    write(args.name, {"rows": rows, "ratios": ratios, "dim": args.dim, "epochs": args.epochs}, md)


if __name__ == "__main__":
    main()
