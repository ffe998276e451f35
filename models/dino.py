"""DINO (Zhang et al., ICLR 2023): Deformable-DETR-based, with contrastive denoising (CDN),
mixed query selection and look-forward-twice.

Follows IDEA-Research/DINO's DINO_4scale configuration (config/DINO/DINO_4scale.py) and
models/dino/{dino.py, deformable_transformer.py, dn_components.py, position_encoding.py}
(grade A where not said otherwise):

* feature positions: ``PositionEmbeddingSineHW`` with temperature 20 (``pe_temperatureH/W``)
  and no -0.5 cell offset (``pos_temperature=20``, ``pos_offset=0``);
* top-k encoder proposals (best class score) give the anchors (detached) while content queries
  stay learned (mixed selection, ``embed_init_tgt``); the encoder loss covers the selected
  proposals with the full class labels;
* the decoder recomputes positional queries from each layer's anchors, updates the anchors from
  the un-normed layer output and reports class / box from the normed one; boxes look forward
  twice; ``inverse_sigmoid`` clamps at 1e-3 (DINO util/misc.py);
* CDN (models/query_groups.py): ``num_dn_queries`` is DINO's ``dn_number`` (100), doubled for
  positive and negative queries, split into groups by the batch's largest GT count; box noise
  scale 0.4 (DINO_4scale's ``dn_box_noise_scale``; detrex and mmdet's DINO configs use 1.0);
  label noise 0.5.
"""
from __future__ import annotations

from torch import Tensor, nn

from .backbone import Backbone
from .detr_base import DETRBase
from .outputs import DetectorOutput, QueryGroup
from .transformer import DeformableDecoder, DeformableEncoder, QuerySelection, xavier_transformer_init


class DINO(DETRBase):
    def __init__(self, backbone: Backbone, num_classes: int, d_model: int = 256, n_heads: int = 8,
                 enc_layers: int = 6, dec_layers: int = 6, dim_feedforward: int = 2048, dropout: float = 0.0,
                 num_queries: int = 900, num_feature_levels: int = 4, enc_points: int = 4, dec_points: int = 4,
                 denoising: bool = True, num_dn_queries: int = 100, label_noise_ratio: float = 0.5,
                 box_noise_scale: float = 0.4, dn_groups: str = "dino", pos_temperature: float = 20.0,
                 pos_offset: float = 0.0):
        """``dn_groups``: ``dino`` (DINO's rule) or ``dynamic`` (always divide by the largest GT
        count; for small ``num_dn_queries``: see models/query_groups.py)."""
        super().__init__(backbone, d_model, num_feature_levels, num_classes, pos_temperature=pos_temperature,
                         pos_offset=pos_offset)
        self.num_queries = num_queries
        self.encoder = DeformableEncoder(d_model, n_heads, dim_feedforward, dropout, enc_layers,
                                         num_feature_levels, enc_points)
        self.decoder = DeformableDecoder(d_model, n_heads, dim_feedforward, dropout, dec_layers,
                                         num_feature_levels, dec_points, num_classes, share_heads=True,
                                         refine=True, look_forward_twice=True, final_norm=True,
                                         pos_from_reference=True, inverse_sigmoid_eps=1e-3)
        self.query_selection = QuerySelection(d_model, num_classes, rank_by="max")
        self.tgt_embed = nn.Embedding(num_queries, d_model)        # learned content (mixed selection)
        # DeformableTransformer._reset_parameters runs after tgt_embed's normal_ init, so the
        # content table ends xavier-initialised too (DINO deformable_transformer.py)
        xavier_transformer_init(self.encoder.layers, self.decoder.layers, self.decoder.ref_point_head,
                                self.query_selection.enc_output, self.tgt_embed)
        self.denoising = denoising
        self.dn_cfg = dict(num_dn_queries=num_dn_queries, label_noise_ratio=label_noise_ratio,
                           box_noise_scale=box_noise_scale, group_rule=dn_groups)
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
