"""Hostile inputs through the command line (issue 16): nothing silent, nothing lost. docs/errors.md lists them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from gcmoe.cli import app
from gcmoe.files import MANIFEST_NAME

runner = CliRunner()

TINY_RUN = """\
data:
  tissue: {n_cells: 200, height: 300, width: 300, n_genes: 30, n_reference_cells: 100, seed: 1}
models: [stnet]
train: {max_epochs: 2, patience: 2}
targets: {n_top_genes: 8}
cv: {n_folds: 2}
"""


def _cv(out: Path, cfg: Path, *extra: str):
    return runner.invoke(app, ["cv", "--config", str(cfg), "--out", str(out), *extra])


def _user_files(folder: Path) -> dict[Path, str]:
    files = {folder / "config.yaml": "my settings\n", folder / "model" / "model.json": "{\"mine\": 1}\n",
             folder / "checkpoints" / "notes.txt": "my notes\n", folder / "cv_state" / "keep.txt": "keep\n"}
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return files


# --- 1. lost user data: the output-folder policy ---


def test_train_and_cv_refuse_a_folder_gcmoe_did_not_make(tmp_path):
    out = tmp_path / "mine"
    files = _user_files(out)
    for command in (["train", "--model", "stnet"], ["cv", "--models", "stnet"]):
        result = runner.invoke(app, [*command, "--out", str(out)])
        assert result.exit_code == 2, result.output
        assert "gcmoe did not make" in result.output and "--overwrite" in result.output
    assert all(path.read_text() == text for path, text in files.items())
    assert not (out / MANIFEST_NAME).exists()


def test_out_naming_a_file_or_folder_of_the_wrong_kind_is_refused_before_the_work(tmp_path):
    taken = tmp_path / "keep.txt"
    taken.write_text("precious\n")
    for command in (["train", "--model", "stnet"], ["simulate"], ["demo", "--quick"]):
        result = runner.invoke(app, [*command, "--out", str(taken)])
        assert result.exit_code == 2 and "is an existing file" in result.output, result.output
    result = runner.invoke(app, ["extract", str(tmp_path / "absent.h5ad"), "--out", str(taken)])
    assert result.exit_code == 2 and "exists; gcmoe does not replace a file" in result.output, result.output
    assert taken.read_text() == "precious\n"
    folder = tmp_path / "folder"
    folder.mkdir()
    result = runner.invoke(app, ["extract", str(tmp_path / "absent.h5ad"), "--out", str(folder)])
    assert result.exit_code == 2 and "is an existing folder" in result.output, result.output
    result = runner.invoke(app, ["predict", "--model", str(tmp_path / "m"), "--slide", str(tmp_path / "s.tif"),
                                 "--out", str(folder)])
    assert result.exit_code == 2 and "is an existing folder" in result.output, result.output
    assert not list(folder.iterdir())


@pytest.mark.slow
def test_cv_keeps_user_files_in_its_own_folder_and_resumes(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(TINY_RUN)
    out = tmp_path / "run"
    assert _cv(out, cfg).exit_code == 0
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["made_by"] == "gcmoe cv" and "config.yaml" in manifest["files"]
    notes = {out / "checkpoints" / "notes.txt": "n\n", out / "cv_state" / "stnet" / "mine.txt": "m\n",
             out / "my_analysis.py": "print(1)\n"}
    for path, text in notes.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    before = (out / "results.json").read_text()
    result = _cv(out, cfg, "--resume")  # its own folder: resumes from cv_state
    assert result.exit_code == 0, result.output
    assert json.loads((out / "results.json").read_text())["datasets"] == json.loads(before)["datasets"]
    result = _cv(out, cfg)  # a fresh run in its own folder deletes its cv_state, not the user's files
    assert result.exit_code == 0, result.output
    assert all(path.read_text() == text for path, text in notes.items())
    (out / "results.md").unlink()
    (out / "results.md").write_text("the user's own\n")  # a file of a name gcmoe writes, now the user's
    (out / MANIFEST_NAME).write_text(json.dumps(
        {**json.loads((out / MANIFEST_NAME).read_text()),
         "files": [f for f in json.loads((out / MANIFEST_NAME).read_text())["files"] if f != "results.md"]}))
    result = _cv(out, cfg, "--resume")
    assert result.exit_code == 2 and "results.md exists and was not written by gcmoe" in result.output, result.output
    assert (out / "results.md").read_text() == "the user's own\n"


@pytest.mark.slow
def test_overwrite_writes_into_a_foreign_folder_but_deletes_nothing(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(TINY_RUN)
    out = tmp_path / "mine"
    files = _user_files(out)
    result = _cv(out, cfg, "--overwrite")
    assert result.exit_code == 0, result.output
    assert (out / "config.yaml").read_text() != files[out / "config.yaml"]  # a name gcmoe writes: replaced
    for path in (out / "model" / "model.json", out / "checkpoints" / "notes.txt", out / "cv_state" / "keep.txt"):
        assert path.read_text() == files[path]
    assert (out / "results.json").is_file()


def test_remove_owned_deletes_only_what_gcmoe_wrote(tmp_path):
    from gcmoe.files import output_folder, remove_owned, write_text

    with output_folder(tmp_path / "o", "test") as folder:
        write_text(tmp_path / "o" / "ck" / "a" / "x.txt", "gcmoe's")
        (tmp_path / "o" / "ck" / "a" / "user.txt").write_text("user's")
        remove_owned(tmp_path / "o" / "ck")
        assert (tmp_path / "o" / "ck" / "a" / "user.txt").is_file()
        assert not (tmp_path / "o" / "ck" / "a" / "x.txt").exists()
        assert "ck/a/x.txt" not in folder.entries
    assert json.loads((tmp_path / "o" / MANIFEST_NAME).read_text())["files"] == []


def test_unexpected_errors_are_one_line_with_the_traceback_in_a_file(tmp_path, monkeypatch):
    import gcmoe.pipeline

    def boom(*args, **kwargs):
        raise RuntimeError("something odd")

    monkeypatch.setattr(gcmoe.pipeline, "run_cv", boom)
    result = runner.invoke(app, ["cv", "--models", "stnet", "--out", str(tmp_path / "o")])
    assert result.exit_code == 1, result.output
    assert "unexpected RuntimeError: something odd" in result.output and "--debug" in result.output
    assert "Traceback" not in result.output
    log_path = result.output.split("the traceback is in ")[1].split(";")[0]
    assert "RuntimeError" in Path(log_path).read_text()
    result = runner.invoke(app, ["--debug", "cv", "--models", "stnet", "--out", str(tmp_path / "o")])
    assert isinstance(result.exception, RuntimeError)


# --- shared inputs: a simulated Sample, its reference, a trained model folder (all through the CLI) ---


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """``tissue/`` (virtual_tissue.h5ad + .tif, reference.h5ad) and ``run/model`` (ST-Net*, 2 epochs)."""
    root = tmp_path_factory.mktemp("hostile")
    result = runner.invoke(app, ["simulate", "--out", str(root / "tissue"), "--n-cells", "200", "--height", "300",
                                 "--width", "300", "--n-genes", "30", "--seed", "1"])
    assert result.exit_code == 0, result.output
    cfg = root / "train.yaml"
    cfg.write_text("train: {max_epochs: 2, patience: 2}\ntargets: {n_top_genes: 8}\n")
    result = runner.invoke(app, ["train", "--config", str(cfg), "--model", "stnet", "--data",
                                 str(root / "tissue" / "virtual_tissue.h5ad"), "--out", str(root / "run"), "--no-qc"])
    assert result.exit_code == 0, result.output
    return root


def _sample_adata(made: Path):
    import anndata

    adata = anndata.read_h5ad(made / "tissue" / "virtual_tissue.h5ad")
    adata.uns["gcmoe"]["image_path"] = str(made / "tissue" / "virtual_tissue.tif")  # copies are written elsewhere
    return adata


def _convert(path: Path, out: Path, *extra: str):
    return runner.invoke(app, ["convert", "--data", str(path), "--out", str(out), *extra])


def _clear(result, *needles: str) -> None:
    """A clear error: exit status 2, no traceback, every needle in the message."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.output, (needle, result.output)


