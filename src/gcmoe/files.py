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

from gcmoe.errors import OutputExistsError

__all__ = ["MANIFEST_NAME", "OutputFolder", "atomic_path", "check_output_file", "claim_file", "file_sha256", "output_folder",
           "plain_values", "publish", "remove_owned", "temporary_path", "write_h5ad", "write_json", "write_text"]

MANIFEST_NAME = ".gcmoe-manifest.json"  # the files gcmoe wrote in an output folder (OutputFolder)



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
    """Rename a finished temporary file or folder to ``path``, replacing what was there (a folder too).

    Inside an active :class:`OutputFolder` a path gcmoe did not write is never replaced (OutputExistsError),
    and the new path is recorded in the folder's manifest.
    """
    folder = _folder_of(path)
    if folder is not None:
        folder.may_replace(path)
    if Path(tmp).is_dir() and Path(path).is_dir():
        shutil.rmtree(path)
    os.replace(tmp, path)
    if folder is not None:
        folder.record(path)


# --- the output-folder policy: gcmoe replaces or deletes only what it wrote itself ---

_ACTIVE: list[OutputFolder] = []


def _folder_of(path: str | os.PathLike) -> OutputFolder | None:
    """The innermost active output folder holding ``path``, or None."""
    resolved = Path(os.path.abspath(path))
    for folder in reversed(_ACTIVE):
        if resolved == folder.root or folder.root in resolved.parents:
            return folder
    return None


class OutputFolder:
    """An output folder and the manifest (``.gcmoe-manifest.json``) of the files and folders gcmoe wrote there.

    An entry ending in ``/`` is a folder gcmoe published whole (a checkpoint, a cell store): all under it is
    gcmoe's. ``overwrite`` lets gcmoe replace a file of a name it writes that it did not write itself; a file it
    did not write is never deleted.
    """

    def __init__(self, root: Path, command: str, overwrite: bool) -> None:
        self.root = Path(os.path.abspath(root))
        self.command = command
        self.overwrite = overwrite
        self.entries: set[str] = set()
        self.manifest = self.root / MANIFEST_NAME

    def _rel(self, path: str | os.PathLike) -> str:
        return Path(os.path.abspath(path)).relative_to(self.root).as_posix()

    def owns(self, path: str | os.PathLike) -> bool:
        """Whether gcmoe wrote ``path`` (itself, or a folder published whole above it)."""
        rel = self._rel(path)
        if rel in self.entries or f"{rel}/" in self.entries:
            return True
        parts = rel.split("/")
        return any("/".join(parts[:i]) + "/" in self.entries for i in range(1, len(parts)))

    def may_replace(self, path: str | os.PathLike) -> None:
        """Raise OutputExistsError when ``path`` exists and gcmoe did not write it (unless ``overwrite``)."""
        path = Path(path)
        if not path.exists() or self.owns(path) or self.overwrite and path.is_file():
            return
        foreign = [p for p in ([path] if path.is_file() else sorted(path.rglob("*"))) if p.is_file() and not self.owns(p)]
        if not foreign:
            return
        raise OutputExistsError(
            f"{path} exists and was not written by gcmoe (it is not in {self.manifest.name}, e.g. {foreign[0]}); "
            f"gcmoe never replaces a file it did not write: move it away or choose another --out"
            + ("" if self.overwrite else " (--overwrite lets gcmoe replace files of the names it writes)"))

    def record(self, path: str | os.PathLike) -> None:
        """Add ``path`` (a folder: whole) to the manifest and save it."""
        rel = self._rel(path)
        if rel == MANIFEST_NAME:
            return
        self.entries.add(f"{rel}/" if Path(path).is_dir() else rel)
        self.save()

    def forget(self, path: str | os.PathLike) -> None:
        """Drop ``path`` and everything under it from the manifest."""
        rel = self._rel(path)
        self.entries = {e for e in self.entries if not (e.rstrip("/") == rel or e.startswith(rel + "/"))}

    def save(self) -> None:
        from datetime import datetime, timezone

        from gcmoe import __version__

        value = {"format": 1, "made_by": f"gcmoe {self.command}", "gcmoe_version": __version__,
                 "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"), "files": sorted(self.entries)}
        tmp = temporary_path(self.manifest)
        tmp.write_text(json.dumps(value, indent=1), encoding="utf-8")
        os.replace(tmp, self.manifest)

    def load(self) -> bool:
        """Read the manifest; False when there is none. A damaged one is refused."""
        if not self.manifest.is_file():
            return False
        try:
            value = json.loads(self.manifest.read_text(encoding="utf-8"))
            files = value["files"]
            if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
                raise ValueError("'files' is not a list of paths")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise OutputExistsError(f"{self.manifest} is not a gcmoe manifest ({exc}); it lists the files gcmoe wrote "
                                    f"in {self.root}: restore it, or choose another --out") from None
        self.entries = set(files)
        return True


@contextmanager
def output_folder(path: str | os.PathLike, command: str, overwrite: bool = False) -> Iterator[OutputFolder]:
    """Claim ``path`` as an output folder for the block: made (with its manifest) when new or empty, used when its
    manifest says gcmoe made it, refused (OutputExistsError) when it holds files gcmoe did not write unless
    ``overwrite``. Within the block :func:`publish` and :func:`remove_owned` keep to the manifest."""
    root = Path(path)
    if root.exists() and not root.is_dir():
        raise OutputExistsError(f"--out {root} is an existing file, but {command} writes a folder there; "
                                f"give the path of a new folder (or of one an earlier gcmoe {command} made)")
    folder = OutputFolder(root, command, overwrite)
    if not folder.load():
        present = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
        if present and not overwrite:
            shown = ", ".join(present[:5]) + (f" and {len(present) - 5} more" if len(present) > 5 else "")
            raise OutputExistsError(
                f"--out {root} is a folder gcmoe did not make (no {MANIFEST_NAME}) and it is not empty ({shown}); "
                f"gcmoe does not write among files it did not make: give a new or empty folder, or --overwrite to "
                f"write there anyway (files of the names gcmoe writes are then replaced; no other file is deleted)")
        root.mkdir(parents=True, exist_ok=True)
        folder.save()
    _ACTIVE.append(folder)
    try:
        yield folder
    finally:
        _ACTIVE.remove(folder)


def remove_owned(path: str | os.PathLike) -> None:
    """Delete ``path`` (a file or folder), or within an active output folder only what gcmoe wrote under it:
    other files and the folders holding them stay."""
    path = Path(path)
    folder = _folder_of(path)
    if folder is None or folder.owns(path):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        if folder is not None:
            folder.forget(path)
            folder.save()
        return
    if not path.is_dir():
        return
    for child in sorted(path.iterdir()):
        remove_owned(child)
    if not any(path.iterdir()):
        path.rmdir()


def claim_file(path: str | os.PathLike) -> None:
    """Before gcmoe appends to ``path`` (a log): refuse it if gcmoe did not write it, else record it."""
    folder = _folder_of(path)
    if folder is not None:
        folder.may_replace(path)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).touch()
        folder.record(path)


def check_output_file(path: str | os.PathLike, overwrite: bool = False, example: str = "out.h5ad") -> Path:
    """Refuse (OutputExistsError) an output file path that is a folder, or an existing file unless ``overwrite``;
    called before the work, so nothing is computed for an output that cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise OutputExistsError(f"--out {path} is an existing folder, but this command writes one file; give a file "
                                f"path, e.g. {path / example}")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"--out {path} exists; gcmoe does not replace a file unless told: give --overwrite to "
                                f"replace it, or another path")
    return path


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
