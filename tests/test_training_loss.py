"""Symmetric InfoNCE with a learnable clamped logit scale, and multi-positive targets."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from internvl_fm.training.loss import MAX_LOGIT_SCALE, ClipLoss, clamp_logit_scale_, contrastive_loss


def _features(n=6, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1), F.normalize(torch.randn(n, d, generator=g), dim=-1)


def test_matches_clip_reference():
    img, txt = _features()
    scale = torch.tensor(math.log(1 / 0.07))
    logits = scale.exp() * img @ txt.t()
    labels = torch.arange(6)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    torch.testing.assert_close(contrastive_loss(img, txt, scale), expected)


def test_aligned_features_give_lower_loss_and_gradient_reaches_logit_scale():
    img, txt = _features()
    scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
    aligned = contrastive_loss(img, img, scale)
    aligned.backward()
    assert aligned < contrastive_loss(img, txt, scale.detach())
    assert scale.grad is not None and scale.grad < 0  # a sharper softmax helps aligned pairs


def test_scale_is_clamped_at_100():
    img, txt = _features()
    big, limit = torch.tensor(10.0), torch.tensor(MAX_LOGIT_SCALE)
    torch.testing.assert_close(contrastive_loss(img, txt, big), contrastive_loss(img, txt, limit))
    p = torch.nn.Parameter(torch.tensor(7.0))
    clamp_logit_scale_(p)
    assert float(p.detach()) == pytest.approx(math.log(100))


def test_duplicates_are_positives_with_match_ids():
    img, _ = _features()
    txt = img[[1, 0, 2, 3, 4, 5]]  # pairs 0 and 1 share attributes; each image is closest to the other's caption
    scale = torch.tensor(math.log(100.0))
    ids = torch.tensor([0, 0, 1, 2, 3, 4])
    plain = contrastive_loss(img, txt, scale)
    assert plain > 5.0  # InfoNCE: the matching duplicate is a hard negative
    assert contrastive_loss(img, txt, scale, ids) < 0.6 * plain
    torch.testing.assert_close(contrastive_loss(img, txt, scale, torch.arange(6)), plain)


def test_clip_loss_normalises_and_validates_shapes():
    img, txt = _features()
    scale = torch.tensor(2.0)
    torch.testing.assert_close(ClipLoss()(img * 3, txt * 0.5, scale), contrastive_loss(img, txt, scale))
    with pytest.raises(ValueError, match="same shape"):
        contrastive_loss(img, txt[:3], scale)
    with pytest.raises(ValueError, match="match_ids"):
        contrastive_loss(img, txt, scale, torch.arange(3))
