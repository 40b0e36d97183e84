"""Foundation-model encoders loaded for real: each architecture is built with timm / open_clip, random weights
are written in the model's published file layout, loaded through ``create_encoder(name, weights=path)``, and
the feature map's shape, the arrival of the weights and the token-to-grid layout are checked.

UNI (ViT-L/16, 300M parameters, a 1.2 GB file) and CONCH (ViT-B/16) are tested on depth-reduced copies of
their published architectures (``UNI_ARCH`` / ``CONCH_TRUNK`` with ``depth=2``): the same key names and
shapes per block, seconds instead of minutes. Their full-size layouts are checked on the meta device.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

timm = pytest.importorskip("timm", reason="needs timm/open_clip: run make test-encoders")
open_clip = pytest.importorskip("open_clip", reason="needs timm/open_clip: run make test-encoders")

from safetensors.torch import save_file  # noqa: E402

from gcmoe.config import TissueConfig  # noqa: E402
from gcmoe.config import FeatureConfig  # noqa: E402
from gcmoe.features import create_encoder, extract_features, extract_features_with_stats  # noqa: E402
from gcmoe.features import foundation  # noqa: E402
from gcmoe.features.weights import EncoderWeightsError  # noqa: E402
from gcmoe.files import file_sha256  # noqa: E402

pytestmark = pytest.mark.encoders


def _randomise(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """A state dict of random values (LayerScale gammas and norms included), so loading is visible."""
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) * 0.05 for k, v in model.state_dict().items()}


def _normalise(x: torch.Tensor, config) -> torch.Tensor:
    mean = torch.tensor(config.mean).view(1, 3, 1, 1)
    std = torch.tensor(config.std).view(1, 3, 1, 1)
    return (x - mean) / std


def _uni_reduced(monkeypatch) -> dict:
    arch = dict(foundation.UNI_ARCH, depth=2)
    monkeypatch.setattr(foundation, "UNI_ARCH", arch)
    return arch


def _timm_reference(name: str, **kwargs) -> torch.nn.Module:
    return timm.create_model(name, pretrained=False, **kwargs).eval()


@pytest.fixture
def uni_file(monkeypatch, tmp_path):
    """A depth-2 UNI: the timm model and its weights written as UNI's pytorch_model.bin (a plain state dict)."""
    arch = _uni_reduced(monkeypatch)
    args = {k: v for k, v in arch.items() if k != "model_name"}
    model = _timm_reference(arch["model_name"], **args)
    state = _randomise(model, 0)
    model.load_state_dict(state)
    path = tmp_path / "pytorch_model.bin"
    torch.save(state, path)
    return model, state, path


def test_uni_loads_published_layout(uni_file):
    model, state, path = uni_file
    enc = create_encoder("uni", weights=path)
    c = enc.config
    assert (c.stride, c.feature_dim, c.tile_size, c.margin, c.align, c.target_mpp) == (16, 1024, 224, 32, 16, 0.5)
    assert c.mean == foundation.IMAGENET_MEAN and c.std == foundation.IMAGENET_STD
    assert c.weights_sha256 == file_sha256(path)
    loaded = enc.model.state_dict()
    for key in ("pos_embed", "blocks.1.ls2.gamma", "blocks.0.attn.qkv.weight", "norm.bias"):
        assert torch.equal(loaded[key], state[key]), key
    assert not any(t.is_meta for t in enc.parameters()) and not enc.training

    x = torch.rand(2, 3, 64, 96)  # a tile size other than 224: dynamic image size
    with torch.inference_mode():
        fmap = enc(x)
        # timm's own NCHW reshape of the same tokens: an independent check of the grid layout
        ref = model.forward_intermediates(_normalise(x, c), indices=1, intermediates_only=True, norm=True)[-1]
    assert fmap.shape == (2, 1024, 4, 6)
    torch.testing.assert_close(fmap, ref, rtol=1e-4, atol=1e-4)
    with torch.inference_mode():
        odd = enc(torch.cat([x, torch.rand(2, 3, 64, 96)[:, :, :5]], dim=2)[:, :, :69, :])  # 69 rows -> 4
    assert odd.shape == (2, 1024, 4, 6)


