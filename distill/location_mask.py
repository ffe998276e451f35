"""Ground-truth location and scale masks on each memory level (CLoCKDistill Sec. 3.1, grade C;
FGD's focal masks, built by the shared distill/gt_masks.py on every level's grid).

CLoCKDistill's option ``mask_extent`` chooses the box extent (``overlap``, our earlier
reading, grade C; ``inclusive``, FGD's, grade A for FGD / C for CLoCKDistill).
"""
from __future__ import annotations

from torch import Tensor

from .gt_masks import location_scale_masks, pad_boxes

__all__ = ["level_masks", "memory_masks", "pad_boxes"]


def level_masks(boxes: Tensor, valid: Tensor, padding_mask: Tensor, valid_ratio: Tensor,
                extent: str = "overlap") -> tuple[Tensor, Tensor, Tensor]:
    """Location mask M, scale mask S and the 0/1 image mask of one level, float [B,H,W].

    boxes [B,G,4] normalised cxcywh, valid [B,G]; padding_mask [B,H,W] (True = padding);
    valid_ratio [B,2] as (w, h)."""
    image = ~padding_mask
    location, scale = location_scale_masks(boxes, valid, image, valid_ratio, extent)
    return location, scale, image.float()


def memory_masks(targets: list[dict], padding_mask: Tensor, spatial_shapes, level_start_index, valid_ratios,
                 extent: str = "overlap"):
    """Masks of every level of a flattened memory: lists of [B,H_l,W_l] tensors (M, S, image)."""
    boxes, valid = pad_boxes(targets, padding_mask.device)
    out = []
    for lvl, ((h, w), start) in enumerate(zip(spatial_shapes, level_start_index)):
        level_padding = padding_mask[:, start:start + h * w].view(-1, h, w)
        out.append(level_masks(boxes, valid, level_padding, valid_ratios[:, lvl], extent))
    return out
