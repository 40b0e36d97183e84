"""GHIST's demo inputs: a cell x gene count CSV, integer cell-type codes and nucleus sizes.

GHIST (SydneyBioX/GHIST) ships the public expression of its breast demo, a 5,508-cell crop of 10x Xenium
breast "In Situ Sample 2" (280 genes, 9 cell types), as ``data_demo/``:

| file | columns |
|---|---|
| ``expr_mat_breast_demo.csv`` | an unnamed index, ``cell_id``, one column per gene (raw counts) |
| ``cell_types_breast_demo.csv`` | ``c_ids`` (cell id), ``ct_idx`` (0-based index into the type names) |
| ``nuclei_sizes_breast_demo.csv`` | the cell id (first column), ``orig_size`` (nucleus area, pixels) |

The type names are not in the CSVs: GHIST's ``configs/config_demo.json`` lists them (``data.cell_types``);
pass that file, or the names, or the breast demo's order (``GHIST_BREAST_TYPES``) is used. Its H&E images are
not read here (the expression alone; ``gcmoe.data.virtual_tissue.transplant`` places it in a rendered tissue).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData

from gcmoe._constants import Key
from gcmoe.errors import InvalidSampleError

# configs/config_demo.json of SydneyBioX/GHIST, data.cell_types, in ct_idx order.
GHIST_BREAST_TYPES = ("B", "Myeloid", "Endothelial", "Fibroblast", "Macrophage", "Malignant", "Epithelial",
                      "Plasma", "T")


class GhistFiles:
    """File and column names of GHIST's demo folder."""

    EXPRESSION = "expr_mat_breast_demo.csv"
    CELL_TYPES = "cell_types_breast_demo.csv"
    NUCLEUS_SIZES = "nuclei_sizes_breast_demo.csv"
    CONFIG = "config_demo.json"
    CELL_ID = "cell_id"
    TYPE_ID = "c_ids"
    TYPE_CODE = "ct_idx"
    SIZE = "orig_size"


def read_ghist_expression(folder: str | os.PathLike, type_names: Sequence[str] | None = None) -> AnnData:
    """Read GHIST's demo expression, cell types and nucleus sizes into an AnnData.

    Parameters
    ----------
    folder
        GHIST's ``data_demo/`` (the three CSVs of the module table; ``config_demo.json`` beside them is
        read for the type names when present).
    type_names
        Names of the ``ct_idx`` codes in order; default: the folder's ``config_demo.json``, else
        ``GHIST_BREAST_TYPES``.

    Returns
    -------
    AnnData (cells x genes) with raw counts in ``X`` and ``layers["counts"]``, ``obs["cell_type"]`` and, when
    the sizes file is present, ``obs["nucleus_size_px"]``. No positions: the CSVs carry none.
    """
    folder = Path(folder)
    expr_path = folder / GhistFiles.EXPRESSION
    types_path = folder / GhistFiles.CELL_TYPES
    for path in (expr_path, types_path):
        if not path.is_file():
            raise InvalidSampleError(f"{path} not found: point to GHIST's data_demo/ folder, which holds "
                                     f"{GhistFiles.EXPRESSION} and {GhistFiles.CELL_TYPES}")
    expr = pd.read_csv(expr_path, index_col=0)
    if GhistFiles.CELL_ID not in expr.columns:
        raise InvalidSampleError(f"{expr_path} has no '{GhistFiles.CELL_ID}' column; its columns start "
                                 f"{list(expr.columns[:5])}")
    ids = expr.pop(GhistFiles.CELL_ID).astype(str).to_numpy()
    counts = expr.to_numpy(dtype=np.float32)
    if not np.isfinite(counts).all() or (counts < 0).any() or not np.array_equal(counts, np.round(counts)):
        raise InvalidSampleError(f"{expr_path} must hold raw counts (non-negative whole numbers)")
    types = pd.read_csv(types_path)
    missing_cols = {GhistFiles.TYPE_ID, GhistFiles.TYPE_CODE} - set(types.columns)
    if missing_cols:
        raise InvalidSampleError(f"{types_path} lacks the column(s) {sorted(missing_cols)}")
    code = pd.Series(types[GhistFiles.TYPE_CODE].to_numpy(), index=types[GhistFiles.TYPE_ID].astype(str))
    missing = [i for i in ids if i not in code.index]
    if missing:
        raise InvalidSampleError(f"{len(missing)} cells of {expr_path.name} have no type in {types_path.name}, "
                                 f"e.g. {missing[:3]}")
    names = list(type_names) if type_names is not None else _type_names(folder)
    codes = code.loc[ids].to_numpy()
    if codes.min() < 0 or codes.max() >= len(names):
        raise InvalidSampleError(f"{types_path} holds type codes {codes.min()}..{codes.max()} but {len(names)} "
                                 f"type names were given: {names}")
    obs = pd.DataFrame(index=pd.Index(ids, name=None))
    obs[Key.CELL_TYPE] = pd.Categorical(np.asarray(names, dtype=object)[codes], categories=names)
    sizes_path = folder / GhistFiles.NUCLEUS_SIZES
    if sizes_path.is_file():
        sizes = pd.read_csv(sizes_path)
        size = pd.Series(sizes[GhistFiles.SIZE].to_numpy(dtype=float), index=sizes.iloc[:, 0].astype(str))
        obs["nucleus_size_px"] = size.reindex(ids).to_numpy()
    adata = AnnData(X=counts, obs=obs)
    adata.var_names = pd.Index(expr.columns.astype(str))
    adata.layers[Key.COUNTS] = counts.copy()
    adata.uns[Key.UNS] = {"provenance": {"reader": "ghist", "folder": str(folder)}}
    return adata


def _type_names(folder: Path) -> list[str]:
    config = folder / GhistFiles.CONFIG
    if config.is_file():
        try:
            names = json.loads(config.read_text())["data"]["cell_types"]
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidSampleError(f"{config} has no data.cell_types list: {exc}") from exc
        return [str(n) for n in names]
    return list(GHIST_BREAST_TYPES)
