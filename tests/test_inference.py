"""gcmoe predict: a trained model folder + a bare H&E image -> an h5ad of predictions."""

import anndata
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from gcmoe.cli import app
from gcmoe.config import RunConfig, TissueConfig
from gcmoe.data.virtual_tissue import simulate_tissue
from gcmoe.errors import InvalidSampleError
from gcmoe.inference import predict_slide
from gcmoe.pipeline import train_model


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    cfg = RunConfig(out=str(root / "train"))
    cfg.data.tissue = TissueConfig(n_cells=600, height=500, width=500, n_genes=60, n_reference_cells=300, seed=3)
    cfg.train.max_epochs = 3
    cfg.targets.n_top_genes = 15
    folder = train_model(cfg, "gcmoe", progress=False)
    new = simulate_tissue(TissueConfig(n_cells=400, height=450, width=450, n_genes=60, n_reference_cells=200, seed=8))
    new.sample.write(root / "new" / "slide.h5ad")
    xy = new.sample.spatial
    pd.DataFrame({"cell_id": new.sample.adata.obs_names, "x": xy[:, 0], "y": xy[:, 1]}).to_csv(root / "cells.csv", index=False)
    return folder, root


@pytest.mark.slow
def test_predict_writes_documented_fields(trained, tmp_path):
    folder, root = trained
    out = tmp_path / "pred.h5ad"
    result = CliRunner().invoke(app, ["predict", "--model", str(folder), "--slide", str(root / "new" / "slide.tif"),
                                      "--cells", str(root / "cells.csv"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    ad = anndata.read_h5ad(out)
    assert ad.n_obs == 400 and ad.n_vars == 15
    assert ad.obsm["spatial"].shape == (400, 2) and ad.obsm["routing"].shape == (400, 4)
    np.testing.assert_allclose(ad.obsm["routing"].sum(1), 1, atol=1e-5)
    assert set(ad.obs["expert"].cat.categories) == {"neoplastic", "inflammatory", "connective", "epithelial"}
    assert ad.uns["gcmoe"]["mpp"] == 0.5 and ad.uns["gcmoe"]["model"]["model"] == "gcmoe"
    assert np.isfinite(ad.X).all()


@pytest.mark.slow
def test_from_a_model_folder_and_a_bare_image_to_an_h5ad_and_a_report(trained, tmp_path):
    """The user's path: model folder + H&E (nuclei detected) -> predictions -> plot and offline HTML report."""
    from html.parser import HTMLParser

    folder, root = trained
    runner = CliRunner()
    pred = tmp_path / "pred.h5ad"
    result = runner.invoke(app, ["predict", "--model", str(folder), "--slide", str(root / "new" / "slide.tif"),
                                 "--detect", "--out", str(pred)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["report", str(pred)])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "pred.html").read_text()

    class Tags(HTMLParser):
        def __init__(self):
            super().__init__()
            self.images, self.tables, self.external = 0, 0, []

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            self.images += tag == "img" and attrs.get("src", "").startswith("data:image/png;base64,")
            self.tables += tag == "table"
            self.external += [v for k, v in attrs.items() if k in ("src", "href") and v and not v.startswith("data:")]

    tags = Tags()
    tags.feed(page)
    assert tags.images == 1 and tags.tables >= 3 and not tags.external
    assert "Cells per expert" in page and "GC-MoE" in page
    result = runner.invoke(app, ["plot", "prediction", str(pred), "--genes", str(anndata.read_h5ad(pred).var_names[0])])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "pred.png").stat().st_size > 10_000 and (tmp_path / "pred.svg").is_file()
    result = runner.invoke(app, ["plot", "prediction", str(pred), "--genes", "NOPE"])
    assert result.exit_code != 0 and "are not predicted by this model" in result.output


@pytest.mark.slow
def test_predict_with_detection(trained, tmp_path):
    folder, root = trained
    ad = predict_slide(folder, root / "new" / "slide.tif", tmp_path / "p.h5ad", detect=True, progress=False)
    assert 200 < ad.n_obs < 600


@pytest.mark.slow
def test_pixel_size_far_from_the_models_is_refused(trained, tmp_path):
    folder, root = trained
    with pytest.raises(InvalidSampleError, match="resampling"):
        predict_slide(folder, root / "new" / "slide.tif", tmp_path / "p.h5ad", cells=root / "cells.csv", mpp=4.0,
                      progress=False)
    with pytest.raises(InvalidSampleError, match="exactly one source of cells"):
        predict_slide(folder, root / "new" / "slide.tif", tmp_path / "p.h5ad", progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["stnet", "histogene", "bleep", "triplex"])
def test_predict_with_every_baseline(tmp_path, name):
    root = tmp_path
    cfg = RunConfig(out=str(root / "train"))
    cfg.data.tissue = TissueConfig(n_cells=300, height=400, width=400, n_genes=60, n_reference_cells=200, seed=3)
    cfg.train.max_epochs = 2
    cfg.targets.n_top_genes = 10
    folder = train_model(cfg, name, progress=False)
    ad = predict_slide(folder, root / "train" / "data" / "virtual_tissue.tif", root / "p.h5ad",
                       cells=_cells_csv(root), progress=False)
    assert ad.n_obs == 300 and ad.n_vars == 10 and np.isfinite(ad.X).all()


def _cells_csv(root):
    ad = anndata.read_h5ad(root / "train" / "data" / "virtual_tissue.h5ad")
    xy = ad.obsm["spatial"]
    pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1]}).to_csv(root / "cells.csv", index=False)
    return root / "cells.csv"


