"""Bad inputs not covered beside their modules: slides that share no gene, docs/errors.md against the tests."""

import re
from pathlib import Path

import numpy as np
import pytest

from gcmoe.config import TargetConfig
from gcmoe.data.sample import Sample
from gcmoe.errors import InvalidSampleError
from gcmoe.pipeline import pool_cells

ROOT = Path(__file__).resolve().parents[1]


def _sample(genes, sid):
    rng = np.random.default_rng(0)
    return Sample.from_arrays(rng.poisson(1.0, (8, len(genes))), rng.uniform(1, 40, (8, 2)),
                              np.full((50, 50, 3), 200, np.uint8), 0.5, genes, sid)


def test_slides_that_share_no_gene_are_refused():
    a, b = _sample(["A", "B"], "one"), _sample(["C", "D"], "two")
    with pytest.raises(InvalidSampleError, match="share no gene; check the gene panels"):
        pool_cells([a, b], "run", [np.zeros((8, 3))] * 2, TargetConfig())


def test_every_row_of_errors_md_names_a_test_that_exists():
    text = (ROOT / "docs" / "errors.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "`tests/" in line]
    assert len(rows) >= 15
    for row in rows:
        for path, name in re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", row):
            source = (ROOT / path).read_text()
            assert re.search(rf"^def {name}\(", source, re.M), f"{path}::{name} (docs/errors.md) does not exist"


def test_missing_pixel_size_says_how_to_give_it(tmp_path):
    import anndata

    import tifffile

    from gcmoe.data.readers import read_sample

    rng = np.random.default_rng(0)
    adata = anndata.AnnData(rng.poisson(1.0, (6, 3)).astype(np.float32))
    adata.obsm["spatial"] = rng.uniform(1, 40, (6, 2))
    adata.write_h5ad(tmp_path / "cells.h5ad")
    tifffile.imwrite(tmp_path / "he.tif", np.full((50, 50, 3), 200, np.uint8), photometric="rgb")  # no resolution tags
    with pytest.raises(InvalidSampleError, match="pixel size of the H&E image is unknown.*give it with --mpp"):
        read_sample(tmp_path / "cells.h5ad", "h5ad", image=tmp_path / "he.tif")
