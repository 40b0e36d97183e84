"""Training and gene settings that cannot work are refused with the setting's name, before any work."""

import dataclasses

import numpy as np
import pytest
import torch

from gcmoe.config import RunConfig, TargetConfig, TrainConfig
from gcmoe.data.genes import select_genes
from gcmoe.errors import ConfigError, InvalidSampleError
from gcmoe.training.trainer import check_train_config


@pytest.mark.parametrize("change, message", [
    ({"batch_size": 0}, r"train.batch_size must be at least 1, got 0"),
    ({"max_epochs": -1}, r"train.max_epochs must be at least 1"),
    ({"patience": 0}, r"train.patience must be at least 1"),
    ({"lr": -1.0}, r"train.lr must be a positive number, got -1.0"),
    ({"lr": float("nan")}, r"train.lr must be a positive number"),
    ({"weight_decay": -0.1}, r"train.weight_decay must be a number >= 0"),
    ({"device": "banana"}, r"train.device 'banana' is not a torch device"),
])
def test_bad_training_settings_are_named(change, message):
    with pytest.raises(ConfigError, match=message):
        check_train_config(dataclasses.replace(TrainConfig(), **change))
    check_train_config(TrainConfig())  # the defaults pass


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_is_explained():
    with pytest.raises(ConfigError, match=r"train.device is 'cuda' but this torch sees no CUDA device"):
        check_train_config(TrainConfig(device="cuda"))


def test_cv_refuses_bad_training_settings_before_the_features(tmp_path):
    from gcmoe.pipeline import run_cv

    cfg = RunConfig(out=str(tmp_path / "run"), models=["stnet"])
    cfg.train.batch_size = 0
    with pytest.raises(ConfigError, match="train.batch_size"):
        run_cv(cfg, progress=False)
    assert not (tmp_path / "run" / "cache").exists()


def _counts(constant: bool = False):
    rng = np.random.default_rng(0)
    counts = np.ones((50, 8)) if constant else rng.poisson(3.0, (50, 8)).astype(float)
    return counts, [f"g{i}" for i in range(8)], np.arange(50)


def test_gene_settings_that_select_nothing_are_named():
    counts, genes, cells = _counts()
    with pytest.raises(InvalidSampleError, match="targets.n_top_genes must be at least 1, got 0"):
        select_genes(counts, genes, cells, TargetConfig(n_top_genes=0))
    with pytest.raises(InvalidSampleError, match="targets.genes is an empty list"):
        select_genes(counts, genes, cells, TargetConfig(genes=[]))
    with pytest.raises(InvalidSampleError, match=r"names \['g1'\] more than once"):
        select_genes(counts, genes, cells, TargetConfig(genes=["g1", "g1", "g2"]))
    assert len(select_genes(counts, genes, cells, TargetConfig(n_top_genes=3))) == 3


def test_data_where_no_gene_varies_is_explained():
    counts, genes, cells = _counts(constant=True)
    with pytest.raises(InvalidSampleError, match="no gene varies across the 50 training cells"):
        select_genes(counts, genes, cells, TargetConfig(n_top_genes=3))