def test_cell_file_units_are_checked(tmp_path):
    """`gcmoe predict --cells` with micrometre centres: refused as pixels (too close at 0.2125 um/px) with
    --coords um as the fix; read with --coords um; pixels given as micrometres overflow the slide and say so."""
    from gcmoe.inference import centres_on_slide

    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(np.arange(20), np.arange(20)), -1).reshape(-1, 2) * 10.0 + rng.uniform(0, 2, (400, 2))
    pd.DataFrame({"x": grid[:, 0], "y": grid[:, 1]}).to_csv(tmp_path / "um.csv", index=False)
    with pytest.raises(InvalidSampleError, match="they look like micrometres, give --coords um"):
        centres_on_slide(tmp_path / "um.csv", "px", (1000, 1000), 0.2125, "s")
    xy, ids = centres_on_slide(tmp_path / "um.csv", "um", (1000, 1000), 0.2125, "s")
    np.testing.assert_allclose(xy, grid / 0.2125)
    assert len(ids) == 400
    pd.DataFrame({"x": grid[:, 0] / 0.2125, "y": grid[:, 1] / 0.2125}).to_csv(tmp_path / "px.csv", index=False)
    with pytest.raises(InvalidSampleError, match=r"fit the image when read another way: as pixels \(--coords px\)"):
        centres_on_slide(tmp_path / "px.csv", "um", (1000, 1000), 0.2125, "s")


@pytest.mark.slow
def test_a_model_trained_with_stain_norm_predicts_with_it(tmp_path):
    """features.stain_norm travels in the model card: prediction normalises the new slide as training did."""
    from gcmoe.inference import load_predictor

    cfg = RunConfig(out=str(tmp_path / "train"))
    cfg.data.tissue = TissueConfig(n_cells=400, height=400, width=400, n_genes=60, n_reference_cells=200, seed=3)
    cfg.train.max_epochs = 1
    cfg.targets.n_top_genes = 10
    cfg.features.stain_norm = "reinhard"
    predictor = load_predictor(train_model(cfg, "stnet", progress=False))
    assert predictor.meta["encoder"]["stain_norm"] == "reinhard"
    new = simulate_tissue(TissueConfig(n_cells=300, height=400, width=400, n_genes=60, n_reference_cells=100, seed=8))
    stats = {}
    ad = predictor.predict(new.sample.image, 0.5, new.sample.spatial, list(new.sample.adata.obs_names), "new", {},
                           progress=False, stats=stats)
    assert stats["stain_norm"] == "reinhard" and len(stats["stain_lab_mean"]) == 3
    assert ad.uns["gcmoe"]["model"]["encoder"]["stain_norm"] == "reinhard"
