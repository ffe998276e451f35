"""Encoders and decoders built from models/layers.py, with per-layer box refinement.

Every decoder takes content vectors and 4-D anchor boxes for *all* queries (detection
queries followed by extra groups) and a self-attention mask, and returns per-layer logits,
boxes, states and the references each layer received.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from .box_ops import inverse_sigmoid
from .layers import MLP, ConditionalDecoderLayer, DeformableDecoderLayer, DeformableEncoderLayer, EncoderLayer
from .position_encoding import sine_box_embedding


def clones(module: nn.Module, n: int) -> nn.ModuleList:
    return nn.ModuleList(copy.deepcopy(module) for _ in range(n))


def prediction_heads(d_model: int, num_classes: int, num_layers: int, share: bool):
    """Class and box heads, one pair per decoder layer (``share``: the same pair for all)."""
    class_head = nn.Linear(d_model, num_classes)
    box_head = MLP(d_model, d_model, 4, 3)
    # focal-loss prior: start every class at probability 0.01 (RetinaNet, Deformable DETR)
    nn.init.constant_(class_head.bias, -4.595)
    nn.init.zeros_(box_head.layers[-1].weight)
    nn.init.zeros_(box_head.layers[-1].bias)
    if share:
        return nn.ModuleList([class_head] * num_layers), nn.ModuleList([box_head] * num_layers)
    return clones(class_head, num_layers), clones(box_head, num_layers)


# --- encoders -------------------------------------------------------------------------------
class StandardEncoder(nn.Module):
    """DAB-DETR encoder: DETR layers whose positional embedding is rescaled per token."""

    def __init__(self, d_model, n_heads, dim_feedforward, dropout, num_layers):
        super().__init__()
        self.layers = clones(EncoderLayer(d_model, n_heads, dim_feedforward, dropout), num_layers)
        self.query_scale = MLP(d_model, d_model, d_model, 2)

    def forward(self, src, pos, padding_mask, **_):
        for layer in self.layers:
            src = layer(src, pos * self.query_scale(src), padding_mask)
        return src


class DeformableEncoder(nn.Module):
    def __init__(self, d_model, n_heads, dim_feedforward, dropout, num_layers, n_levels, n_points):
        super().__init__()
        layer = DeformableEncoderLayer(d_model, n_heads, dim_feedforward, dropout, n_levels, n_points)
        self.layers = clones(layer, num_layers)

    @staticmethod
    def reference_points(spatial_shapes, valid_ratios: Tensor) -> Tensor:
        """Centre of every cell of every level, in each level's valid area: [B,S,L,2]."""
        refs = []
        device = valid_ratios.device
        for lvl, (h, w) in enumerate(spatial_shapes):
            ys, xs = torch.meshgrid(torch.linspace(0.5, h - 0.5, h, device=device),
                                    torch.linspace(0.5, w - 0.5, w, device=device), indexing="ij")
            ys = ys.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
            xs = xs.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
            refs.append(torch.stack((xs, ys), -1))
        refs = torch.cat(refs, 1)
        return refs[:, :, None] * valid_ratios[:, None]

    def forward(self, src, pos, padding_mask, spatial_shapes, valid_ratios):
        refs = self.reference_points(spatial_shapes, valid_ratios).to(src.dtype)
        for layer in self.layers:
            src = layer(src, pos, refs, spatial_shapes, padding_mask)
        return src


# --- decoders -------------------------------------------------------------------------------
class BoxDecoder(nn.Module):
    """The per-layer loop every decoder shares: run a layer, predict, refine the anchors.

    ``refine``: anchors are updated layer by layer (detached between layers, as in Deformable
    DETR's iterative refinement); ``look_forward_twice`` (DINO, Sec. 3.5): a layer's box
    prediction is built on the previous layer's *undetached* box, so its loss also updates the
    previous layer's head.
    """

    def __init__(self, d_model, num_classes, num_layers, share_heads, refine=True, look_forward_twice=False,
                 final_norm=True):
        super().__init__()
        self.class_heads, self.box_heads = prediction_heads(d_model, num_classes, num_layers, share_heads)
        self.norm = nn.LayerNorm(d_model) if final_norm else nn.Identity()
        self.refine, self.look_forward_twice = refine, look_forward_twice

    def predict(self, layer_id, state, reference, previous_box):
        delta = self.box_heads[layer_id](state)
        new_reference = (delta + inverse_sigmoid(reference)).sigmoid()
        if self.look_forward_twice:
            box = (delta + inverse_sigmoid(previous_box)).sigmoid()
        else:
            box = new_reference
        return self.class_heads[layer_id](state), box, new_reference

    @staticmethod
    def stack(logits, boxes, states, references, attention):
        return {"logits": torch.stack(logits), "boxes": torch.stack(boxes), "states": torch.stack(states),
                "references": torch.stack(references), "attention": attention or None}


