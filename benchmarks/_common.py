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
