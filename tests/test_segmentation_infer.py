"""Whole / sliding-window inference, image segmentation and the `internvl-fm segment` command."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from internvl_fm.cli import main
from internvl_fm.models.configuration_intern_vit import InternVisionConfig
from internvl_fm.models.modeling_intern_vit import InternVisionModel
from internvl_fm.segmentation import (CropSizeError, SegmentationConfig, SegmentationModel, default_stride,
                                      segment_image, slide_inference, whole_inference)
from internvl_fm.segmentation.cli import segment_main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> SegmentationModel:
    torch.manual_seed(0)
    vision = InternVisionConfig(hidden_size=32, num_attention_heads=2, intermediate_size=64, num_hidden_layers=4,
                                image_size=56, patch_size=14, qkv_bias=True, qk_normalization=False,
                                norm_type="layer_norm")
    config = SegmentationConfig(num_classes=4, head="upernet", out_indices=[0, 1, 2, 3], crop_size=56, channels=16,
                                aux_channels=8, class_names=["bg", "a", "b", "c"])
    model = SegmentationModel(config, vit=InternVisionModel(vision).init_weights())
    with torch.no_grad():  # non-trivial batch-norm statistics so the logits vary
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_var.uniform_(0.01, 0.1)
    return model.eval()


@pytest.mark.parametrize("crop", [56, 70])
def test_slide_equals_whole_when_the_crop_covers_the_image(model, crop):
    pixels = torch.randn(2, 3, 56, 56)
    torch.testing.assert_close(slide_inference(model, pixels, crop_size=crop, stride=14),
                               whole_inference(model, pixels))


def test_slide_windows_cover_every_pixel_and_average_overlaps(model):
    pixels = torch.randn(1, 3, 84, 112)
    logits = slide_inference(model, pixels, crop_size=56, stride=42)
    assert logits.shape == (1, 4, 84, 112) and torch.isfinite(logits).all()
    # rows < 28 and cols < 42 lie in the top-left window only: same logits as that crop alone
    first = whole_inference(model, pixels[:, :, :56, :56])
    torch.testing.assert_close(logits[:, :, :28, :28], first[:, :, :28, :28])
    assert not torch.allclose(logits[:, :, 42:56, 42:56], first[:, :, 42:56, 42:56])


def test_crop_not_divisible_by_patch_size_is_a_clear_error(model):
    with pytest.raises(CropSizeError, match="crop size 50 is not a positive multiple of the patch size 14"):
        slide_inference(model, torch.randn(1, 3, 56, 56), crop_size=50, stride=28)
    with pytest.raises(CropSizeError, match="stride 70"):
        slide_inference(model, torch.randn(1, 3, 56, 56), crop_size=56, stride=70)


def test_whole_inference_pads_sizes_that_are_not_patch_multiples(model):
    assert whole_inference(model, torch.randn(1, 3, 50, 61)).shape == (1, 4, 50, 61)


def test_segment_image_returns_a_mask_of_the_original_size(model):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (45, 77, 3), dtype=np.uint8))
    for mode in ("whole", "slide"):
        mask = segment_image(model, image, mode=mode, stride=28)
        assert mask.shape == (45, 77) and mask.dtype == torch.int64
        assert 0 <= int(mask.min()) and int(mask.max()) < 4


def test_segment_command_writes_mask_and_overlay(model, tmp_path, capsys):
    model.save_pretrained(tmp_path / "ckpt")
    image_path = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (60, 90, 3), dtype=np.uint8)).save(image_path)
    code = segment_main([str(image_path), "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out"),
                         "--device", "cpu", "--stride", "28"])
    assert code == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    mask = Image.open(tmp_path / "out" / "photo_mask.png")
    overlay = Image.open(tmp_path / "out" / "photo_overlay.png")
    assert mask.size == overlay.size == (90, 60) and mask.mode == "P" and overlay.mode == "RGB"
    values = np.asarray(mask)
    assert values.max() < 4 and set(record["classes"]) == {["bg", "a", "b", "c"][v] for v in np.unique(values)}


def test_segment_command_reports_unreadable_images_in_one_line(model, tmp_path, capsys):
    model.save_pretrained(tmp_path / "ckpt")
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    code = main(["segment", str(bad), "--model", str(tmp_path / "ckpt"), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("internvl-fm segment: error: cannot load image ")
    assert "broken.png" in err[0]
    code = main(["segment", str(tmp_path / "missing.png"), "--model", str(tmp_path / "ckpt"),
                 "--output", str(tmp_path / "out")])
    assert code == 2 and "image file(s) not found: " in capsys.readouterr().err


def test_default_stride_is_two_thirds_of_the_crop(model):
    assert [default_stride(c) for c in (512, 504, 112, 56)] == [341, 336, 75, 37]
    pixels = torch.randn(1, 3, 70, 98)
    torch.testing.assert_close(slide_inference(model, pixels, crop_size=56),
                               slide_inference(model, pixels, crop_size=56, stride=37))
    assert not torch.allclose(slide_inference(model, pixels, crop_size=56),
                              slide_inference(model, pixels, crop_size=56, stride=56))
