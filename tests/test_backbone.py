"""Backbones: token grids and NHWC maps laid out as B×D×h×w, input normalisation, output stride,
several-backbone specs."""
from __future__ import annotations

import pytest
import torch

from cxrlab.errors import CxrlabError
from cxrlab.models import backbone_specs, build_from_config, build_model
from cxrlab.models.backbone import GRAY_MEAN, GRAY_STD, Backbone


def test_vit_tokens_are_laid_on_their_grid():
    net = Backbone("test_vit").eval()  # 160 px, patch 16: 10×10 patch tokens after the class token
    x = torch.rand(2, 1, 160, 160)
    with torch.no_grad():
        fmap = net(x)
        tokens = net.net.forward_features((x - GRAY_MEAN) / GRAY_STD)
    assert net.num_prefix_tokens == 1 and tokens.shape == (2, 101, 64)
    assert fmap.shape == (2, 64, 10, 10)
    # row-major: token 1 + 10·i + j is location (i, j)
    for i, j in ((0, 0), (0, 9), (3, 7), (9, 9)):
        torch.testing.assert_close(fmap[:, :, i, j], tokens[:, 1 + 10 * i + j])


def test_nhwc_backbone_is_permuted():
    net = Backbone("test_mambaout").eval()
    assert net.output_fmt == "NHWC"
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        raw = net.net.forward_features((x - GRAY_MEAN) / GRAY_STD)  # B×h×w×D
        fmap = net(x)
    assert raw.shape == (2, 2, 2, 64) and fmap.shape == (2, 64, 2, 2)
    torch.testing.assert_close(fmap, raw.permute(0, 3, 1, 2))


@pytest.fixture(scope="module")
def vit_weights(tmp_path_factory):
    """A local 'pretrained' file for test_vit (RGB stem, classifier), as timm would download."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "test_vit.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("test_vit").state_dict().items()}, str(path))
    return path


def test_normalisation_random_init_and_pretrained(vit_weights):
    plain = Backbone("test_vit")
    assert (float(plain.input_mean), float(plain.input_std)) == pytest.approx((GRAY_MEAN, GRAY_STD))
    assert plain.normalisation == "grey ImageNet default"
    pre = Backbone("test_vit", pretrained=str(vit_weights)).eval()
    # test_vit's pretrained_cfg is (0.5, 0.5, 0.5) / (0.5, 0.5, 0.5): averaged, 0.5 / 0.5
    assert (float(pre.input_mean), float(pre.input_std)) == pytest.approx((0.5, 0.5))
    assert pre.normalisation == "pretrained_cfg"
    x = torch.rand(1, 1, 160, 160)
    with torch.no_grad():
        expected = pre.net.forward_features((x - 0.5) / 0.5)[:, 1:].transpose(1, 2).reshape(1, 64, 10, 10)
        torch.testing.assert_close(pre(x), expected)
    # the RGB stem summed to one channel: the local file's weights did arrive
    from safetensors.torch import load_file

    rgb = load_file(str(vit_weights))["patch_embed.proj.weight"]
    torch.testing.assert_close(pre.net.patch_embed.proj.weight, rgb.sum(1, keepdim=True))


def test_normalisation_is_saved_with_the_weights(vit_weights):
    """A checkpoint rebuilds without pretrained weights: the recorded mean/std must come back."""
    trained = build_model("test_vit", "linear", 3, pretrained=str(vit_weights)).eval()
    rebuilt = build_from_config({"backbone": "test_vit", "pretrained": str(vit_weights), "head": "linear"}, 3,
                                load_weights=False)
    assert float(rebuilt.backbone.input_mean) == pytest.approx(GRAY_MEAN)  # before loading
    rebuilt.load_state_dict(trained.state_dict())
    rebuilt.eval()
    assert float(rebuilt.backbone.input_mean) == pytest.approx(0.5)
    x = torch.rand(2, 1, 160, 160)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x).logits, trained(x).logits)


def test_state_dict_without_normalisation_loads_with_the_old_default():
    old = build_model("test_resnet", "linear", 3)
    sd = {k: v for k, v in old.state_dict().items() if not k.endswith(("input_mean", "input_std"))}
    fresh = build_model("test_resnet", "linear", 3)
    fresh.backbone.input_mean.fill_(0.0)
    fresh.load_state_dict(sd, strict=True)
    assert float(fresh.backbone.input_mean) == pytest.approx(GRAY_MEAN)


def test_output_stride():
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        assert Backbone("test_resnet")(x).shape[-2:] == (2, 2)
        assert Backbone("test_resnet", output_stride=16)(x).shape[-2:] == (4, 4)
        assert Backbone("test_resnet", output_stride=8)(x).shape[-2:] == (8, 8)
    with pytest.raises(CxrlabError, match=r"model\.output_stride=8.*densenet121"):
        Backbone("densenet121", output_stride=8)
    with pytest.raises(CxrlabError, match=r"model\.output_stride must be one of 8, 16, 32"):
        Backbone("test_resnet", output_stride=4)


def test_backbone_specs():
    assert [s.name for s in backbone_specs({"backbone": "resnet18"})] == ["resnet18"]
    specs = backbone_specs({"backbones": ["a", {"name": "b", "pretrained": True}], "pretrained": "/w.safetensors",
                            "output_stride": 8})
    assert [(s.name, s.pretrained, s.output_stride) for s in specs] == [("a", "/w.safetensors", 8), ("b", True, 8)]
    with pytest.raises(CxrlabError, match=r"model\.backbones\[1\] key.*'pretrain'.*'pretrained'"):
        backbone_specs({"backbones": ["a", {"name": "b", "pretrain": True}]})
    with pytest.raises(CxrlabError, match=r"model\.backbones\[0\] lacks a backbone 'name'"):
        backbone_specs({"backbones": [{"pretrained": True}]})
    from cxrlab.config import load_recipe

    recipe = load_recipe(None, ["model.backbones=[test_resnet, {name: test_resnet, output_stride: 8}]"])
    assert [(s.name, s.output_stride) for s in backbone_specs(recipe.model)] == [("test_resnet", None),
                                                                                 ("test_resnet", 8)]


def test_head_must_fit_the_number_of_backbones():
    from cxrlab.models import check_model

    with pytest.raises(CxrlabError, match=r"model\.head 'linear' takes one feature map.*cross_attention"):
        build_model(["test_resnet", "test_resnet"], "linear", 3)
    with pytest.raises(CxrlabError, match=r"model\.head 'cross_attention' needs several backbones.*model\.backbones"):
        check_model({"backbone": "test_resnet", "head": "cross_attention"})
    with pytest.raises(CxrlabError, match="backbone"):
        check_model({"backbones": ["test_resnet", "resnet19"], "head": "concat"})
