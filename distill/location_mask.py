"""Ground-truth location and scale masks on each memory level (CLoCKDistill Sec. 3.1, grade C;
the masks follow FGD's focal distillation, built here vectorised on every level's grid).

A cell is foreground if its extent overlaps a GT box, so a box smaller than a cell still
marks the cell it falls in. Coordinates: boxes are normalised to the *unpadded* image, a
level's grid covers the padded batch, so the image spans ``valid_ratio * W`` cells.
"""
from __future__ import annotations

import torch
from torch import Tensor


def pad_boxes(targets: list[dict], device: torch.device) -> tuple[Tensor, Tensor]:
    """GT boxes of all images padded to [B,G,4] (normalised cxcywh) with a validity mask [B,G]."""
    max_gt = max((t["boxes"].shape[0] for t in targets), default=0)
    boxes = torch.zeros(len(targets), max(max_gt, 1), 4, device=device)
    valid = torch.zeros(len(targets), max(max_gt, 1), dtype=torch.bool, device=device)
    for b, t in enumerate(targets):
        n = t["boxes"].shape[0]
        boxes[b, :n] = t["boxes"].to(device, torch.float32)
        valid[b, :n] = True
    return boxes, valid


def level_masks(boxes: Tensor, valid: Tensor, padding_mask: Tensor, valid_ratio: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Location mask M, scale mask S and the image mask of one level.

    boxes [B,G,4] normalised cxcywh, valid [B,G]; padding_mask [B,H,W] (True = padding);
    valid_ratio [B,2] as (w, h). Returns float tensors [B,H,W]:
    M = 1 on cells overlapping any GT box; S = 1/(h_k*w_k) for the smallest box k covering the
    cell (its size in cells), else 1/N_bg (N_bg = background cells of that image); and the
    0/1 image mask (padding counts for nothing).
    """
    batch, height, width = padding_mask.shape
    image = (~padding_mask).float()
    cells_w = valid_ratio[:, 0:1] * width             # [B,1] cells the image spans
    cells_h = valid_ratio[:, 1:2] * height
    cx, cy, w, h = boxes.unbind(-1)
    col_lo = torch.floor((cx - w / 2).clamp(0, 1) * cells_w)
    col_hi = torch.ceil((cx + w / 2).clamp(0, 1) * cells_w).clamp(min=col_lo + 1)
    row_lo = torch.floor((cy - h / 2).clamp(0, 1) * cells_h)
    row_hi = torch.ceil((cy + h / 2).clamp(0, 1) * cells_h).clamp(min=row_lo + 1)
    cols = torch.arange(width, device=boxes.device, dtype=boxes.dtype)
    rows = torch.arange(height, device=boxes.device, dtype=boxes.dtype)
    in_cols = (cols >= col_lo[..., None]) & (cols < col_hi[..., None])          # [B,G,W]
    in_rows = (rows >= row_lo[..., None]) & (rows < row_hi[..., None])          # [B,G,H]
    cover = in_rows[..., :, None] & in_cols[..., None, :] & valid[..., None, None]  # [B,G,H,W]
    inverse_area = 1.0 / ((row_hi - row_lo) * (col_hi - col_lo))                # [B,G]
    fg_scale = (cover.float() * inverse_area[..., None, None]).amax(1) if cover.shape[1] else image * 0
    location = cover.any(1).float() * image
    background = (1 - location) * image
    n_bg = background.flatten(1).sum(1).clamp(min=1)[:, None, None]
    scale = location * fg_scale + background / n_bg
    return location, scale, image


def memory_masks(targets: list[dict], padding_mask: Tensor, spatial_shapes, level_start_index, valid_ratios):
    """Masks of every level of a flattened memory: lists of [B,H_l,W_l] tensors (M, S, image)."""
    boxes, valid = pad_boxes(targets, padding_mask.device)
    out = []
    for lvl, ((h, w), start) in enumerate(zip(spatial_shapes, level_start_index)):
        level_padding = padding_mask[:, start:start + h * w].view(-1, h, w)
        out.append(level_masks(boxes, valid, level_padding, valid_ratios[:, lvl]))
    return out
