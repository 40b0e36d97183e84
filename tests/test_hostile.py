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
