"""KD-DETR baseline: consistent distillation points shared by teacher and student decoders.

Paper: Y. Wang, X. Li, S. Weng, G. Zhang, H. Yue, H. Feng, J. Han, E. Ding, *KD-DETR: Knowledge
Distillation for Detection Transformer with Consistent Distillation Points Sampling*, CVPR 2024
(arXiv 2211.08071). The official code is **not public** (github.com/wennyuhey/KD-DETR holds only
a README), so this is our reading of the paper's description.

Idea: DETR's predictions have no fixed inputs that teacher and student share, so KD-DETR feeds
the same *distillation points* (object queries) to both decoders and distils the two nets'
predictions point by point. "General-to-specific" sampling: *general* points are random
queries spread over the image; *specific* points are the teacher's own object queries.

Our version (one teacher pass per step, with every point group):
- General points (group ``kd_points``): ``num_general`` random anchors (cx, cy ~ U(0,1),
  w, h ~ U(general_wh)) with content rows of a fixed seeded N(0,1) table (``content: table``;
  ``zeros`` = DAB-DETR's zero content), row i for point i. Anchors are redrawn every training
  step from a CPU generator seeded with ``seed`` and a step counter (a buffer: a resumed run
  draws the same anchors); ``resample: false`` keeps one set. Grade D (numbers and law ours).
- Specific points (group ``kd_specific``, ``specific: teacher_queries``): *all* of the
  teacher's detection queries exactly as its decoder received them, content and anchor
  (distill/query_inputs.py), grade C (the paper samples the teacher's queries). The teacher's
  outputs for them are its own detection outputs of the same pass, so no second teacher pass
  is needed; in the student they form one group that sees only itself, as the teacher's
  detection queries see only each other: an identical student reproduces them exactly
  (two-stage Deformable DETR, DINO, DAB-DETR; one-stage Deformable DETR recomputes the
  positional query from the anchor, a small mismatch). When widths differ the teacher's
  content cannot enter the student: its rows then come from the fixed table (grade D).
  ``specific: none`` uses general points only.
- Both groups are isolated from the detection queries (neither sees them nor is seen); the
  general points see each other (``points_see_each_other``), as a DN group's queries do.
- Loss per point i, weighted by the teacher's confidence w_i = max_k sigmoid(z_T) (detached;
  ``score_weighting``), normalised by sum w over all points of the layer:
    cls: binary KL between sigmoid(z_T/T) and sigmoid(z_S/T) per class, summed over classes, x T^2
         (= sigmoid BCE against the teacher's probabilities minus the teacher's entropy);
    bbox: L1 on normalised cxcywh; giou: 1 - GIoU.
  Keys loss_kd_cls / loss_kd_bbox / loss_kd_giou, inner weights 1 / 5 / 2 (DETR's box-loss
  weights, grade D); outer weight ``kd_weight`` (default 1).
- Layers (``layers``): ``all`` pairs every student decoder layer with a teacher layer by the
  shared rule of distill/layers.py and sums the pair losses; ``last`` uses the last layers.
"""
from __future__ import annotations

import torch
from torch import Tensor

from models.outputs import DetectorOutput, QueryGroup

from .base import Distiller, NotCacheable
from .features import model_width
from .layers import LAYER_MODES, layer_pairs
from .logit_losses import binary_kl, box_losses
from .options import check_choice
from .query_inputs import detection_query_inputs

__all__ = ["KDDETR", "binary_kl", "box_losses", "layer_pairs"]


