"""Where the real files written by others live: ``../shared/realdata`` beside the project root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def realdata_dir() -> Path:
    """``$GCMOE_REALDATA``, else ``../shared/realdata`` relative to the project root (never inside the repo)."""
    return Path(os.environ.get("GCMOE_REALDATA", PROJECT_ROOT.parent / "shared" / "realdata"))


@pytest.fixture
def realdata():
    """A function giving a real-data file or folder by its relative path, skipping the test when it is absent."""

    def get(relative: str) -> Path:
        path = realdata_dir() / relative
        if not path.exists():
            pytest.skip(f"real data {relative} not found under {realdata_dir()} (set GCMOE_REALDATA to its folder)")
        return path

    return get
