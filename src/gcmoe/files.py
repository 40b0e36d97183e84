"""Writing files safely, once for the whole package: atomic replacement, values files can store, file hashes.

Every file the package writes goes to a hidden temporary name beside its destination and is renamed over
it (``os.replace``, atomic on one file system), so an interrupted write never leaves a half file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["atomic_path", "file_sha256", "plain_values", "publish", "temporary_path", "write_h5ad", "write_json",
           "write_text"]


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; it replaces ``path`` when the block ends without error.

    ``suffix`` ends the temporary name, for writers that add their own (``np.savez`` adds ``.npz``). The
    parent folder is created. The temporary path may become a folder (a folder at ``path`` is then replaced
    whole). On an error the temporary file or folder is removed and nothing is replaced.
    """
    tmp = temporary_path(path, suffix)
    try:
        yield tmp
        publish(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def temporary_path(path: str | os.PathLike, suffix: str = "") -> Path:
    """The hidden temporary name beside ``path`` that :func:`publish` renames to ``path`` (parent created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.tmp{suffix}")


def publish(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename a finished temporary file or folder to ``path``, replacing what was there (a folder too)."""
    if Path(tmp).is_dir() and Path(path).is_dir():
        shutil.rmtree(path)
    os.replace(tmp, path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, value: Any, indent: int | None = None) -> Path:
    """Write ``value`` as JSON atomically (NaN and infinities as null, numpy values as Python ones)."""
    return write_text(path, json.dumps(plain_values(value), indent=indent))


def write_h5ad(adata: Any, path: str | os.PathLike) -> Path:
    """Write an AnnData to ``path`` atomically."""
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp)
    return Path(path)


def plain_values(value: Any, h5ad: bool = False) -> Any:
    """``value`` as JSON (default) or an h5ad ``uns`` can store it, recursively.

    Keys become strings, tuples lists, numpy scalars Python ones. For JSON, NaN and infinities become None
    and arrays lists; for h5ad, None is dropped (h5ad cannot store it) and arrays stay arrays. Other objects
    (paths, ...) become their string.
    """
    if isinstance(value, Mapping):
        return {str(k): plain_values(v, h5ad) for k, v in value.items() if not (h5ad and v is None)}
    if isinstance(value, (list, tuple)):
        return [plain_values(v, h5ad) for v in value if not (h5ad and v is None)]
    if isinstance(value, np.ndarray):
        return value if h5ad else plain_values(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not h5ad and not np.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file, read in ``chunk``-byte pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
