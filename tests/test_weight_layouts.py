"""Published encoder key layouts -> timm (models/weight_layouts.py): a small randomly initialised model in
each layout is saved, loaded through the mapping, and must give the reference model's outputs (no download)."""
from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from cxrlab.errors import CxrlabError
from cxrlab.models.backbone import Backbone
from cxrlab.models.weight_layouts import detect_layout, load_into

TINY = dict(embed_dim=32, depth=2, num_heads=2, num_classes=0, global_pool="")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter drawn at random (norm scales around 1), so a wrongly mapped tensor shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return model.eval()


def save(state: dict, path) -> str:
    if str(path).endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, str(path))
    return str(path)


def grey(size: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(2, 1, size, size, generator=torch.Generator().manual_seed(seed))


def test_rad_dino_transformers_dinov2_layouts(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=128, image_size=56, patch_size=14, layerscale_value=0.5)
    hf = randomise(transformers.Dinov2Model(config))
    x = grey(56)
    with torch.no_grad():
        want = hf(pixel_values=x.expand(-1, 3, -1, -1)).last_hidden_state
    state = hf.state_dict()
    assert "encoder.layer.0.attention.q_proj.weight" in state or "encoder.layer.0.attention.attention.query.weight" in state
    # the key layout RAD-DINO was published in (transformers 4): attention.attention.query/key/value, output.dense
    v4 = {}
    for k, v in state.items():
        for new, old in (("attention.q_proj.", "attention.attention.query."), ("attention.k_proj.", "attention.attention.key."),
                         ("attention.v_proj.", "attention.attention.value."), ("attention.o_proj.", "attention.output.dense.")):
            k = k.replace(new, old)
        v4[k] = v
    assert "encoder.layer.1.attention.attention.value.bias" in v4 and "embeddings.mask_token" in v4
    for i, layout in enumerate((state, v4, {f"dinov2.{k}": v for k, v in v4.items()})):
        net = timm.create_model("vit_base_patch14_dinov2", img_size=56, in_chans=1, init_values=1e-5, mlp_ratio=4, **TINY)
        assert detect_layout(layout) == "hf_dinov2"
        assert load_into(net, save(layout, tmp_path / f"rad_dino{i}.safetensors"), "vit_base_patch14_dinov2") == "hf_dinov2"
        with torch.no_grad():
            got = net.eval().forward_features(x)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_eva_x_separate_qkv_into_fused_eva(tmp_path):
    kw = dict(img_size=28, patch_size=14, in_chans=1, **TINY)
    published = randomise(timm.create_model("eva02_tiny_patch14_224", qkv_fused=False, **kw))  # q/k/v_proj
    x = grey(28)
    with torch.no_grad():
        want = published.forward_features(x)
    state = {f"model.{k}": v for k, v in published.state_dict().items()}
    # a key bias, as a file with biases on all three projections has: it must not change the output
    state.update({f"model.blocks.{i}.attn.k_proj.bias": torch.randn(32) for i in range(2)})
    path = save(state, tmp_path / "eva_x.pth")
    fused = timm.create_model("eva02_tiny_patch14_224", **kw)
    assert "blocks.0.attn.q_bias" in fused.state_dict()
    assert load_into(fused, path, "eva02_tiny_patch14_224") == "timm"
    with torch.no_grad():  # the dropped key bias adds a constant per query: softmax ignores it
        torch.testing.assert_close(fused.eval().forward_features(x), want, atol=2e-5, rtol=1e-4)
    # and back: the fused file into separate projections
    path = save(fused.state_dict(), tmp_path / "eva_fused.safetensors")
    split = timm.create_model("eva02_tiny_patch14_224", qkv_fused=False, **kw)
    load_into(split, path, "eva02_tiny_patch14_224")
    with torch.no_grad():
        torch.testing.assert_close(split.eval().forward_features(x), want, atol=2e-5, rtol=1e-4)


def test_biomedclip_open_clip_visual_trunk_rgb_to_grey(tmp_path):
    rgb = randomise(timm.create_model("vit_base_patch16_224", img_size=32, in_chans=3, **TINY))
    x = grey(32)
    with torch.no_grad():
        want = rgb.forward_features(x.expand(-1, 3, -1, -1))
    clip = {f"visual.trunk.{k}": v for k, v in rgb.state_dict().items()}
    clip.update({"visual.head.proj.weight": torch.randn(16, 32), "logit_scale": torch.tensor(4.6),
                 "text.transformer.encoder.layer.0.attention.self.query.weight": torch.randn(8, 8)})
    net = timm.create_model("vit_base_patch16_224", img_size=32, in_chans=1, **TINY)
    assert load_into(net, save(clip, tmp_path / "biomedclip.bin"), "vit_base_patch16_224") == "open_clip"
    with torch.no_grad():
        torch.testing.assert_close(net.eval().forward_features(x), want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("finetuned", [False, True])
def test_medical_mae_checkpoints(tmp_path, finetuned):
    mae = randomise(timm.create_model("vit_base_patch16_224", img_size=32, in_chans=3, **TINY))
    x = grey(32)
    with torch.no_grad():
        want = mae.forward_features(x.expand(-1, 3, -1, -1))
    state = dict(mae.state_dict())
    if finetuned:  # global-pool fine-tuning keeps the final norm as fc_norm, and adds a classifier
        state["fc_norm.weight"], state["fc_norm.bias"] = state.pop("norm.weight"), state.pop("norm.bias")
        state.update({"head.weight": torch.randn(14, 32), "head.bias": torch.randn(14)})
    else:  # the pretraining checkpoint: encoder + decoder + mask token, under "model"
        state.update({"mask_token": torch.randn(1, 1, 16), "decoder_embed.weight": torch.randn(16, 32),
                      "decoder_blocks.0.attn.qkv.weight": torch.randn(48, 16), "decoder_pos_embed": torch.randn(1, 5, 16)})
    path = save({"model": state, "epoch": 799}, tmp_path / "mae.pth")
    net = timm.create_model("vit_base_patch16_224", img_size=32, in_chans=1, **TINY)
    load_into(net, path, "vit_base_patch16_224")
    with torch.no_grad():
        torch.testing.assert_close(net.eval().forward_features(x), want, atol=2e-5, rtol=1e-4)


def test_position_embeddings_resampled_to_the_recipe_size(tmp_path):
    """Through Backbone: test_vit's 160 px weights (10×10 grid) for a 64 px recipe (4×4 grid)."""
    source = randomise(timm.create_model("test_vit", in_chans=3))
    path = save({f"visual.trunk.{k}": v for k, v in source.state_dict().items()}, tmp_path / "w.safetensors")
    net = Backbone("test_vit", pretrained=path, image_size=64).eval()
    assert net.layout == "open_clip" and net.normalisation == "pretrained_cfg"
    expected = resample_abs_pos_embed(source.pos_embed.detach(), new_size=[4, 4], num_prefix_tokens=1)
    torch.testing.assert_close(net.net.pos_embed.detach(), expected)
    torch.testing.assert_close(net.net.patch_embed.proj.weight.detach(),
                               source.patch_embed.proj.weight.detach().sum(1, keepdim=True))
    with torch.no_grad():
        assert net(grey(64)).shape == (2, source.num_features, 4, 4)


def test_mismatch_names_the_first_missing_and_unexpected_keys(tmp_path):
    small = timm.create_model("vit_base_patch16_224", img_size=32, in_chans=1, **TINY)
    deeper = timm.create_model("vit_base_patch16_224", img_size=32, in_chans=1, **{**TINY, "depth": 3})
    path = save(small.state_dict(), tmp_path / "two_blocks.safetensors")
    with pytest.raises(CxrlabError, match=r"^model\.pretrained=.*two_blocks\.safetensors \(timm layout\) does not fit "
                                          r"backbone 'vit_base_patch16_224': 12 missing \(first: blocks\.2\.norm1\.weight, "
                                          r"blocks\.2\.norm1\.bias, blocks\.2\.attn\.qkv\.weight\)$"):
        load_into(deeper, path, "vit_base_patch16_224")
    extra = save({**small.state_dict(), "adapter.weight": torch.zeros(3)}, tmp_path / "extra.safetensors")
    with pytest.raises(CxrlabError, match=r"1 unexpected \(first: adapter\.weight\)"):
        load_into(small, extra, "vit_base_patch16_224")
    wide = timm.create_model("vit_base_patch16_224", img_size=32, in_chans=1, **{**TINY, "embed_dim": 64})
    with pytest.raises(CxrlabError, match=r"cls_token has shape \(1, 1, 32\) in the file but \(1, 1, 64\)"):
        load_into(wide, path, "vit_base_patch16_224")


def test_a_vit_trains_at_the_recipe_size_and_its_checkpoint_rebuilds(tmp_path):
    """test_vit is built for 160 px; a 32 px recipe builds it for 32 px (2×2 grid), and so does load_model."""
    import cxrlab
    from cxrlab.checkpoint import load_model

    source = randomise(timm.create_model("test_vit", in_chans=3))
    weights = save(source.state_dict(), tmp_path / "test_vit.safetensors")
    run = cxrlab.train("demo", tmp_path / "run", **{
        "data.source": "synthetic:120", "data.image_size": 32, "data.cache_dir": str(tmp_path / "cache"),
        "model.backbone": "test_vit", "model.pretrained": weights, "train.epochs": 1, "eval.bootstrap": 0,
        "eval.subgroups": []})
    model, _ = load_model(run.checkpoint)
    assert model.backbone.net.pos_embed.shape == (1, 1 + 2 * 2, source.num_features)
    x = grey(32)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, run.model.eval()(x).logits)
