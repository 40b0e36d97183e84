"""Small synthetic H&E images for the feature tests: dark nuclei on pink stroma, white lumens."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gcmoe.data.sample import Sample
from gcmoe.features.morphology import RGB_FROM_HED
from gcmoe.features.registry import Encoder, EncoderConfig


def paint(
    shape: tuple[int, int],
    nuclei: np.ndarray | None = None,
    *,
    stroma: float = 0.35,
    lumens: list[tuple[float, float, float]] = (),
    noise: float = 0.0,
    seed: int = 0,
) -> np.ndarray:
    """An H&E-like uint8 RGB image through Beer-Lambert: OD = c_H * H + c_E * E.

    ``nuclei`` rows: x, y (continuous pixels, pixel k centred at k + 0.5), semi-axes a, b (px), angle
    (radians), haematoxylin concentration. Background is eosin ``stroma``; lumens (x, y, r) are white.
    """
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    conc_h = np.full(shape, 0.03)
    conc_e = np.full(shape, stroma)
    for x, y, r in lumens:
        alpha = np.clip(r - np.hypot(xx - x, yy - y) + 0.5, 0.0, 1.0)
        conc_h *= 1 - alpha
        conc_e *= 1 - alpha
    for x, y, a, b, theta, ch in np.zeros((0, 6)) if nuclei is None else nuclei:
        x0, x1 = int(max(x - a - 2, 0)), int(min(x + a + 3, w))
        y0, y1 = int(max(y - a - 2, 0)), int(min(y + a + 3, h))
        dx, dy = xx[y0:y1, x0:x1] - x, yy[y0:y1, x0:x1] - y
        u = dx * np.cos(theta) + dy * np.sin(theta)
        v = -dx * np.sin(theta) + dy * np.cos(theta)
        rho = np.hypot(u / a, v / b)  # 1 on the boundary
        alpha = np.clip((1.0 - rho) * min(a, b) + 0.5, 0.0, 1.0)
        conc_h[y0:y1, x0:x1] = (1 - alpha) * conc_h[y0:y1, x0:x1] + alpha * ch
        conc_e[y0:y1, x0:x1] = (1 - alpha) * conc_e[y0:y1, x0:x1] + alpha * 0.1
    if noise:
        rng = np.random.default_rng(seed)
        conc_h = conc_h * (1 + noise * rng.standard_normal(shape))
        conc_e = conc_e * (1 + noise * rng.standard_normal(shape))
    od = conc_h[..., None] * RGB_FROM_HED[0] + conc_e[..., None] * RGB_FROM_HED[1]
    return np.clip(np.round(255 * np.exp(-od)), 0, 255).astype(np.uint8)


def make_sample(image: np.ndarray, xy: np.ndarray, mpp: float = 0.5, sample_id: str = "synthetic") -> Sample:
    n = len(xy)
    counts = np.ones((n, 2), dtype=np.int64)
    return Sample.from_arrays(counts, xy, image, mpp=mpp, genes=["g0", "g1"], sample_id=sample_id)


def grid_nuclei(
    classes: list[dict[str, float]], per_class: int, spacing: float, seed: int = 0, jitter: float = 0.1
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Nuclei of several classes on a shuffled lattice; returns (nuclei rows, class labels, image shape)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(classes)), per_class)
    rng.shuffle(labels)
    n = len(labels)
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    shape = (int(rows * spacing + spacing), int(cols * spacing + spacing))
    rows_ = []
    for i, lab in enumerate(labels):
        c = classes[lab]
        r, k = divmod(i, cols)
        x = spacing * (k + 1) + rng.uniform(-1, 1)
        y = spacing * (r + 1) + rng.uniform(-1, 1)
        a = c["a"] * (1 + jitter * rng.uniform(-1, 1))
        b = c.get("b", c["a"]) * (1 + jitter * rng.uniform(-1, 1))
        rows_.append([x, y, a, b, rng.uniform(0, np.pi), c["h"] * (1 + jitter * rng.uniform(-1, 1))])
    return np.array(rows_), labels, shape


class BoxEncoder(Encoder):
    """Test encoder: the mean RGB of each stride x stride block (a linear ramp stays exactly linear)."""

    def __init__(self, stride: int = 4, tile_size: int = 64, margin: int = 8, target_mpp: float = 0.5) -> None:
        super().__init__(
            EncoderConfig(
                name="box", target_mpp=target_mpp, tile_size=tile_size, stride=stride, feature_dim=3,
                margin=margin, align=stride,
            )
        )  # fmt: skip
        self.calls = 0

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return F.avg_pool2d(x, self.config.stride)


@pytest.fixture
def paint_he():
    """The painter: ``paint_he(shape, nuclei, stroma=, lumens=, noise=, seed=)`` -> uint8 RGB."""
    return paint


@pytest.fixture
def sample_of():
    """``sample_of(image, xy, mpp=0.5, sample_id="synthetic")`` -> Sample with dummy counts."""
    return make_sample


@pytest.fixture
def box_encoder():
    """``box_encoder(stride=4, tile_size=64, margin=8, target_mpp=0.5)`` -> a fresh BoxEncoder."""
    return BoxEncoder


@pytest.fixture(scope="session")
def nuclei_sample() -> tuple[Sample, np.ndarray]:
    """Four nucleus classes at 0.5 um/px: small dark, big dark, small pale, elongated dark (labels 0..3)."""
    classes = [
        {"a": 6.0, "h": 0.9},  # r = 3 um, dark (lymphocyte-like)
        {"a": 12.0, "h": 0.9},  # r = 6 um, dark (tumour-like)
        {"a": 6.0, "h": 0.35},  # r = 3 um, pale
        {"a": 14.0, "b": 4.5, "h": 0.9},  # elongated (fibroblast-like)
    ]
    nuclei, labels, shape = grid_nuclei(classes, per_class=30, spacing=44.0, seed=1)
    image = paint(shape, nuclei, noise=0.05, seed=2)
    return make_sample(image, nuclei[:, :2], mpp=0.5, sample_id="nuclei"), labels
