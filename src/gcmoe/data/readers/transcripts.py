"""Cell x gene counts from a transcripts parquet, in bounded memory.

The file is read in record batches with pyarrow (never whole): each batch is filtered (quality ``qv >= min_qv``;
control and unassigned features dropped), its transcripts are assigned to cells (by the file's ``cell_id``, or
by the cell polygons that contain them), and counted into a sparse matrix that is summed batch by batch. Memory
is one batch plus the growing sparse matrix, so tens of millions of transcripts fit in a few hundred MB.

Control features follow 10x's naming (Xenium Onboard Analysis outputs): ``NegControlProbe_*``,
``NegControlCodeword_*``, ``BLANK_*``, ``UnassignedCodeword_*``, ``DeprecatedCodeword_*``, genomic controls
(``Intergenic_Region_*``) and ``antisense_*`` probes; newer files also say it in ``is_gene`` /
``codeword_category`` columns, which are used when present.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from gcmoe.data.readers.polygons import PolygonIndex, Polygons, as_str_id
from gcmoe.errors import InvalidSampleError

log = logging.getLogger(__name__)

CONTROL_PREFIXES = (
    "NegControlProbe_",
    "NegControlCodeword_",
    "NegControl",
    "BLANK_",
    "UnassignedCodeword_",
    "Unassigned",
    "DeprecatedCodeword_",
    "Deprecated",
    "Intergenic",
    "GenomicControl",
    "antisense_",
)
UNASSIGNED_IDS = frozenset({"-1", "UNASSIGNED", ""})  # 10x: -1 (integer ids) or "UNASSIGNED" (string ids)
MIN_QV = 20.0


def is_control_feature(name: str) -> bool:
    """True for 10x negative-control, blank, unassigned, deprecated and genomic-control features."""
    return name.startswith(CONTROL_PREFIXES)


@dataclass
class TranscriptCounts:
    """What :func:`aggregate_transcripts` returns.

    ``counts`` cells x genes (CSR, int32); ``cell_ids``/``genes`` name its rows/columns; ``mean_xy`` the mean
    transcript position of each cell (same unit as the file's x/y columns); ``stats`` the filtering tallies.
    """

    counts: sp.csr_matrix
    cell_ids: list[str]
    genes: list[str]
    mean_xy: np.ndarray
    stats: dict[str, Any] = field(default_factory=dict)


class _Grow:
    """A growing str -> index map with a fixed prefix of allowed keys when ``fixed`` is set."""

    def __init__(self, keys: list[str] | None = None) -> None:
        self.fixed = keys is not None
        self.keys: list[str] = list(keys or [])
        self.index: dict[str, int] = {k: i for i, k in enumerate(self.keys)}

    def lookup(self, key: str) -> int:
        i = self.index.get(key)
        if i is None:
            if self.fixed:
                return -1
            i = self.index[key] = len(self.keys)
            self.keys.append(key)
        return i


def _codes(column, mapper, null_code: int) -> np.ndarray:
    """Map an arrow column of ids/names to int codes through ``mapper`` (called once per distinct value)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if not pa.types.is_dictionary(column.type):
        column = pc.dictionary_encode(column)
    table = np.array([mapper(v) for v in column.dictionary.to_pylist()] + [null_code], dtype=np.int64)
    idx = column.indices
    if idx.null_count:
        idx = idx.fill_null(len(table) - 1)
    return table[idx.to_numpy(zero_copy_only=False).astype(np.int64)]


def aggregate_transcripts(
    path: str | os.PathLike,
    x_col: str = "he_x",
    y_col: str = "he_y",
    cell_ids: list[str] | None = None,
    polygons: Polygons | None = None,
    assign: str = "auto",
    min_qv: float = MIN_QV,
    genes: list[str] | None = None,
    batch_size: int = 1_000_000,
    progress: bool = True,
) -> TranscriptCounts:
    """Count transcripts per cell and gene from a parquet file, batch by batch.

    Parameters
    ----------
    path
        Transcripts parquet (10x ``transcripts.parquet`` or HEST ``{id}_transcripts.parquet``) with
        ``feature_name``, ``qv``, ``cell_id`` (optional) and the ``x_col``/``y_col`` coordinates.
    cell_ids
        Keep only these cells (e.g. the segmentation's), in this order; None keeps every assigned cell.
    polygons
        Cell polygons in the x/y columns' units, used when ``assign`` is "polygons" (or "auto" without cell_id).
    assign
        "cell_id" (the file's assignment), "polygons" (point in polygon), or "auto" (cell_id when present).
    min_qv
        Transcripts with a lower Phred quality are dropped (10x counts Q20 and above).
    genes
        Keep only these features (in this order); None keeps every non-control feature.
    """
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise InvalidSampleError(f"transcripts file not found: {path}")
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:
        raise InvalidSampleError(f"cannot read {path} as parquet ({exc}); is the file complete?") from exc
    names = pf.schema_arrow.names
    missing = [c for c in ("feature_name", x_col, y_col) if c not in names]
    if missing:
        raise InvalidSampleError(
            f"{path}: transcripts need columns feature_name, {x_col}, {y_col}; missing {missing} (found {names[:20]})"
        )
    if assign == "auto":
        assign = "cell_id" if "cell_id" in names else "polygons"
    if assign == "cell_id" and "cell_id" not in names:
        raise InvalidSampleError(f"{path} has no cell_id column; assign transcripts by polygons instead")
    if assign == "polygons" and polygons is None:
        raise InvalidSampleError(f"{path}: transcripts must be assigned by polygons but no segmentation was given")
    if assign not in ("cell_id", "polygons"):
        raise InvalidSampleError(f"assign must be 'auto', 'cell_id' or 'polygons', got {assign!r}")

    use_qv = "qv" in names
    use_is_gene = "is_gene" in names
    columns = ["feature_name", x_col, y_col] + (["qv"] if use_qv else []) + (["is_gene"] if use_is_gene else [])
    if assign == "cell_id":
        columns.append("cell_id")
    if not use_qv:
        log.warning("%s has no qv column: transcripts are not filtered by quality", path.name)

    gene_map = _Grow(genes)
    if assign == "polygons":
        cell_map = _Grow(list(polygons.ids) if cell_ids is None else cell_ids)
        index = PolygonIndex(polygons)
        poly_to_cell = np.array([cell_map.index.get(i, -1) for i in polygons.ids], dtype=np.int64)
    else:
        cell_map = _Grow(cell_ids)

    def gene_code(v) -> int:
        name = as_str_id(v) if v is not None else ""
        return -2 if (not name or is_control_feature(name)) else gene_map.lookup(name)

    def cell_code(v) -> int:
        cid = as_str_id(v) if v is not None else ""
        return -1 if cid in UNASSIGNED_IDS else cell_map.lookup(cid)

    total = sp.csr_matrix((0, 0), dtype=np.int64)
    sum_xy = np.zeros((0, 2))
    n_tx = np.zeros(0, dtype=np.int64)
    stats = {"transcripts": 0, "low_quality": 0, "control": 0, "unassigned": 0, "gene_not_kept": 0, "counted": 0}

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  disable=not progress, transient=True) as bar:
        task = bar.add_task(f"transcripts of {path.name}", total=pf.metadata.num_rows)
        for batch in pf.iter_batches(batch_size=batch_size, columns=columns):
            n = batch.num_rows
            stats["transcripts"] += n
            keep = np.ones(n, dtype=bool)
            if use_qv:
                qv = batch.column("qv").to_numpy(zero_copy_only=False).astype(np.float64)
                low = ~(qv >= min_qv)
                stats["low_quality"] += int(low.sum())
                keep &= ~low
            g = _codes(batch.column("feature_name"), gene_code, -2)
            control = g == -2
            if use_is_gene:
                control |= ~batch.column("is_gene").to_numpy(zero_copy_only=False).astype(bool)
            stats["control"] += int((control & keep).sum())
            keep &= ~control
            stats["gene_not_kept"] += int(((g == -1) & keep).sum())
            keep &= g >= 0
            x = batch.column(x_col).to_numpy(zero_copy_only=False).astype(np.float64)
            y = batch.column(y_col).to_numpy(zero_copy_only=False).astype(np.float64)
            if assign == "cell_id":
                c = _codes(batch.column("cell_id"), cell_code, -1)
            else:
                c = np.full(n, -1, dtype=np.int64)
                hit = index.assign(np.column_stack([x[keep], y[keep]]))
                c[np.flatnonzero(keep)] = np.where(hit >= 0, poly_to_cell[np.maximum(hit, 0)], -1)
            stats["unassigned"] += int(((c < 0) & keep).sum())
            keep &= c >= 0
            c, g, x, y = c[keep], g[keep], x[keep], y[keep]
            stats["counted"] += int(keep.sum())
            n_cells, n_genes = len(cell_map.keys), len(gene_map.keys)
            part = sp.coo_matrix((np.ones(len(c), dtype=np.int64), (c, g)), shape=(n_cells, n_genes)).tocsr()
            if total.shape != part.shape:
                total.resize(part.shape)
            total = total + part
            if len(sum_xy) < n_cells:
                sum_xy = np.vstack([sum_xy, np.zeros((n_cells - len(sum_xy), 2))])
                n_tx = np.concatenate([n_tx, np.zeros(n_cells - len(n_tx), dtype=np.int64)])
            sum_xy[:, 0] += np.bincount(c, weights=x, minlength=n_cells)
            sum_xy[:, 1] += np.bincount(c, weights=y, minlength=n_cells)
            n_tx += np.bincount(c, minlength=n_cells)
            bar.advance(task, n)

    n_cells, n_genes = len(cell_map.keys), len(gene_map.keys)
    if total.shape != (n_cells, n_genes):
        total.resize((n_cells, n_genes))
    if len(sum_xy) < n_cells:
        sum_xy = np.vstack([sum_xy, np.zeros((n_cells - len(sum_xy), 2))])
        n_tx = np.concatenate([n_tx, np.zeros(n_cells - len(n_tx), dtype=np.int64)])
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_xy = sum_xy / n_tx[:, None]
    if n_genes == 0:
        raise InvalidSampleError(
            f"{path}: no gene features left after dropping controls and qv < {min_qv} transcripts"
            + (f" and restricting to the {len(genes)} genes asked for" if genes else "")
        )
    stats["cells_with_transcripts"] = int((n_tx > 0).sum())
    log.info(
        "%s: %d transcripts, %d counted into %d cells x %d genes (dropped: %d qv < %g, %d control features, "
        "%d outside any cell, %d not in the gene list)",
        path.name, stats["transcripts"], stats["counted"], stats["cells_with_transcripts"], n_genes,
        stats["low_quality"], min_qv, stats["control"], stats["unassigned"], stats["gene_not_kept"],
    )
    return TranscriptCounts(total.astype(np.int32).tocsr(), list(cell_map.keys), list(gene_map.keys), mean_xy, stats)
