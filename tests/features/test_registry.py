from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from gcmoe.errors import ConfigError, UnknownNameError
from gcmoe.features import Encoder, EncoderConfig, create_encoder, list_encoders, register_encoder
from gcmoe.features import registry
from gcmoe.files import file_sha256


def _config(**overrides) -> EncoderConfig:
    values = dict(name="t", target_mpp=0.5, tile_size=64, stride=4, feature_dim=3, margin=8, align=4)
    values.update(overrides)
    return EncoderConfig(**values)


def test_list_encoders_has_morphology_and_filters():
    names = list_encoders()
    assert "morphology" in names and names == sorted(names)
    assert list_encoders("morph*") == ["morphology", "morphology_context"]
    assert list_encoders("nothing*") == []


def test_unknown_encoder_lists_valid_names():
    with pytest.raises(UnknownNameError) as info:
        create_encoder("resnet9000")
    message = str(info.value)
    assert "resnet9000" in message and "morphology" in message
    assert isinstance(info.value, KeyError)


# encoders that need a weights file (foundation models) have their smoke test in tests/extras/
@pytest.mark.parametrize("name", [n for n in list_encoders() if not registry.requires_weights(n)])
def test_every_encoder_output_shape_matches_config(name):
    encoder = create_encoder(name)
    c = encoder.config
    assert isinstance(encoder, Encoder) and not encoder.training
    assert all(not p.requires_grad for p in encoder.parameters())
    height, width = 2 * c.stride * 9 + 3, 2 * c.stride * 12 + 1  # deliberately not multiples of the stride
    with torch.inference_mode():
        out = encoder(torch.rand(2, 3, height, width))
    assert tuple(out.shape) == (2, c.feature_dim, height // c.stride, width // c.stride)
    assert encoder.output_size(height, width) == tuple(out.shape[2:])
    assert torch.isfinite(out).all()
    if encoder.channel_names is not None:
        assert len(encoder.channel_names) == c.feature_dim


def test_config_hash_and_dict():
    a = _config()
    assert a.hash() == _config().hash() and len(a.hash()) == 16
    assert a.hash() != _config(version="2").hash()
    assert a.hash() != a.with_tile_size(128).hash()
    assert a.hash() != _config(weights_sha256="ab" * 32).hash()
    json.dumps(_config(mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2)).to_dict())
    with pytest.raises(Exception):
        a.stride = 2  # frozen


@pytest.mark.parametrize(
    "overrides",
    [
        dict(tile_size=66),  # not a multiple of the stride
        dict(margin=6),  # not a multiple of align
        dict(margin=32),  # no room inside the margins
        dict(target_mpp=0.0),
        dict(stride=0),
        dict(mean=(0.5, 0.5)),
        dict(std=(1.0, 0.0, 1.0)),
    ],
)
def test_config_validation(overrides):
    with pytest.raises(ConfigError):
        _config(**overrides)


class _Normalising(Encoder):
    def forward_features(self, x):
        return x[:, :, :: self.config.stride, :: self.config.stride]


def test_forward_applies_mean_std():
    enc = _Normalising(_config(mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 2.0)))
    out = enc(torch.full((1, 3, 8, 8), 0.5))
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([0.0, 1.0, 0.25]))
    with pytest.raises(ValueError):
        enc(torch.rand(1, 4, 8, 8))


def test_register_create_and_weights(monkeypatch, tmp_path):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    loaded = {}

    @register_encoder("toy")
    def toy(weights=None, tile_size: int = 64):
        loaded["weights"] = weights
        return _Normalising(_config(name="toy", tile_size=tile_size))

    assert "toy" in list_encoders()
    enc = create_encoder("toy", tile_size=128)
    assert enc.config.tile_size == 128 and enc.config.weights_sha256 is None
    weights = tmp_path / "toy.pt"
    weights.write_bytes(b"not really weights")
    enc = create_encoder("toy", weights=weights)
    assert loaded["weights"] == weights
    assert enc.config.weights_sha256 == file_sha256(weights)
    weights.write_bytes(b"other weights")
    assert create_encoder("toy", weights=weights).config.hash() != enc.config.hash()
    with pytest.raises(ConfigError, match="not found"):
        create_encoder("toy", weights=tmp_path / "missing.pt")
    with pytest.raises(ConfigError, match="does not take"):
        create_encoder("toy", depth=3)
    with pytest.raises(ConfigError, match="already registered"):
        register_encoder("toy")(lambda: None)

    @register_encoder
    def bare():
        return _Normalising(_config(name="bare"))

    assert "bare" in list_encoders()


def test_morphology_takes_no_weights(tmp_path):
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"x")
    with pytest.raises(ConfigError, match="takes no weights"):
        create_encoder("morphology", weights=weights)


def test_import_gcmoe_features_does_not_import_torch():
    code = "import sys, gcmoe, gcmoe.features; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_public_api_resolves():
    import gcmoe.features as features

    for name in features.__all__:
        assert getattr(features, name) is not None
    assert set(features.__all__) <= set(dir(features))
    with pytest.raises(AttributeError):
        features.no_such_thing
