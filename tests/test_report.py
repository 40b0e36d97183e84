"""gcmoe report: one self-contained, valid HTML page holding the tables and every figure of a run."""

from __future__ import annotations

import base64
from html.parser import HTMLParser

import pytest
from typer.testing import CliRunner

from gcmoe.cli import app
from gcmoe.report import write_report

pytestmark = pytest.mark.slow

VOID = {"meta", "img", "br", "hr", "link", "input"}


class Structure(HTMLParser):
    """Checks that every element is closed in order; collects images, sections and table rows."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.images: list[dict] = []
        self.sections: list[str] = []
        self.rows = 0
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
        if tag == "section":
            self.sections.append(attrs.get("id", ""))
        if tag == "tr":
            self.rows += 1
        for key in ("src", "href"):
            if key in attrs and not str(attrs[key]).startswith(("data:", "#")):
                self.external.append(attrs[key])
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()


@pytest.fixture(scope="module")
def run_dir(tiny_run):
    return tiny_run


@pytest.fixture(scope="module")
def report(run_dir):
    return write_report(run_dir, max_cells=100)


def test_report_is_valid_html_with_every_figure(run_dir, report):
    assert report == run_dir / "report.html"
    text = report.read_text()
    assert text.startswith("<!DOCTYPE html>")
    parser = Structure()
    parser.feed(text)
    parser.close()
    assert parser.errors == [] and parser.stack == []
    assert parser.sections == ["fig-cv", "fig-gene-pcc", "fig-tsne", "fig-gene-vectors", "fig-spatial"]
    assert len(parser.images) == 5 and parser.external == []  # every figure embedded: readable offline
    for img in parser.images:
        assert img["src"].startswith("data:image/png;base64,")
        assert base64.b64decode(img["src"].split(",", 1)[1])[:4] == b"\x89PNG"
    assert "GC-MoE" in text and "ST-Net*" in text and "ceiling" in text
    assert parser.rows >= 2 * (3 + 1) + 2  # both tables: 3 methods + ceiling, with headers
    assert not list(run_dir.glob(".*.tmp"))


def test_report_command_notes_what_a_run_cannot_show(run_dir, tmp_path):
    import shutil

    partial = tmp_path / "partial"  # a run folder of an older gcmoe: no kept predictions or models
    shutil.copytree(run_dir, partial, ignore=shutil.ignore_patterns("models", "predictions", "report.html"))
    out = tmp_path / "r.html"
    result = CliRunner().invoke(app, ["report", str(partial), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert str(out) in result.output.replace("\n", "")
    text = out.read_text()
    parser = Structure()
    parser.feed(text)
    assert parser.errors == [] and len(parser.images) == 2  # the CV table and per-gene PCC need no predictions
    assert text.count("Not available for this run") == 3 and "older gcmoe" in text
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "results.json" in result.output