def test_uni_wrong_file_fails_clearly(uni_file, tmp_path):
    _, state, _ = uni_file
    bad = dict(state)
    bad["blocks.0.attn.qkv.w"] = bad.pop("blocks.0.attn.qkv.weight")  # renamed key
    bad["head.weight"] = torch.zeros(3, 1024)  # a classifier UNI does not have
    path = tmp_path / "wrong.bin"
    torch.save(bad, path)
    with pytest.raises(EncoderWeightsError) as info:
        create_encoder("uni", weights=path)
    message = str(info.value)
    assert "1 missing" in message and "2 unexpected" in message
    assert "blocks.0.attn.qkv.weight" in message and "head.weight" in message and str(path) in message


def test_full_size_layouts_on_meta():
    """The full UNI / CONCH architectures, built on the meta device (no memory): the published layouts."""
    from timm.models.vision_transformer import VisionTransformer

    arch = dict(foundation.UNI_ARCH)
    with torch.device("meta"):
        uni = timm.create_model(arch.pop("model_name"), pretrained=False, **arch)
        conch = VisionTransformer(**foundation.CONCH_TRUNK)
    uni_state, conch_state = uni.state_dict(), conch.state_dict()
    assert sum(p.numel() for p in uni.parameters()) == pytest.approx(303.3e6, rel=0.01)
    assert uni_state["pos_embed"].shape == (1, 1 + 14 * 14, 1024)
    assert "blocks.23.ls2.gamma" in uni_state and "blocks.24.norm1.weight" not in uni_state
    assert not any(k.startswith("head.") and uni_state[k].numel() for k in uni_state)
    assert conch_state["pos_embed"].shape == (1, 1 + 28 * 28, 768)
    assert "blocks.11.mlp.fc2.weight" in conch_state and not any(".ls1." in k for k in conch_state)


@pytest.fixture
def conch_file(monkeypatch, tmp_path):
    """A depth-2 CONCH trunk written as the CoCa checkpoint does: under visual.trunk., beside other keys."""
    from timm.models.vision_transformer import VisionTransformer

    arch = dict(foundation.CONCH_TRUNK, depth=2)
    monkeypatch.setattr(foundation, "CONCH_TRUNK", arch)
    trunk = VisionTransformer(**arch).eval()
    state = _randomise(trunk, 1)
    trunk.load_state_dict(state)
    full = {f"visual.trunk.{k}": v for k, v in state.items()}
    full.update({  # a few of the CoCa model's other tensors, which the encoder does not use
        "visual.attn_pool_contrast.query": torch.randn(1, 512),
        "visual.ln_contrast.weight": torch.ones(512),
        "visual.proj_contrast": torch.randn(512, 512),
        "visual.attn_pool_caption.query": torch.randn(256, 768),
        "text.token_embedding.weight": torch.randn(32007, 8),
        "text_decoder.ln_final.weight": torch.ones(768),
        "logit_scale": torch.tensor(4.6),
    })
    path = tmp_path / "pytorch_model.bin"
    torch.save(full, path)
    return trunk, state, path


def test_conch_loads_trunk_from_coca_checkpoint(conch_file, tmp_path):
    trunk, state, path = conch_file
    enc = create_encoder("conch", weights=path, tile_size=96)
    c = enc.config
    assert (c.stride, c.feature_dim, c.tile_size, c.target_mpp) == (16, 768, 96, 0.5)
    assert c.mean == foundation.CLIP_MEAN and c.std == foundation.CLIP_STD
    assert create_encoder("conch", weights=path).config.tile_size == 448
    assert torch.equal(enc.model.state_dict()["blocks.1.attn.proj.weight"], state["blocks.1.attn.proj.weight"])
    x = torch.rand(1, 3, 96, 128)
    with torch.inference_mode():
        fmap = enc(x)
        ref = trunk.forward_intermediates(_normalise(x, c), indices=1, intermediates_only=True, norm=True)[-1]
    assert fmap.shape == (1, 768, 6, 8)
    torch.testing.assert_close(fmap, ref, rtol=1e-4, atol=1e-4)

    no_trunk = tmp_path / "text_only.bin"
    torch.save({"text.token_embedding.weight": torch.zeros(2, 2)}, no_trunk)
    with pytest.raises(EncoderWeightsError, match="no 'visual.trunk"):
        create_encoder("conch", weights=no_trunk)
    extra = tmp_path / "extra_block.bin"
    torch.save({**torch.load(path, weights_only=True), "visual.trunk.blocks.2.norm1.weight": torch.ones(768)}, extra)
    with pytest.raises(EncoderWeightsError, match=r"1 unexpected.*blocks\.2\.norm1\.weight"):
        create_encoder("conch", weights=extra)


