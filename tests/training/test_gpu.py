"""The same code on a CUDA device: training (with float16 mixed precision), prediction and feature extraction.

Marked ``gpu``: skipped where torch sees no CUDA device (tests/conftest.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gcmoe.config import FeatureConfig, TrainConfig
from gcmoe.models import create_model
from gcmoe.training.cells import CellData
from gcmoe.training.trainer import fit, predict

pytestmark = pytest.mark.gpu


def _data(n=1200, d=6, g=4, seed=0) -> CellData:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    w = rng.normal(size=(d, g)).astype(np.float32)
    y = (x @ w + 0.5 * rng.normal(size=(n, g))).astype(np.float32)
    return CellData(torch.from_numpy(x), torch.from_numpy(y))


@pytest.mark.parametrize("amp", [False, True])
def test_training_on_cuda_learns(amp):
    data, idx = _data(), np.arange(1200)
    model = create_model("stnet", 6, 4)
    res = fit(model, data, idx[:900], idx[900:], TrainConfig(max_epochs=15, patience=5, device="cuda", amp=amp))
    assert res.best_val_pcc > 0.7  # float16 autocast with GradScaler when amp
    assert next(model.parameters()).device.type == "cuda"


def test_prediction_on_cuda_matches_the_cpu():
    data, idx = _data(), np.arange(1200)
    model = create_model("gcmoe_no_cap_c2ca", 6, 4)
    fit(model, data, idx[:900], idx[900:], TrainConfig(max_epochs=2, patience=5))
    on_cpu = predict(model, data, idx)
    on_gpu = predict(model.to("cuda"), data, idx)
    np.testing.assert_allclose(on_gpu, on_cpu, atol=1e-4, rtol=1e-4)


def test_feature_extraction_on_cuda_matches_the_cpu(tiny_sample):
    from gcmoe.features import extract_features

    on_cpu = extract_features(tiny_sample, FeatureConfig(device="cpu"), progress=False)
    on_gpu = extract_features(tiny_sample, FeatureConfig(device="cuda"), progress=False)
    np.testing.assert_allclose(on_gpu, on_cpu, atol=1e-3, rtol=1e-3)
