"""Extra query groups: the decoder's self-attention mask, and contrastive denoising (DINO).

Every extra-query user (denoising, CLoCKDistill's target-aware queries, KD-DETR points) goes
through ``QueryGroup`` and ``decoder_self_attn_mask``; there is no second mechanism.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from .outputs import QueryGroup


def decoder_self_attn_mask(
    num_detection: int, groups: list[QueryGroup], batch_size: int, device: torch.device
) -> Tensor | None:
    """Boolean mask [B,T,T] (True = blocked) over [detection queries, group 1, group 2, ...].

    Detection queries see only detection queries; a group sees itself (minus its own
    ``self_attn_mask`` structure and padding slots) and, if allowed, the detection queries.
    The diagonal is always open so no row is fully blocked (softmax would give NaN).
    """
    if not groups:
        return None
    sizes = [num_detection] + [g.num_queries for g in groups]
    total = sum(sizes)
    mask = torch.ones(batch_size, total, total, dtype=torch.bool, device=device)
    mask[:, :num_detection, :num_detection] = False
    start = num_detection
    for group in groups:
        n = group.num_queries
        block = slice(start, start + n)
        inner = torch.zeros(batch_size, n, n, dtype=torch.bool, device=device)
        if group.self_attn_mask is not None:
            inner |= group.self_attn_mask.to(device)[None]
        if group.valid is not None:
            inner |= ~group.valid[:, None, :]          # nobody attends to padding slots
        mask[:, block, block] = inner
        if group.see_detection_queries:
            mask[:, block, :num_detection] = False
        start += n
    idx = torch.arange(total, device=device)
    mask[:, idx, idx] = False
    return mask


def denoising_group_count(num_dn_queries: int, max_gt: int, rule: str = "dino") -> int:
    """How many CDN groups (each 2 * max_gt queries) a batch gets.

    ``dino``: DINO's ``prepare_for_cdn``: dn = 2 * num_dn_queries; for dn >= 100 the groups are
    dn // (2 * max_gt), else dn itself (a fixed count, whatever the GT count), and at least 1.
    ``dynamic`` (grade D, for the CPU sizes whose small num_dn_queries would otherwise take the
    fixed branch, e.g. 30 -> 60 groups of 2 * max_gt queries each): the first branch at any size,
    num_dn_queries // max_gt, at least 1.
    """
    if rule not in ("dino", "dynamic"):
        raise ValueError(f"denoising group rule must be dino or dynamic, got {rule!r}")
    doubled = 2 * num_dn_queries
    if rule == "dynamic" or doubled >= 100:
        return max(1, doubled // (2 * max_gt))
    return max(1, doubled)


def contrastive_denoising_group(
    targets: list[dict],
    label_embedding: nn.Embedding,
    num_classes: int,
    num_dn_queries: int = 100,
    label_noise_ratio: float = 0.5,
    box_noise_scale: float = 0.4,
    generator: torch.Generator | None = None,
    group_rule: str = "dino",
) -> QueryGroup | None:
    """DINO's contrastive denoising queries (Zhang et al., 2023, Sec. 3.3; IDEA-Research/DINO
    models/dino/dn_components.py ``prepare_for_cdn``).

    GT sets are padded to the batch's largest set and repeated in G groups, each holding a
    positive half (box noise < half the box size: reconstruct the GT) and a negative half
    (noise in [1, 2) x half size: predict "no object"). ``num_dn_queries`` is DINO's
    ``dn_number``, doubled for the two halves: see ``denoising_group_count`` for G.
    ``box_noise_scale`` 0.4 is DINO_4scale's (detrex and mmdet's DINO use 1.0).
    Returns None when the batch has no objects at all.
    """
    device = label_embedding.weight.device
    counts = [int(t["labels"].numel()) for t in targets]
    max_gt = max(counts, default=0)
    if max_gt == 0:
        return None
    batch = len(targets)
    groups = denoising_group_count(num_dn_queries, max_gt, group_rule)
    per_group = 2 * max_gt
    total = groups * per_group

    labels = torch.full((batch, max_gt), num_classes, dtype=torch.long, device=device)
    boxes = torch.zeros(batch, max_gt, 4, device=device)
    valid_gt = torch.zeros(batch, max_gt, dtype=torch.bool, device=device)
    for b, t in enumerate(targets):
        n = counts[b]
        labels[b, :n] = t["labels"].to(device)
        boxes[b, :n] = t["boxes"].to(device)
        valid_gt[b, :n] = True

    # [B, G, 2, max_gt]: group, positive/negative half, GT slot
    labels = labels[:, None, None].expand(batch, groups, 2, max_gt).clone()
    boxes = boxes[:, None, None].expand(batch, groups, 2, max_gt, 4).clone()
    valid = valid_gt[:, None, None].expand(batch, groups, 2, max_gt).clone()

    def rand(*shape: int) -> Tensor:
        # a generator, if given, must live on the embedding's device
        return torch.rand(*shape, generator=generator, device=device)

    if label_noise_ratio > 0:
        # DINO flips labels with probability ratio * 0.5 (IDEA-Research/DINO models/dino/dn_components.py);
        # a flipped label may draw its own class again, so with few classes (KITTI: 3) the
        # effective noise is lower still, as mmdet's CdnQueryGenerator docstring warns
        flip = rand(*labels.shape) < label_noise_ratio * 0.5
        random_labels = (rand(*labels.shape) * num_classes).long().clamp(max=num_classes - 1)
        labels = torch.where(flip & valid, random_labels, labels)
    if box_noise_scale > 0:
        xyxy = box_cxcywh_to_xyxy(boxes)
        half_wh = boxes[..., 2:].repeat(1, 1, 1, 1, 2) / 2
        sign = rand(*xyxy.shape) * 2 - 1
        sign = torch.where(sign >= 0, torch.ones_like(sign), -torch.ones_like(sign))
        magnitude = rand(*xyxy.shape)
        magnitude[:, :, 1] += 1.0                       # negatives: noise in [1, 2)
        xyxy = xyxy + sign * magnitude * half_wh * box_noise_scale
        # DINO feeds inverse_sigmoid(box) with eps 1e-3 (util/misc.py) to a decoder that takes
        # its sigmoid: every coordinate lands in [1e-3, 1 - 1e-3]
        boxes = box_xyxy_to_cxcywh(xyxy.clamp(0.0, 1.0)).clamp(1e-3, 1 - 1e-3)

    labels = labels.reshape(batch, total)
    boxes = boxes.reshape(batch, total, 4)
    valid = valid.reshape(batch, total)
    content = label_embedding(labels)

    # groups cannot see each other; inside a group everything is visible
    group_id = torch.arange(total, device=device) // per_group
    self_mask = group_id[:, None] != group_id[None, :]
    meta = {"num_groups": groups, "max_gt": max_gt, "counts": counts}
    return QueryGroup(
        name="dn", content=content, boxes=boxes, valid=valid, self_attn_mask=self_mask,
        see_detection_queries=True, meta=meta,
    )


def denoising_targets(group_meta: dict, targets: list[dict]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Indices of the denoising slots and their GT: (batch_idx, slot_idx, gt_idx, is_positive).

    Positive slots reconstruct their GT box and class; negative slots must predict no object.
    Arithmetic, no matching (DINO).
    """
    groups, max_gt, counts = group_meta["num_groups"], group_meta["max_gt"], group_meta["counts"]
    batch_idx, slot_idx, gt_idx, positive = [], [], [], []
    for b, n in enumerate(counts):
        if n == 0:
            continue
        j = torch.arange(n)
        for g in range(groups):
            base = g * 2 * max_gt
            for half in (0, 1):
                batch_idx.append(torch.full((n,), b))
                slot_idx.append(base + half * max_gt + j)
                gt_idx.append(j)
                positive.append(torch.full((n,), half == 0))
    if not batch_idx:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty, empty, torch.zeros(0, dtype=torch.bool)
    return torch.cat(batch_idx), torch.cat(slot_idx), torch.cat(gt_idx), torch.cat(positive)