# --- 2. silent wrong results ---


def test_log1p_counts_are_refused_on_every_path(made, tmp_path):
    adata = _sample_adata(made)
    adata.layers["counts"] = np.log1p(adata.layers["counts"])
    adata.write_h5ad(tmp_path / "log.h5ad")
    _clear(_convert(tmp_path / "log.h5ad", tmp_path / "o.h5ad", "--format", "sample"),
           "not whole numbers", "normalised or log1p")
    ref = __import__("anndata").read_h5ad(made / "tissue" / "reference.h5ad")
    ref.X = np.log1p(np.asarray(ref.X.todense() if hasattr(ref.X, "todense") else ref.X))
    ref.layers.clear()
    ref.write_h5ad(tmp_path / "ref_log.h5ad")
    _clear(runner.invoke(app, ["prior", "--reference", str(tmp_path / "ref_log.h5ad"), "--genes", "g1,g2",
                               "--out", str(tmp_path / "p.npz")]), "reference", "not whole numbers")
    nan = _sample_adata(made)
    nan.layers["counts"] = np.asarray(nan.layers["counts"], dtype=np.float32)
    nan.layers["counts"][0, 0] = np.nan
    nan.write_h5ad(tmp_path / "nan.h5ad")
    _clear(_convert(tmp_path / "nan.h5ad", tmp_path / "o.h5ad", "--format", "sample"), "1 NaN or infinite values")


