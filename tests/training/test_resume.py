"""Crash safety: checkpoints of the whole training state, resume to the same weights, refusal of a foreign run."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gcmoe.config import TrainConfig
from gcmoe.models import create_model
from gcmoe.training.checkpoint import CheckpointError
from gcmoe.training.state import latest_checkpoint
from gcmoe.training.cells import CellData
from gcmoe.training.trainer import fit


def _data(n=600, d=6, g=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (x @ rng.normal(size=(d, g)) + rng.normal(size=(n, g))).astype(np.float32)
    return CellData(torch.from_numpy(x), torch.from_numpy(y))


CONFIG = TrainConfig(max_epochs=8, patience=100, batch_size=64, checkpoint_every=1, num_threads=1)
IDX = np.arange(600)


class Crash(RuntimeError):
    pass


def _crashing_model(after_validations: int):
    """ST-Net* (with dropout, so the RNG state matters) that raises at the n-th validation."""
    model = create_model("stnet", 6, 4)
    calls = {"n": 0}

    def hook(data, train_idx):
        calls["n"] += 1
        if calls["n"] > after_validations:
            raise Crash

    model.on_validation_start = hook
    return model


def test_resume_after_a_crash_gives_the_uninterrupted_weights(tmp_path):
    data = _data()
    torch.manual_seed(1)
    reference = create_model("stnet", 6, 4)
    ref_res = fit(reference, data, IDX[:450], IDX[450:], CONFIG)

    torch.manual_seed(1)
    crashed = _crashing_model(after_validations=3)
    with pytest.raises(Crash):
        fit(crashed, data, IDX[:450], IDX[450:], CONFIG, checkpoint_dir=tmp_path)
    assert latest_checkpoint(tmp_path).name == "epoch-000003"

    torch.manual_seed(99)  # a different init: everything must come from the checkpoint
    resumed = create_model("stnet", 6, 4)
    res = fit(resumed, data, IDX[:450], IDX[450:], CONFIG, checkpoint_dir=tmp_path, resume=True)
    assert res.epochs_run == ref_res.epochs_run and res.best_epoch == ref_res.best_epoch
    assert [h["val_pcc"] for h in res.history] == [h["val_pcc"] for h in ref_res.history]
    for (k, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    assert latest_checkpoint(tmp_path).name == "epoch-000008"  # the final state; older ones removed
    assert len(list(tmp_path.iterdir())) == 1


def test_resume_of_a_finished_run_restores_its_best_weights(tmp_path):
    data = _data()
    first = create_model("stnet", 6, 4)
    res1 = fit(first, data, IDX[:450], IDX[450:], CONFIG, checkpoint_dir=tmp_path)
    again = create_model("stnet", 6, 4)
    res2 = fit(again, data, IDX[:450], IDX[450:], CONFIG, checkpoint_dir=tmp_path, resume=True)
    assert res2.best_epoch == res1.best_epoch and res2.epochs_run == res1.epochs_run
    for a, b in zip(first.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def test_resume_with_other_settings_or_data_is_refused(tmp_path):
    data = _data()
    fit(create_model("stnet", 6, 4), data, IDX[:450], IDX[450:], CONFIG, checkpoint_dir=tmp_path)
    other = TrainConfig(**{**CONFIG.__dict__, "lr": 0.01})
    with pytest.raises(CheckpointError, match=r"train\.lr: checkpoint 0\.001, now 0\.01"):
        fit(create_model("stnet", 6, 4), data, IDX[:450], IDX[450:], other, checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(CheckpointError, match="features"):
        fit(create_model("stnet", 6, 4), _data(seed=5), IDX[:450], IDX[450:], CONFIG, checkpoint_dir=tmp_path,
            resume=True)
    with pytest.raises(CheckpointError, match="split"):
        fit(create_model("stnet", 6, 4), data, IDX[:400], IDX[450:], CONFIG, checkpoint_dir=tmp_path, resume=True)


def test_a_damaged_checkpoint_is_detected_by_its_checksum(tmp_path):
    data = _data()
    fit(create_model("stnet", 6, 4), data, IDX[:450], IDX[450:], CONFIG, checkpoint_dir=tmp_path)
    weights = latest_checkpoint(tmp_path) / "state.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-10] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="checksum"):
        fit(create_model("stnet", 6, 4), data, IDX[:450], IDX[450:], CONFIG, checkpoint_dir=tmp_path, resume=True)


# A training run in its own process, slowed by a pause per validation so that it can be killed mid-run.
_SCRIPT = textwrap.dedent("""
    import sys, time
    import numpy as np, torch
    from safetensors.torch import save_file
    from gcmoe.config import TrainConfig
    from gcmoe.models import create_model
    from gcmoe.training.cells import CellData
    from gcmoe.training.trainer import fit

    ckpt, out, pause = sys.argv[1], sys.argv[2], float(sys.argv[3])
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 6)).astype(np.float32)
    y = (x @ rng.normal(size=(6, 4)) + rng.normal(size=(600, 4))).astype(np.float32)
    data = CellData(torch.from_numpy(x), torch.from_numpy(y))
    torch.manual_seed(1)
    model = create_model("stnet", 6, 4)
    model.on_validation_start = lambda data, idx: time.sleep(pause)
    config = TrainConfig(max_epochs=40, patience=1000, batch_size=64, checkpoint_every=1, num_threads=1)
    idx = np.arange(600)
    fit(model, data, idx[:450], idx[450:], config, checkpoint_dir=ckpt, resume=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out)
""")


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_equals_an_uninterrupted_run(tmp_path):
    from safetensors.torch import load_file

    script = tmp_path / "train.py"
    script.write_text(_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def run(ckpt: Path, out: Path, pause: float) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(script), str(ckpt), str(out), str(pause)], env=env)

    reference = run(tmp_path / "ref_ckpt", tmp_path / "ref.safetensors", 0)  # alongside: one thread each
    proc = run(tmp_path / "ckpt", tmp_path / "killed.safetensors", 0.1)
    deadline = time.time() + 120
    while time.time() < deadline:
        last = latest_checkpoint(tmp_path / "ckpt")
        if last is not None and int(last.name.split("-")[1]) >= 5:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = int(latest_checkpoint(tmp_path / "ckpt").name.split("-")[1])
    assert 5 <= killed_at < 40, "the run must be killed mid-way"
    assert not (tmp_path / "killed.safetensors").exists()

    resumed = run(tmp_path / "ckpt", tmp_path / "resumed.safetensors", 0)
    assert resumed.wait(timeout=300) == 0 and reference.wait(timeout=300) == 0
    ref, got = load_file(str(tmp_path / "ref.safetensors")), load_file(str(tmp_path / "resumed.safetensors"))
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
