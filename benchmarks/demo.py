"""The default demo end to end: wall-clock time and its accuracy table.

Runs `gcmoe demo` in a subprocess (fresh process, as a user would), times it, and records results.md.

Run: .venv/bin/python benchmarks/demo.py [--out /tmp/gcmoe_demo_bench] [--quick]
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
from _common import write  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/gcmoe_demo_bench")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)  # no feature cache: time the whole job
    gcmoe = Path(sys.executable).with_name("gcmoe")
    cmd = [str(gcmoe), "demo", "--out", str(out)] + (["--quick"] if args.quick else [])
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t0
    results = json.loads((out / "results.json").read_text())
    table = (out / "results.md").read_text()
    name = "demo_quick" if args.quick else "demo"
    md = (f"# `gcmoe demo{' --quick' if args.quick else ''}` end to end\n\n"
          f"Command: `.venv/bin/python benchmarks/demo.py{' --quick' if args.quick else ''}` "
          f"(runs `gcmoe demo{' --quick' if args.quick else ''}` in a fresh process, empty cache).\n\n"
          f"Wall clock: **{wall:.1f} s** (features {results['seconds']['features']} s, "
          f"whole run inside the process {results['seconds']['total']} s).\n\n" + table.replace("# Results\n", ""))
    write(name, {"wall_seconds": round(wall, 1), "results": results}, md)


if __name__ == "__main__":
    main()
