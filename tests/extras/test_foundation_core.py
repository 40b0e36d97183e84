"""Foundation-model encoders without timm/open_clip: listed, refused with a clear error, safe file reading.

These run in the core environment (``make test``) and in the encoders environment alike; "timm missing" is
simulated by hiding the module, so the message is checked in both.
"""

from __future__ import annotations

import sys

import pytest
import torch

from gcmoe.errors import ConfigError, GcmoeError
from gcmoe.features import create_encoder, list_encoders
from gcmoe.features import registry
from gcmoe.features.foundation import default_margin
from gcmoe.features.weights import EncoderWeightsError, MissingExtraError, load_weights_file


def test_foundation_names_are_listed_and_need_weights():
    names = list_encoders()
    for name in ("uni", "conch", "timm:*", "open_clip:*"):
        assert name in names
        assert registry.requires_weights(name)
    assert registry.requires_weights("timm:vit_base_patch16_224")
    assert not registry.requires_weights("morphology")
    assert list_encoders("timm:*") == ["timm:*"]


@pytest.mark.parametrize("name", ["uni", "conch", "timm:vit_tiny_patch16_224", "open_clip:ViT-B-16"])
def test_no_weights_is_a_clear_error(name):
    with pytest.raises(ConfigError, match="needs a local weights file"):
        create_encoder(name)


@pytest.mark.parametrize(
    ("name", "module", "package"),
    [("uni", "timm", "timm"), ("conch", "timm", "timm"), ("timm:vit_tiny_patch16_224", "timm", "timm"),
     ("open_clip:ViT-B-16", "open_clip", "open_clip_torch")],
)
def test_missing_extra_says_how_to_install(name, module, package, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, module, None)  # importing it now raises ImportError, as when absent
    weights = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.zeros(1)}, weights)
    with pytest.raises(MissingExtraError) as info:
        create_encoder(name, weights=weights)
    message = str(info.value)
    assert f"'{package}'" in message and "make test-encoders" in message and ".venv-encoders" in message
    assert isinstance(info.value, GcmoeError) and isinstance(info.value, ImportError)


def test_hub_names_are_refused(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"x")
    for name in ("timm:hf-hub:MahmoodLab/UNI", "timm:hf_hub:x/y", "open_clip:hf-hub:laion/x", "timm:*"):
        with pytest.raises(ConfigError, match="nothing is downloaded"):
            create_encoder(name, weights=weights)


def test_load_weights_file_formats(tmp_path):
    from safetensors.torch import save_file

    state = {"a.weight": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2)}
    torch.save(state, tmp_path / "w.bin")
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "wrapped.pth")
    save_file(state, str(tmp_path / "w.safetensors"))
    for file in ("w.bin", "wrapped.pth", "w.safetensors"):
        loaded = load_weights_file(tmp_path / file, "t")
        assert sorted(loaded) == ["a.weight", "b"]
        assert torch.equal(loaded["a.weight"], state["a.weight"])


class _Pickled:
    pass


@pytest.mark.parametrize(
    ("file", "content", "match"),
    [
        ("w.npz", b"whatever", "expected a .safetensors"),
        ("w.bin", b"not a zip or pickle", "not a readable weights file"),
        ("w.safetensors", b"\x00\x01", "not a readable weights file"),
        ("obj.bin", _Pickled, "not a readable weights file"),  # arbitrary objects are never unpickled
        ("list.bin", [torch.ones(1)], "does not hold a state dict"),
    ],
)
def test_bad_weights_files_are_refused(tmp_path, file, content, match):
    path = tmp_path / file
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content() if isinstance(content, type) else content, path)
    with pytest.raises(EncoderWeightsError, match=match):
        load_weights_file(path, "t")


def test_default_margin():
    assert default_margin(224, 16) == 32 and default_margin(448, 16) == 64
    assert default_margin(32, 16) == 0 and default_margin(48, 16) == 16
    for tile in (48, 64, 224, 512, 1024):
        m = default_margin(tile, 16)
        assert m % 16 == 0 and 2 * m < tile
