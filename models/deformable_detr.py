"""Deformable DETR (Zhu et al., ICLR 2021) with iterative box refinement and two-stage options.

Follows fundamentalvision/Deformable-DETR models/deformable_detr.py and
models/deformable_transformer.py (grade A; tests/test_hf_deformable_detr.py checks it against
transformers' ``DeformableDetrForObjectDetection`` to 1e-4 in all three modes).

Multi-scale features (C3-C5 + one stride-2 extra level) -> deformable encoder -> queries:

* one-stage: learned query embeddings (positional half, content half); the initial references
  are 2-D points, sigmoid(Linear(d, 2)(positional query)). With box refinement they become
  boxes after the first layer; without, they stay points in every layer.
* two-stage: every encoder token is a proposal scored by the encoder head; the top-k by class
  0's logit give the anchors, and positional + content queries come from the anchors' sine
  embedding (coordinates in x, y, w, h order) through ``pos_trans``. The encoder head is trained
  on every token with binarised labels (models/criterion.py ``encoder_binary_labels``).

Extra query groups (denoising, distillation queries) carry 4-D boxes and get their positional
query from their anchors through ``pos_trans``, the two-stage path; in one-stage mode that
layer exists for them alone (it has no counterpart in the original). The decoder marks the
one-stage detection queries as points, so both kinds decode in one pass.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .backbone import Backbone
from .detr_base import DETRBase
from .outputs import DetectorOutput, QueryGroup
from .position_encoding import sine_box_embedding
from .transformer import DeformableDecoder, DeformableEncoder, QuerySelection, xavier_transformer_init


class DeformableDETR(DETRBase):
    def __init__(self, backbone: Backbone, num_classes: int, d_model: int = 256, n_heads: int = 8,
                 enc_layers: int = 6, dec_layers: int = 6, dim_feedforward: int = 1024, dropout: float = 0.1,
                 num_queries: int = 300, num_feature_levels: int = 4, enc_points: int = 4, dec_points: int = 4,
                 with_box_refine: bool = True, two_stage: bool = True, denoising: bool = False,
                 num_dn_queries: int = 100, label_noise_ratio: float = 0.5, box_noise_scale: float = 0.4):
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
        in_transformer = [self.encoder.layers, self.decoder.layers, self.pos_trans]
        if two_stage:
            self.query_selection = QuerySelection(d_model, num_classes, rank_by="first")
            in_transformer.append(self.query_selection.enc_output)
            if not with_box_refine:
                # without refinement the original's class_embed / bbox_embed lists repeat one
                # head, the encoder's (index -1) included
                self.query_selection.class_head = self.decoder.class_heads[0]
                self.query_selection.box_head = self.decoder.box_heads[0]
        else:
            self.query_embed = nn.Embedding(num_queries, 2 * d_model)
            self.reference_points = nn.Linear(d_model, 2)
            in_transformer.append(self.reference_points)
        # DeformableTransformer._reset_parameters (reference_points: xavier gain 1, bias 0)
        xavier_transformer_init(*in_transformer)
        if not two_stage:
            nn.init.zeros_(self.reference_points.bias)
            # the first box head starts at w = h = sigmoid(-2) (Deformable-DETR deformable_detr.py:
            # bbox_embed[0] bias[2:] = -2; two-stage sets every head's back to 0)
            nn.init.constant_(self.decoder.box_heads[0].layers[-1].bias[2:], -2.0)
        self.denoising = denoising
        self.dn_cfg = dict(num_dn_queries=num_dn_queries, label_noise_ratio=label_noise_ratio,
                           box_noise_scale=box_noise_scale)
        self.label_enc = nn.Embedding(num_classes + 1, d_model) if denoising else None

    def anchor_queries(self, anchors: Tensor) -> tuple[Tensor, Tensor]:
        """Positional and content queries from 4-D anchors (Deformable DETR two-stage:
        ``get_proposal_pos_embed`` keeps the x, y, w, h order)."""
        sine = sine_box_embedding(anchors, self.d_model // 2, y_first=False).to(anchors.dtype)
        embed = self.pos_trans_norm(self.pos_trans(sine))
        return embed.split(self.d_model, dim=-1)

    def forward(self, images: Tensor, pad_mask: Tensor, targets: list[dict] | None = None,
                groups: list[QueryGroup] | None = None, return_attention: bool = False) -> DetectorOutput:
        enc = self.encode(images, pad_mask)
        batch = images.shape[0]

        enc_logits = enc_boxes = None
        if self.two_stage:
            selected = self.query_selection(enc.memory, enc.padding_mask, enc.spatial_shapes, self.num_queries)
            # the encoder loss covers every token (Deformable DETR's enc_outputs)
            enc_logits, enc_boxes, anchors = selected["all_logits"], selected["all_boxes"], selected["anchors"]
            query_pos, content = self.anchor_queries(anchors)
        else:
            query_pos, content = self.query_embed.weight[None].expand(batch, -1, -1).split(self.d_model, -1)
            points = self.reference_points(query_pos).sigmoid()
            # a 2-D point as a box whose (w, h) = 0.5 the decoder ignores (models/transformer.py)
            anchors = torch.cat([points, torch.full_like(points, 0.5)], -1)

        groups = self.with_denoising(groups, targets)
        num_det = content.shape[1]
        queries, boxes, attn_mask = self.join_queries(content, anchors, groups)
        point_queries = None
        if not self.two_stage:
            point_queries = torch.arange(boxes.shape[1], device=boxes.device) < num_det
        if groups:
            group_pos, _ = self.anchor_queries(boxes[:, num_det:])
            query_pos = torch.cat([query_pos, group_pos], 1)
        dec = self.decoder(queries, boxes, enc.memory, enc.padding_mask, enc.spatial_shapes, enc.valid_ratios,
                           attn_mask, query_pos=query_pos, return_attention=return_attention,
                           point_queries=point_queries)
        return self.assemble(enc, num_det, groups, dec, enc_logits=enc_logits, enc_boxes=enc_boxes)