@pytest.fixture
def vit_tiny_file(tmp_path):
    """vit_tiny_patch16_224 as timm publishes it (model.safetensors, with its 1000-class head)."""
    model = _timm_reference("vit_tiny_patch16_224", dynamic_img_size=True)  # same keys as without
    state = _randomise(model, 2)
    model.load_state_dict(state)
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    return model, state, path


def test_timm_vit_by_name(vit_tiny_file, tmp_path):
    model, state, path = vit_tiny_file
    enc = create_encoder("timm:vit_tiny_patch16_224", weights=path)
    c = enc.config
    assert c.name == "timm:vit_tiny_patch16_224"
    assert (c.stride, c.feature_dim, c.tile_size) == (16, 192, 224)
    assert c.mean == (0.5, 0.5, 0.5) and c.std == (0.5, 0.5, 0.5)  # from timm's pretrained config
    assert "head.weight" not in enc.model.state_dict()
    assert torch.equal(enc.model.state_dict()["blocks.11.mlp.fc1.weight"], state["blocks.11.mlp.fc1.weight"])
    x = torch.rand(2, 3, 48, 80)
    with torch.inference_mode():
        fmap = enc(x)
        ref = model.forward_intermediates(_normalise(x, c), indices=1, intermediates_only=True, norm=True)[-1]
    assert fmap.shape == (2, 192, 3, 5)
    torch.testing.assert_close(fmap, ref, rtol=1e-4, atol=1e-4)

    small = _timm_reference("vit_small_patch16_224")
    wrong = tmp_path / "vit_small.safetensors"
    save_file(small.state_dict(), str(wrong))
    with pytest.raises(EncoderWeightsError, match=r"of another shape keys.*qkv\.weight \(file \(1152, 384\), model \(576, 192\)\)"):
        create_encoder("timm:vit_tiny_patch16_224", weights=wrong)


def test_timm_cnn_by_name(tmp_path):
    model = _timm_reference("resnet18", num_classes=0)
    state = _randomise(model, 3)
    state = {k: (v.abs() + 0.5 if "running_var" in k else v) for k, v in state.items()}
    model.load_state_dict(state)
    path = tmp_path / "pytorch_model.bin"
    torch.save(state, path)
    enc = create_encoder("timm:resnet18", weights=path, tile_size=128)
    assert (enc.config.stride, enc.config.feature_dim, enc.config.margin) == (32, 512, 32)
    x = torch.rand(1, 3, 128, 96)
    with torch.inference_mode():
        fmap = enc(x)
        ref = model.forward_features(_normalise(x, enc.config))
    assert fmap.shape == (1, 512, 4, 3)
    torch.testing.assert_close(fmap, ref)


def test_timm_unknown_model(tmp_path):
    path = tmp_path / "w.bin"
    torch.save({"a": torch.ones(1)}, path)
    from gcmoe.errors import UnknownNameError

    with pytest.raises(UnknownNameError, match="timm has no model 'vit_nonexistent'"):
        create_encoder("timm:vit_nonexistent", weights=path)


@pytest.fixture
def tiny_clip(tmp_path):
    """A small open_clip ViT model config registered by name, and its full CLIP checkpoint file."""
    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
    }
    cfg_path = tmp_path / "gcmoe-tiny-ViT.json"
    cfg_path.write_text(json.dumps(cfg))
    open_clip.add_model_config(cfg_path)
    model = open_clip.create_model("gcmoe-tiny-ViT", pretrained=None).eval()
    state = _randomise(model, 4)
    model.load_state_dict(state)
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(state, path)
    return model, state, path


