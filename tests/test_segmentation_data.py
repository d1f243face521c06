"""Datasets, augmentations and the resumable sampler; bad inputs give errors that name the file."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from internvl_fm.segmentation import (EvalTransform, LabelOutOfRangeError, MaskSizeMismatchError, ResumableSampler,
                                      SegmentationDataError, SegmentationDataset, TrainTransform,
                                      make_shapes_dataset)
from internvl_fm.segmentation.data import eval_size


def write_pair(root, name, image_hw, mask_array, mask_mode="L"):
    (root / "img").mkdir(exist_ok=True)
    (root / "ann").mkdir(exist_ok=True)
    Image.fromarray(np.full((*image_hw, 3), 100, np.uint8)).save(root / "img" / f"{name}.jpg")
    Image.fromarray(mask_array, mode=mask_mode).save(root / "ann" / f"{name}.png")


def test_mask_image_size_mismatch_names_both_files(tmp_path):
    write_pair(tmp_path, "a", (20, 30), np.zeros((20, 31), np.uint8))
    ds = SegmentationDataset(tmp_path / "img", tmp_path / "ann", num_classes=3)
    with pytest.raises(MaskSizeMismatchError, match=r"a\.png is 31x20 but image .*a\.jpg is 30x20"):
        ds[0]


def test_labels_outside_num_classes_are_rejected_but_255_is_ignored(tmp_path):
    mask = np.zeros((8, 8), np.uint8)
    mask[0, 0], mask[1, 1] = 255, 2
    write_pair(tmp_path, "ok", (8, 8), mask)
    ds = SegmentationDataset(tmp_path / "img", tmp_path / "ann", num_classes=3)
    assert ds[0]["labels"][0, 0] == 255
    mask[2, 2] = 7
    write_pair(tmp_path, "ok", (8, 8), mask)
    with pytest.raises(LabelOutOfRangeError, match=r"labels \[7\] outside \[0, 3\)"):
        ds[0]


def test_reduce_zero_label_follows_ade20k(tmp_path):
    mask = np.array([[0, 1], [150, 255]], np.uint8)
    root = tmp_path / "ade"
    (root / "images" / "validation").mkdir(parents=True)
    (root / "annotations" / "validation").mkdir(parents=True)
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(root / "images" / "validation" / "x.jpg")
    Image.fromarray(mask).save(root / "annotations" / "validation" / "x.png")
    ds = SegmentationDataset.ade20k(root, "validation")
    assert ds.num_classes == 150
    assert ds[0]["labels"].tolist() == [[255, 0], [149, 255]]


def test_rgb_masks_and_missing_masks_are_errors(tmp_path):
    write_pair(tmp_path, "rgb", (4, 4), np.zeros((4, 4, 3), np.uint8), mask_mode="RGB")
    ds = SegmentationDataset(tmp_path / "img", tmp_path / "ann", num_classes=3)
    with pytest.raises(SegmentationDataError, match="single-channel"):
        ds[0]
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "img" / "lonely.png")
    with pytest.raises(SegmentationDataError, match="have no mask.*lonely"):
        SegmentationDataset(tmp_path / "img", tmp_path / "ann", num_classes=3)
    with pytest.raises(SegmentationDataError, match="folder not found"):
        SegmentationDataset(tmp_path / "nope", tmp_path / "ann", num_classes=3)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), num_images=4, size=64, seed=1)


def test_train_transform_gives_crop_sized_padded_deterministic_samples(shapes):
    tf = TrainTransform(crop_size=56, ratio_range=(0.5, 2.0))
    ds = SegmentationDataset(shapes / "images/training", shapes / "annotations/training", num_classes=4,
                             transform=tf, seed=3)
    seen_pad = False
    for position in range(12):
        a, b = ds[(position % 4, position)], ds[(position % 4, position)]
        assert a["pixel_values"].shape == (3, 56, 56) and a["labels"].shape == (56, 56)
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["labels"], b["labels"])
        assert set(a["labels"].unique().tolist()) <= {0, 1, 2, 3, 255}
        seen_pad |= bool((a["labels"] == 255).any())  # 64 px images scaled down below the crop get padded
    assert seen_pad
    assert not torch.equal(ds[(0, 0)]["pixel_values"], ds[(0, 4)]["pixel_values"])  # new position, new draw


def test_cat_max_ratio_avoids_single_class_crops():
    image = torch.zeros(3, 200, 200, dtype=torch.uint8)
    mask = torch.zeros(200, 200, dtype=torch.long)
    mask[:, 150:] = 1  # class 1 only in the right quarter
    tf = TrainTransform(crop_size=100, ratio_range=(1.0, 1.0), scale=(200, 200), cat_max_ratio=0.75,
                        photometric=False)
    mixed = 0
    for seed in range(20):
        _, labels = tf(image, mask, torch.Generator().manual_seed(seed))
        counts = torch.bincount(labels.flatten(), minlength=2)
        mixed += int(counts.min() > 0 and counts.max() / counts.sum() < 0.75)
    assert mixed >= 18  # without the retry rule ~half the crops would hold one class only


def test_eval_transform_resizes_to_a_patch_multiple_and_keeps_the_mask():
    image = torch.randint(0, 255, (3, 50, 80), dtype=torch.uint8)
    mask = torch.zeros(50, 80, dtype=torch.long)
    pixels, labels = EvalTransform(crop_size=56, patch_size=14)(image, mask)
    assert pixels.shape == (3, 56, 98) and labels is mask
    assert eval_size(500, 300, 504, 14) == (840, 504)


def test_sampler_resumes_mid_stream_and_splits_ranks():
    full = list(itertools.islice(iter(ResumableSampler(10, batch_size=3, seed=5)), 30))
    resumed = list(itertools.islice(iter(ResumableSampler(10, batch_size=3, seed=5, start_step=4)), 18))
    assert resumed == full[12:30]
    assert sorted(i for i, _ in full[:30]) == sorted(list(range(10)) * 3)  # whole epochs, each sample once
    r0 = list(itertools.islice(iter(ResumableSampler(10, 2, seed=5, rank=0, world_size=2)), 6))
    r1 = list(itertools.islice(iter(ResumableSampler(10, 2, seed=5, rank=1, world_size=2)), 6))
    single = list(itertools.islice(iter(ResumableSampler(10, 4, seed=5)), 12))
    assert r0[:2] + r1[:2] == single[:4] and {p for _, p in r0}.isdisjoint({p for _, p in r1})


def test_normalisation_uses_the_core_imagenet_statistics():
    from internvl_fm.processing import IMAGENET_MEAN, IMAGENET_STD
    from internvl_fm.segmentation.data import normalize

    mean_image = torch.tensor(IMAGENET_MEAN).view(3, 1, 1).expand(3, 4, 4) * 255.0
    torch.testing.assert_close(normalize(mean_image), torch.zeros(3, 4, 4), atol=1e-5, rtol=0)
    one_std = mean_image + torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255.0
    torch.testing.assert_close(normalize(one_std), torch.ones(3, 4, 4))
    assert TrainTransform().mean == IMAGENET_MEAN and EvalTransform().std == IMAGENET_STD
