import numpy as np

from gcmoe.config import TissueConfig
from gcmoe.data.detection import detect_nuclei, match_centres
from gcmoe.data.image import ArrayImage
from gcmoe.data.virtual_tissue import simulate_tissue


def test_match_centres_is_one_to_one():
    truth = np.array([[0.0, 0.0], [10.0, 0.0]])
    found = np.array([[0.5, 0.0], [0.6, 0.0], [30.0, 0.0]])  # two detections compete for one nucleus
    m = match_centres(found, truth, radius_px=2.0)
    assert m["matched"] == 1 and m["precision"] == 1 / 3 and m["recall"] == 0.5


def test_detector_finds_most_nuclei_of_a_tiny_tissue():
    tissue = simulate_tissue(TissueConfig(n_cells=700, height=600, width=600, n_genes=60, n_reference_cells=200, seed=1))
    found = detect_nuclei(tissue.sample.image, 0.5)
    m = match_centres(found, tissue.sample.spatial, radius_px=4 / 0.5)
    assert m["precision"] > 0.75 and m["recall"] > 0.45, m  # benchmarks/results/detection.md has the figures
    # tiles do not change the answer: no nucleus counted twice at a tile border
    tiled = detect_nuclei(tissue.sample.image, 0.5, tile=256)
    assert abs(len(tiled) - len(found)) <= 0.02 * len(found)


def test_blank_image_has_no_nuclei():
    assert len(detect_nuclei(ArrayImage(np.full((200, 200, 3), 250, np.uint8)), 0.5)) == 0
