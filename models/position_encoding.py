"""Sine position encodings: of feature-map cells (DETR) and of anchor boxes (DAB-DETR)."""
from __future__ import annotations

import math

import torch
from torch import Tensor


def sine_position_embedding(
    pad_mask: Tensor, num_feats: int, temperature: float = 10000.0, scale: float = 2 * math.pi,
    offset: float = -0.5,
) -> Tensor:
    """2-D sine embedding of every cell, normalised to the *unpadded* extent (DETR, Sec. A.4).

    pad_mask: [B,H,W] bool, True on padding. Returns [B, 2*num_feats, H, W] (y features, then x).
    ``offset`` is added to the 1-based cell count before normalising: -0.5 centres each cell, as
    Deformable DETR does (fundamentalvision/Deformable-DETR models/position_encoding.py); DETR,
    DAB-DETR and DINO (``PositionEmbeddingSineHW``) use 0.
    """
    not_mask = (~pad_mask).to(torch.float32)
    y_embed = not_mask.cumsum(1)
    x_embed = not_mask.cumsum(2)
    eps = 1e-6
    y_embed = (y_embed + offset) / (y_embed[:, -1:, :] + eps) * scale
    x_embed = (x_embed + offset) / (x_embed[:, :, -1:] + eps) * scale
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=pad_mask.device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_feats)
    pos_x = x_embed[..., None] / dim_t
    pos_y = y_embed[..., None] / dim_t
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def sine_box_embedding(boxes: Tensor, num_feats: int, temperature: float = 10000.0,
                       y_first: bool = True) -> Tensor:
    """Sine embedding of each coordinate of normalised boxes or points (DAB-DETR's anchors).

    boxes: [..., 2] (cx, cy) or [..., 4] (cx, cy, w, h) in [0, 1].
    Returns [..., num_feats * boxes.shape[-1]], coordinates in the order y, x, w, h as in
    DAB-DETR and DINO, so that the first 2*num_feats features are the (y, x) position part;
    ``y_first=False`` keeps the boxes' own order x, y, w, h, as Deformable DETR's two-stage
    ``get_proposal_pos_embed`` (fundamentalvision/Deformable-DETR models/deformable_transformer.py).
    """
    scale = 2 * math.pi
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=boxes.device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_feats)
    coords = boxes.float().unbind(-1)
    order = ([1, 0] if y_first else [0, 1]) + list(range(2, len(coords)))
    parts = []
    for i in order:
        pos = coords[i][..., None] * scale / dim_t
        parts.append(torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2))
    return torch.cat(parts, dim=-1)
