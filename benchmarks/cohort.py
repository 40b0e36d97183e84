"""`gcmoe predict --slides` on a synthetic cohort of virtual whole slides: throughput, tissue-only reading,
peak memory against slide size, and a rerun after kill -9.

Slides: --slides virtual whole slides of --size px a side at 0.25 um/px, written as JPEG-compressed, tiled
(512 px), pyramidal BigTIFFs (levels down to 1/32), as a scanner exports them. Tissue covers about 30% of the
area: a smooth random field (correlation length about 1 mm) thresholded at its 70th percentile, filled with a
2048 px virtual-tissue patch (gcmoe.data.virtual_tissue at 0.25 um/px, repeated); glass elsewhere (pale grey
with noise). The model is a GC-MoE trained for one epoch on a small virtual tissue at 0.5 um/px (so the slides
are resampled 2x, as a 40x scan is for a 20x model); nuclei are detected on the tissue (no cell files).

Measured, each in a fresh process (`gcmoe.cohort.predict_cohort`, the library call behind the command):
1. the whole cohort: wall clock (slides per hour, cells per second), peak RSS;
2. background skipped: detection tiles (2048 px) that hold no tissue in the truth and that the run did not
   read, over all such tiles; and encoder tiles read over the encoder grid;
3. peak RSS of one slide of each of --rss-sizes px a side;
4. a cohort of 2 slides killed (SIGKILL) while predicting the second, then rerun: which slides the rerun
   predicts.

Run: python benchmarks/cohort.py                 # 4 slides of 40,000 px, RSS at 10k, 20k, 40k (long)
     python benchmarks/cohort.py --quick         # 4 slides of 8,000 px, RSS at 4k, 8k, 16k (minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import peak_rss_mb, write  # noqa: E402

MPP = 0.25
TILE = 512
PATCH = 2048
FIELD_PX = 256  # full-resolution pixels per cell of the tissue field
TISSUE_SHARE = 0.30
DETECT_TILE = 2048


def tissue_field(side: int, seed: int) -> tuple:
    """The slide's smooth random field (one value per FIELD_PX px) and the threshold leaving TISSUE_SHARE above it."""
    import numpy as np
    from scipy import ndimage as ndi

    n = -(-side // FIELD_PX) + 2
    rng = np.random.default_rng(seed)
    field = ndi.gaussian_filter(rng.standard_normal((n, n)), sigma=max(1000 / (FIELD_PX * MPP) / 2, 1.0))
    core = field[: -(-side // FIELD_PX), : -(-side // FIELD_PX)]
    return field, float(np.quantile(core, 1 - TISSUE_SHARE))


def truth_mask(field, threshold: float, x0: int, y0: int, w: int, h: int, scale: int = 1):
    """Tissue (bool, h x w) of the region at level ``scale`` (full-resolution origin x0, y0; size at that level)."""
    import numpy as np
    from scipy import ndimage as ndi

    ys = (y0 + (np.arange(h) + 0.5) * scale) / FIELD_PX - 0.5
    xs = (x0 + (np.arange(w) + 0.5) * scale) / FIELD_PX - 0.5
    grid = np.meshgrid(np.clip(ys, 0, None), np.clip(xs, 0, None), indexing="ij")
    return ndi.map_coordinates(field, grid, order=1, mode="nearest") > threshold


def write_slide(path: Path, side: int, seed: int, patch) -> dict:
    """A JPEG-compressed pyramidal tiled BigTIFF of ``side`` px; returns its facts (tissue share, seconds)."""
    import numpy as np
    import tifffile

    start = time.perf_counter()
    field, threshold = tissue_field(side, seed)
    rng = np.random.default_rng(seed)
    glass = (np.array([236, 234, 238], np.uint8) + rng.integers(0, 4, (TILE, TILE, 3), dtype=np.uint8))
    levels = [1]
    while side // (levels[-1] * 2) >= TILE and levels[-1] < 32:
        levels.append(levels[-1] * 2)
    tissue_px = [0]

    def tiles(scale: int):
        size = -(-side // scale)
        sub = patch[::scale, ::scale]
        p = sub.shape[0]
        for y in range(0, size, TILE):
            for x in range(0, size, TILE):
                mask = truth_mask(field, threshold, x * scale, y * scale, TILE, TILE, scale)
                out = glass.copy()
                if mask.any():
                    ys = (np.arange(y, y + TILE) % p)[:, None]
                    xs = (np.arange(x, x + TILE) % p)[None, :]
                    out[mask] = sub[ys, xs][mask]
                    if scale == 1:
                        inside = mask[: min(TILE, size - y), : min(TILE, size - x)]
                        tissue_px[0] += int(inside.sum())
                yield out

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    per_cm = 1e4 / MPP
    with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        for i, scale in enumerate(levels):
            size = -(-side // scale)
            kwargs = dict(subifds=len(levels) - 1, resolution=(per_cm, per_cm), resolutionunit="CENTIMETER") if i == 0 \
                else dict(subfiletype=1)
            tw.write(tiles(scale), shape=(size, size, 3), dtype=np.uint8, tile=(TILE, TILE), compression="jpeg",
                     compressionargs={"level": 85}, photometric="rgb", **kwargs)
    os.replace(tmp, path)
    return {"side": side, "tissue_share": tissue_px[0] / side**2, "bytes": path.stat().st_size,
            "seconds_write": time.perf_counter() - start}


def make_patch(seed: int = 0):
    from gcmoe.config import TissueConfig
    from gcmoe.data.virtual_tissue import simulate_tissue

    # about 7,000 cells per mm2 as the default virtual tissue: 0.26 mm2 at 0.25 um/px
    vt = simulate_tissue(TissueConfig(n_cells=1800, height=PATCH, width=PATCH, mpp=MPP, n_genes=60,
                                      n_reference_cells=200, seed=seed))
    return vt.sample.image.read_region(0, 0, PATCH, PATCH)


def train(root: Path) -> Path:
    from gcmoe.config import RunConfig, TissueConfig
    from gcmoe.pipeline import train_model

    cfg = RunConfig(out=str(root / "train"))
    cfg.data.tissue = TissueConfig(n_cells=800, height=600, width=600, n_genes=60, n_reference_cells=300, seed=1)
    cfg.train.max_epochs = 1
    cfg.targets.n_top_genes = 20
    return train_model(cfg, "gcmoe", progress=False)


def child(args) -> None:
    """Run one cohort in this process and print what it did as JSON (last line)."""
    from gcmoe.cohort import list_slides, predict_cohort
    from gcmoe.data.detection import detection_tiles
    from gcmoe.data.image import open_image
    from gcmoe.tissue import detect_tissue

    start = time.perf_counter()
    jobs = list_slides(args.child_slides)
    result = predict_cohort(args.child_model, jobs, args.child_out, progress=False)
    seconds = time.perf_counter() - start
    rss = peak_rss_mb()
    report = {"seconds": seconds, "peak_rss_mb": rss, "done": result.done, "skipped": result.skipped,
              "failed": result.failed, "slides": []}
    for job in jobs:
        summary_path = Path(args.child_out) / "slides" / job.slide_id / "summary.json"
        if not summary_path.is_file():
            continue
        s = json.loads(summary_path.read_text())
        facts = json.loads(Path(str(job.slide) + ".json").read_text())
        image = open_image(job.slide)
        mask = detect_tissue(image, MPP)  # deterministic: the mask the run used
        read = set(detection_tiles(image.shape, DETECT_TILE, mask))
        field, threshold = tissue_field(facts["side"], facts["seed"])
        background = [t for t in detection_tiles(image.shape, DETECT_TILE)
                      if not truth_mask(field, threshold, t[0], t[1], DETECT_TILE // 16, DETECT_TILE // 16, 16).any()]
        report["slides"].append({
            "slide_id": job.slide_id, "side": facts["side"], "n_cells": s["n_cells"],
            "tissue_share_truth": facts["tissue_share"], "tissue_fraction_mask": s["qc"]["tissue_fraction"],
            "detection_tiles_total": s["qc"]["detection_tiles_total"],
            "detection_tiles_read": s["qc"]["detection_tiles_read"],
            "background_tiles": len(background), "background_tiles_read": len(read & set(background)),
            "feature_tiles_total": s["qc"]["feature_tiles_total"], "feature_tiles_read": s["qc"]["feature_tiles_read"],
            "seconds": s["seconds"]})
    print(json.dumps(report))


def run_child(model: Path, slides: str, out: Path, kill_after=None) -> dict:
    cmd = [sys.executable, __file__, "--child-model", str(model), "--child-slides", slides, "--child-out", str(out)]
    env = os.environ | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if kill_after is None:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-3000:])
        return json.loads(proc.stdout.strip().splitlines()[-1])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    while not kill_after() and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return {"killed": True}


def rss_only(args, name: str, model: Path, slide, sizes: list[int]) -> None:
    """Peak RSS of one slide per size, each in a fresh process; results rewritten after each size."""
    rows = []
    for side in sizes:
        kept = Path(args.root) / f"rss_row_{side}.json"  # a size measured by an earlier call is not run again
        if kept.is_file():
            rows.append(json.loads(kept.read_text()))
        else:
            path = slide(f"rss_{side}", side, 100)
            run = run_child(model, str(path.parent), Path(args.root) / f"rss_out_{side}")
            s = run["slides"][0]
            rows.append({"side": side, "peak_rss_mb": run["peak_rss_mb"], "n_cells": s["n_cells"],
                         "seconds": run["seconds"], "background_tiles": s["background_tiles"],
                         "background_tiles_read": s["background_tiles_read"],
                         "detection_tiles_read": s["detection_tiles_read"],
                         "detection_tiles_total": s["detection_tiles_total"]})
            kept.write_text(json.dumps(rows[-1]))
        ratio = rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]
        md = ["# Cohort prediction: peak RSS of one virtual whole slide by size (`gcmoe predict --slides`)", "",
              f"Command: `python benchmarks/cohort.py --rss-only --rss-sizes {args.rss_sizes}`", "",
              f"Machine: {os.cpu_count()} CPU cores, **shared** with other jobs while this ran (timings are upper "
              "bounds); OMP_NUM_THREADS=1. One slide per size at 0.25 um/px, JPEG pyramidal BigTIFF, about 30% "
              "tissue, nuclei detected on the tissue; each in a fresh process.", "",
              "| side px | cells | peak RSS MiB | s | detection tiles read | background tiles skipped |",
              "|---:|---:|---:|---:|---:|---:|"]
        md += [f"| {r['side']:,} | {r['n_cells']:,} | {r['peak_rss_mb']:.0f} | {r['seconds']:.0f} | "
               f"{r['detection_tiles_read']} of {r['detection_tiles_total']} | "
               f"{r['background_tiles'] - r['background_tiles_read']} of {r['background_tiles']} |" for r in rows]
        md += ["", f"Largest over smallest: {ratio:.2f}x (target <= 1.5x).", "",
               "A size measured by an earlier call with the same --root is reused, not run again "
               "(ROOT/rss_row_<side>.json)."]
        write(name, {"rss": rows, "rss_ratio_largest_smallest": ratio, "sizes_planned": sizes}, "\n".join(md) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=40_000, help="side of the cohort's slides, px")
    ap.add_argument("--slides", type=int, default=4)
    ap.add_argument("--rss-sizes", default="10000,20000,40000")
    ap.add_argument("--quick", action="store_true", help="--size 8000 --rss-sizes 4000,8000,16000")
    ap.add_argument("--rss-only", action="store_true",
                    help="only the peak RSS of one slide per --rss-sizes (results written after each size)")
    ap.add_argument("--root", default="/tmp/gcmoe_cohort_bench")
    ap.add_argument("--name", default=None, help="results name (default cohort, or cohort_quick)")
    ap.add_argument("--child-model")
    ap.add_argument("--child-slides")
    ap.add_argument("--child-out")
    args = ap.parse_args()
    if args.child_model:
        return child(args)
    if args.quick:
        args.size, args.rss_sizes = 8000, "4000,8000,16000"
    name = args.name or ("cohort_quick" if args.quick else "cohort")
    rss_sizes = [int(s) for s in args.rss_sizes.split(",")]
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    model = train(root)
    seconds_train = time.perf_counter() - t
    patch = make_patch()

    def slide(folder: str, side: int, seed: int) -> Path:
        path = root / folder / f"slide{seed}_{side}.tif"
        if not path.is_file():
            facts = write_slide(path, side, seed, patch) | {"seed": seed}
            Path(str(path) + ".json").write_text(json.dumps(facts))
        return path

    if args.rss_only:
        return rss_only(args, name + "_rss", model, slide, rss_sizes)
    cohort = [slide("cohort", args.size, seed) for seed in range(args.slides)]
    writes = [json.loads(Path(str(p) + ".json").read_text()) for p in cohort]
    # 1 + 2: the whole cohort
    main_run = run_child(model, str(root / "cohort"), root / f"out_{args.size}")
    cells = sum(s["n_cells"] for s in main_run["slides"])
    background = sum(s["background_tiles"] for s in main_run["slides"])
    background_read = sum(s["background_tiles_read"] for s in main_run["slides"])
    skipped = 1 - background_read / background if background else float("nan")
    feat_total = sum(s["feature_tiles_total"] for s in main_run["slides"])
    feat_read = sum(s["feature_tiles_read"] for s in main_run["slides"])
    # 3: one slide per size
    rss = []
    for side in rss_sizes:
        if side == args.size:  # the cohort's first slide, not written twice
            path = root / f"rss_{side}" / cohort[0].name
            path.parent.mkdir(exist_ok=True)
            if not path.exists():
                path.symlink_to(cohort[0])
                Path(str(path) + ".json").write_text(Path(str(cohort[0]) + ".json").read_text())
        else:
            path = slide(f"rss_{side}", side, 100)
        run = run_child(model, str(path.parent), root / f"rss_out_{side}")
        rss.append({"side": side, "peak_rss_mb": run["peak_rss_mb"], "n_cells": run["slides"][0]["n_cells"],
                    "seconds": run["seconds"]})
    ratio = rss[-1]["peak_rss_mb"] / rss[0]["peak_rss_mb"]
    # 4: kill -9 while the second of two slides is being predicted, then rerun
    kill_dir = root / "kill_slides"
    kill_dir.mkdir(exist_ok=True)
    for p in cohort[:2]:
        link = kill_dir / p.name
        if not link.exists():
            link.symlink_to(p)
            Path(str(link) + ".json").write_text(Path(str(p) + ".json").read_text())
    kill_out = root / "kill_out"
    import shutil

    shutil.rmtree(kill_out, ignore_errors=True)
    second = kill_out / "slides" / cohort[1].name.removesuffix(".tif")
    run_child(model, str(kill_dir), kill_out, kill_after=lambda: (second / "tissue_mask.png").is_file())
    first_summary = kill_out / "slides" / cohort[0].name.removesuffix(".tif") / "summary.json"
    finished_before = first_summary.is_file() and not (second / "summary.json").is_file()
    mtime = first_summary.stat().st_mtime_ns if first_summary.is_file() else None
    rerun = run_child(model, str(kill_dir), kill_out)
    kill = {"finished_before_kill": [cohort[0].stem] if finished_before else [], "rerun_predicted": rerun["done"],
            "rerun_skipped": rerun["skipped"],
            "first_slide_untouched": mtime is not None and first_summary.stat().st_mtime_ns == mtime}
    kill_ok = kill["rerun_predicted"] == [cohort[1].stem] and kill["rerun_skipped"] == [cohort[0].stem] \
        and kill["first_slide_untouched"]

    slides_per_hour = len(cohort) / main_run["seconds"] * 3600
    payload = {"size": args.size, "n_slides": len(cohort), "mpp": MPP, "slides_written": writes,
               "seconds_train": seconds_train, "cohort": main_run, "cells": cells,
               "slides_per_hour": slides_per_hour, "cells_per_second": cells / main_run["seconds"],
               "background_tiles": background, "background_tiles_read": background_read,
               "background_skipped": skipped, "feature_tiles_total": feat_total, "feature_tiles_read": feat_read,
               "rss": rss, "rss_ratio_largest_smallest": ratio, "kill": kill,
               "targets": {"background_skipped>=0.95": skipped >= 0.95, "rss_ratio<=1.5": ratio <= 1.5,
                           "rerun_redoes_only_the_unfinished_slide": kill_ok}}
    md = [f"# Cohort prediction (`gcmoe predict --slides`): {len(cohort)} virtual whole slides of {args.size:,} px",
          "", f"Command: `python benchmarks/cohort.py{' --quick' if args.quick else ''}"
          f"{'' if args.quick else f' --size {args.size}'}`", "",
          f"Machine: {os.cpu_count()} CPU cores, **shared** with other jobs while this ran (timings are upper bounds); "
          "OMP_NUM_THREADS=1, one process. Slides: 0.25 um/px, JPEG-compressed tiled pyramidal BigTIFF, about 30% "
          "tissue (a repeated 2048 px virtual-tissue patch), nuclei detected on the tissue, a one-epoch GC-MoE "
          "(morphology encoder at 0.5 um/px, 20 genes).", "",
          "| slides | cells | wall s | slides/hour | cells/s | peak RSS MiB | background tiles skipped | encoder tiles read |",
          "|---:|---:|---:|---:|---:|---:|---:|---:|",
          f"| {len(cohort)} | {cells:,} | {main_run['seconds']:.0f} | {slides_per_hour:.1f} | "
          f"{cells / main_run['seconds']:.0f} | {main_run['peak_rss_mb']:.0f} | "
          f"{100 * skipped:.1f}% ({background - background_read} of {background}) | "
          f"{feat_read} of {feat_total} ({100 * feat_read / max(feat_total, 1):.0f}%) |", "",
          "Per slide (seconds: tissue mask / nuclei detection / features + model / writing outputs):", "",
          "| slide | tissue (truth) | tissue (mask) | cells | detection tiles read | s tissue | s cells | s predict | s write |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in main_run["slides"]:
        sec = s["seconds"]
        md.append(f"| {s['slide_id']} | {100 * s['tissue_share_truth']:.1f}% | {100 * s['tissue_fraction_mask']:.1f}% | "
                  f"{s['n_cells']:,} | {s['detection_tiles_read']} of {s['detection_tiles_total']} | "
                  f"{sec['tissue']:.1f} | {sec['cells']:.1f} | {sec['predict']:.1f} | {sec['write']:.1f} |")
    md += ["", "Peak RSS of one slide (fresh process each):", "", "| side px | cells | peak RSS MiB | s |",
           "|---:|---:|---:|---:|"]
    md += [f"| {r['side']:,} | {r['n_cells']:,} | {r['peak_rss_mb']:.0f} | {r['seconds']:.0f} |" for r in rss]
    md += ["", f"Largest over smallest: {ratio:.2f}x (target <= 1.5x) for a {(rss_sizes[-1] / rss_sizes[0])**2:.0f}x "
           "larger slide.", "",
           f"Kill -9 while predicting the second of two slides, then rerun: finished before the kill "
           f"{kill['finished_before_kill']}, rerun predicted {kill['rerun_predicted']}, skipped "
           f"{kill['rerun_skipped']}, first slide's outputs untouched: {kill['first_slide_untouched']}.", "",
           "Targets: " + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in payload["targets"].items()) + "."]
    write(name, payload, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