def test_a_reference_without_cells_or_cell_types_says_so(made, tmp_path):
    import anndata

    ref = anndata.read_h5ad(made / "tissue" / "reference.h5ad")
    ref[:0].copy().write_h5ad(tmp_path / "empty.h5ad")
    _clear(runner.invoke(app, ["prior", "--reference", str(tmp_path / "empty.h5ad"), "--genes", "g1",
                               "--out", str(tmp_path / "p.npz")]), "holds 0 cells")
    del ref.obs["cell_type"]
    ref.write_h5ad(tmp_path / "untyped.h5ad")
    _clear(runner.invoke(app, ["prior", "--reference", str(tmp_path / "untyped.h5ad"), "--genes", "g1",
                               "--out", str(tmp_path / "p.npz")]), "no obs column 'cell_type'", "prior.type_key")


def test_an_edited_model_card_is_refused(made, tmp_path):
    import shutil

    from gcmoe.training.checkpoint import seal_model

    slide = made / "tissue" / "virtual_tissue.tif"
    cells = tmp_path / "cells.csv"
    xy = np.asarray(_sample_adata(made).obsm["spatial"])
    cells.write_text("x,y\n" + "\n".join(f"{x:.1f},{y:.1f}" for x, y in xy) + "\n")
    model = tmp_path / "model"
    shutil.copytree(made / "run" / "model", model)
    meta = json.loads((model / "model.json").read_text())

    def predict(*extra):
        return runner.invoke(app, ["predict", "--model", str(model), "--slide", str(slide), "--cells", str(cells),
                                   "--mpp", "0.5", "--out", str(tmp_path / f"p{len(extra)}.h5ad"), *extra])

    (model / "model.json").write_text(json.dumps(meta | {"genes": meta["genes"][::-1]}))  # relabels every gene
    _clear(predict(), "model.json does not match its checksum in SHA256SUMS", "seal_model")
    (model / "model.json").write_text(json.dumps(meta | {"genes": meta["genes"][:-2]}))
    seal_model(model)
    _clear(predict(), "not a usable model card", "'genes' must list the model's")
    (model / "model.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "params"}))
    seal_model(model)
    _clear(predict(), "'params'")
    (model / "model.json").write_text(json.dumps(meta | {"params": {"hiddn": 3}}))
    seal_model(model)
    _clear(predict(), "has no parameter(s) ['hiddn']")
    (model / "model.json").write_text(json.dumps(meta))
    seal_model(model)
    assert meta["encoder"]["tile_size"] > 0 and "weights_sha256" in meta["encoder"]  # item 5: the card is complete
    result = predict()
    assert result.exit_code == 0, result.output


def test_a_one_pixel_slide_is_refused(made, tmp_path):
    from PIL import Image

    Image.new("RGB", (1, 1), (230, 200, 220)).save(tmp_path / "tiny.png")
    (tmp_path / "cells.csv").write_text("x,y\n0,0\n")
    result = runner.invoke(app, ["predict", "--model", str(made / "run" / "model"), "--slide", str(tmp_path / "tiny.png"),
                                 "--cells", str(tmp_path / "cells.csv"), "--mpp", "0.5", "--out", str(tmp_path / "p.h5ad")])
    _clear(result, "is 1 x 1 px", "mostly from padding")
    assert not (tmp_path / "p.h5ad").exists()


def test_anndata_cell_types_are_used_without_cell_type_key(made, tmp_path):
    import anndata

    adata = _sample_adata(made)
    plain = anndata.AnnData(X=adata.layers["counts"], obs=adata.obs[["cell_type"]].copy(), var=adata.var[[]])
    plain.obsm["spatial"] = np.asarray(adata.obsm["spatial"])
    plain.write_h5ad(tmp_path / "plain.h5ad")
    result = _convert(tmp_path / "plain.h5ad", tmp_path / "o.h5ad", "--format", "h5ad", "--image",
                      str(made / "tissue" / "virtual_tissue.tif"), "--mpp", "0.5")
    assert result.exit_code == 0, result.output
    converted = anndata.read_h5ad(tmp_path / "o.h5ad")
    assert (converted.obs["cell_type"].astype(str).to_numpy() == adata.obs["cell_type"].astype(str).to_numpy()).all()


@pytest.mark.slow
def test_cv_state_and_cell_store_damage_is_detected_on_resume(made, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(TINY_RUN)
    out = tmp_path / "run"
    assert _cv(out, cfg, "--stream").exit_code == 0
    state = sorted((out / "cv_state" / "stnet").glob("*.json"))[0]
    npz = state.with_suffix(".npz")
    good_npz, good_json = npz.read_bytes(), state.read_text()
    with np.load(npz) as arrays:
        np.savez(tmp_path / "other.npz", prediction=arrays["prediction"][::-1])
    npz.write_bytes((tmp_path / "other.npz").read_bytes())  # rewritten predictions
    _clear(_cv(out, cfg, "--stream", "--resume"), "does not match its checksum", "delete")
    npz.write_bytes(good_npz)
    state.write_text(good_json[: len(good_json) // 2])  # truncated
    _clear(_cv(out, cfg, "--stream", "--resume"), "is not a complete fold state", "truncated or damaged")
    state.write_text(good_json)
    from gcmoe.run_store import STORE_DIR

    chunk = max((p for p in (out / "cache" / STORE_DIR).rglob("*") if p.is_file() and "targets.zarr" in p.as_posix()
                 and p.name != "zarr.json"), key=lambda p: p.stat().st_size)
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    chunk.write_bytes(bytes(raw))
    _clear(_cv(out, cfg, "--stream", "--resume"), "cell store", "delete")


# --- 3. tracebacks instead of a message ---


def test_malformed_anndata_fields_are_explained(made, tmp_path):
    tif = str(made / "tissue" / "virtual_tissue.tif")
    adata = _sample_adata(made)
    adata.obsm["spatial"] = np.asarray(adata.obsm["spatial"]).astype(str).astype(object)
    adata.obsm["spatial"] = np.array([[f"{x}px", y] for x, y in adata.obsm["spatial"]], dtype=object).astype(str)
    adata.write_h5ad(tmp_path / "strings.h5ad")
    _clear(_convert(tmp_path / "strings.h5ad", tmp_path / "o.h5ad", "--format", "h5ad", "--image", tif, "--mpp", "0.5"),
           "must hold numbers")
    adata = _sample_adata(made)
    adata.uns["gcmoe"]["mpp"] = "abc"
    adata.write_h5ad(tmp_path / "mpp.h5ad")
    _clear(_convert(tmp_path / "mpp.h5ad", tmp_path / "o.h5ad", "--format", "h5ad", "--image", tif), "'abc'", "--mpp")
    _clear(_convert(tmp_path / "mpp.h5ad", tmp_path / "o.h5ad", "--format", "sample"), "'abc'")
    adata = _sample_adata(made)
    xy = np.asarray(adata.obsm["spatial"], dtype=float)
    xy[:3] = np.nan
    adata.obsm["spatial"] = xy
    adata.write_h5ad(tmp_path / "nan_xy.h5ad")
    result = _convert(tmp_path / "nan_xy.h5ad", tmp_path / "o.h5ad", "--format", "h5ad", "--image", tif, "--mpp", "0.5")
    _clear(result, "3 of 200 cell centres", "NaN or infinite")
    assert "outside" not in result.output and "scaled" not in result.output


def test_bad_cell_files_are_explained(made, tmp_path):
    slide = made / "tissue" / "virtual_tissue.tif"

    def predict(cells: Path):
        return runner.invoke(app, ["predict", "--model", str(made / "run" / "model"), "--slide", str(slide),
                                   "--cells", str(cells), "--mpp", "0.5", "--out", str(tmp_path / "p.h5ad")])

    (tmp_path / "units.csv").write_text("x,y\n12px,30\n40,50\n")
    _clear(predict(tmp_path / "units.csv"), "column 'x' must hold plain numbers", "'12px'")
    (tmp_path / "hover.json").write_text(json.dumps({"nuc": {"1": {"bbox": [[0, 0], [4, 4]]}}}))
    _clear(predict(tmp_path / "hover.json"), "HoVer-Net nucleus '1' has no usable 'centroid'")
    (tmp_path / "cells.geojson").write_text(json.dumps(
        {"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": {"type": "Polygon"}}]}))
    _clear(predict(tmp_path / "cells.geojson"), "without usable coordinates")
    np.save(tmp_path / "mask.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    _clear(predict(tmp_path / "mask.npy"), "cannot read a label mask", "no pickled objects")


def test_training_on_three_cells_is_explained(made, tmp_path):
    adata = _sample_adata(made)[:3].copy()
    adata.write_h5ad(tmp_path / "three.h5ad")
    result = runner.invoke(app, ["train", "--model", "stnet", "--data", str(tmp_path / "three.h5ad"), "--no-qc",
                                 "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "3" in result.output and "cells" in result.output


def test_non_finite_training_stops_with_a_clear_error():
    import torch

    from gcmoe.config import TrainConfig
    from gcmoe.errors import TrainingError
    from gcmoe.models import create_model
    from gcmoe.training.cells import CellData
    from gcmoe.training.trainer import fit

    feats = torch.randn(40, 6)
    targets = torch.rand(40, 4)
    feats[3, 2] = float("nan")
    with pytest.raises(TrainingError, match="NaN or infinite"):
        fit(create_model("stnet", 6, 4), CellData(feats, targets), np.arange(30), np.arange(30, 40),
            TrainConfig(max_epochs=2))
    with pytest.raises(TrainingError, match="loss became|predicts NaN"):
        fit(create_model("stnet", 6, 4), CellData(torch.randn(40, 6), targets), np.arange(30), np.arange(30, 40),
            TrainConfig(max_epochs=3, lr=1e30))


def test_nan_weights_never_give_a_silent_nan_prediction(made, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from gcmoe.files import file_sha256
    from gcmoe.training.checkpoint import seal_model

    model = tmp_path / "model"
    shutil.copytree(made / "run" / "model", model)
    weights = load_file(str(model / "model.safetensors"))
    name = next(k for k, v in weights.items() if v.is_floating_point() and v.ndim == 2)
    weights[name][:] = float("nan")
    save_file(weights, str(model / "model.safetensors"))
    meta = json.loads((model / "model.json").read_text())
    (model / "model.json").write_text(json.dumps(meta | {"weights_sha256": file_sha256(model / "model.safetensors")}))
    seal_model(model)
    xy = np.asarray(_sample_adata(made).obsm["spatial"])
    (tmp_path / "cells.csv").write_text("x,y\n" + "\n".join(f"{x:.1f},{y:.1f}" for x, y in xy) + "\n")
    result = runner.invoke(app, ["predict", "--model", str(model), "--slide", str(made / "tissue" / "virtual_tissue.tif"),
                                 "--cells", str(tmp_path / "cells.csv"), "--mpp", "0.5", "--out", str(tmp_path / "p.h5ad")])
    _clear(result, "predicts NaN or infinite values for 200 of 200 cells", "nothing was written")
    assert not (tmp_path / "p.h5ad").exists()


def test_sample_id_advice_fits_the_input(made, tmp_path):
    adata = _sample_adata(made)
    adata.uns["gcmoe"]["sample_id"] = ".hidden"
    adata.write_h5ad(tmp_path / "bad_id.h5ad")
    _clear(_convert(tmp_path / "bad_id.h5ad", tmp_path / "o.h5ad", "--format", "sample"),
           "uns['gcmoe']['sample_id']", "rename the slide file")


@pytest.mark.slow
def test_resume_after_editing_model_params_is_refused(tmp_path, monkeypatch):
    import gcmoe.pipeline.cv as cv

    cfg = tmp_path / "run.yaml"
    cfg.write_text(TINY_RUN + "model_params: {stnet: {hidden: 32}}\n")
    out = tmp_path / "run"

    def crash(*args, **kwargs):
        raise RuntimeError("power cut")

    with monkeypatch.context() as m:  # the first fold's training finishes, then the run dies: its checkpoint stays
        m.setattr(cv, "save_fold_model", crash)
        assert _cv(out, cfg).exit_code == 1
    assert list((out / "checkpoints").rglob("state.json"))
    cfg.write_text(TINY_RUN + "model_params: {stnet: {hidden: 64}}\n")
    _clear(_cv(out, cfg, "--resume"), "cannot resume", "params")


@pytest.mark.slow
def test_train_resumes_and_reruns_in_its_own_folder(made, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(made / "run", run)  # the manifest lists paths relative to the folder: a copy stays gcmoe's
    (run / "checkpoints" / "mine.txt").write_text("mine\n")
    args = ["train", "--config", str(made / "train.yaml"), "--model", "stnet", "--data",
            str(made / "tissue" / "virtual_tissue.h5ad"), "--out", str(run), "--no-qc"]
    for extra in (["--resume"], []):
        result = runner.invoke(app, [*args, *extra])
        assert result.exit_code == 0, result.output
    assert (run / "checkpoints" / "mine.txt").read_text() == "mine\n"
    assert "model/model.json" in json.loads((run / MANIFEST_NAME).read_text())["files"]
