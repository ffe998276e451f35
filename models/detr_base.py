"""What the three detectors share: backbone + input projections, level flattening, query groups.

Each detector (dab_detr.py, deformable_detr.py, dino.py) adds its encoder, its way of making
the detection queries, and its decoder; the bookkeeping of extra query groups lives here once.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .backbone import Backbone
from .outputs import DetectorOutput, GroupOutput, QueryGroup
from .position_encoding import sine_position_embedding
from .query_groups import contrastive_denoising_group, decoder_self_attn_mask


@dataclass
class Encoded:
    """The encoder's output and the bookkeeping of its levels."""

    memory: Tensor                  # [B,S,D]
    pos: Tensor                     # [B,S,D] positional + level embedding
    padding_mask: Tensor            # [B,S]
    spatial_shapes: list[tuple[int, int]]
    level_start_index: list[int]
    valid_ratios: Tensor            # [B,levels,2]
    features: list[Tensor]          # per level [B,D,H,W]


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups (Deformable DETR), or the largest divisor below for odd widths."""
    groups = max(g for g in range(1, 33) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


class DETRBase(nn.Module):
    """Backbone, per-level 1x1 projections to d_model (plus stride-2 extra levels), positions."""

    def __init__(self, backbone: Backbone, d_model: int, num_feature_levels: int, num_classes: int,
                 pos_temperature: float = 10000.0, pos_offset: float = -0.5, input_proj_norm: bool = True):
        """``pos_offset``: see models.position_encoding.sine_position_embedding.
        ``input_proj_norm``: GroupNorm after each 1x1 input projection (Deformable DETR, DINO);
        DAB-DETR's single level has a plain 1x1 convolution."""
        super().__init__()
        self.pos_temperature, self.pos_offset = pos_temperature, pos_offset
        self.backbone = backbone
        self.d_model, self.num_classes = d_model, num_classes
        self.num_feature_levels = num_feature_levels
        projections = []
        for ch in backbone.channels[:num_feature_levels]:
            norm = group_norm(d_model) if input_proj_norm else nn.Identity()
            projections.append(nn.Sequential(nn.Conv2d(ch, d_model, 1), norm))
        in_ch = backbone.channels[-1]
        for _ in range(num_feature_levels - len(backbone.channels)):
            projections.append(nn.Sequential(nn.Conv2d(in_ch, d_model, 3, 2, 1), group_norm(d_model)))
            in_ch = d_model
        self.input_proj = nn.ModuleList(projections)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
        self.level_embed = nn.Parameter(torch.zeros(num_feature_levels, d_model)) if num_feature_levels > 1 else None
        if self.level_embed is not None:
            nn.init.normal_(self.level_embed)

    # -- inputs ------------------------------------------------------------------------------
    def embed_inputs(self, images: Tensor, pad_mask: Tensor):
        """Projected features, padding masks and positional embeddings, one per level."""
        backbone_out = self.backbone(images, pad_mask)
        features, masks = [], []
        for proj, (feat, mask) in zip(self.input_proj, backbone_out):
            features.append(proj(feat))
            masks.append(mask)
        last = backbone_out[-1][0]
        for proj in self.input_proj[len(backbone_out):]:
            last = proj(last)
            features.append(last)
            masks.append(nn.functional.interpolate(pad_mask[None].float(), size=last.shape[-2:])[0].bool())
        positions = [sine_position_embedding(m, self.d_model // 2, self.pos_temperature,
                                             offset=self.pos_offset).to(f.dtype)
                     for f, m in zip(features, masks)]
        return features, masks, positions

    def flatten_levels(self, features, masks, positions):
        """[B,S,D] tokens of all levels, with the bookkeeping every consumer of the memory needs."""
        spatial_shapes = [tuple(f.shape[-2:]) for f in features]
        level_start_index, start = [], 0
        for h, w in spatial_shapes:
            level_start_index.append(start)
            start += h * w
        src = torch.cat([f.flatten(2).transpose(1, 2) for f in features], 1)
        mask = torch.cat([m.flatten(1) for m in masks], 1)
        pos = [p.flatten(2).transpose(1, 2) for p in positions]
        if self.level_embed is not None:
            pos = [p + self.level_embed[i].to(p.dtype) for i, p in enumerate(pos)]
        pos = torch.cat(pos, 1)
        valid_ratios = torch.stack([self.valid_ratio(m) for m in masks], 1)
        return src, mask, pos, spatial_shapes, level_start_index, valid_ratios

    def encode(self, images: Tensor, pad_mask: Tensor) -> "Encoded":
        """Backbone, projections and the detector's encoder: everything before the queries."""
        features, masks, positions = self.embed_inputs(images, pad_mask)
        src, mask, pos, shapes, starts, ratios = self.flatten_levels(features, masks, positions)
        memory = self.encoder(src, pos, mask, spatial_shapes=shapes, valid_ratios=ratios)
        return Encoded(memory, pos, mask, shapes, starts, ratios, features)

    @staticmethod
    def valid_ratio(mask: Tensor) -> Tensor:
        """Fraction (w, h) of a level's grid covered by the image rather than padding."""
        _, h, w = mask.shape
        valid_h = (~mask[:, :, 0]).sum(1).float()
        valid_w = (~mask[:, 0, :]).sum(1).float()
        return torch.stack([valid_w / w, valid_h / h], -1)

    # -- query groups ------------------------------------------------------------------------
    @staticmethod
    def join_queries(content: Tensor, boxes: Tensor, groups: list[QueryGroup]):
        """Concatenate detection queries and groups along the query axis, and build the mask."""
        batch, num_det = content.shape[:2]
        if not groups:
            return content, boxes, None
        for g in groups:
            if g.content.shape[0] != batch or g.content.shape[-1] != content.shape[-1]:
                raise ValueError(f"query group {g.name!r}: content {tuple(g.content.shape)} does not fit "
                                 f"batch {batch} x d_model {content.shape[-1]}")
        mask = decoder_self_attn_mask(num_det, groups, batch, content.device)
        content = torch.cat([content] + [g.content.to(content.dtype) for g in groups], 1)
        boxes = torch.cat([boxes] + [g.boxes.to(boxes.dtype) for g in groups], 1)
        return content, boxes, mask

    def assemble(self, encoded: "Encoded", num_det: int, groups: list[QueryGroup], dec: dict,
                 **extra) -> DetectorOutput:
        """Slice the decoder's per-layer outputs into detection queries and each group, and
        return the one output object every consumer reads."""
        logits, boxes, states, references, attention = (
            dec["logits"], dec["boxes"], dec["states"], dec["references"], dec["attention"])
        group_outputs = {}
        start = num_det
        for g in groups:
            sl = slice(start, start + g.num_queries)
            attn = None
            if attention is not None:
                attn = [{k: v[:, sl] for k, v in layer.items()} for layer in attention]
            group_outputs[g.name] = GroupOutput(logits[:, :, sl], boxes[:, :, sl], states[:, :, sl],
                                                references[:, :, sl], g, attn)
            start += g.num_queries
        det_logits = logits[:, :, :num_det]
        label_enc = getattr(self, "label_enc", None)
        if label_enc is not None:
            # keep the label book in the graph when a batch has no denoising group (DDP)
            det_logits = det_logits + 0.0 * label_enc.weight.sum()
        return DetectorOutput(
            layer_logits=det_logits, layer_boxes=boxes[:, :, :num_det], layer_states=states[:, :, :num_det],
            layer_references=references[:, :, :num_det], memory=encoded.memory, memory_pos=encoded.pos,
            memory_padding_mask=encoded.padding_mask, spatial_shapes=encoded.spatial_shapes,
            level_start_index=encoded.level_start_index, valid_ratios=encoded.valid_ratios,
            features=encoded.features, groups=group_outputs, cross_attention=attention, **extra)

    def with_denoising(self, groups: list[QueryGroup] | None, targets: list[dict] | None) -> list[QueryGroup]:
        """The caller's groups, preceded in training by a contrastive denoising group when the
        model has denoising on (DINO always; DAB-DETR / Deformable DETR optionally, as DN-DETR)."""
        groups = list(groups or [])
        if getattr(self, "denoising", False) and self.training and targets is not None:
            dn = contrastive_denoising_group(targets, self.label_enc, self.num_classes, **self.dn_cfg)
            if dn is not None:
                groups.insert(0, dn)
        return groups

