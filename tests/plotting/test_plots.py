"""Each figure on tiny inputs: a non-empty PNG and SVG, and the expected number of panels."""

from __future__ import annotations

import numpy as np
import pytest

from gcmoe.errors import ConfigError
from gcmoe.plotting import (
    RunFolderError,
    correlated_pairs,
    link_distance_ratio,
    plot_cv_table,
    plot_gene_pcc,
    plot_gene_vectors,
    plot_spatial_maps,
    plot_tsne,
    read_downsampled,
    save_figure,
)


def panels(fig) -> list:
    """The figure's axes that are panels (colour bars are axes too)."""
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


def assert_written(fig, tmp_path, stem="fig"):
    paths = save_figure(fig, tmp_path / stem)
    assert [p.suffix for p in paths] == [".png", ".svg"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[0].stat().st_size > 1000
    assert b"<svg" in paths[1].read_bytes()[:500]
    assert not list(tmp_path.glob(".*.tmp"))  # written under a temporary name, then renamed


def test_tsne_one_panel_per_matrix(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(["a", "b"], 40)
    measured = rng.normal(size=(80, 6)) + (labels == "a")[:, None] * 3
    fig = plot_tsne({"Measured": measured, "M1": measured + rng.normal(size=measured.shape), "M2": measured},
                    labels, max_cells=60)
    assert len(panels(fig)) == 3
    assert "silhouette" in panels(fig)[0].get_title()
    # the subsample is drawn: 60 points per panel
    assert sum(len(c.get_offsets()) for c in panels(fig)[0].collections) == 60
    assert_written(fig, tmp_path)
    with pytest.raises(ConfigError, match="rows"):
        plot_tsne({"x": measured[:10]}, labels)


def test_correlated_pairs_and_distance_ratio():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(200, 1))
    x = np.hstack([base, base + 0.1 * rng.normal(size=(200, 1)), rng.normal(size=(200, 1)), np.zeros((200, 1))])
    assert correlated_pairs(x, 0.5).tolist() == [[0, 1]]  # the constant gene links to nothing
    vectors = np.array([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [-5.0, 5.0]])
    assert link_distance_ratio(vectors, np.array([[0, 1]])) < 0.1
    assert np.isnan(link_distance_ratio(vectors, np.zeros((0, 2), dtype=int)))


def test_gene_vectors_one_panel_per_model(tmp_path):
    rng = np.random.default_rng(2)
    genes = [f"g{i}" for i in range(15)]
    fig = plot_gene_vectors({"with CAP": rng.normal(size=(15, 8)), "without CAP": rng.normal(size=(15, 8))},
                            np.array([[0, 1], [2, 3]]), genes)
    assert len(panels(fig)) == 2
    assert len(panels(fig)[0].collections) == 2  # the links and the genes
    assert_written(fig, tmp_path)


def test_spatial_maps_panels(tmp_path):
    rng = np.random.default_rng(3)
    n = 50
    xy = rng.uniform(10, 90, size=(n, 2))
    tissue = np.full((50, 50, 3), 220, dtype=np.uint8)
    measured = rng.normal(size=(n, 2))
    types = rng.choice(["t1", "t2"], n)
    fig = plot_spatial_maps(tissue, (0, 0, 100, 100), xy, ["A", "B"], measured,
                            {"ST-Net*": measured + 1, "GC-MoE": -measured}, cell_type=types, expert=types)
    # row 1: H&E, cell types, experts; then per gene: measured + 2 models
    assert len(panels(fig)) == 3 + 2 * 3
    titles = [ax.get_title() for ax in panels(fig)]
    assert "A: ST-Net* (r = 1.00)" in titles and "B: GC-MoE (r = -1.00)" in titles
    assert_written(fig, tmp_path)
    fig = plot_spatial_maps(tissue, (0, 0, 100, 100), xy, ["A"], measured[:, :1], {"m": measured[:, :1]})
    assert len(panels(fig)) == 1 + 2
    # a prediction (no measurements, one model): H&E, experts and 3 gene maps in one grid of 3 + 2, no empty row
    fig = plot_spatial_maps(tissue, (0, 0, 100, 100), xy, ["A", "B", "C"], None,
                            {"GC-MoE": np.column_stack([measured, measured[:, 0]])}, expert=types)
    boxes = [ax.get_subplotspec() for ax in panels(fig)]
    assert len(boxes) == 5 and boxes[0].get_gridspec().get_geometry() == (2, 3)
    assert [ax.get_title() for ax in panels(fig)][2:] == ["A: GC-MoE", "B: GC-MoE", "C: GC-MoE"]
    assert_written(fig, tmp_path, "prediction")


def test_read_downsampled_uses_the_pyramid(tmp_path):
    from gcmoe.data.image import open_image, write_tiff

    rng = np.random.default_rng(4)
    array = rng.integers(0, 255, size=(1200, 1000, 3), dtype=np.uint8)
    image = open_image(write_tiff(tmp_path / "s.tif", array, mpp=0.5, tile=128))
    thumb = read_downsampled(image, (100, 200, 800, 800), max_side=200)
    assert thumb.shape == (200, 200, 3)
    np.testing.assert_array_equal(thumb[0, 0], array[200, 100])  # level-2 pixel = level-0 pixel (strided levels)
    small = read_downsampled(image, (0, 0, 100, 50), max_side=200)
    np.testing.assert_array_equal(small, array[:50, :100])


def test_gene_pcc_and_cv_table(tmp_path):
    pcc = {"ST-Net*": {"a": 0.2, "b": 0.5, "c": np.nan}, "GC-MoE": {"a": 0.3, "b": 0.6, "c": 0.1}}
    fig = plot_gene_pcc(pcc, ceiling={"a": 0.9, "b": 0.8, "c": 0.7})
    assert len(panels(fig)) == 1
    ax = panels(fig)[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["b", "a", "c"]  # sorted by the last model
    assert len(ax.patches) == 6
    assert_written(fig, tmp_path, "pcc")
    results = {"datasets": {"d": {"ceiling": 0.8, "ceiling_std": 0.01, "ceiling_folds": [0.79, 0.81],
                                  "fold_names": ["s1", "s2"],
                                  "models": {"ST-Net*": {"folds": [0.4, 0.5], "mean": 0.45, "std": 0.07},
                                             "GC-MoE": {"folds": [0.5, 0.6], "mean": 0.55, "std": 0.07,
                                                        "routing_accuracy": 0.9, "share_of_ceiling": 0.69}}}}}
    fig = plot_cv_table(results)
    assert len(fig.axes) == 2
    assert_written(fig, tmp_path, "cv")
    with pytest.raises(ConfigError, match="dataset"):
        plot_cv_table(results, "nope")


def test_unknown_models_are_named():
    from gcmoe.plotting._run import resolve_models

    class Fake:
        uns = {"gcmoe": {"models": {"stnet": "ST-Net*", "gcmoe": "GC-MoE"}}}
        layers = {"stnet": None, "gcmoe": None}

    assert resolve_models(Fake(), None) == ["stnet", "gcmoe"]
    assert resolve_models(Fake(), ["GC-MoE"]) == ["gcmoe"]
    with pytest.raises(RunFolderError, match="it has stnet, gcmoe"):
        resolve_models(Fake(), ["bleep"])
