"""Cell-type-specific gene co-expression graphs from a labelled reference scRNA-seq set (CAP's prior).

For routing type k: the reference cells whose type maps to k, restricted to the target genes, library-size
normalised (to the median total of the reference) and log1p-transformed; Pearson correlation between genes;
an edge (g, h) wherever r_gh > tau, no self loops. Genes missing from the reference get no edges (and a
warning that names them); so do genes constant within a type. A graph is also built over all reference
cells (the no-MoE ablation's graph).

The prior is saved as a .npz (no pickles: arrays and a JSON header only) and loaded back with ``allow_pickle``
off, so a prior handed over by someone else cannot run code.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gcmoe.data.normalisation import log_normalised
from gcmoe.errors import GcmoeError, InvalidSampleError
from gcmoe.files import atomic_path

log = logging.getLogger(__name__)


class PriorError(GcmoeError, ValueError):
    """A reference or a prior file cannot give the co-expression graphs asked for."""


@dataclass
class CoexpressionPrior:
    """One binary gene graph per routing type, over the target genes."""

    genes: list[str]
    types: list[str]
    adjacency: np.ndarray  # (K, G, G) bool, symmetric, no self loops
    all_cells: np.ndarray  # (G, G) bool: the graph over all reference cells
    tau: float
    n_cells: list[int]  # reference cells behind each type's graph
    missing_genes: list[str]  # target genes absent from the reference (no edges)

    def summary(self) -> dict[str, Any]:
        """Edges per type, genes covered (with at least one edge), and the overlap between types' graphs."""
        k = len(self.types)
        upper = np.triu_indices(len(self.genes), 1)
        edge_sets = [set(zip(*np.nonzero(np.triu(a, 1)))) for a in self.adjacency]
        overlap = [[(len(edge_sets[i] & edge_sets[j]) / max(len(edge_sets[i] | edge_sets[j]), 1)) for j in range(k)]
                   for i in range(k)]
        return {
            "tau": self.tau,
            "n_genes": len(self.genes),
            "missing_genes": self.missing_genes,
            "types": {
                t: {"reference_cells": int(self.n_cells[i]), "edges": int(self.adjacency[i][upper].sum()),
                    "density": float(self.adjacency[i][upper].mean()) if len(upper[0]) else 0.0,
                    "genes_covered": int(self.adjacency[i].any(axis=1).sum())}
                for i, t in enumerate(self.types)
            },
            "all_cells_edges": int(self.all_cells[upper].sum()),
            "edge_jaccard_between_types": overlap,
        }

    def subset(self, genes: Sequence[str]) -> CoexpressionPrior:
        """The graphs restricted to ``genes`` (every one must be in the prior), in that order."""
        index = {g: i for i, g in enumerate(self.genes)}
        absent = [g for g in genes if g not in index]
        if absent:
            raise PriorError(f"the prior does not cover {len(absent)} gene(s), e.g. {absent[:10]}; rebuild it for these genes")
        idx = np.array([index[g] for g in genes], dtype=np.int64)
        return CoexpressionPrior(
            list(genes), list(self.types), self.adjacency[:, idx][:, :, idx], self.all_cells[np.ix_(idx, idx)],
            self.tau, list(self.n_cells), [g for g in self.missing_genes if g in set(genes)],
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write to .npz atomically (arrays + a JSON header; no pickled objects)."""
        path = Path(path)
        header = {"genes": self.genes, "types": self.types, "tau": self.tau, "n_cells": self.n_cells,
                  "missing_genes": self.missing_genes, "format": "gcmoe-coexpression-prior/1"}
        with atomic_path(path, suffix=".npz") as tmp:
            np.savez_compressed(tmp, adjacency=np.packbits(self.adjacency, axis=-1),
                                all_cells=np.packbits(self.all_cells, axis=-1),
                                header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> CoexpressionPrior:
        """Read a prior written by :meth:`save`."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                header = json.loads(bytes(z["header"]).decode())
                g = len(header["genes"])
                adjacency = np.unpackbits(z["adjacency"], axis=-1, count=g).astype(bool)
                all_cells = np.unpackbits(z["all_cells"], axis=-1, count=g).astype(bool)
        except (OSError, KeyError, ValueError, json.JSONDecodeError) as exc:
            raise PriorError(f"{path} is not a gcmoe co-expression prior ({exc}); rebuild it with `gcmoe prior`") from exc
        return cls(header["genes"], header["types"], adjacency, all_cells, float(header["tau"]),
                   list(header["n_cells"]), list(header["missing_genes"]))


def reference_type_mapping(reference, type_key: str = "cell_type", mapping: Mapping[str, str] | None = None,
                           routing_types: Sequence[str] | None = None) -> dict[str, str]:
    """Reference type name -> routing type: ``mapping`` when given, else the reference's own
    (``uns["gcmoe"]["type_mapping"]``), else each reference type to the routing type of the same name (every
    reference type when ``routing_types`` is None). Reference types absent from the result are left out."""
    if mapping is not None:
        return {str(k): str(v) for k, v in dict(mapping).items()}
    own = reference.uns.get("gcmoe", {}).get("type_mapping")
    if own:
        return {str(k): str(v) for k, v in dict(own).items()}
    ref_types = reference.obs[type_key].astype(str).unique() if type_key in reference.obs else []
    return {t: t for t in ref_types if routing_types is None or t in set(routing_types)}


def prior_from_files(reference: str | os.PathLike, genes: Sequence[str] | None = None,
                     genes_of: str | os.PathLike | None = None, routing_types: Sequence[str] | None = None,
                     mapping: str | os.PathLike | None = None, type_key: str = "cell_type",
                     tau: float = 0.2) -> CoexpressionPrior:
    """``gcmoe prior``: co-expression graphs from a reference .h5ad, with the target genes and type mapping
    read from files.

    Parameters
    ----------
    genes
        The target genes; else those of the Sample .h5ad ``genes_of``; else every gene of the reference.
    routing_types
        The routing types; default: the mapping's types in routing order (gcmoe.data.cell_types.ordered_types).
    mapping
        A YAML file ``{reference type: routing type}``; default: the reference's own, else the same names.
    """
    import anndata
    import yaml

    from gcmoe.data.cell_types import ordered_types

    from gcmoe.data.readers.h5ad import read_reference

    ref = read_reference(reference, type_key)
    if genes is None:
        genes = list(map(str, (anndata.read_h5ad(genes_of, backed="r") if genes_of else ref).var_names))
    type_map = yaml.safe_load(Path(mapping).read_text()) if mapping else None
    if routing_types is None:
        routing_types = ordered_types(reference_type_mapping(ref, type_key, type_map).values())
    return build_coexpression_prior(ref, list(genes), list(routing_types), type_key=type_key, mapping=type_map,
                                    tau=tau)


def correlation_graph(expr: np.ndarray, tau: float) -> np.ndarray:
    """Binary graph r_gh > tau between the columns of ``expr`` (cells x genes); constant genes get no edge."""
    if expr.shape[0] < 3:
        return np.zeros((expr.shape[1], expr.shape[1]), dtype=bool)
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore")
        r = np.corrcoef(expr, rowvar=False)
    r = np.atleast_2d(np.nan_to_num(r, nan=0.0))
    adj = r > tau
    np.fill_diagonal(adj, False)
    return adj


def build_coexpression_prior(
    reference,
    genes: Sequence[str],
    routing_types: Sequence[str],
    type_key: str = "cell_type",
    mapping: Mapping[str, str] | None = None,
    tau: float = 0.2,
    layer: str | None = "counts",
    min_cells: int = 10,
) -> CoexpressionPrior:
    """Co-expression graphs of ``genes`` for each routing type from a labelled reference AnnData.

    ``mapping`` sends reference type names to routing types (reference types absent from it are left out,
    and named in the log); by default names equal to a routing type map to it, and
    ``reference.uns["gcmoe"]["type_mapping"]`` is used when the reference carries one. Raw counts are read
    from ``layers[layer]`` when present, else ``X``. A routing type with fewer than ``min_cells`` reference
    cells raises :class:`PriorError` naming it.
    """
    if type_key not in reference.obs:
        raise PriorError(f"the reference has no obs['{type_key}'] column; columns are {list(reference.obs.columns)}")
    mapping = reference_type_mapping(reference, type_key, mapping, routing_types)
    unknown_targets = sorted({v for v in mapping.values() if v not in set(routing_types)})
    if unknown_targets:
        raise PriorError(f"the type mapping sends reference types to {unknown_targets}, which are not routing types {list(routing_types)}")
    ref_genes = [str(g) for g in reference.var_names]
    present = [g for g in genes if g in set(ref_genes)]
    missing = [g for g in genes if g not in set(ref_genes)]
    if not present:
        raise InvalidSampleError(f"the reference shares no gene with the {len(genes)} target genes (e.g. {list(genes)[:5]})")
    if missing:
        warnings.warn(f"{len(missing)} target gene(s) are absent from the reference and get no co-expression edges: "
                      f"{missing[:20]}", stacklevel=2)
    counts = reference.layers[layer] if layer and layer in reference.layers else reference.X
    col = np.array([ref_genes.index(g) for g in present])
    expr = log_normalised(counts, col)
    ref_types = reference.obs[type_key].astype(str).to_numpy()
    routed = np.array([mapping.get(t, "") for t in ref_types])
    left_out = sorted(set(ref_types[routed == ""]))
    if left_out:
        log.info("reference types not mapped to a routing type (left out of the prior): %s", left_out)
    pos = np.array([list(genes).index(g) for g in present])
    g = len(genes)
    adjacency = np.zeros((len(routing_types), g, g), dtype=bool)
    n_cells = []
    for k, t in enumerate(routing_types):
        rows = routed == t
        n_cells.append(int(rows.sum()))
        if rows.sum() < min_cells:
            raise PriorError(f"routing type {t!r} has {int(rows.sum())} reference cells (need >= {min_cells}); "
                             f"map more reference types to it (reference types: {sorted(set(ref_types))})")
        adjacency[k][np.ix_(pos, pos)] = correlation_graph(expr[rows], tau)
    all_cells = np.zeros((g, g), dtype=bool)
    all_cells[np.ix_(pos, pos)] = correlation_graph(expr[routed != ""], tau)
    return CoexpressionPrior(list(genes), list(routing_types), adjacency, all_cells, float(tau), n_cells, missing)
