"""`gcmoe predict --detect` on PNG/JPEG crops: the real H&E patches of ../shared/realdata and a Pillow-written one."""

from __future__ import annotations

import os
from pathlib import Path

import anndata
import numpy as np
import pytest
from typer.testing import CliRunner

from gcmoe.cli import app
from gcmoe.config import RunConfig, TissueConfig
from gcmoe.pipeline import train_model

REALDATA = Path(os.environ.get("GCMOE_REALDATA", Path(__file__).resolve().parents[1].parent / "shared" / "realdata"))

# pixel sizes of the real patches: from their READMEs (tiatoolbox's is a 40x crop; stardist's and torchstain's
# are 20x-like and low-magnification crops, taken as 0.5 and 1.0 um/px); NCBI858 is 10x downsampled Xenium H&E
PATCHES = {
    "he_patches/tiatoolbox_target_image.png": 0.25,
    "he_patches/stardist_histo.jpg": 0.5,
    "he_patches/torchstain_source.png": 1.0,
    "he_patches/torchstain_target.png": 1.0,
}


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """A tiny ST-Net* trained on a 300-cell virtual tissue at 0.5 um/px (the morphology encoder's)."""
    root = tmp_path_factory.mktemp("trained_small")
    cfg = RunConfig(out=str(root / "train"))
    cfg.data.tissue = TissueConfig(n_cells=300, height=400, width=400, n_genes=40, n_reference_cells=200, seed=5)
    cfg.train.max_epochs = 1
    cfg.targets.n_top_genes = 8
    return train_model(cfg, "stnet", progress=False)


def _predict(folder: Path, slide: Path, out: Path, *extra: str):
    return CliRunner().invoke(app, ["predict", "--model", str(folder), "--slide", str(slide), "--detect",
                                    "--out", str(out), *extra])


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PATCHES))
def test_predict_detect_on_real_he_patches(model_folder, tmp_path, name):
    path = REALDATA / name
    if not path.is_file():
        pytest.skip(f"real data {name} not found under {REALDATA} (set GCMOE_REALDATA to its folder)")
    out = tmp_path / "pred.h5ad"
    result = _predict(model_folder, path, out, "--mpp", str(PATCHES[name]))
    assert result.exit_code == 0, result.output
    ad = anndata.read_h5ad(out)
    assert ad.n_obs > 10 and ad.n_vars == 8 and np.isfinite(ad.X).all()
    assert ad.uns["gcmoe"]["mpp"] == PATCHES[name] and ad.uns["gcmoe"]["cells"] == "detect_nuclei"


@pytest.mark.slow
def test_predict_on_png_and_jpeg_needs_mpp(model_folder, tmp_path):
    """Without --mpp a PNG/JPEG is refused with the reason; NCBI858's 2.1 um/px is refused as too coarse."""
    from PIL import Image

    from gcmoe.data.virtual_tissue import simulate_tissue

    new = simulate_tissue(TissueConfig(n_cells=150, height=300, width=300, n_genes=40, n_reference_cells=100, seed=9))
    Image.fromarray(new.sample.image.read_region(0, 0, 300, 300)).save(tmp_path / "crop.png")
    result = _predict(model_folder, tmp_path / "crop.png", tmp_path / "p.h5ad")
    assert result.exit_code == 2
    assert "crop.png is a PNG/JPEG image" in result.output and "--mpp" in result.output
    result = _predict(model_folder, tmp_path / "crop.png", tmp_path / "p.h5ad", "--mpp", "0.5")
    assert result.exit_code == 0, result.output
    assert anndata.read_h5ad(tmp_path / "p.h5ad").n_obs > 50
    lung = REALDATA / "xenium_lung_ncbi858" / "NCBI858.jpg"
    if lung.is_file():
        result = _predict(model_folder, lung, tmp_path / "lung.h5ad", "--mpp", "2.125")
        assert result.exit_code == 2 and "resampling by more than 4x" in " ".join(result.output.split())
