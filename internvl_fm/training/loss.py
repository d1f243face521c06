"""Symmetric InfoNCE (CLIP / InternVL-C image-text contrastive loss) with a learnable, clamped temperature."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps exp(logit_scale) to at most 100


def clamp_logit_scale_(logit_scale: torch.Tensor, max_value: float = MAX_LOGIT_SCALE) -> None:
    """Clamp the (log-space) logit scale parameter in place to [0, log(100)], as CLIP does after each step."""
    with torch.no_grad():
        logit_scale.clamp_(0.0, max_value)


def gather_features(features: torch.Tensor) -> torch.Tensor:
    """Concatenate `features` from every DDP rank (identity in a single process).

    Gradients flow through this rank's own shard, the other shards are constants (open_clip's default); summed over
    ranks by DDP that is the gradient of the full-batch loss, divided by the world size.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features
    gathered = [torch.empty_like(features) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, features.detach().contiguous())
    gathered[dist.get_rank()] = features
    return torch.cat(gathered, dim=0)


def gather_ids(ids: torch.Tensor) -> torch.Tensor:
    """Concatenate an integer tensor from every DDP rank (no gradient)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return ids
    out = [torch.empty_like(ids) for _ in range(dist.get_world_size())]
    dist.all_gather(out, ids)
    return torch.cat(out, dim=0)


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                     match_ids: torch.Tensor | None = None, label_smoothing: float = 0.0) -> torch.Tensor:
    """Symmetric InfoNCE between L2-normalised `image_features` [N, D] and `text_features` [N, D].

    `logits = exp(logit_scale).clamp(max=100) * img @ txt.T`; the loss is the mean of the image->text and
    text->image cross-entropies.  Without `match_ids` pair i is the only positive of row i (CLIP).  With
    `match_ids` [N] (e.g. an id of the attribute tuple of each pair), every pair sharing an id is a positive and the
    target distribution is uniform over them, so duplicates inside a batch are not pushed apart.
    """
    if image_features.shape != text_features.shape or image_features.dim() != 2:
        raise ValueError(f"contrastive_loss expects two [N, D] tensors of the same shape, got "
                         f"{tuple(image_features.shape)} and {tuple(text_features.shape)}")
    scale = logit_scale.exp().clamp(max=math.exp(MAX_LOGIT_SCALE))
    logits = scale * image_features.float() @ text_features.float().t()
    n = logits.shape[0]
    if match_ids is None:
        labels = torch.arange(n, device=logits.device)
        return 0.5 * (F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
                      + F.cross_entropy(logits.t(), labels, label_smoothing=label_smoothing))
    if match_ids.shape != (n,):
        raise ValueError(f"match_ids must have shape [{n}], got {tuple(match_ids.shape)}")
    positives = (match_ids[:, None] == match_ids[None, :]).float()
    targets = positives / positives.sum(dim=1, keepdim=True)
    if label_smoothing:
        targets = targets * (1.0 - label_smoothing) + label_smoothing / n
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets))


class ClipLoss(nn.Module):
    """`contrastive_loss` over the features of all DDP ranks (each rank gathers the others' features)."""

    def __init__(self, label_smoothing: float = 0.0, gather: bool = True):
        super().__init__()
        self.label_smoothing = label_smoothing
        self.gather = gather

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                match_ids: torch.Tensor | None = None) -> torch.Tensor:
        image_features = F.normalize(image_features, dim=-1)
        text_features = F.normalize(text_features, dim=-1)
        if self.gather:
            image_features = gather_features(image_features)
            text_features = gather_features(text_features)
            match_ids = gather_ids(match_ids) if match_ids is not None else None
        return contrastive_loss(image_features, text_features, logit_scale, match_ids, self.label_smoothing)
