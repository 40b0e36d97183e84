"""Helpers shared by the benchmarks: machine facts, peak memory, JSON + markdown output."""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
    }


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB.

    Read from /proc/self/status (VmHWM): ``ru_maxrss`` would carry the parent's peak into a child started
    with fork + exec.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def write(name: str, payload: dict, markdown: str) -> None:
    """Write results/<name>.json and results/<name>.md (with the reproducing command) atomically."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "command": " ".join(["python", *sys.argv]), "machine": machine(), **payload}
    for suffix, text in ((".json", json.dumps(payload, indent=2)), (".md", markdown)):
        path = RESULTS / f"{name}{suffix}"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    print(markdown)


def size_args(ap, sizes: str = "100000,500000,2000000", modes: str = "stream,memory") -> None:
    """The options the scale benchmarks share: cell counts, modes, feature dimension, epochs."""
    ap.add_argument("--sizes", default=sizes)
    ap.add_argument("--modes", default=modes)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=1)


def largest_to_smallest(rows: list[dict], key: str) -> dict[str, float]:
    """Per ``mode``: ``key`` of the row with the most ``cells`` over that of the fewest (modes with >1 row)."""
    out = {}
    for mode in sorted({r["mode"] for r in rows}):
        mine = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["cells"])
        if len(mine) > 1:
            out[mode] = round(mine[-1][key] / mine[0][key], 2)
    return out
