"""DINO (Zhang et al., ICLR 2023): Deformable-DETR-based, with contrastive denoising (CDN),
mixed query selection and look-forward-twice.

Multi-scale features -> deformable encoder -> top-k encoder proposals give the anchors
(detached) while content queries stay learned (mixed selection) -> decoder whose positional
queries are recomputed from each layer's anchors; boxes look forward twice. In training, CDN
queries (positive and negative groups) are one QueryGroup among others.
"""
from __future__ import annotations

from torch import Tensor, nn

from .backbone import Backbone
from .detr_base import DETRBase
from .outputs import DetectorOutput, QueryGroup
from .transformer import DeformableDecoder, DeformableEncoder, QuerySelection


class DINO(DETRBase):
    def __init__(self, backbone: Backbone, num_classes: int, d_model: int = 256, n_heads: int = 8,
                 enc_layers: int = 6, dec_layers: int = 6, dim_feedforward: int = 2048, dropout: float = 0.0,
                 num_queries: int = 900, num_feature_levels: int = 4, enc_points: int = 4, dec_points: int = 4,
                 denoising: bool = True, num_dn_queries: int = 100, label_noise_ratio: float = 0.5,
                 box_noise_scale: float = 1.0, **unused):
        super().__init__(backbone, d_model, num_feature_levels, num_classes)
        self.num_queries = num_queries
        self.encoder = DeformableEncoder(d_model, n_heads, dim_feedforward, dropout, enc_layers,
                                         num_feature_levels, enc_points)
        self.decoder = DeformableDecoder(d_model, n_heads, dim_feedforward, dropout, dec_layers,
                                         num_feature_levels, dec_points, num_classes, share_heads=True,
                                         refine=True, look_forward_twice=True, final_norm=True,
                                         pos_from_reference=True)
        self.query_selection = QuerySelection(d_model, num_classes)
        self.tgt_embed = nn.Embedding(num_queries, d_model)        # learned content (mixed selection)
        self.denoising = denoising
        self.dn_cfg = dict(num_dn_queries=num_dn_queries, label_noise_ratio=label_noise_ratio,
                           box_noise_scale=box_noise_scale)
        # the CDN label book; also what GT-derived distillation queries may borrow
        self.label_enc = nn.Embedding(num_classes + 1, d_model)

    def forward(self, images: Tensor, pad_mask: Tensor, targets: list[dict] | None = None,
                groups: list[QueryGroup] | None = None, return_attention: bool = False) -> DetectorOutput:
        enc = self.encode(images, pad_mask)
        batch = images.shape[0]

        selected = self.query_selection(enc.memory, enc.padding_mask, enc.spatial_shapes, self.num_queries)
        anchors = selected["anchors"]
        content = self.tgt_embed.weight[: anchors.shape[1]][None].expand(batch, -1, -1)

        groups = self.with_denoising(groups, targets)
        num_det = content.shape[1]
        queries, boxes, attn_mask = self.join_queries(content, anchors, groups)
        dec = self.decoder(queries, boxes, enc.memory, enc.padding_mask, enc.spatial_shapes, enc.valid_ratios,
                           attn_mask, return_attention=return_attention)
        return self.assemble(enc, num_det, groups, dec, enc_logits=selected["logits"], enc_boxes=selected["boxes"])
