"""FGD-style ground-truth masks on a level's grid (shared by FGD and CLoCKDistill's L_lcmd).

Location mask M: 1 on cells a GT box covers. Scale mask S: on covered cells 1/(h_k w_k) for
the smallest box k covering the cell (its extent in cells, FGD's max over boxes of 1/area);
on background cells 1/N_bg (N_bg = background cells of that image). Padding counts for nothing.

Box extent on the grid (``extent``):
- ``inclusive``: FGD's (yzd-v/FGD mmdet/distillation/losses/fgd.py ``get_fg_mask``): columns
  floor(x1 W) .. ceil(x2 W) *inclusive*, area (ceil - floor + 1) per axis; a box inside one cell
  covers 2 x 2 = 4 cells (grade A).
- ``overlap``: the cells the box overlaps, [floor(x1 W), ceil(x2 W)), at least one (grade C):
  a box inside one cell covers 1 cell.
Coordinates: boxes are normalised to the *unpadded* image and a level's grid covers the padded
batch, so the image spans ``valid_ratio * W`` cells (FGD divides by the image size and maps onto
the padded grid; ours keeps the box on its image: departure grade D, no effect without padding).
"""
from __future__ import annotations

import torch
from torch import Tensor

EXTENTS = ("inclusive", "overlap")


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


def box_cells(lo: Tensor, hi: Tensor, cells: Tensor, extent: str) -> tuple[Tensor, Tensor]:
    """First cell and one-past-last cell along one axis for normalised [lo, hi] and ``cells`` cells."""
    first = torch.floor(lo.clamp(0, 1) * cells)
    if extent == "inclusive":
        last = torch.ceil(hi.clamp(0, 1) * cells) + 1
    elif extent == "overlap":
        last = torch.ceil(hi.clamp(0, 1) * cells).clamp(min=first + 1)
    else:
        raise ValueError(f"extent must be one of {list(EXTENTS)}, got {extent!r}")
    return first, last


def location_scale_masks(boxes: Tensor, valid: Tensor, image: Tensor, valid_ratio: Tensor,
                         extent: str = "inclusive") -> tuple[Tensor, Tensor]:
    """(M, S) of one level as float [B,H,W]; ``image`` [B,H,W] bool (True = image cell)."""
    batch, height, width = image.shape
    image_f = image.float()
    cells_w = valid_ratio[:, 0:1].float() * width              # [B,1] cells the image spans
    cells_h = valid_ratio[:, 1:2].float() * height
    cx, cy, w, h = boxes.float().unbind(-1)
    col_lo, col_hi = box_cells(cx - w / 2, cx + w / 2, cells_w, extent)
    row_lo, row_hi = box_cells(cy - h / 2, cy + h / 2, cells_h, extent)
    cols = torch.arange(width, device=boxes.device, dtype=torch.float32)
    rows = torch.arange(height, device=boxes.device, dtype=torch.float32)
    in_cols = (cols >= col_lo[..., None]) & (cols < col_hi[..., None])          # [B,G,W]
    in_rows = (rows >= row_lo[..., None]) & (rows < row_hi[..., None])          # [B,G,H]
    cover = in_rows[..., :, None] & in_cols[..., None, :] & valid[..., None, None]  # [B,G,H,W]
    inverse_area = 1.0 / ((row_hi - row_lo) * (col_hi - col_lo)).clamp(min=1.0)   # [B,G]
    fg_scale = (cover.float() * inverse_area[..., None, None]).amax(1) * image_f
    location = cover.any(1).float() * image_f
    background = (1 - location) * image_f
    n_bg = background.flatten(1).sum(1).clamp(min=1)[:, None, None]
    return location, location * fg_scale + background / n_bg


def fg_bg_masks(targets: list[dict], image: Tensor, valid_ratio: Tensor,
                extent: str = "inclusive") -> tuple[Tensor, Tensor]:
    """FGD's two masks: foreground scale mask (M*S) and normalised background mask ((1-M)*S)."""
    boxes, valid = pad_boxes(targets, image.device)
    location, scale = location_scale_masks(boxes, valid, image, valid_ratio, extent)
    return location * scale, (1 - location) * image.float() * scale