def test_open_clip_by_name(tiny_clip):
    model, state, path = tiny_clip
    assert any(k.startswith("transformer.") for k in state)  # the text tower is in the file, and ignored
    enc = create_encoder("open_clip:gcmoe-tiny-ViT", weights=path)
    c = enc.config
    assert (c.stride, c.feature_dim, c.tile_size) == (16, 64, 64)
    assert c.mean == foundation.CLIP_MEAN and c.std == foundation.CLIP_STD
    visual = enc.tokens.visual
    assert torch.equal(visual.positional_embedding, state["visual.positional_embedding"])
    assert torch.equal(visual.transformer.resblocks[1].mlp.c_fc.weight, state["visual.transformer.resblocks.1.mlp.c_fc.weight"])

    x = torch.rand(2, 3, 64, 64)  # the tower's own size: open_clip's forward_intermediates, unchanged
    with torch.inference_mode():
        fmap = enc(x)
        ref = model.visual.forward_intermediates(_normalise(x, c), indices=1, intermediates_only=True,
                                                 normalize_intermediates=True)["image_intermediates"][-1]
    assert fmap.shape == (2, 64, 4, 4)
    torch.testing.assert_close(fmap, ref)
    with torch.inference_mode():
        other = enc(torch.rand(1, 3, 96, 48))  # another grid: interpolated position embedding
    assert other.shape == (1, 64, 6, 3) and torch.isfinite(other).all()
    assert visual.positional_embedding.shape == state["visual.positional_embedding"].shape  # not changed


def test_open_clip_full_size_layout_on_meta():
    with torch.device("meta"):
        visual = open_clip.create_model("ViT-B-16", pretrained=None, device="meta").visual
    keys = visual.state_dict()
    for key in ("conv1.weight", "class_embedding", "positional_embedding", "ln_pre.weight",
                "transformer.resblocks.11.attn.in_proj_weight", "ln_post.weight", "proj"):
        assert key in keys, key
    assert keys["positional_embedding"].shape == (1 + 14 * 14, 768)


def test_extract_features_with_a_timm_vit(vit_tiny_file, tmp_path):
    """The whole feature path, tiling and sampling unchanged, with a ViT on a small virtual tissue."""
    from gcmoe.data.virtual_tissue import simulate_tissue

    _, state, path = vit_tiny_file
    sample = simulate_tissue(TissueConfig(n_cells=200, height=400, width=400)).sample
    name = "timm:vit_tiny_patch16_224"
    feats, stats = extract_features_with_stats(sample, FeatureConfig(encoder=name, weights=path, tile_size=160, batch_size=3))
    assert feats.shape == (sample.n_cells, 192) and feats.dtype == np.float32
    assert np.isfinite(feats).all()
    assert np.std(feats, axis=0).mean() > 1e-3  # cells differ
    assert 0 < stats.tiles_run <= stats.tiles_total and stats.encoder_passes == -(-stats.tiles_run // 3)

    cached = extract_features(sample, FeatureConfig(encoder=name, weights=path, tile_size=160, cache_dir=tmp_path / "cache"))
    np.testing.assert_allclose(cached, feats, rtol=2e-3, atol=2e-3)  # float16 cache
    again, hit = extract_features_with_stats(sample, FeatureConfig(encoder=name, weights=path, tile_size=160, cache_dir=tmp_path / "cache"))
    np.testing.assert_array_equal(again, cached)
    assert hit.cache_hit and hit.tiles_run == 0

    other = tmp_path / "other.safetensors"
    save_file({k: v + 0.01 for k, v in state.items()}, str(other))
    changed = extract_features(sample, FeatureConfig(encoder=name, weights=other, tile_size=160, cache_dir=tmp_path / "cache"))
    assert not np.allclose(changed, cached)  # new weights, new cache entry
    assert len(list((tmp_path / "cache").rglob("meta.json"))) == 2
