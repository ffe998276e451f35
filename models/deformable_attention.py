"""Multi-scale deformable attention (Zhu et al., Deformable DETR, 2021, Sec. 4.1) in pure PyTorch.

No custom CUDA op. Two interchangeable implementations of the sampling (bilinear, zero padding,
``align_corners=False`` pixel centres, as ``F.grid_sample``):

* ``grid_sample``: ``F.grid_sample`` per level, as in RT-DETR and HF transformers. Fewest ops, so
  best for small problems and the default on GPUs.
* ``gather``: every level is copied once into one zero-bordered value table, each sampling
  point becomes 4 (row, weight) pairs and the whole weighted sum is a single
  ``F.embedding_bag(mode="sum", per_sample_weights=...)``; a hand-written backward gets the
  value gradient by sorting the points by their top-left row and running the transposed bags,
  and the location/weight gradients from embedding_bag's per-sample-weight kernel. On a CPU this
  is 1.5-3x faster than grid_sample at KITTI resolution (``python -m reproduce.bench --only msda``).

``impl="auto"`` picks ``gather`` on the CPU for problems of at least ``gather_min_points()``
sampling points (B*Q*heads*levels*points; 2^14 single-threaded, 2^18 otherwise) and
``grid_sample`` otherwise. Spatial shapes travel
as a Python list so the level loop never syncs with the device. Under autocast the sampling
runs in float32 (low-precision sampling was the top AMP complaint upstream).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

# "auto" thresholds in sampling points (B*Q*heads*levels*points). gather issues ~3x more ops;
# with several threads each op pays a parallel-region start, which on a loaded shared CPU costs
# milliseconds, so small problems stay on grid_sample; single-threaded, gather wins from ~16k
# points up (python -m reproduce.bench --only msda).
GATHER_MIN_POINTS = 1 << 18
GATHER_MIN_POINTS_SINGLE_THREAD = 1 << 14
IMPLEMENTATIONS = ("auto", "grid_sample", "gather")


def gather_min_points() -> int:
    """The size from which ``impl="auto"`` uses the gather implementation on a CPU."""
    return GATHER_MIN_POINTS_SINGLE_THREAD if torch.get_num_threads() == 1 else GATHER_MIN_POINTS


def multi_scale_deformable_attention(
    value: Tensor,
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
    *,
    impl: str = "auto",
) -> Tensor:
    """Bilinear sampling of every level at every point, weighted and summed.

    value: [B,S,M,Dh] per-head values of all levels (S = sum H_l*W_l).
    sampling_locations: [B,Q,M,L,P,2] normalised (x, y) in [0, 1] of each level's image area.
    attention_weights: [B,Q,M,L,P], softmax-normalised over L*P.
    impl: "auto" | "grid_sample" | "gather" (same result up to float rounding; see the module doc).
    Returns [B,Q,M*Dh].
    """
    if impl == "auto":
        n_points = sampling_locations.numel() // 2
        impl = "gather" if value.device.type == "cpu" and n_points >= gather_min_points() else "grid_sample"
    if impl == "gather":
        shapes = [(int(h), int(w)) for h, w in spatial_shapes]
        return _GatherSample.apply(value, sampling_locations, attention_weights, shapes)
    if impl != "grid_sample":
        raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
    return _grid_sample_attention(value, spatial_shapes, sampling_locations, attention_weights)


def _grid_sample_attention(value, spatial_shapes, sampling_locations, attention_weights) -> Tensor:
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


# --- the gather implementation ------------------------------------------------------------
# Layout: the value of level l lives in a zero-bordered (H_l+2) x (W_l+2) map, all levels one
# after the other, rows of ``padded.view(-1, Dh)`` ordered (batch, cell, head). A point whose
# top-left bilinear corner (x0, y0) lies in [-1, W-1] x [-1, H-1] has all four corners inside
# its bordered map (the border supplies grid_sample's zero padding); any other point has all
# four corners outside, gets weight 0 and an arbitrary in-range row. Each query-head is one
# embedding_bag of L*P*4 (row, weight) pairs, corner-major: [B,Q,M,4,L,P]. Per-(level, point)
# constants are [L,P] tensors so the innermost dimension of every elementwise op stays
# contiguous (tiny broadcast dims cost ~10x on a CPU).

def _bordered_starts(spatial_shapes) -> tuple[list[int], int]:
    starts, start = [], 0
    for h, w in spatial_shapes:
        starts.append(start)
        start += (h + 2) * (w + 2)
    return starts, start


class _GatherSample(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value, locations, weights, spatial_shapes):
        batch, tokens, heads, head_dim = value.shape
        _, queries, _, levels, points, _ = locations.shape
        device, ftype = value.device, locations.dtype
        starts, padded_tokens = _bordered_starts(spatial_shapes)
        padded = value.new_zeros(batch, padded_tokens, heads, head_dim)
        src = 0
        for (h, w), st in zip(spatial_shapes, starts):
            interior = padded[:, st:st + (h + 2) * (w + 2)].view(batch, h + 2, w + 2, heads, head_dim)[:, 1:-1, 1:-1]
            interior.copy_(value[:, src:src + h * w].reshape(batch, h, w, heads, head_dim))
            src += h * w

        def per_level(values, dtype):     # [L,P]
            return torch.tensor(values, dtype=dtype, device=device)[:, None].expand(levels, points).contiguous()

        width = per_level([w for _, w in spatial_shapes], ftype)
        height = per_level([h for h, _ in spatial_shapes], ftype)
        minus_half = torch.full((), -0.5, dtype=ftype, device=device)
        minus_two = torch.full((), -2.0, dtype=ftype, device=device)
        # pixel coordinates (centres at +0.5) with grid_sample's own float arithmetic,
        # (grid + 1) * (size / 2) - 0.5 on grid = 2 * loc - 1, so both implementations round alike
        grid1 = (2 * locations - 1).add_(1)
        px = torch.addcmul(minus_half, grid1[..., 0], width / 2)      # [B,Q,M,L,P]
        py = torch.addcmul(minus_half, grid1[..., 1], height / 2)
        inside = (px >= -1) & (px < width) & (py >= -1) & (py < height)
        px = torch.clamp_(px, minus_two, width + 1)                    # bounded before .long()
        py = torch.clamp_(py, minus_two, height + 1)
        x0, y0 = px.floor(), py.floor()
        # linear interpolation weights (1 - f, f) per axis, written in place: [B,Q,M,2,L,P]
        lin_x = locations.new_empty(batch, queries, heads, 2, levels, points)
        lin_y = torch.empty_like(lin_x)
        fx = torch.sub(px, x0, out=lin_x[:, :, :, 1])
        fy = torch.sub(py, y0, out=lin_y[:, :, :, 1])
        one = torch.ones((), dtype=ftype, device=device)
        torch.sub(one, fx, out=lin_x[:, :, :, 0])
        torch.sub(one, fy, out=lin_y[:, :, :, 0])
        # top-left corner in bordered coordinates (+1), clamped so outside points stay in range
        xi = torch.minimum(x0.long().add_(1).clamp_(min=0), width.long())
        yi = torch.minimum(y0.long().add_(1).clamp_(min=0), height.long())
        row_stride = per_level([(w + 2) * heads for _, w in spatial_shapes], torch.long)
        base = ((torch.arange(batch, device=device) * (padded_tokens * heads)).view(batch, 1, 1, 1, 1)
                + torch.arange(heads, device=device).view(1, 1, heads, 1, 1)
                + per_level([st * heads for st in starts], torch.long))               # [B,1,M,L,P]
        top_left = yi.mul_(row_stride).add_(xi.mul_(heads)).add_(base)
        steps = torch.stack([torch.zeros_like(row_stride), torch.full_like(row_stride, heads), row_stride,
                             row_stride + heads])                                       # corners (y,x): 00 01 10 11
        rows = top_left[:, :, :, None] + steps                                          # [B,Q,M,4,L,P]
        a = weights * inside
        corner_weights = ((lin_y * a[:, :, :, None])[:, :, :, :, None] * lin_x[:, :, :, None]).to(value.dtype)
        bags, per_bag = batch * queries * heads, 4 * levels * points
        out = F.embedding_bag(rows.view(bags, per_bag), padded.view(-1, head_dim), mode="sum",
                              per_sample_weights=corner_weights.view(bags, per_bag))
        ctx.save_for_backward(padded, rows, a, inside, lin_x, lin_y, width, height)
        ctx.layout = (spatial_shapes, starts, padded_tokens, tuple(value.shape))
        return out.view(batch, queries, heads * head_dim)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        padded, rows, a, inside, lin_x, lin_y, width, height = ctx.saved_tensors
        spatial_shapes, starts, padded_tokens, value_shape = ctx.layout
        head_dim = value_shape[-1]
        bags = rows.shape[0] * rows.shape[1] * rows.shape[2]
        per_bag = rows.shape[3] * rows.shape[4] * rows.shape[5]
        grad = grad_out.reshape(bags, head_dim).to(padded.dtype).contiguous()
        grad_value = grad_locations = grad_weights = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            # <grad of the query-head, value row of the corner> for every corner: the kernel
            # autograd itself uses for embedding_bag's per_sample_weights
            offsets = torch.arange(0, bags * per_bag, per_bag, device=grad.device)
            offset2bag = torch.arange(bags, device=grad.device).repeat_interleave(per_bag)
            h = torch.ops.aten._embedding_bag_per_sample_weights_backward(
                grad, padded.view(-1, head_dim), rows.view(-1), offsets, offset2bag, 0, -1)
            h = h.view(rows.shape[:3] + (2, 2) + rows.shape[4:]).to(a.dtype)         # [B,Q,M,y,x,L,P]
            along_x = h[:, :, :, :, 0] * lin_x[:, :, :, None, 0] + h[:, :, :, :, 1] * lin_x[:, :, :, None, 1]
            if ctx.needs_input_grad[2]:
                grad_weights = along_x[:, :, :, 0] * lin_y[:, :, :, 0] + along_x[:, :, :, 1] * lin_y[:, :, :, 1]
                grad_weights = grad_weights.mul_(inside)
            if ctx.needs_input_grad[1]:
                along_y = h[:, :, :, 0] * lin_y[:, :, :, None, 0] + h[:, :, :, 1] * lin_y[:, :, :, None, 1]
                gx = (along_y[:, :, :, 1] - along_y[:, :, :, 0]).mul_(a).mul_(width)
                gy = (along_x[:, :, :, 1] - along_x[:, :, :, 0]).mul_(a).mul_(height)
                grad_locations = torch.stack([gx, gy], -1)
        if ctx.needs_input_grad[0]:
            grad_value = _gather_value_grad(grad, rows, a, lin_x, lin_y, spatial_shapes, starts, padded_tokens,
                                            value_shape)
        return grad_value, grad_locations, grad_weights, None


def _gather_value_grad(grad, rows, a, lin_x, lin_y, spatial_shapes, starts, padded_tokens, value_shape) -> Tensor:
    """The transposed gather without atomics: points sorted by their top-left row form one bag
    per bordered cell; one embedding_bag per corner, then each corner's map shifted into place."""
    batch, tokens, heads, head_dim = value_shape
    per_bag = rows.shape[4] * rows.shape[5]
    n_rows = batch * padded_tokens * heads
    keys = rows[:, :, :, 0].to(torch.int32 if n_rows < 2 ** 31 else torch.long).reshape(-1)
    sorted_keys, order = torch.sort(keys, stable=True)
    offsets = torch.zeros(n_rows, dtype=torch.long, device=grad.device)
    torch.cumsum(torch.bincount(sorted_keys, minlength=n_rows)[:-1], 0, out=offsets[1:])
    if per_bag & (per_bag - 1) == 0:
        bag_of_point = order >> (per_bag.bit_length() - 1)
    else:
        bag_of_point = order // per_bag
    a_s, fx, fy = (x.reshape(-1).index_select(0, order).to(grad.dtype)
                   for x in (a, lin_x[:, :, :, 1], lin_y[:, :, :, 1]))
    ay1 = a_s * fy
    ay0 = a_s - ay1
    corner_weights = (ay0 - ay0 * fx, ay0 * fx, ay1 - ay1 * fx, ay1 * fx)
    parts = [F.embedding_bag(bag_of_point, grad, offsets, mode="sum", per_sample_weights=cw)
             .view(batch, padded_tokens, heads * head_dim) for cw in corner_weights]
    acc = parts[0]
    for (h, w), st in zip(spatial_shapes, starts):
        n = (h + 2) * (w + 2)
        for c, shift in ((1, 1), (2, w + 2), (3, w + 3)):
            acc[:, st + shift:st + n] += parts[c][:, st:st + n - shift]
    out = grad.new_empty(batch, tokens, heads * head_dim)
    src = 0
    for (h, w), st in zip(spatial_shapes, starts):
        n = (h + 2) * (w + 2)
        out[:, src:src + h * w].view(batch, h, w, -1).copy_(
            acc[:, st:st + n].view(batch, h + 2, w + 2, -1)[:, 1:-1, 1:-1])
        src += h * w
    return out.view(value_shape)


