"""The seed-ensemble option (`train.ensemble` / `--ensemble`) on the model suite, against single models.

Reads the JSON of two finished runs of benchmarks/suite.py made with the same tissues, seeds and models, one
with `--ensemble 1` (--single) and one with `--ensemble N` (--ensembled). Member 0 of an ensemble is the single
model of the same seed, so the two runs differ only by the extra members. Compares, per tissue, each model as an
ensemble against itself alone (paired per trainer seed: the suite's JSON keeps per-seed means), and GC-MoE
against ST-Net* within each run (paired per fold and seed, as the suite reports it). Run times are the runs'
own wall clocks.

    .venv/bin/python benchmarks/suite.py --models stnet,gcmoe --seeds 0,1 --ensemble 1 --out /tmp/ens1 \
        --ghist-demo DIR --name ensprobe1
    .venv/bin/python benchmarks/suite.py --models stnet,gcmoe --seeds 0,1 --ensemble 3 --out /tmp/ens3 \
        --ghist-demo DIR --name ensprobe3
    .venv/bin/python benchmarks/ensemble.py --single benchmarks/results/ensprobe1.json \
        --ensembled benchmarks/results/ensprobe3.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write  # noqa: E402

MODELS = ("GC-MoE", "ST-Net*")


def ensemble_size(run: dict) -> int:
    """The `--ensemble` of a suite run, read from its recorded command (1 when absent)."""
    found = re.search(r"--ensemble\s+(\d+)", run["command"])
    return int(found.group(1)) if found else 1


def fmt(p: dict) -> str:
    return f"{p['mean']:+.4f} ± {p['sd']:.4f} ({p['wins']}/{p['n']})"


def paired(diff: np.ndarray) -> dict:
    sd = float(diff.std(ddof=1)) if diff.size > 1 else float("nan")
    return {"mean": float(diff.mean()), "sd": sd, "wins": int((diff > 0).sum()), "n": int(diff.size)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--single", required=True, help="suite JSON of the run with --ensemble 1")
    ap.add_argument("--ensembled", required=True, help="suite JSON of the run with --ensemble N")
    ap.add_argument("--name", default="ensemble")
    args = ap.parse_args()
    one, ens = (json.loads(Path(p).read_text()) for p in (args.single, args.ensembled))
    n_one, n_ens = ensemble_size(one), ensemble_size(ens)
    if n_one != 1 or n_ens < 2:
        raise SystemExit(f"--single must be a run with --ensemble 1 and --ensembled one with N >= 2 "
                         f"(got {n_one} and {n_ens})")

    summary, rows, gains = {}, [], {m: [] for m in MODELS}
    for tissue, rec_one in one["summary"].items():
        rec_ens = ens["summary"].get(tissue)
        if rec_ens is None or rec_one["seeds"] != rec_ens["seeds"]:
            continue
        entry: dict = {"seeds": rec_one["seeds"], "mean": {}, "gain": {}}
        for m in MODELS:
            a = np.asarray(rec_ens["models"][m]["per_seed"])
            b = np.asarray(rec_one["models"][m]["per_seed"])
            entry["mean"][m] = {"single": float(b.mean()), "ensemble": float(a.mean())}
            entry["gain"][m] = paired(a - b)
            gains[m].append(a - b)
        entry["gcmoe_vs_stnet"] = {"single": rec_one["paired"]["ST-Net*"], "ensembles": rec_ens["paired"]["ST-Net*"]}
        entry["routing_accuracy"] = {"single": rec_one["models"]["GC-MoE"].get("routing_accuracy"),
                                     "ensemble": rec_ens["models"]["GC-MoE"].get("routing_accuracy")}
        entry["wall_seconds"] = {"single": one["wall_seconds"][tissue], "ensemble": ens["wall_seconds"][tissue]}
        summary[tissue] = entry
        mean, g, vs, w = entry["mean"], entry["gain"], entry["gcmoe_vs_stnet"], entry["wall_seconds"]
        rows.append(
            f"| {tissue} | {mean['GC-MoE']['single']:.3f} -> {mean['GC-MoE']['ensemble']:.3f} | "
            f"{g['GC-MoE']['mean']:+.4f} ({g['GC-MoE']['wins']}/{g['GC-MoE']['n']}) | "
            f"{mean['ST-Net*']['single']:.3f} -> {mean['ST-Net*']['ensemble']:.3f} | "
            f"{g['ST-Net*']['mean']:+.4f} ({g['ST-Net*']['wins']}/{g['ST-Net*']['n']}) | "
            f"{fmt(vs['single'])} | {fmt(vs['ensembles'])} | {w['single']:.0f} -> {w['ensemble']:.0f} |")
    if not summary:
        raise SystemExit("the two runs share no tissue with the same seeds")
    overall = {m: paired(np.concatenate(gains[m])) for m in MODELS}
    md = (
        f"# Seed ensembles (`--ensemble {n_ens}`) on the model suite\n\n"
        f"Command: `{' '.join(['python', *sys.argv])}`, reading two suite runs of ST-Net* and GC-MoE, "
        f"once single (`{one['command']}`) and once as ensembles of {n_ens} (`{ens['command']}`). "
        "5 vertical strips, top-50 HVG, patience 20. Member 0 of each ensemble is the single model of the same "
        "seed, so the gain is what the extra members add. Gains are paired per trainer seed (mean; ahead in k "
        "of n); GC-MoE − ST-Net* is paired per (fold, seed) within each run: mean ± sd (ahead in k of n). "
        "Wall seconds: the suite's clock per tissue for both models and all seeds, on a 2-core machine shared "
        "with other jobs, so they are upper bounds and show the ratio only.\n\n"
        "| tissue | GC-MoE: one -> ensemble | GC-MoE gain | ST-Net*: one -> ensemble | ST-Net* gain | "
        "GC-MoE − ST-Net*, single | GC-MoE − ST-Net*, ensembles | wall s |\n"
        "|---|:---:|:---:|:---:|:---:|:---:|:---:|:---:|\n" + "\n".join(rows) + "\n\n"
        f"Over all tissues and seeds: GC-MoE gains {fmt(overall['GC-MoE'])}, ST-Net* {fmt(overall['ST-Net*'])}.\n"
    )
    write(args.name, {"single": one["command"], "ensembled": ens["command"], "ensemble_size": n_ens,
                      "overall_gain": overall, "summary": summary}, md)
    print(md)


if __name__ == "__main__":
    main()
