"""Backbone feature maps, pyramid, heads (key names, transformers UperNet parity), losses, save / load."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from internvl_fm.errors import WeightLoadingError
from internvl_fm.models.configuration_intern_vit import InternVisionConfig
from internvl_fm.models.modeling_intern_vit import InternVisionModel
from internvl_fm.segmentation import (CropSizeError, FCNHead, InternViTBackbone, LinearHead, SegmentationConfig,
                                      SegmentationConfigError, SegmentationModel, UperNetHead,
                                      convert_hf_upernet_state_dict, convert_official_state_dict,
                                      segmentation_loss)


def tiny_vit(layers: int = 4, image_size: int = 56, patch_size: int = 14) -> InternVisionModel:
    torch.manual_seed(0)
    config = InternVisionConfig(hidden_size=32, num_attention_heads=2, intermediate_size=64,
                                num_hidden_layers=layers, image_size=image_size, patch_size=patch_size,
                                qkv_bias=True, qk_normalization=False, norm_type="layer_norm")
    return InternVisionModel(config).init_weights()


def tiny_config(**kw) -> SegmentationConfig:
    base = dict(num_classes=5, head="upernet", out_indices=[0, 1, 2, 3], with_pyramid=True, crop_size=56,
                channels=16, aux_channels=8, reduce_zero_label=False)
    base.update(kw)
    return SegmentationConfig(**base)


def test_backbone_maps_equal_reference_hidden_states(tiny_vit_path, golden):
    """Maps are the official block outputs (golden, made by the reference code), CLS dropped, row-major grid."""
    expected = load_file(golden / "internvit_300m" / "expected.safetensors")["hidden_states"]  # [L+1, B, 1+hw, C]
    pixels = load_file(golden / "internvit_300m" / "inputs.safetensors")["pixel_values"]
    backbone = InternViTBackbone.from_pretrained(tiny_vit_path, out_indices=[0, -1])
    maps = backbone(pixels)
    for block, fmap in zip((1, 2), maps):
        tokens = expected[block][:, 1:]  # [B, 16, 48]
        assert fmap.shape == (2, 48, 4, 4)
        torch.testing.assert_close(fmap.flatten(2).transpose(1, 2), tokens, atol=1e-5, rtol=1e-4)


def test_backbone_from_full_internvl_checkpoint(tiny_clip_path):
    """The vision tower (`vision_model.*`) of a full InternVL-C/G checkpoint, position embedding resized once."""
    backbone = InternViTBackbone.from_pretrained(tiny_clip_path, out_indices=[-1], image_size=56)
    assert backbone.vit.embeddings.position_embedding.shape == (1, 16 + 1, 64)
    assert backbone(torch.randn(1, 3, 56, 42))[0].shape == (1, 64, 4, 3)


@pytest.mark.parametrize("index", [0, 1, 2, 3, -1, -4])
def test_feature_map_shape_for_every_out_index(index):
    backbone = InternViTBackbone(tiny_vit(), out_indices=[index])
    (fmap,) = backbone(torch.randn(2, 3, 56, 70))
    assert fmap.shape == (2, 32, 4, 5) and fmap.dtype == torch.float32


def test_out_index_beyond_depth_is_rejected():
    with pytest.raises(ValueError, match="out of range"):
        InternViTBackbone(tiny_vit(), out_indices=[4])


def test_pyramid_levels_are_x4_x2_x1_x0_5():
    backbone = InternViTBackbone(tiny_vit(), out_indices=[0, 1, 2, 3], with_pyramid=True)
    maps = backbone(torch.randn(2, 3, 56, 112))  # 4 x 8 patch grid
    assert [tuple(m.shape) for m in maps] == [(2, 32, 16, 32), (2, 32, 8, 16), (2, 32, 4, 8), (2, 32, 2, 4)]
    assert backbone.out_strides == [3.5, 7.0, 14.0, 28.0]
    keys = set(backbone.state_dict())
    assert {"up1.0.weight", "up1.1.weight", "up1.1.bias", "up1.3.weight", "up2.0.weight"} <= keys


def test_pyramid_needs_four_levels():
    with pytest.raises(ValueError, match="exactly 4"):
        InternViTBackbone(tiny_vit(), out_indices=[1, 3], with_pyramid=True)


def test_frozen_backbone_gets_no_gradient_but_pyramid_and_heads_do():
    model = SegmentationModel(tiny_config(), vit=tiny_vit())
    model.train()
    assert not model.backbone.vit.training  # frozen ViT stays in eval mode (no drop path / dropout)
    out = model(torch.randn(2, 3, 56, 56), torch.randint(0, 5, (2, 56, 56)))
    out.loss.backward()
    assert all(p.grad is None for p in model.backbone.vit.parameters())
    assert model.backbone.up1[0].weight.grad is not None
    assert model.decode_head.conv_seg.weight.grad is not None
    assert model.auxiliary_head.conv_seg.weight.grad is not None


def test_trainable_backbone_gets_gradient():
    model = SegmentationModel(tiny_config(head="linear", out_indices=[-1], with_pyramid=False,
                                          freeze_backbone=False), vit=tiny_vit())
    model.train()
    model(torch.randn(2, 3, 56, 56), torch.randint(0, 5, (2, 56, 56))).loss.backward()
    assert model.backbone.vit.encoder.layers[0].attn.qkv.weight.grad is not None


def test_bf16_backbone_returns_float32_maps_close_to_fp32():
    vit = tiny_vit()
    pixels = torch.randn(1, 3, 56, 56)
    ref = InternViTBackbone(vit, out_indices=[-1])(pixels)[0]
    bf16 = InternViTBackbone(tiny_vit(), out_indices=[-1], bf16=True)
    assert bf16.vit.dtype == torch.bfloat16  # frozen + bf16: weights kept in bf16
    out = bf16(pixels)[0]
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_position_embedding_resized_once_for_the_crop():
    model = SegmentationModel(tiny_config(crop_size=84), vit=tiny_vit(image_size=56))
    assert model.backbone.vit.embeddings.position_embedding.shape == (1, 36 + 1, 32)
    assert model.config.vision_config.image_size == 84


def test_crop_not_divisible_by_patch_is_rejected():
    with pytest.raises(CropSizeError, match="patch size 14"):
        SegmentationModel(tiny_config(crop_size=100), vit=tiny_vit())


def test_config_errors_name_the_problem():
    with pytest.raises(SegmentationConfigError, match="head must be"):
        tiny_config(head="segformer")
    with pytest.raises(SegmentationConfigError, match="class_names"):
        tiny_config(class_names=["a", "b"])


def test_save_and_reload_give_identical_logits(tmp_path):
    model = SegmentationModel(tiny_config(crop_size=84), vit=tiny_vit()).eval()
    model.save_pretrained(tmp_path / "ckpt")
    again = SegmentationModel.from_pretrained(tmp_path / "ckpt")
    assert again.config.head == "upernet" and again.config.vision_config.hidden_size == 32
    pixels = torch.randn(1, 3, 84, 84)
    torch.testing.assert_close(again(pixels).logits, model(pixels).logits)


def test_module_names_follow_mmseg():
    model = SegmentationModel(tiny_config(), vit=tiny_vit())
    keys = set(model.state_dict())
    for key in ("decode_head.psp_modules.0.1.conv.weight", "decode_head.psp_modules.3.1.bn.running_mean",
                "decode_head.bottleneck.conv.weight", "decode_head.lateral_convs.2.bn.weight",
                "decode_head.fpn_convs.0.conv.weight", "decode_head.fpn_bottleneck.conv.weight",
                "decode_head.conv_seg.weight", "auxiliary_head.convs.0.conv.weight",
                "auxiliary_head.conv_seg.bias", "backbone.up1.0.weight"):
        assert key in keys, key
    linear = SegmentationModel(tiny_config(head="linear", out_indices=[-1], with_pyramid=False), vit=tiny_vit())
    head_keys = {k for k in linear.state_dict() if k.startswith("decode_head.")}
    assert head_keys == {"decode_head.norm.weight", "decode_head.norm.bias", "decode_head.norm.running_mean",
                         "decode_head.norm.running_var", "decode_head.norm.num_batches_tracked",
                         "decode_head.conv_seg.weight", "decode_head.conv_seg.bias"}


def test_official_checkpoint_keys_convert(tmp_path):
    """timm-style keys of the released mmseg checkpoints (cls_token, blocks.i.ls1.gamma...) map onto the model."""
    model = SegmentationModel(tiny_config(), vit=tiny_vit())
    ours = model.state_dict()
    official = {}
    for key, value in ours.items():
        key = (key.replace("backbone.vit.embeddings.class_embedding", "backbone.cls_token")
               .replace("backbone.vit.embeddings.position_embedding", "backbone.pos_embed")
               .replace("backbone.vit.embeddings.patch_embedding.", "backbone.patch_embed.proj.")
               .replace("backbone.vit.encoder.layers.", "backbone.blocks."))
        if key.endswith((".ls1", ".ls2")):
            key += ".gamma"
        official[key] = value
    converted = convert_official_state_dict({"state_dict": official})
    assert set(converted) == set(ours)
    model.load_state_dict(converted)
    # a released-style .pth (bf16 weights, mmcv meta) loads into a model built from the same config
    path = tmp_path / "official.pth"
    torch.save({"meta": {"iter": 80000}, "state_dict": {k: v.to(torch.bfloat16) if v.is_floating_point() else v
                                                        for k, v in official.items()}}, path)
    loaded = SegmentationModel.from_official_checkpoint(tiny_config(vision_config=model.config.vision_config), path)
    torch.testing.assert_close(loaded.decode_head.conv_seg.weight,
                               model.decode_head.conv_seg.weight.to(torch.bfloat16).float())
    official.pop("decode_head.conv_seg.bias")
    torch.save({"state_dict": official}, path)
    with pytest.raises(WeightLoadingError, match="decode_head.conv_seg.bias"):
        SegmentationModel.from_official_checkpoint(tiny_config(vision_config=model.config.vision_config), path)


def test_upernet_matches_transformers_upernet_head():
    transformers_upernet = pytest.importorskip("transformers.models.upernet.modeling_upernet")
    from transformers import UperNetConfig

    torch.manual_seed(0)
    in_channels = [8, 8, 8, 8]
    config = UperNetConfig(hidden_size=16, num_labels=5, pool_scales=[1, 2, 3, 6])
    hf = transformers_upernet.UperNetHead(config, in_channels=in_channels).eval()
    for module in hf.modules():
        if isinstance(module, torch.nn.BatchNorm2d):  # non-trivial statistics
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
    ours = UperNetHead(in_channels, 16, 5).eval()
    ours.load_state_dict(convert_hf_upernet_state_dict(hf.state_dict()))
    features = [torch.randn(2, 8, s, s) for s in (32, 16, 8, 4)]
    torch.testing.assert_close(ours(features), hf(features), atol=1e-5, rtol=1e-4)


def test_linear_and_fcn_heads_read_their_level():
    features = [torch.randn(2, 8, 8, 8), torch.randn(2, 8, 4, 4)]
    assert LinearHead(8, 3, in_index=-1)(features).shape == (2, 3, 4, 4)
    assert FCNHead(8, 6, 3, in_index=0)(features).shape == (2, 3, 8, 8)


def test_loss_ignores_255_and_upsamples_logits():
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    labels = torch.full((1, 8, 8), 255)
    labels[0, :2, :2] = 1
    big = torch.nn.functional.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=False)
    expected = torch.nn.functional.cross_entropy(big[0, :, :2, :2].reshape(3, -1).T, torch.ones(4, dtype=torch.long))
    torch.testing.assert_close(segmentation_loss(logits, labels), expected)
    empty = segmentation_loss(logits, torch.full((1, 8, 8), 255))
    empty.backward()
    assert float(empty.detach()) == 0.0 and logits.grad is not None


def test_gradient_checkpointing_gives_the_same_gradients_under_bf16_autocast():
    def loss_and_grad(checkpointing: bool):
        model = SegmentationModel(tiny_config(head="linear", out_indices=[-1], with_pyramid=False,
                                              freeze_backbone=False, bf16=True), vit=tiny_vit())
        model.train()
        if checkpointing:
            model.backbone.vit.gradient_checkpointing_enable()
        torch.manual_seed(1)
        loss = model(torch.randn(2, 3, 56, 56), torch.randint(0, 5, (2, 56, 56))).loss
        loss.backward()
        return loss.detach(), model.backbone.vit.encoder.layers[1].mlp.fc1.weight.grad

    (loss_a, grad_a), (loss_b, grad_b) = loss_and_grad(False), loss_and_grad(True)
    assert grad_a is not None and grad_a.dtype == torch.float32  # fp32 master weights, bf16 compute
    torch.testing.assert_close(loss_a, loss_b)
    torch.testing.assert_close(grad_a, grad_b)


def test_default_normalisation_is_the_core_imagenet_one(tmp_path):
    from internvl_fm.processing import IMAGENET_MEAN, IMAGENET_STD

    config = tiny_config()
    assert config.mean == list(IMAGENET_MEAN) and config.std == list(IMAGENET_STD)
    model = SegmentationModel(config, vit=tiny_vit())
    model.save_pretrained(tmp_path / "m")
    assert SegmentationModel.from_pretrained(tmp_path / "m").config.mean == list(IMAGENET_MEAN)