class MultiScaleDeformableAttention(nn.Module):
    """Each query attends to ``n_points`` sampled points per head and level around its reference.

    Reference points are [B,Q,L,2] points or [B,Q,L,4] boxes (cx, cy, w, h); with boxes the
    offsets are scaled by the box size (Deformable DETR's two-stage / box-refine branch), with
    points by each level's (W, H) (its one-stage branch; fundamentalvision/Deformable-DETR
    models/ops/modules/ms_deform_attn.py). ``point_queries`` [B,Q] or [Q] bool mixes both in
    one pass: 4-D references whose marked queries use the point formula on (cx, cy) and ignore
    (w, h) (one-stage detection queries decoded next to box-carrying query groups).
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
        point_queries: Tensor | None = None,
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
            if reference_points.shape[-1] not in (2, 4):
                raise ValueError(f"reference points must end in 2 or 4, got {tuple(reference_points.shape)}")
            if reference_points.shape[-1] == 2 or point_queries is not None:
                # offsets are in cells of each level: divide by (W_l, H_l)
                if torch.jit.is_tracing():
                    # ONNX export (reproduce/deploy/export.py): the level sizes are traced 0-d tensors;
                    # torch.tensor would bake the example image's sizes into the graph
                    normalizer = torch.stack([torch.stack([torch.as_tensor(w), torch.as_tensor(h)])
                                              for h, w in spatial_shapes]).to(query.device, torch.float32)
                else:
                    normalizer = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=torch.float32,
                                              device=query.device)
                at_points = reference_points[:, :, None, :, None, :2] + offsets / normalizer[None, None, None, :, None, :]
            if reference_points.shape[-1] == 4:
                in_boxes = (reference_points[:, :, None, :, None, :2]
                            + offsets / points * reference_points[:, :, None, :, None, 2:] * 0.5)
            if reference_points.shape[-1] == 2:
                locations = at_points
            elif point_queries is None:
                locations = in_boxes
            else:
                marked = point_queries.expand(batch, queries) if point_queries.dim() == 1 else point_queries
                locations = torch.where(marked.view(batch, queries, 1, 1, 1, 1), at_points, in_boxes)
            output = multi_scale_deformable_attention(value, spatial_shapes, locations, weights)
        output = self.output_proj(output.to(query.dtype))
        attention = None
        if return_attention:
            attention = {"sampling_locations": locations.detach(), "attention_weights": weights.detach()}
        return output, attention
