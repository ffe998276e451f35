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
    """DAB-DETR encoder: DETR layers whose positional embedding is rescaled per token
    (IDEA-Research/DAB-DETR models/DAB_DETR/transformer.py ``TransformerEncoder``; post-norm, so
    no final norm)."""

    def __init__(self, d_model, n_heads, dim_feedforward, dropout, num_layers, activation="relu"):
        super().__init__()
        self.layers = clones(EncoderLayer(d_model, n_heads, dim_feedforward, dropout, activation), num_layers)
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
            # arange + 0.5 equals linspace(0.5, h - 0.5, h) exactly, and also exports to ONNX for a
            # level of size 1 (the exported linspace divides by steps - 1: NaN)
            ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=device) + 0.5,
                                    torch.arange(w, dtype=torch.float32, device=device) + 0.5, indexing="ij")
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
    """Deformable DETR / DINO decoder (fundamentalvision/Deformable-DETR and IDEA-Research/DINO
    models/dino/deformable_transformer.py ``DeformableTransformerDecoder``).

    References are 4-D for every query. ``point_queries`` ([T] bool) marks queries whose reference
    is a 2-D point (Deformable DETR one-stage): they carry (cx, cy, 0.5, 0.5), sample with the
    point formula of deformable attention, and since logit(0.5) = 0 the box head's w, h come out
    as sigmoid(delta), exactly the original's ``delta[..., :2] += inverse_sigmoid(ref)``. After a
    refinement step every reference is a box, as in the original. Each layer's anchor update
    reads the *un-normed* layer output and the reported class/box read the normed one (DINO; the
    Deformable DETR decoder has no final norm, so both are the same there).

    ``pos_from_reference`` (DINO): the positional query is recomputed from each layer's anchor as
    MLP(sine(anchor)); otherwise the ``query_pos`` given to forward stays fixed across layers
    (Deformable DETR). ``inverse_sigmoid_eps``: 1e-5 in Deformable DETR's util/misc.py, 1e-3 in
    DINO's.
    """

    def __init__(self, d_model, n_heads, dim_feedforward, dropout, num_layers, n_levels, n_points, num_classes,
                 share_heads=False, refine=True, look_forward_twice=False, final_norm=False,
                 pos_from_reference=False, inverse_sigmoid_eps=1e-5):
        super().__init__(d_model, num_classes, num_layers, share_heads, refine, look_forward_twice, final_norm)
        layer = DeformableDecoderLayer(d_model, n_heads, dim_feedforward, dropout, n_levels, n_points)
        self.layers = clones(layer, num_layers)
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2) if pos_from_reference else None
        self.d_model = d_model
        self.eps = inverse_sigmoid_eps

    def forward(self, content, anchors, memory, memory_padding_mask, spatial_shapes, valid_ratios,
                self_attn_mask=None, query_pos=None, return_attention=False, point_queries=None, **_):
        output, reference, previous_box = content, anchors, anchors
        logits, boxes, states, references, attention = [], [], [], [], []
        scale = torch.cat([valid_ratios, valid_ratios], -1)[:, None]          # [B,1,L,4]
        for i, layer in enumerate(self.layers):
            reference_input = reference[:, :, None] * scale
            pos = query_pos
            if self.ref_point_head is not None:
                pos = self.ref_point_head(sine_box_embedding(reference_input[:, :, 0], self.d_model // 2).to(output.dtype))
            output, attn = layer(output, pos, reference_input, memory, spatial_shapes, memory_padding_mask,
                                 self_attn_mask, return_attention, point_queries)
            state = self.norm(output)
            head = self.box_heads[i]
            delta = head(state)
            raw_delta = delta if state is output else head(output)
            new_reference = (raw_delta + inverse_sigmoid(reference, self.eps)).sigmoid()
            base = previous_box if self.look_forward_twice else reference
            box = (delta + inverse_sigmoid(base, self.eps)).sigmoid()
            logits.append(self.class_heads[i](state)), boxes.append(box), states.append(state)
            references.append(reference)
            if attn is not None:
                attention.append(attn)
            if self.refine:
                previous_box = new_reference
                reference = new_reference.detach()
                point_queries = None          # refined references are boxes (Deformable DETR)
        return self.stack(logits, boxes, states, references, attention)


def xavier_transformer_init(*modules: nn.Module) -> None:
    """``DeformableTransformer._reset_parameters`` of Deformable DETR and DINO
    (fundamentalvision/Deformable-DETR and IDEA-Research/DINO ``deformable_transformer.py``):
    xavier_uniform_ on every parameter with more than one dimension, then every deformable
    attention its own initialisation. Pass only the modules that live inside the original's
    transformer (not the prediction heads, which keep their own initialisation). Our
    ``SelfAttention`` stands for ``nn.MultiheadAttention``: its q, k, v are one fused [3d, d]
    ``in_proj_weight`` there, so they get xavier bounds of the fused matrix, and all its biases
    start at 0 (``nn.MultiheadAttention._reset_parameters``)."""
    from .deformable_attention import MultiScaleDeformableAttention
    from .layers import SelfAttention

    for module in modules:
        for param in module.parameters():
            if param.dim() > 1:
                nn.init.xavier_uniform_(param)
        for sub in module.modules():
            if isinstance(sub, SelfAttention):
                d = sub.q_proj.in_features
                fused = torch.empty(3 * d, d)
                nn.init.xavier_uniform_(fused)
                with torch.no_grad():
                    for proj, part in zip((sub.q_proj, sub.k_proj, sub.v_proj), fused.split(d)):
                        proj.weight.copy_(part)
                for proj in (sub.q_proj, sub.k_proj, sub.v_proj, sub.out_proj):
                    nn.init.zeros_(proj.bias)
            elif isinstance(sub, MultiScaleDeformableAttention):
                sub.reset_parameters()


class ConditionalDecoder(BoxDecoder):
    """DAB-DETR decoder: anchors give positional queries, modulated by the anchor's w and h.

    As IDEA-Research/DAB-DETR models/DAB_DETR/transformer.py ``TransformerDecoder`` and
    models/DAB_DETR/DABDETR.py ``forward`` (grade A): each layer's anchor update is the shared box
    head on the layer's *un-normed* output; the reported boxes and logits use the normed output
    (the shared final norm), and a layer's box is built on the anchor it received *undetached*
    (the previous layer's update), so its loss also reaches the previous layer, while the anchor
    fed to the next layer's positional query is detached.
    """

    def __init__(self, d_model, n_heads, dim_feedforward, dropout, num_layers, num_classes,
                 modulate_hw_attn=True, anchor_pos_temperature=10000.0, share_heads=True, activation="relu",
                 anchor_update_normed=False):
        super().__init__(d_model, num_classes, num_layers, share_heads, refine=True, final_norm=True)
        self.anchor_pos_temperature = anchor_pos_temperature
        # ``anchor_update_normed``: update anchors from the normed state, detached (our earlier
        # variant; not DAB-DETR's)
        self.anchor_update_normed = anchor_update_normed
        layer = ConditionalDecoderLayer(d_model, n_heads, dim_feedforward, dropout, activation)
        self.layers = clones(layer, num_layers)
        for layer in self.layers[1:]:
            layer.ca_qpos = None      # DAB-DETR adds the positional query to the content only in layer 1
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.query_scale = MLP(d_model, d_model, d_model, 2)
        self.ref_anchor_head = MLP(d_model, d_model, 2, 2) if modulate_hw_attn else None
        self.d_model = d_model

    def forward(self, content, anchors, memory, memory_pos, memory_padding_mask, self_attn_mask=None,
                return_attention=False, **_):
        d = self.d_model
        # reference: detached anchor of this layer's positional queries; box_base: the same
        # anchor undetached, on which the reported box is built (DAB-DETR's ``ref_points``)
        output, reference, box_base = content, anchors, anchors
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
            box = (self.box_heads[i](state) + inverse_sigmoid(box_base)).sigmoid()
            logits.append(self.class_heads[i](state)), boxes.append(box), states.append(state)
            references.append(reference)
            if attn is not None:
                attention.append(attn)
            if i < len(self.layers) - 1:   # the last layer's update would feed nothing
                if self.anchor_update_normed:
                    box_base = box.detach()
                else:
                    box_base = (self.box_heads[i](output) + inverse_sigmoid(reference)).sigmoid()
                reference = box_base.detach()
        return self.stack(logits, boxes, states, references, attention)


# --- two-stage proposals --------------------------------------------------------------------
def encoder_output_proposals(memory: Tensor, padding_mask: Tensor, spatial_shapes):
    """One box proposal per memory token (Deformable DETR two-stage, Sec. 4.2): centred on the
    cell, size 0.05 * 2^level. Returns masked memory and inverse-sigmoid proposals [B,S,4];
    padding and border tokens get +inf proposals and zero memory (Deformable-DETR
    models/deformable_transformer.py ``gen_encoder_output_proposals``)."""
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
    top-k. ``rank_by``: ``first`` ranks by class 0's logit (Deformable DETR, whose encoder head
    is trained as a binary foreground head: fundamentalvision/Deformable-DETR
    models/deformable_transformer.py ``topk(enc_outputs_class[..., 0])``), ``max`` by the best
    class (DINO models/dino/deformable_transformer.py). As in both, padding and border tokens
    are not excluded from the ranking: their proposal is +inf (box 1) and their feature 0, and
    the encoder loss teaches their score down. Returns the selected proposals' logits and boxes
    (DINO's encoder loss), all tokens' logits and boxes (Deformable DETR's), the selected anchors
    (detached, as both papers do) and memory features.
    """

    def __init__(self, d_model: int, num_classes: int, rank_by: str = "max"):
        super().__init__()
        if rank_by not in ("max", "first"):
            raise ValueError(f"rank_by must be max or first, got {rank_by!r}")
        self.rank_by = rank_by
        self.enc_output = nn.Linear(d_model, d_model)
        self.enc_norm = nn.LayerNorm(d_model)
        self.class_head, self.box_head = (m[0] for m in prediction_heads(d_model, num_classes, 1, share=True))

    def forward(self, memory, padding_mask, spatial_shapes, k: int):
        output_memory, proposals = encoder_output_proposals(memory, padding_mask, spatial_shapes)
        output_memory = self.enc_norm(self.enc_output(output_memory))
        logits = self.class_head(output_memory)
        boxes_unact = self.box_head(output_memory) + proposals
        k = min(k, memory.shape[1])
        scores = logits[..., 0] if self.rank_by == "first" else logits.max(-1).values
        topk = scores.topk(k, dim=1).indices
        take = lambda t: torch.gather(t, 1, topk[..., None].expand(-1, -1, t.shape[-1]))  # noqa: E731
        selected_unact = take(boxes_unact)
        return {
            "logits": take(logits),
            "boxes": selected_unact.sigmoid(),
            "all_logits": logits,
            "all_boxes": boxes_unact.sigmoid(),
            "anchors": selected_unact.detach().sigmoid(),
            "memory": take(output_memory),
        }
