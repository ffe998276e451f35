"""Read-only access to a detector's own decoder inputs for its detection queries.

KD-DETR's specific points and DETRDistill's query-prior assignment feed the *teacher's own*
queries (content + anchor, as its decoder received them) to the student. The anchors are in
``DetectorOutput.layer_references[0]``; the content is rebuilt from the model's parameters
without changing the model (no hooks, no writes):
- DINO: the learned content ``tgt_embed`` (mixed query selection);
- Deformable DETR two-stage: the content half of ``anchor_queries(anchors)`` (pos_trans);
  one-stage: the content half of ``query_embed``;
- DAB-DETR: zero content (its queries are anchors only).
The positional part is not passed: every detector recomputes it from the anchor for a group
exactly as for its detection queries, so a student identical to the teacher decodes the
teacher's queries exactly as the teacher did.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from models.outputs import DetectorOutput


@torch.no_grad()
def detection_query_inputs(model: nn.Module, out: DetectorOutput) -> tuple[Tensor, Tensor]:
    """(content [B,Q,D], anchors [B,Q,4]) the model's decoder received for its detection queries."""
    anchors = out.layer_references[0].detach()
    batch, num = anchors.shape[:2]
    if hasattr(model, "tgt_embed"):                                     # DINO
        content = model.tgt_embed.weight[:num][None].expand(batch, -1, -1)
    elif hasattr(model, "anchor_queries") and getattr(model, "two_stage", False):   # Deformable two-stage
        content = model.anchor_queries(anchors)[1]
    elif hasattr(model, "query_embed"):                                 # Deformable one-stage
        content = model.query_embed.weight[:num, model.d_model:][None].expand(batch, -1, -1)
    elif hasattr(model, "refpoint_embed"):                              # DAB-DETR
        content = anchors.new_zeros(batch, num, model.d_model)
    else:
        raise ValueError(f"{type(model).__name__}: no known detection-query inputs")
    return content.detach().clone(), anchors.clone()
