"""DAB-DETR (Liu et al., ICLR 2022): single-scale DETR whose queries are 4-D anchor boxes.

Read top to bottom: C5 features -> 1x1 projection -> DETR encoder (standard attention) ->
decoder queries = learned anchors (cx, cy, w, h) with zero content, refined layer by layer;
positional queries come from the anchors' sine embeddings (ConditionalDecoder).
Extra query groups (denoising, target-aware) are decoded in the same pass behind a mask.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .backbone import Backbone
from .detr_base import DETRBase
from .outputs import DetectorOutput, QueryGroup
from .transformer import ConditionalDecoder, StandardEncoder


class DABDETR(DETRBase):
    def __init__(self, backbone: Backbone, num_classes: int, d_model: int = 256, n_heads: int = 8,
                 enc_layers: int = 6, dec_layers: int = 6, dim_feedforward: int = 2048, dropout: float = 0.0,
                 num_queries: int = 300, random_refpoints_xy: bool = False, modulate_hw_attn: bool = True,
                 denoising: bool = False, num_dn_queries: int = 100, label_noise_ratio: float = 0.5,
                 box_noise_scale: float = 0.4, **unused):
        # DAB-DETR's feature-map sine embedding uses temperature 20 (not DETR's 10000)
        super().__init__(backbone, d_model, num_feature_levels=1, num_classes=num_classes, pos_temperature=20.0)
        self.num_queries = num_queries
        self.encoder = StandardEncoder(d_model, n_heads, dim_feedforward, dropout, enc_layers)
        self.decoder = ConditionalDecoder(d_model, n_heads, dim_feedforward, dropout, dec_layers, num_classes,
                                          modulate_hw_attn)
        # DAB-DETR initialises its transformer with Xavier; the prediction heads keep their own init
        heads = {id(p) for m in (self.decoder.class_heads, self.decoder.box_heads) for p in m.parameters()}
        for p in list(self.encoder.parameters()) + list(self.decoder.parameters()):
            if p.dim() > 1 and id(p) not in heads:
                nn.init.xavier_uniform_(p)
        # learned anchors, stored in inverse-sigmoid space
        self.refpoint_embed = nn.Embedding(num_queries, 4)
        if random_refpoints_xy:   # DAB-DETR's option: uniform, frozen centres
            self.refpoint_embed.weight.data[:, :2].uniform_(0, 1)
            self.refpoint_embed.weight.data[:, :2] = torch.logit(self.refpoint_embed.weight.data[:, :2], eps=1e-5)
            self.refpoint_embed.weight.data[:, :2].requires_grad = False
        # denoising is not part of DAB-DETR; DN-DETR added it to the same architecture (optional)
        self.denoising = denoising
        self.dn_cfg = dict(num_dn_queries=num_dn_queries, label_noise_ratio=label_noise_ratio,
                           box_noise_scale=box_noise_scale)
        self.label_enc = nn.Embedding(num_classes + 1, d_model) if denoising else None

    def forward(self, images: Tensor, pad_mask: Tensor, targets: list[dict] | None = None,
                groups: list[QueryGroup] | None = None, return_attention: bool = False) -> DetectorOutput:
        enc = self.encode(images, pad_mask)
        batch = images.shape[0]
        content = enc.memory.new_zeros(batch, self.num_queries, self.d_model)
        anchors = self.refpoint_embed.weight.sigmoid()[None].expand(batch, -1, -1)
        groups = self.with_denoising(groups, targets)
        queries, boxes, attn_mask = self.join_queries(content, anchors, groups)
        dec = self.decoder(queries, boxes, enc.memory, enc.pos, enc.padding_mask, attn_mask, return_attention)
        return self.assemble(enc, self.num_queries, groups, dec)