class KDDETR(Distiller):
    """KD-DETR with general + teacher-specific distillation points (see the module docstring)."""

    name = "kd_detr"
    needs_teacher = True
    GROUP = "kd_points"
    SPECIFIC = "kd_specific"

    DEFAULTS = {
        "num_general": 100,         # random points per image; grade D
        "specific": "teacher_queries",  # teacher_queries (all of them, own content; grade C) | none
        "general_wh": [0.05, 0.5],  # range of random anchor width/height (image fraction); grade D
        "content": "table",         # general points' content: table (fixed N(0,1) rows) | zeros; grade D
        "resample": True,           # redraw general anchors every step; grade D
        "seed": 0,
        "points_see_each_other": True,  # self-attention inside the general group; grade D
        "layers": "all",            # all | last; grade D
        "temperature": 1.0,         # T of the class KL; grade D
        "score_weighting": True,    # weight points by teacher max score; grade C
        "w_cls": 1.0,               # grade D
        "w_bbox": 5.0,              # DETR's L1 weight; grade D
        "w_giou": 2.0,              # DETR's GIoU weight; grade D
        "kd_weight": 1.0,           # outer weight on the three terms
    }

    def __init__(self, student, criterion, teacher=None, cfg=None):
        super().__init__(student, criterion, teacher, {**self.DEFAULTS, **(cfg or {})})
        c = self.cfg
        check_choice(self.name, "specific", c["specific"], ("teacher_queries", "none"))
        check_choice(self.name, "content", c["content"], ("table", "zeros"))
        check_choice(self.name, "layers", c["layers"], LAYER_MODES)
        if int(c["num_general"]) <= 0 and c["specific"] == "none":
            raise ValueError("kd_detr: no distillation points (num_general 0 and specific none)")
        self.d_student, self.d_teacher = model_width(student), model_width(self.teacher)
        n_specific = int(getattr(self.teacher, "num_queries", 0)) if c["specific"] != "none" else 0
        rows = int(c["num_general"]) + n_specific
        gen = torch.Generator().manual_seed(int(c["seed"]))
        self.register_buffer("kd_content", torch.randn(max(rows, 1), max(self.d_student, self.d_teacher),
                                                       generator=gen))
        self.register_buffer("kd_step", torch.zeros((), dtype=torch.long))
        self.weights = {"loss_kd_cls": float(c["w_cls"]), "loss_kd_bbox": float(c["w_bbox"]),
                        "loss_kd_giou": float(c["w_giou"])}

    # -- distillation points --------------------------------------------------------------------
    def general_anchors(self, batch: int, device: torch.device) -> Tensor:
        n = int(self.cfg["num_general"])
        step = int(self.kd_step.item()) if self.cfg["resample"] else 0
        gen = torch.Generator().manual_seed(int(self.cfg["seed"]) * 1_000_003 + step)
        lo, hi = (float(v) for v in self.cfg["general_wh"])
        cxcy = torch.rand(batch, n, 2, generator=gen)
        wh = lo + (hi - lo) * torch.rand(batch, n, 2, generator=gen)
        return torch.cat([cxcy, wh], -1).to(device).clamp(1e-4, 1 - 1e-4)

    def table_rows(self, start: int, n: int, width: int, batch: int, dtype) -> Tensor:
        return self.kd_content[start:start + n, :width].to(dtype)[None].expand(batch, -1, -1)

    def general_groups(self, images: Tensor) -> tuple[QueryGroup, QueryGroup] | None:
        """The same general points for the teacher (width D_T) and the student (width D_S)."""
        n = int(self.cfg["num_general"])
        if n == 0:
            return None
        batch = images.shape[0]
        boxes = self.general_anchors(batch, images.device).detach()
        mask = None if self.cfg["points_see_each_other"] else ~torch.eye(n, dtype=torch.bool, device=boxes.device)

        def group(width: int) -> QueryGroup:
            if self.cfg["content"] == "zeros":
                content = boxes.new_zeros(batch, n, width)
            else:
                content = self.table_rows(0, n, width, batch, boxes.dtype)
            return QueryGroup(name=self.GROUP, content=content, boxes=boxes, self_attn_mask=mask,
                              see_detection_queries=False, meta={"num_general": n})

        if self.training:
            self.kd_step += 1
        return group(self.d_teacher), group(self.d_student)

    def specific_group(self, teacher_out: DetectorOutput) -> QueryGroup | None:
        """The teacher's own detection queries, for the student (see the module docstring)."""
        if self.cfg["specific"] == "none":
            return None
        content, anchors = detection_query_inputs(self.teacher, teacher_out)
        if self.d_student != self.d_teacher:
            n = anchors.shape[1]
            content = self.table_rows(int(self.cfg["num_general"]), n, self.d_student, anchors.shape[0],
                                      anchors.dtype)
        return QueryGroup(name=self.SPECIFIC, content=content, boxes=anchors, see_detection_queries=False)

    def teacher_groups(self, images, targets):
        if self.cfg["resample"] and int(self.cfg["num_general"]):
            raise NotCacheable("kd_detr redraws its general points every step (resample: true): live teacher")
        general = self.general_groups(images)
        return [general[0]] if general else None

    # -- training step --------------------------------------------------------------------------
    def forward(self, images, pad_mask, targets):
        general = self.general_groups(images)
        teacher_out = self.teacher_forward(images, pad_mask, groups=[general[0]] if general else None)
        student_groups = [general[1]] if general else []
        specific = self.specific_group(teacher_out)
        if specific is not None:
            student_groups.append(specific)
        student_out = self.student(images, pad_mask, targets, groups=student_groups or None)
        losses = self.criterion(student_out, targets)
        losses.update(self.kd_losses(student_out, teacher_out))
        return losses

    def point_outputs(self, student_out: DetectorOutput, teacher_out: DetectorOutput):
        """Per-layer (logits, boxes) of all points, student and teacher, concatenated over groups."""
        s_logits, s_boxes, t_logits, t_boxes = [], [], [], []
        if self.GROUP in student_out.groups:
            s, t = student_out.groups[self.GROUP], teacher_out.groups[self.GROUP]
            s_logits.append(s.layer_logits), s_boxes.append(s.layer_boxes)
            t_logits.append(t.layer_logits), t_boxes.append(t.layer_boxes)
        if self.SPECIFIC in student_out.groups:
            s = student_out.groups[self.SPECIFIC]
            s_logits.append(s.layer_logits), s_boxes.append(s.layer_boxes)
            t_logits.append(teacher_out.layer_logits), t_boxes.append(teacher_out.layer_boxes)
        cat = lambda xs: torch.cat(xs, 2)  # noqa: E731  [L,B,N,*]
        return cat(s_logits), cat(s_boxes), cat(t_logits), cat(t_boxes)

    def kd_losses(self, student_out: DetectorOutput, teacher_out: DetectorOutput) -> dict[str, Tensor]:
        s_logits, s_boxes, t_logits_all, t_boxes_all = self.point_outputs(student_out, teacher_out)
        temp = float(self.cfg["temperature"])
        cls = l1 = giou = None
        for i, j in layer_pairs(s_logits.shape[0], t_logits_all.shape[0], self.cfg["layers"]):
            t_logits = t_logits_all[j].float().detach()
            if self.cfg["score_weighting"]:
                w = t_logits.sigmoid().amax(-1)
            else:
                w = torch.ones(t_logits.shape[:2], device=t_logits.device)
            denom = w.sum().clamp(min=1e-6)
            c = (binary_kl(s_logits[i], t_logits, temp) * w).sum() / denom
            b_l1, b_giou = box_losses(s_boxes[i], t_boxes_all[j].detach())
            b_l1, b_giou = (b_l1 * w).sum() / denom, (b_giou * w).sum() / denom
            cls = c if cls is None else cls + c
            l1 = b_l1 if l1 is None else l1 + b_l1
            giou = b_giou if giou is None else giou + b_giou
        return {"loss_kd_cls": cls, "loss_kd_bbox": l1, "loss_kd_giou": giou}
