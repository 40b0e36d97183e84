"""Speed and memory of cell-feature extraction with the morphology encoder (2 CPU threads).

On a synthetic H&E slide (the package's virtual tissue when available, else a painted one: tumour nests,
lymphocyte aggregates, fibrous stroma with spindle nuclei, white lumens) written to a tiled TIFF and
read back lazily, this measures: encoder-input megapixels per second, slide megapixels per second, cells
per second, encoder tile passes per cell, peak resident memory, and the time of a cache hit.

Run: .venv/bin/python benchmarks/features.py [--size 3072] [--threads 2] [--source auto|virtual|painted]
     .venv/bin/python benchmarks/features.py --calibrate   # print the morphology channels' raw statistics
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import peak_rss_mb  # noqa: E402
from _common import write  # noqa: E402


RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])


def painted_slide(size: int, seed: int = 0, mpp: float = 0.5):
    """A painted H&E slide of size x size pixels at ``mpp`` with its cell centres (a Sample)."""
    from scipy import ndimage

    from gcmoe.data.sample import Sample

    rng = np.random.default_rng(seed)
    h = w = size
    um = 1.0 / mpp  # pixels per micrometre

    def field(sigma_um: float) -> np.ndarray:
        f = ndimage.gaussian_filter(rng.standard_normal((h // 8, w // 8)), sigma_um * um / 8)
        f = (f - f.mean()) / (f.std() + 1e-12)
        return ndimage.zoom(f, 8, order=1)[:h, :w]

    tumour = field(60) > 0.5
    lymph = (field(40) > 1.0) & ~tumour
    lumen = np.zeros((h, w), bool)
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(int(6 * size * size / 2048**2)):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        r = rng.uniform(15, 40) * um
        lumen |= (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
    fibre = ndimage.gaussian_filter(rng.standard_normal((h, w)), (1.0 * um, 6.0 * um))
    conc_e = 0.30 + 2.0 * fibre + 0.03 * rng.standard_normal((h, w))
    conc_e[tumour] = 0.22 + 0.03 * rng.standard_normal(int(tumour.sum()))
    conc_h = np.full((h, w), 0.04)
    conc_h[tumour] = 0.12
    conc_e[lumen], conc_h[lumen] = 0.0, 0.0
    del fibre, yy, xx

    def jittered(spacing_um: float, mask: np.ndarray) -> np.ndarray:
        s = spacing_um * um
        gy, gx = np.mgrid[s / 2 : h : s, s / 2 : w : s]
        pts = np.column_stack([gx.ravel(), gy.ravel()]) + rng.uniform(-0.35 * s, 0.35 * s, (gx.size, 2))
        pts = pts[(pts[:, 0] >= 0) & (pts[:, 0] < w) & (pts[:, 1] >= 0) & (pts[:, 1] < h)]
        return pts[mask[pts[:, 1].astype(int), pts[:, 0].astype(int)]]

    kinds = [  # (centres, semi-axis a um, b/a, H concentration)
        (jittered(13.0, tumour & ~lumen), (5.0, 7.0), (0.7, 1.0), (0.55, 0.95)),
        (jittered(8.0, lymph & ~lumen), (2.5, 3.5), (0.85, 1.0), (0.95, 1.3)),
        (jittered(26.0, ~tumour & ~lymph & ~lumen), (5.0, 8.0), (0.25, 0.4), (0.6, 0.85)),
    ]
    centres = []
    for pts, a_rng, ratio_rng, h_rng in kinds:
        for x, y in pts:
            a = rng.uniform(*a_rng) * um
            b = a * rng.uniform(*ratio_rng)
            theta, ch = rng.uniform(0, np.pi), rng.uniform(*h_rng)
            x0, x1 = int(max(x - a - 2, 0)), int(min(x + a + 3, w))
            y0, y1 = int(max(y - a - 2, 0)), int(min(y + a + 3, h))
            py, px = np.mgrid[y0:y1, x0:x1] + 0.5
            u = (px - x) * np.cos(theta) + (py - y) * np.sin(theta)
            v = -(px - x) * np.sin(theta) + (py - y) * np.cos(theta)
            alpha = np.clip((1.0 - np.hypot(u / a, v / b)) * b + 0.5, 0.0, 1.0)
            chromatin = ch * (1 + 0.15 * rng.standard_normal(alpha.shape))
            conc_h[y0:y1, x0:x1] = (1 - alpha) * conc_h[y0:y1, x0:x1] + alpha * chromatin
            conc_e[y0:y1, x0:x1] = (1 - alpha) * conc_e[y0:y1, x0:x1] + alpha * 0.08
            centres.append((x, y))
    od = np.clip(conc_h, 0, None)[..., None] * RGB_FROM_HED[0] + np.clip(conc_e, 0, None)[..., None] * RGB_FROM_HED[1]
    image = np.clip(np.round(255 * np.exp(-od) + rng.normal(0, 2.0, od.shape)), 0, 255).astype(np.uint8)
    xy = np.array(centres)
    counts = np.ones((len(xy), 1), dtype=np.int64)
    return Sample.from_arrays(counts, xy, image, mpp=mpp, genes=["g0"], sample_id=f"painted_{size}_{seed}")


def virtual_slide(size: int, seed: int = 0):
    from gcmoe.config import TissueConfig
    from gcmoe.data.virtual_tissue import simulate_tissue

    n_cells = int(10_000 * (size / 2400) ** 2)
    return simulate_tissue(TissueConfig(seed=seed, n_cells=n_cells, height=size, width=size)).sample


def make_slide(source: str, size: int):
    if source in ("auto", "virtual"):
        try:
            return virtual_slide(size), "virtual tissue (gcmoe.data.virtual_tissue)"
        except ImportError:
            if source == "virtual":
                raise
    return painted_slide(size), "painted synthetic H&E (benchmarks/features.py)"


def calibrate(sample) -> None:
    """Print median and robust spread of each raw morphology channel at cell centres and random points."""
    import torch

    from gcmoe.features import create_encoder
    from gcmoe.features.sampling import sample_feature_map

    enc = create_encoder("morphology")
    h, w = sample.image.shape
    size = min(h, w) // 4 * 4
    x = torch.from_numpy(sample.image.read_region(0, 0, size, size)).permute(2, 0, 1).float().div(255)[None]
    with torch.inference_mode():
        raw = enc.raw_features(x)[0]
    rng = np.random.default_rng(0)
    xy = sample.spatial
    xy = xy[(xy < size).all(axis=1)]
    pts = np.concatenate([xy, rng.uniform(0, size, (len(xy), 2))])
    vals = sample_feature_map(raw, pts, 4).numpy()
    for name, col in zip(enc.channel_names, vals.T):
        q10, q50, q90 = np.percentile(col, [10, 50, 90])
        spread = max((q90 - q10) / 2.56, 1e-6)
        print(f'    ("{name}", {q50:.3g}, {spread:.3g}),  # mean {col.mean():.3g} sd {col.std():.3g}')


def run(path: str, threads: int, batch_size: int) -> dict:
    """Extraction on the Sample written at ``path``, in this (fresh) process; returns the measurements."""
    import torch

    from gcmoe.data.sample import Sample
    from gcmoe.config import FeatureConfig
    from gcmoe.features import create_encoder, extract_features_with_stats

    torch.set_num_threads(threads)
    sample = Sample.read(path)  # the image is a tiled TIFF, read lazily tile by tile
    encoder = create_encoder("morphology")
    rss_loaded = peak_rss_mb()
    with torch.inference_mode():  # warm-up: oneDNN builds its kernels on the first call of each shape
        encoder(torch.ones(batch_size, 3, encoder.config.tile_size, encoder.config.tile_size))
    rss_before = peak_rss_mb()
    _, cold = extract_features_with_stats(sample, FeatureConfig(batch_size=batch_size), encoder=encoder, progress=False)
    warm = [extract_features_with_stats(sample, FeatureConfig(batch_size=batch_size), encoder=encoder, progress=False) for _ in range(3)]
    features, stats = sorted(warm, key=lambda r: r.stats.seconds)[1]  # the median of three
    rss_after = peak_rss_mb()
    cache = Path(path).parent / "cache"
    _, miss = extract_features_with_stats(sample, FeatureConfig(cache_dir=cache, batch_size=batch_size), encoder=encoder, progress=False)
    hits = []
    for _ in range(3):
        cached, hit = extract_features_with_stats(sample, FeatureConfig(cache_dir=cache), encoder=encoder, progress=False)
        hits.append(hit.seconds)
    if not (hit.cache_hit and cached.shape == features.shape):
        raise RuntimeError("the cache did not hit")
    cache_mb = sum(p.stat().st_size for p in Path(hit.cache_path).rglob("*") if p.is_file()) / 2**20
    return {
        "extraction": stats.to_dict(),
        "extraction_cold": cold.to_dict(),
        "extraction_seconds_warm": [round(r.stats.seconds, 3) for r in warm],
        "feature_abs_mean": float(np.abs(features).mean()),
        "peak_rss_mb": {"slide_opened": round(rss_loaded, 1), "after_warm_up": round(rss_before, 1),
                        "after_extraction": round(rss_after, 1)},
        "cache": {"write_seconds": round(miss.seconds, 3), "hit_seconds_best": round(min(hits), 4),
                  "hit_seconds": [round(s, 4) for s in hits], "size_mb": round(cache_mb, 2)},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=3072, help="slide side, pixels at 0.5 um/px")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--source", choices=["auto", "virtual", "painted"], default="auto")
    ap.add_argument("--calibrate", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--run", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run:
        print(json.dumps(run(args.run, args.threads, args.batch_size)))
        return

    t = time.perf_counter()
    sample, source = make_slide(args.source, args.size)
    seconds_make = time.perf_counter() - t
    if args.calibrate:
        calibrate(sample)
        return
    from gcmoe.features import create_encoder

    config = create_encoder("morphology").config
    with tempfile.TemporaryDirectory() as tmp:
        path = sample.write(Path(tmp) / "slide.h5ad")
        cmd = [sys.executable, __file__, "--run", str(path), "--threads", str(args.threads),
               "--batch-size", str(args.batch_size)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    stats = r["extraction"]
    height, width = sample.image.shape
    slide_mp = height * width / 1e6
    area_mm2 = slide_mp * 1e6 * sample.mpp**2 / 1e6
    result = {
        "source": source,
        "slide": {"height": height, "width": width, "mpp": sample.mpp, "megapixels": round(slide_mp, 2),
                  "cells": sample.n_cells, "cells_per_mm2": round(sample.n_cells / area_mm2)},
        "encoder": config.to_dict(),
        "threads": args.threads,
        "batch_size": args.batch_size,
        "seconds_make_slide": round(seconds_make, 2),
        "encoder_megapixels_per_s": round(stats["megapixels_encoded"] / stats["seconds"], 2),
        "slide_megapixels_per_s": round(slide_mp / stats["seconds"], 2),
        "cells_per_s": round(stats["n_cells"] / stats["seconds"]),
        "cold_slide_megapixels_per_s": round(slide_mp / r["extraction_cold"]["seconds"], 2),
        "tiles_per_cell": round(stats["tiles_per_cell"], 5),
        **r,
    }
    peak = r["peak_rss_mb"]
    cache = r["cache"]
    cmd = f".venv/bin/python benchmarks/features.py --size {args.size} --threads {args.threads} --source {args.source}"
    md = "\n".join([
        "# Feature extraction: morphology encoder",
        "",
        f"Command: `{cmd}`",
        "",
        f"Slide: {source}, {width} x {height} px at {sample.mpp} um/px ({slide_mp:.1f} Mpx, {area_mm2:.2f} mm2), "
        f"{sample.n_cells:,} cells ({result['slide']['cells_per_mm2']:,} per mm2), read lazily from a tiled TIFF. "
        f"Encoder: `morphology` ({config.feature_dim} channels, stride {config.stride}, tile "
        f"{stats['tile_size']} px, margin {config.margin} px); {args.threads} torch threads, batches of "
        f"{args.batch_size} tiles, CPU; extraction in a fresh process after one warm-up encoder pass. Figures are "
        "the median of three extractions after a first, cold one (which also pays for first TIFF reads; its "
        "seconds are in the last rows).",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| encoder-input megapixels / s (tiles incl. overlap) | {result['encoder_megapixels_per_s']} |",
        f"| slide megapixels / s (end to end) | {result['slide_megapixels_per_s']} |",
        f"| cells / s | {result['cells_per_s']:,} |",
        f"| tiles run / tiles in grid | {stats['tiles_run']} / {stats['tiles_total']} |",
        f"| encoder tile passes per cell (tiles run / cells) | {result['tiles_per_cell']} |",
        f"| extraction seconds: total (read + resize in a background thread / encode + sample) | "
        f"{stats['seconds']:.2f} ({stats['seconds_read']:.2f} / {stats['seconds_encode']:.2f}) |",
        f"| peak RSS, MiB: slide opened / after warm-up / after extraction | "
        f"{peak['slide_opened']:.0f} / {peak['after_warm_up']:.0f} / {peak['after_extraction']:.0f} |",
        f"| first (cold) extraction: seconds, slide megapixels / s | {r['extraction_cold']['seconds']:.2f}, "
        f"{result['cold_slide_megapixels_per_s']} |",
        f"| cache miss (extraction + float16 zarr write), seconds | {cache['write_seconds']:.2f} |",
        f"| cache hit (read + checksum), seconds, best of 3 | {cache['hit_seconds_best']:.4f} |",
        f"| cache entry size, MiB | {cache['size_mb']:.2f} |",
        "",
    ])
    write("features", result, md)


if __name__ == "__main__":
    main()
