"""`gcmoe qc`: cell centres against the nuclei of the H&E, on the virtual tissue and on real annotated H&E."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from gcmoe.cli import app
from gcmoe.data.qc import check_slide
from gcmoe.data.sample import Sample

runner = CliRunner()


@pytest.fixture(scope="module")
def tissue_sample() -> Sample:
    """A 1,500-cell virtual tissue (0.5 um/px, 480 x 480 um)."""
    from gcmoe.data.virtual_tissue import simulate_tissue

    return simulate_tissue(n_cells=1_500, height=960, width=960, n_genes=20, n_reference_cells=100, seed=5).sample


def _moved(sample: Sample, xy: np.ndarray) -> Sample:
    """``sample`` with its cells at ``xy`` (those that leave the image dropped)."""
    h, w = sample.image.shape
    keep = (xy[:, 0] >= 0) & (xy[:, 1] >= 0) & (xy[:, 0] < w) & (xy[:, 1] < h)
    adata = sample.adata[keep].copy()
    adata.obsm["spatial"] = xy[keep]
    return Sample(adata, sample.image)


def _verdicts(report) -> dict[str, str]:
    return {c.name: c.verdict for c in report.checks}


def test_registered_tissue_passes(tissue_sample):
    report = check_slide(tissue_sample)
    assert report.verdict == "pass", report.markdown()
    assert report.matched > report.matched_random + 0.15
    assert np.hypot(*report.shift_um) < 1.5 and abs(report.scale - 1) < 0.01
    assert 1_000 < report.checks[0].value < 20_000  # cells per mm2


def test_shift_of_8um_fails_and_is_measured(tissue_sample):
    shifted = _moved(tissue_sample, tissue_sample.spatial + [8 / tissue_sample.mpp, 0])
    report = check_slide(shifted)
    verdicts = _verdicts(report)
    assert report.verdict == "fail" and verdicts["cells on nuclei"] == "fail" and verdicts["shift"] == "fail"
    assert report.shift_um[0] == pytest.approx(-8, abs=1.5) and abs(report.shift_um[1]) < 1.5  # the correction
    assert verdicts["scale"] == "pass"


def test_scale_error_of_10_percent_fails_and_is_measured(tissue_sample):
    scaled = _moved(tissue_sample, tissue_sample.spatial * 1.1)  # micrometres placed with a pixel size 10% off
    report = check_slide(scaled)
    verdicts = _verdicts(report)
    assert report.verdict == "fail" and verdicts["scale"] == "fail" and verdicts["cells on nuclei"] == "fail"
    assert report.scale == pytest.approx(1 / 1.1, abs=0.01)
    assert "+10" in next(c.detail for c in report.checks if c.name == "scale")  # "stretched by +10.0%"


def test_cells_off_the_tissue_fail(tissue_sample):
    blank = np.full((*tissue_sample.image.shape, 3), 245, dtype=np.uint8)
    report = check_slide(Sample(tissue_sample.adata.copy(), _array_image(blank)))
    assert _verdicts(report)["cells on nuclei"] == "fail"
    assert "no nuclei" in report.failed()[0].detail


def test_pixel_size_far_too_small_fails_density_and_spacing(tissue_sample):
    adata = tissue_sample.adata.copy()
    adata.uns["gcmoe"]["mpp"] = 0.1  # the image is 0.5 um/px: cells look 5x closer than they are
    report = check_slide(Sample(adata, tissue_sample.image))
    verdicts = _verdicts(report)
    assert verdicts["density"] == "fail" and verdicts["spacing"] == "fail", report.markdown()


def test_coarse_image_skips_the_nuclei_checks(tissue_sample):
    adata = tissue_sample.adata.copy()
    adata.obsm["spatial"] = adata.obsm["spatial"] / 4
    adata.uns["gcmoe"]["mpp"] = 2.0
    small = np.ascontiguousarray(np.asarray(tissue_sample.image.read_region(0, 0, 960, 960))[::4, ::4])
    report = check_slide(Sample(adata, _array_image(small)))
    verdicts = _verdicts(report)
    assert verdicts["cells on nuclei"] == verdicts["shift"] == verdicts["scale"] == "skipped"
    assert verdicts["density"] == "pass" and report.verdict == "pass"
    assert "coarser than 1 um/px" in report.checks[2].detail


def test_real_annotated_he_passes_and_a_shift_fails(realdata):
    """Real TCGA breast H&E with hand-placed cell dots (BRCA-M2C): the dots sit on the nuclei found."""
    from PIL import Image

    root = realdata("brca_m2c")
    names = sorted(p.stem for p in (root / "images").glob("*.png"))[:3]
    for name in names:
        rgb = np.asarray(Image.open(root / "images" / f"{name}.png").convert("RGB"))
        yx = np.loadtxt(root / "labels" / f"{name}_gt_class_coords.txt", ndmin=2)[:, :2]
        xy = yx[:, ::-1].astype(float)
        sample = Sample.from_arrays(np.ones((len(xy), 1)), xy, rgb, 0.5, ["g"], name)
        report = check_slide(sample)
        assert report.verdict == "pass", report.markdown()
        assert report.matched > 0.6 and report.matched > report.matched_random + 0.3
        shifted = check_slide(_moved(sample, xy + [16, 0]))  # 8 um at 0.5 um/px
        assert _verdicts(shifted)["shift"] == "fail" and _verdicts(shifted)["cells on nuclei"] == "fail"


def test_qc_command_writes_the_report_and_exits_1_on_failure(tissue_sample, tmp_path):
    good = tissue_sample.write(tmp_path / "good" / "good.h5ad")
    result = runner.invoke(app, ["qc", str(good), "--out", str(tmp_path / "qc")])
    assert result.exit_code == 0, result.output
    sid = tissue_sample.sample_id
    saved = json.loads((tmp_path / "qc" / f"{sid}.json").read_text())
    assert saved["verdict"] == "pass" and {c["name"] for c in saved["checks"]} >= {"shift", "scale", "density"}
    assert (tmp_path / "qc" / f"{sid}.png").stat().st_size > 10_000 and (tmp_path / "qc" / f"{sid}.md").is_file()

    bad = _moved(tissue_sample, tissue_sample.spatial + [0, 10 / tissue_sample.mpp]).write(tmp_path / "bad" / "bad.h5ad")
    result = runner.invoke(app, ["qc", str(bad), "--out", str(tmp_path / "qc_bad")])
    assert result.exit_code == 1
    assert "QC failed" in result.output and "shift" in result.output


def test_cv_stops_on_a_failed_check_unless_no_qc(tissue_sample, tmp_path):
    bad = _moved(tissue_sample, tissue_sample.spatial + [0, 10 / tissue_sample.mpp]).write(tmp_path / "bad.h5ad")
    cfg = tmp_path / "run.yaml"
    cfg.write_text("train:\n  max_epochs: 1\ntargets:\n  n_top_genes: 8\ncv:\n  n_folds: 2\n")
    out = tmp_path / "run"
    result = runner.invoke(app, ["cv", "--config", str(cfg), "--data", str(bad), "--models", "stnet", "--out", str(out)])
    assert result.exit_code == 2
    assert "slide check failed" in result.output and "--no-qc" in result.output
    assert (out / "qc" / f"{tissue_sample.sample_id}.png").is_file()
    result = runner.invoke(app, ["cv", "--config", str(cfg), "--data", str(bad), "--models", "stnet", "--out", str(out),
                                 "--no-qc"])
    assert result.exit_code == 0, result.output
    assert (out / "results.json").is_file()


def _array_image(array: np.ndarray):
    from gcmoe.data.image import ArrayImage

    return ArrayImage(array)
