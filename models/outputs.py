"""What a detector's forward returns, and the extra-query groups its decoder accepts.

Distillation reads these objects and never reaches into a model with hooks, so a method
works on any detector that returns them.
Shapes use: B batch, Q detection queries, N queries of an extra group, L decoder layers,
K classes, D d_model, S memory tokens (sum of H_l*W_l over levels).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class QueryGroup:
    """Extra decoder queries decoded next to the detection queries, in the same pass.

    DINO's denoising groups, CLoCKDistill's target-aware queries and KD-DETR's distillation
    points all use this one path. The decoder builds the self-attention mask so that
    detection queries never see a group, groups never see each other, and a group sees the
    detection queries only if ``see_detection_queries`` (DINO lets its denoising queries do so;
    target-aware queries must not, or teacher and student would condition on different things).
    """

    name: str
    content: Tensor                       # [B,N,D] content vectors
    boxes: Tensor                         # [B,N,4] anchor boxes, normalised cxcywh in (0,1)
    valid: Tensor | None = None           # [B,N] bool; False marks padding slots
    self_attn_mask: Tensor | None = None  # [N,N] bool, True = blocked (structure inside the group)
    see_detection_queries: bool = False
    meta: dict = field(default_factory=dict)

    @property
    def num_queries(self) -> int:
        return self.content.shape[1]


@dataclass
class GroupOutput:
    """Per-layer decoder outputs of one QueryGroup."""

    layer_logits: Tensor       # [L,B,N,K]
    layer_boxes: Tensor        # [L,B,N,4]
    layer_states: Tensor       # [L,B,N,D]
    layer_references: Tensor   # [L,B,N,4] anchor each layer received (detached input)
    group: QueryGroup
    cross_attention: list[dict] | None = None


@dataclass
class DetectorOutput:
    """One object with everything the criterion, the distillers and the notebooks read."""

    layer_logits: Tensor           # [L,B,Q,K] classification logits of the detection queries
    layer_boxes: Tensor            # [L,B,Q,4] boxes, normalised cxcywh
    layer_states: Tensor           # [L,B,Q,D] decoder hidden states after each layer's norm
    layer_references: Tensor       # [L,B,Q,4] anchors each layer received
    memory: Tensor                 # [B,S,D] encoder output
    memory_pos: Tensor             # [B,S,D] positional (+ level) embedding of the memory
    memory_padding_mask: Tensor    # [B,S] bool, True on padding
    spatial_shapes: list[tuple[int, int]]
    level_start_index: list[int]
    valid_ratios: Tensor           # [B,levels,2] (w, h) fraction of each level that is image
    features: list[Tensor]         # per level [B,D,H,W]: projected backbone features (the "neck")
    # encoder proposals: DINO's selected top-k [B,Q,K]; Deformable DETR two-stage: every memory
    # token [B,S,K] (its encoder loss covers all of them)
    enc_logits: Tensor | None = None
    enc_boxes: Tensor | None = None
    groups: dict[str, GroupOutput] = field(default_factory=dict)
    # per decoder layer, on request (return_attention=True): deformable layers give
    # {"sampling_locations": [B,T,H,levels,P,2], "attention_weights": [B,T,H,levels,P]},
    # DAB-DETR's dense cross-attention gives {"attention_weights": [B,T,H,S]}; T = all queries
    # in decoder order (detection queries first, then the groups in the order given).
    cross_attention: list[dict] | None = None

    @property
    def logits(self) -> Tensor:
        return self.layer_logits[-1]

    @property
    def boxes(self) -> Tensor:
        return self.layer_boxes[-1]

    @property
    def num_levels(self) -> int:
        return len(self.spatial_shapes)
