"""Multi-scale deformable attention (Zhu et al., Deformable DETR, 2021, Sec. 4.1) in pure PyTorch.

No custom CUDA op: ``F.grid_sample`` per level, as in RT-DETR and HF transformers. Spatial
shapes travel as a Python list so the level loop never syncs with the device. Under autocast
the sampling runs in float32 (low-precision sampling was the top AMP complaint upstream).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def multi_scale_deformable_attention(
    value: Tensor,
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Bilinear sampling of every level at every point, weighted and summed.

    value: [B,S,M,Dh] per-head values of all levels (S = sum H_l*W_l).
    sampling_locations: [B,Q,M,L,P,2] normalised (x, y) in [0, 1] of each level's image area.
    attention_weights: [B,Q,M,L,P], softmax-normalised over L*P.
    Returns [B,Q,M*Dh].
    """
    batch, _, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    values = value.split([h * w for h, w in spatial_shapes], dim=1)
    grids = 2 * sampling_locations - 1          # grid_sample wants [-1, 1]
    output = None
    for level, (h, w) in enumerate(spatial_shapes):
        # [B,HW,M,Dh] -> [B*M,Dh,H,W]
        level_value = values[level].permute(0, 2, 3, 1).reshape(batch * heads, head_dim, h, w)
        # [B,Q,M,P,2] -> [B*M,Q,P,2]
        grid = grids[:, :, :, level].transpose(1, 2).reshape(batch * heads, queries, points, 2)
        sampled = F.grid_sample(level_value, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        # weight and reduce over points per level: never materialise all levels at once
        weight = attention_weights[:, :, :, level].transpose(1, 2).reshape(batch * heads, 1, queries, points)
        contribution = (sampled * weight).sum(-1)   # [B*M,Dh,Q]
        output = contribution if output is None else output + contribution
    return output.view(batch, heads * head_dim, queries).transpose(1, 2)


class MultiScaleDeformableAttention(nn.Module):
    """Each query attends to ``n_points`` sampled points per head and level around its reference.

    Reference points are [B,Q,L,2] points or [B,Q,L,4] boxes (cx, cy, w, h); with boxes the
    offsets are scaled by the box size (Deformable DETR's two-stage / box-refine branch).
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} must be divisible by n_heads {n_heads}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Offsets start on a ring of directions, one per head, growing with the point index
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2 * math.pi / self.n_heads)
        grid = torch.stack([angles.cos(), angles.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        value: Tensor,
        spatial_shapes: list[tuple[int, int]],
        value_padding_mask: Tensor | None = None,
        return_attention: bool = False,
    ) -> tuple[Tensor, dict | None]:
        batch, queries, _ = query.shape
        heads, levels, points = self.n_heads, self.n_levels, self.n_points
        if len(spatial_shapes) != levels:
            raise ValueError(f"expected {levels} levels, got spatial_shapes {spatial_shapes}")
        value = self.value_proj(value)
        if value_padding_mask is not None:
            value = value.masked_fill(value_padding_mask[..., None], 0.0)
        value = value.view(batch, value.shape[1], heads, self.d_model // heads)
        offsets = self.sampling_offsets(query).view(batch, queries, heads, levels, points, 2)
        weights = self.attention_weights(query).view(batch, queries, heads, levels * points)
        weights = weights.softmax(-1).view(batch, queries, heads, levels, points)

        with torch.autocast(device_type=query.device.type, enabled=False):
            offsets, weights, value = offsets.float(), weights.float(), value.float()
            reference_points = reference_points.float()
            if reference_points.shape[-1] == 2:
                # offsets are in cells of each level: divide by (W_l, H_l)
                normalizer = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=torch.float32,
                                          device=query.device)
                locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
            elif reference_points.shape[-1] == 4:
                locations = (reference_points[:, :, None, :, None, :2]
                             + offsets / points * reference_points[:, :, None, :, None, 2:] * 0.5)
            else:
                raise ValueError(f"reference points must end in 2 or 4, got {tuple(reference_points.shape)}")
            output = multi_scale_deformable_attention(value, spatial_shapes, locations, weights)
        output = self.output_proj(output.to(query.dtype))
        attention = None
        if return_attention:
            attention = {"sampling_locations": locations.detach(), "attention_weights": weights.detach()}
        return output, attention
