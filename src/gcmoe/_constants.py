"""Names of the AnnData fields that gcmoe reads and writes, in one place (squidpy's habit)."""

from __future__ import annotations

from typing import Final


class Key:
    """AnnData field names.

    Coordinates in ``obsm[Key.SPATIAL]`` are always (x, y) pixels of the full-resolution H&E image.
    """

    SPATIAL: Final = "spatial"  # obsm: (n_cells, 2) float, (x, y) full-resolution H&E pixels
    COUNTS: Final = "counts"  # layers: raw integer counts
    CELL_TYPE: Final = "cell_type"  # obs: routing cell type (categorical), when known
    SAMPLE_ID: Final = "sample_id"  # obs: the sample each cell belongs to
    UNS: Final = "gcmoe"  # uns: image path, mpp, provenance
    # Virtual tissue only: the generator's ground truth, kept with the cells so a saved tissue keeps its ceiling.
    TRUTH_MEAN: Final = "truth_mean"  # layers: noise-free expected counts
    TRUTH_STATE: Final = "truth_state"  # obsm: continuous per-cell state


class UnsKey:
    """Keys inside ``adata.uns[Key.UNS]``."""

    SAMPLE_ID: Final = "sample_id"
    IMAGE_PATH: Final = "image_path"
    MPP: Final = "mpp"  # micrometres per full-resolution pixel, the value used
    MPP_EMBEDDED: Final = "mpp_embedded"  # the value stored in the image file, when it differs
    PROVENANCE: Final = "provenance"
    TRUTH: Final = "truth"  # virtual tissue: generator parameters needed to compute the ceiling
