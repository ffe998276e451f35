"""Deformable DETR (Zhu et al., ICLR 2021) with iterative box refinement and two-stage options.

Multi-scale features (C3-C5 + one stride-2 extra level) -> deformable encoder -> queries:
two-stage: top-k encoder proposals give anchors, and content + positional queries come from
the proposals' sine embeddings (pos_trans); one-stage: learned query embeddings.
Deviation (documented): one-stage initial references are 4-D boxes predicted from the learned
positional query, not 2-D points, so every query, injected ones included, uses the same
box-reference branch of deformable attention. Extra query groups get their positional query
from their anchors through the same pos_trans path that two-stage proposals use.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .backbone import Backbone
from .detr_base import DETRBase
from .outputs import DetectorOutput, QueryGroup
from .position_encoding import sine_box_embedding
from .transformer import DeformableDecoder, DeformableEncoder, QuerySelection


class DeformableDETR(DETRBase):
    def __init__(self, backbone: Backbone, num_classes: int, d_model: int = 256, n_heads: int = 8,
                 enc_layers: int = 6, dec_layers: int = 6, dim_feedforward: int = 1024, dropout: float = 0.1,
                 num_queries: int = 300, num_feature_levels: int = 4, enc_points: int = 4, dec_points: int = 4,
                 with_box_refine: bool = True, two_stage: bool = True, denoising: bool = False,
                 num_dn_queries: int = 100, label_noise_ratio: float = 0.5, box_noise_scale: float = 0.4,
                 **unused):
        super().__init__(backbone, d_model, num_feature_levels, num_classes)
        self.num_queries, self.two_stage = num_queries, two_stage
        self.encoder = DeformableEncoder(d_model, n_heads, dim_feedforward, dropout, enc_layers,
                                         num_feature_levels, enc_points)
        self.decoder = DeformableDecoder(d_model, n_heads, dim_feedforward, dropout, dec_layers,
                                         num_feature_levels, dec_points, num_classes,
                                         share_heads=not with_box_refine, refine=with_box_refine)
        # anchors -> (positional query, content): Deformable DETR's pos_trans for two-stage
        self.pos_trans = nn.Linear(2 * d_model, 2 * d_model)
        self.pos_trans_norm = nn.LayerNorm(2 * d_model)
        if two_stage:
            self.query_selection = QuerySelection(d_model, num_classes)
        else:
            self.query_embed = nn.Embedding(num_queries, 2 * d_model)
            self.reference_points = nn.Linear(d_model, 4)
        self.denoising = denoising
        self.dn_cfg = dict(num_dn_queries=num_dn_queries, label_noise_ratio=label_noise_ratio,
                           box_noise_scale=box_noise_scale)
        self.label_enc = nn.Embedding(num_classes + 1, d_model) if denoising else None

    def anchor_queries(self, anchors: Tensor) -> tuple[Tensor, Tensor]:
        """Positional and content queries from 4-D anchors (Deformable DETR two-stage)."""
        embed = self.pos_trans_norm(self.pos_trans(sine_box_embedding(anchors, self.d_model // 2).to(anchors.dtype)))
        return embed.split(self.d_model, dim=-1)

    def forward(self, images: Tensor, pad_mask: Tensor, targets: list[dict] | None = None,
                groups: list[QueryGroup] | None = None, return_attention: bool = False) -> DetectorOutput:
        enc = self.encode(images, pad_mask)
        batch = images.shape[0]

        enc_logits = enc_boxes = None
        if self.two_stage:
            selected = self.query_selection(enc.memory, enc.padding_mask, enc.spatial_shapes, self.num_queries)
            enc_logits, enc_boxes, anchors = selected["logits"], selected["boxes"], selected["anchors"]
            query_pos, content = self.anchor_queries(anchors)
        else:
            query_pos, content = self.query_embed.weight[None].expand(batch, -1, -1).split(self.d_model, -1)
            anchors = self.reference_points(query_pos).sigmoid()

        groups = self.with_denoising(groups, targets)
        num_det = content.shape[1]
        queries, boxes, attn_mask = self.join_queries(content, anchors, groups)
        if groups:
            group_pos, _ = self.anchor_queries(boxes[:, num_det:])
            query_pos = torch.cat([query_pos, group_pos], 1)
        dec = self.decoder(queries, boxes, enc.memory, enc.padding_mask, enc.spatial_shapes, enc.valid_ratios,
                           attn_mask, query_pos=query_pos, return_attention=return_attention)
        return self.assemble(enc, num_det, groups, dec, enc_logits=enc_logits, enc_boxes=enc_boxes)
