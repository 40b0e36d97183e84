"""The canonical in-memory form of one slide: cells x genes AnnData + lazy H&E image + pixel size.

Everything downstream of the readers takes a :class:`Sample`, never a file format. A Sample is validated
when it is built, so code that receives one can trust its coordinates, counts and pixel size.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from gcmoe._constants import Key, UnsKey
from gcmoe.data.image import ArrayImage, SlideImage, open_image, write_tiff
from gcmoe.errors import InvalidSampleError
from gcmoe.files import write_h5ad

# sample ids become file and folder names (caches, data/): no separators, no parent references
_SAFE_ID = re.compile(r"[^./\\\x00-\x1f][^/\\\x00-\x1f]{0,199}")
MPP_PLAUSIBLE = (0.05, 10.0)  # um/px; H&E scans are 0.12-1 um/px, so values outside this are unit mistakes


@dataclass
class Sample:
    """One slide: cells x genes AnnData with raw counts, cell centres in H&E pixels, and the image.

    Fields of ``adata`` (names in :class:`gcmoe._constants.Key`):
    ``layers["counts"]`` raw counts; ``obsm["spatial"]`` (x, y) full-resolution H&E pixels;
    ``obs["sample_id"]``; ``obs["cell_type"]`` when known; ``uns["gcmoe"]`` with ``sample_id``, ``mpp``,
    ``image_path`` (once written) and ``provenance``.
    """

    adata: AnnData
    image: SlideImage

    def __post_init__(self) -> None:
        validate_sample(self)

    @property
    def sample_id(self) -> str:
        return str(self.adata.uns[Key.UNS][UnsKey.SAMPLE_ID])

    @property
    def mpp(self) -> float:
        """Micrometres per full-resolution pixel."""
        return float(self.adata.uns[Key.UNS][UnsKey.MPP])

    @property
    def spatial(self) -> np.ndarray:
        """Cell centres, (n_cells, 2) float64, (x, y) in full-resolution H&E pixels."""
        return np.asarray(self.adata.obsm[Key.SPATIAL], dtype=np.float64)

    @property
    def counts(self) -> np.ndarray | sp.spmatrix:
        return self.adata.layers[Key.COUNTS]

    @property
    def n_cells(self) -> int:
        return int(self.adata.n_obs)

    @property
    def genes(self) -> list[str]:
        return list(map(str, self.adata.var_names))

    @classmethod
    def from_arrays(
        cls,
        counts: np.ndarray | sp.spmatrix,
        spatial: np.ndarray,
        image: SlideImage | np.ndarray,
        mpp: float,
        genes: Sequence[str],
        sample_id: str,
        cell_ids: Sequence[str] | None = None,
        cell_type: Sequence[str] | None = None,
        obs: pd.DataFrame | None = None,
        provenance: Mapping[str, Any] | None = None,
    ) -> Sample:
        """Build and validate a Sample from plain arrays (cells in rows, genes in columns)."""
        n = int(np.shape(counts)[0])
        index = pd.Index(list(map(str, cell_ids)) if cell_ids is not None else [f"cell_{i}" for i in range(n)])
        frame = pd.DataFrame(index=index)
        if obs is not None:
            frame = pd.concat([frame, obs.set_axis(index, axis=0)], axis=1)
        adata = AnnData(X=counts.copy() if sp.issparse(counts) else np.array(counts, copy=True), obs=frame)
        adata.var_names = pd.Index(list(map(str, genes)))
        adata.layers[Key.COUNTS] = adata.X.copy()
        adata.obsm[Key.SPATIAL] = np.asarray(spatial, dtype=np.float64)
        adata.obs[Key.SAMPLE_ID] = pd.Categorical([sample_id] * n)
        if cell_type is not None:
            adata.obs[Key.CELL_TYPE] = pd.Categorical(np.asarray(cell_type, dtype=str))
        adata.uns[Key.UNS] = {
            UnsKey.SAMPLE_ID: str(sample_id),
            UnsKey.MPP: float(mpp),
            UnsKey.PROVENANCE: dict(provenance or {}),
        }
        if not isinstance(image, SlideImage):
            image = ArrayImage(np.asarray(image))
        return cls(adata=adata, image=image)

    def fingerprint(self) -> str:
        """A short hash of what the cell features depend on: sample id, cell centres, pixel size, image size."""
        h = hashlib.sha256()
        h.update(self.sample_id.encode())
        h.update(np.ascontiguousarray(self.spatial).tobytes())
        h.update(json.dumps([self.mpp, list(self.image.shape)]).encode())
        return h.hexdigest()[:16]

    def write(self, path: str | os.PathLike) -> Path:
        """Write the AnnData to ``path`` (.h5ad), and an in-memory image as a pyramidal TIFF beside it.

        An image that already lives in a file is referenced by its absolute path, not copied. Both files
        are written to temporary names first and renamed, so an interrupted write leaves no half file.
        """
        path = Path(path)
        if path.suffix != ".h5ad":
            raise InvalidSampleError(f"a Sample is written as .h5ad; got {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        adata = self.adata.copy()
        if self.image.path is None:
            image_path = path.with_suffix(".tif")
            write_tiff(image_path, self.image.read_region(0, 0, self.image.shape[1], self.image.shape[0]), self.mpp)
            adata.uns[Key.UNS][UnsKey.IMAGE_PATH] = image_path.name
        else:
            adata.uns[Key.UNS][UnsKey.IMAGE_PATH] = str(Path(self.image.path).resolve())
        write_h5ad(adata, path)
        return path

    @classmethod
    def read(cls, path: str | os.PathLike) -> Sample:
        """Read a Sample written by :meth:`write`; a relative image path resolves beside the .h5ad."""
        import anndata

        path = Path(path)
        if not path.is_file():
            raise InvalidSampleError(f"sample file not found: {path}")
        try:
            adata = anndata.read_h5ad(path)
        except Exception as exc:
            raise InvalidSampleError(f"cannot read {path} as an .h5ad file ({exc}); is it complete?") from exc
        meta = adata.uns.get(Key.UNS)
        if meta is None or UnsKey.IMAGE_PATH not in meta:
            raise InvalidSampleError(
                f"{path} has no uns['{Key.UNS}']['{UnsKey.IMAGE_PATH}']: it was not written by gcmoe; "
                "read it with a reader that takes the image path and mpp"
            )
        image_path = Path(str(meta[UnsKey.IMAGE_PATH]))
        if not image_path.is_absolute():
            image_path = path.parent / image_path
        return cls(adata=adata, image=open_image(image_path))


def validate_sample(sample: Sample) -> None:
    """Raise :class:`InvalidSampleError` naming the problem when a Sample cannot be used.

    Checks: the uns block and mpp (> 0 and plausible), raw counts present, finite and non-negative,
    cell centres present, finite and inside the image, unique cell ids and gene names, at least one cell.
    """
    adata = sample.adata
    meta = adata.uns.get(Key.UNS)
    if not isinstance(meta, Mapping) or UnsKey.SAMPLE_ID not in meta or UnsKey.MPP not in meta:
        raise InvalidSampleError(f"uns['{Key.UNS}'] must hold '{UnsKey.SAMPLE_ID}' and '{UnsKey.MPP}'")
    sid = meta[UnsKey.SAMPLE_ID]
    if not _SAFE_ID.fullmatch(str(sid)) or str(sid) in (".", ".."):
        raise InvalidSampleError(
            f"sample id {str(sid)!r} cannot be used: sample ids name files and folders, so they may not hold "
            "'/', '\\' or control characters, nor start with '.'; give another one (a Sample file: its "
            f"uns['{Key.UNS}']['{UnsKey.SAMPLE_ID}']; gcmoe predict: rename the slide file, whose name it takes; "
            "convert: --sample-id)"
        )
    try:
        mpp = float(meta[UnsKey.MPP])
    except (TypeError, ValueError):
        raise InvalidSampleError(f"sample {sid}: mpp must be a number of micrometres per pixel, got {meta[UnsKey.MPP]!r}")
    if not np.isfinite(mpp) or mpp <= 0:
        raise InvalidSampleError(f"sample {sid}: mpp must be > 0 micrometres per pixel, got {mpp}")
    lo, hi = MPP_PLAUSIBLE
    if not lo <= mpp <= hi:
        raise InvalidSampleError(
            f"sample {sid}: mpp={mpp} um/px is implausible for an H&E image (expected {lo}-{hi}); "
            "check the units (um per pixel, not pixels per um or nm)"
        )
    if adata.n_obs == 0:
        raise InvalidSampleError(f"sample {sid} has no cells")
    if not adata.obs_names.is_unique:
        dup = adata.obs_names[adata.obs_names.duplicated()][:5].tolist()
        raise InvalidSampleError(f"sample {sid}: duplicated cell ids, e.g. {dup}; cell ids must be unique")
    if not adata.var_names.is_unique:
        dup = adata.var_names[adata.var_names.duplicated()][:5].tolist()
        raise InvalidSampleError(f"sample {sid}: duplicated gene names, e.g. {dup}")
    if Key.COUNTS not in adata.layers:
        raise InvalidSampleError(f"sample {sid}: raw counts missing: put them in layers['{Key.COUNTS}']")
    from gcmoe.data.readers.h5ad import check_raw_counts

    counts = adata.layers[Key.COUNTS]
    check_raw_counts(counts.data if sp.issparse(counts) else counts, f"sample {sid}", f"layers['{Key.COUNTS}']")
    if Key.SPATIAL not in adata.obsm:
        raise InvalidSampleError(f"sample {sid}: cell centres missing: put (x, y) H&E pixels in obsm['{Key.SPATIAL}']")
    try:
        xy = np.asarray(adata.obsm[Key.SPATIAL], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InvalidSampleError(f"sample {sid}: obsm['{Key.SPATIAL}'] must hold numbers (x, y H&E pixels), but it "
                                 f"cannot be read as numbers ({exc})") from None
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise InvalidSampleError(f"sample {sid}: obsm['{Key.SPATIAL}'] must be (n_cells, 2), got {xy.shape}")
    if not np.all(np.isfinite(xy)):
        raise InvalidSampleError(f"sample {sid}: {int((~np.isfinite(xy)).any(axis=1).sum())} cell centres are NaN or infinite")
    height, width = sample.image.shape
    outside = (xy[:, 0] < 0) | (xy[:, 0] >= width) | (xy[:, 1] < 0) | (xy[:, 1] >= height)
    if outside.any():
        n_out = int(outside.sum())
        raise InvalidSampleError(
            f"sample {sid}: {n_out} of {len(xy)} cell centres lie outside the {width}x{height} px image "
            f"(x range {xy[:, 0].min():.1f}..{xy[:, 0].max():.1f}, y range {xy[:, 1].min():.1f}..{xy[:, 1].max():.1f}); "
            "centres must be full-resolution H&E pixels: check units (micrometres vs pixels), the alignment, "
            "and the image level"
        )
