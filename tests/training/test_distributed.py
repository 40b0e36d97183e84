"""torch.distributed with gloo on the CPU: 2 processes train the weights 1 process trains (same global batch)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np, torch
    from safetensors.torch import save_file
    from gcmoe.config import TrainConfig
    from gcmoe.models import create_model
    from gcmoe.training.distributed import init_from_env, is_main_process, rank_world
    from gcmoe.training.cells import CellData
    from gcmoe.training.trainer import fit

    init_from_env("cpu")
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(700, 6)).astype(np.float32)
    y = (x @ rng.normal(size=(6, 4)) + rng.normal(size=(700, 4))).astype(np.float32)
    data = CellData(torch.from_numpy(x), torch.from_numpy(y))
    torch.manual_seed(int(sys.argv[2]))  # DDP must broadcast rank 0's initial weights
    model = create_model(sys.argv[3], 6, 4, dropout=0.0)
    if is_main_process():
        save_file({k: v.clone().contiguous() for k, v in model.state_dict().items()}, sys.argv[1] + ".init")
    idx = np.arange(700)
    # the MSE term gives the output bias a real gradient: under 1 - PCC alone (shift-invariant) its gradient is
    # round-off, which Adam scales up to full steps, so it would differ between any two summation orders
    config = TrainConfig(max_epochs=5, patience=100, batch_size=101, num_threads=1, mse_weight=0.5)
    res = fit(model, data, idx[:500], idx[500:], config, checkpoint_dir=sys.argv[1] + "_ckpt")
    if is_main_process():
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, sys.argv[1])
        print("world", rank_world()[1], "best", res.best_epoch, "val", res.best_val_pcc)
""")


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path):
    from safetensors.torch import load_file

    script = tmp_path / "train.py"
    script.write_text(_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")} | {"OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one.safetensors"), "0", "stnet"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(script), str(tmp_path / "two.safetensors"), "0", "stnet"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "world 2" in two.stdout and "world 1" in one.stdout
    a, b = load_file(str(tmp_path / "one.safetensors")), load_file(str(tmp_path / "two.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    # the training moved the weights (the comparison is not between two untrained models)
    init = load_file(str(tmp_path / "two.safetensors.init"))
    assert not torch.allclose(init["head.0.weight"], b["head.0.weight"], atol=1e-3)
    assert (tmp_path / "two.safetensors_ckpt").is_dir()  # written once, by rank 0


@pytest.mark.slow
def test_gcmoe_train_under_torchrun(tmp_path):
    """`torchrun -m gcmoe train`: both ranks encode a share of the tiles and train, rank 0 alone writes the
    model folder and its checkpoints."""
    import re

    from gcmoe.data.sample import Sample
    from gcmoe.features import create_encoder
    from gcmoe.features.tiling import make_tile_grid
    from gcmoe.training.checkpoint import load_model

    (tmp_path / "cfg.yaml").write_text(
        "data: {tissue: {n_cells: 700, height: 600, width: 600, n_genes: 60, n_reference_cells: 400, seed: 5}}\n"
        "features: {tile_size: 256}\n"
        "train: {max_epochs: 3, patience: 5, checkpoint_every: 1}\ntargets: {n_top_genes: 20}\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")} | {"OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "gcmoe", "train", "--config", str(tmp_path / "cfg.yaml"), "--model", "gcmoe",
                          "--out", str(tmp_path / "run")], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("model saved to") == 1
    model, meta = load_model(tmp_path / "run" / "model")
    assert meta["model"] == "gcmoe" and len(meta["genes"]) == 20
    assert (tmp_path / "run" / "checkpoints" / "gcmoe" / "epoch-000003").is_dir()
    # the slide's tiles were shared out: rank 0 encoded some but not all of them
    sample = Sample.read(tmp_path / "run" / "data" / "virtual_tissue.h5ad")
    config = create_encoder("morphology").config.with_tile_size(256)
    n_tiles = len(make_tile_grid(sample.image.shape, sample.mpp, config).assign(sample.spatial))
    done = re.search(r"from (\d+) tiles .*\(rank 0 of 2\)", (tmp_path / "run" / "log.txt").read_text())
    assert done and 0 < int(done.group(1)) < n_tiles, (done, n_tiles)