class DeformableDecoder(BoxDecoder):
    """Deformable DETR / DINO decoder with 4-D box references.

    ``pos_from_reference`` (DINO, DAB-Deformable): the positional query is recomputed from each
    layer's anchor as MLP(sine(anchor)); otherwise the ``query_pos`` given to forward stays
    fixed across layers (Deformable DETR).
    """

    def __init__(self, d_model, n_heads, dim_feedforward, dropout, num_layers, n_levels, n_points, num_classes,
                 share_heads=False, refine=True, look_forward_twice=False, final_norm=False,
                 pos_from_reference=False):
        super().__init__(d_model, num_classes, num_layers, share_heads, refine, look_forward_twice, final_norm)
        layer = DeformableDecoderLayer(d_model, n_heads, dim_feedforward, dropout, n_levels, n_points)
        self.layers = clones(layer, num_layers)
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2) if pos_from_reference else None
        self.d_model = d_model

    def forward(self, content, anchors, memory, memory_padding_mask, spatial_shapes, valid_ratios,
                self_attn_mask=None, query_pos=None, return_attention=False, **_):
        output, reference, previous_box = content, anchors, anchors
        logits, boxes, states, references, attention = [], [], [], [], []
        scale = torch.cat([valid_ratios, valid_ratios], -1)[:, None]          # [B,1,L,4]
        for i, layer in enumerate(self.layers):
            reference_input = reference[:, :, None] * scale
            pos = query_pos
            if self.ref_point_head is not None:
                pos = self.ref_point_head(sine_box_embedding(reference_input[:, :, 0], self.d_model // 2).to(output.dtype))
            output, attn = layer(output, pos, reference_input, memory, spatial_shapes, memory_padding_mask,
                                 self_attn_mask, return_attention)
            state = self.norm(output)
            layer_logits, box, new_reference = self.predict(i, state, reference, previous_box)
            logits.append(layer_logits), boxes.append(box), states.append(state), references.append(reference)
            if attn is not None:
                attention.append(attn)
            if self.refine:
                previous_box = new_reference
                reference = new_reference.detach()
        return self.stack(logits, boxes, states, references, attention)


class ConditionalDecoder(BoxDecoder):
    """DAB-DETR decoder: anchors give positional queries, modulated by the anchor's w and h."""

    def __init__(self, d_model, n_heads, dim_feedforward, dropout, num_layers, num_classes,
                 modulate_hw_attn=True, anchor_pos_temperature=10000.0, share_heads=True):
        super().__init__(d_model, num_classes, num_layers, share_heads, refine=True, final_norm=True)
        self.anchor_pos_temperature = anchor_pos_temperature
        self.layers = clones(ConditionalDecoderLayer(d_model, n_heads, dim_feedforward, dropout), num_layers)
        for layer in self.layers[1:]:
            layer.ca_qpos = None      # DAB-DETR adds the positional query to the content only in layer 1
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.query_scale = MLP(d_model, d_model, d_model, 2)
        self.ref_anchor_head = MLP(d_model, d_model, 2, 2) if modulate_hw_attn else None
        self.d_model = d_model

    def forward(self, content, anchors, memory, memory_pos, memory_padding_mask, self_attn_mask=None,
                return_attention=False, **_):
        d = self.d_model
        output, reference = content, anchors
        logits, boxes, states, references, attention = [], [], [], [], []
        for i, layer in enumerate(self.layers):
            sine = sine_box_embedding(reference, d // 2, self.anchor_pos_temperature).to(output.dtype)  # y, x, w, h
            query_pos = self.ref_point_head(sine)
            pos_scale = 1.0 if i == 0 else self.query_scale(output)
            query_sine = sine[..., :d] * pos_scale
            if self.ref_anchor_head is not None:
                # width/height-modulated attention (DAB-DETR Sec. 4.3): x part by w, y part by h
                ref_hw = self.ref_anchor_head(output).sigmoid()
                query_sine = torch.cat([query_sine[..., : d // 2] * (ref_hw[..., 1] / reference[..., 3])[..., None],
                                        query_sine[..., d // 2:] * (ref_hw[..., 0] / reference[..., 2])[..., None]], -1)
            output, attn = layer(output, query_pos, query_sine, memory, memory_pos, memory_padding_mask,
                                 self_attn_mask, return_attention)
            state = self.norm(output)
            layer_logits, box, new_reference = self.predict(i, state, reference, reference)
            logits.append(layer_logits), boxes.append(box), states.append(state), references.append(reference)
            if attn is not None:
                attention.append(attn)
            reference = new_reference.detach()
        return self.stack(logits, boxes, states, references, attention)


# --- two-stage proposals --------------------------------------------------------------------
def encoder_output_proposals(memory: Tensor, padding_mask: Tensor, spatial_shapes):
    """One box proposal per memory token (Deformable DETR two-stage, Sec. 4.2): centred on the
    cell, size 0.05 * 2^level. Returns masked memory and inverse-sigmoid proposals [B,S,4];
    padding and border tokens get +inf proposals so they are never selected."""
    batch = memory.shape[0]
    proposals, start = [], 0
    for lvl, (h, w) in enumerate(spatial_shapes):
        mask = padding_mask[:, start:start + h * w].view(batch, h, w)
        valid_h = (~mask[:, :, 0]).sum(1)
        valid_w = (~mask[:, 0, :]).sum(1)
        ys, xs = torch.meshgrid(torch.arange(h, device=memory.device), torch.arange(w, device=memory.device),
                                indexing="ij")
        grid = torch.stack([xs, ys], -1).float()[None] + 0.5
        scale = torch.stack([valid_w, valid_h], 1).view(batch, 1, 1, 2).float()
        grid = grid / scale
        wh = torch.full_like(grid, 0.05 * (2.0 ** lvl))
        proposals.append(torch.cat([grid, wh], -1).view(batch, -1, 4))
        start += h * w
    proposals = torch.cat(proposals, 1)
    keep = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
    proposals = torch.log(proposals / (1 - proposals))
    proposals = proposals.masked_fill(padding_mask[..., None] | ~keep, float("inf"))
    memory = memory.masked_fill(padding_mask[..., None] | ~keep, 0.0)
    return memory, proposals


class QuerySelection(nn.Module):
    """Two-stage query selection (Deformable DETR Sec. 4.2; DINO's mixed selection, Sec. 3.4).

    Scores every memory token with its own class head, refines its proposal box, keeps the
    top-k by best class score. Returns the selected proposals' logits and boxes (supervised by
    the encoder loss), their anchors (detached, as both papers do) and their memory features.
    """

    def __init__(self, d_model: int, num_classes: int):
        super().__init__()
        self.enc_output = nn.Linear(d_model, d_model)
        self.enc_norm = nn.LayerNorm(d_model)
        self.class_head, self.box_head = (m[0] for m in prediction_heads(d_model, num_classes, 1, share=True))

    def forward(self, memory, padding_mask, spatial_shapes, k: int):
        output_memory, proposals = encoder_output_proposals(memory, padding_mask, spatial_shapes)
        output_memory = self.enc_norm(self.enc_output(output_memory))
        logits = self.class_head(output_memory)
        boxes_unact = self.box_head(output_memory) + proposals
        k = min(k, memory.shape[1])
        scores = logits.max(-1).values.masked_fill(torch.isinf(proposals[..., 0]), float("-inf"))
        topk = scores.topk(k, dim=1).indices
        take = lambda t: torch.gather(t, 1, topk[..., None].expand(-1, -1, t.shape[-1]))  # noqa: E731
        selected_unact = take(boxes_unact)
        return {
            "logits": take(logits),
            "boxes": selected_unact.sigmoid(),
            "anchors": selected_unact.detach().sigmoid(),
            "memory": take(output_memory),
        }
