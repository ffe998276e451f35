"""CLoCKDistill (Lan & Tian, WACV 2025, arXiv 2502.10683).

L = L_det(student) + w_lcmd * L_lcmd + w_tcld * L_tcld

* L_lcmd, location-and-context-aware memory distillation (Sec. 3.1): the encoder memory of
  teacher and student, reshaped into per-level maps, compared under a GT location mask and an
  FGD-style scale mask (grade C reconstruction; see distill/location_mask.py).
* L_tcld, target-aware consistent logit distillation (Sec. 3.2): queries built from the GT
  (distill/target_queries.py) go through both decoders behind an attention mask; the student's
  class and box outputs follow the teacher's, query by query, at every decoder layer, weighted
  by the teacher's confidence (grade B/C).

Every choice the paper's available text does not settle is a key of ``DEFAULTS`` with its grade.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.box_ops import box_cxcywh_to_xyxy, elementwise_generalized_box_iou
from models.outputs import DetectorOutput, GroupOutput

from .base import Distiller
from .location_mask import memory_masks
from .target_queries import TargetQueryGenerator

DEFAULTS = {
    "lcmd": True,              # grade A: memory distillation is one of the two parts
    "tcld": True,              # grade A: target-aware logit distillation is the other
    "lcmd_weight": 1.0,        # outer weights 1 unless tuned (grade C)
    "tcld_weight": 1.0,
    "alpha": 5.0e-5,           # foreground weight (grade C; tuned for tens of thousands of tokens)
    "beta": 1.0e-7,            # background weight (grade C)
    "location_mask": True,     # ablation: False = plain MSE over all image cells, weight alpha
    "positional": False,       # add each model's positional embedding to its memory (grade C)
    "feature_source": "memory",  # ablation: "memory" (the paper) or "backbone" (projected neck maps)
    "copies": 1,               # GT repeats (author's earlier code: 3; grade B)
    "num_random": 0,           # extra fixed general queries (grade B)
    "content_source": "table",  # fixed random class table (grade B) or "label_embedding"
    "cls_loss": "kl",          # "kl": T^2 KL of softmax(z/T) (grade C); "bce": sigmoid BCE form
    "temperature": 10.0,       # grade B (author's earlier code)
    "cls_weight": 1.0,         # grade C
    "l1_weight": 5.0,          # grade C
    "giou_weight": 2.0,        # grade C
    "all_layers": True,        # every decoder layer (grade C); False: last layer only
    "seed": 0,                 # seed of the fixed random tables
}


def aligned_layer(student_layer: int, student_layers: int, teacher_layers: int) -> int:
    """Teacher layer paired with a student layer when depths differ: last with last, evenly."""
    return round((student_layer + 1) * teacher_layers / student_layers) - 1


class CLoCKDistill(Distiller):
    name = "clockdistill"
    needs_teacher = True
    DEFAULTS = DEFAULTS

    def __init__(self, student, criterion, teacher=None, cfg=None):
        super().__init__(student, criterion, teacher, {**DEFAULTS, **(cfg or {})})
        unknown = set(self.cfg) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"clockdistill: unknown options {sorted(unknown)}")
        c = self.cfg
        if c["feature_source"] not in ("memory", "backbone"):
            raise ValueError(f"feature_source must be memory or backbone, got {c['feature_source']!r}")
        if c["cls_loss"] not in ("kl", "bce"):
            raise ValueError(f"cls_loss must be kl or bce, got {c['cls_loss']!r}")
        d_s, d_t = student.d_model, self.teacher.d_model
        # an adapter only where channel counts differ (a 1x1 conv on the maps = a Linear on tokens)
        self.adapter = nn.Linear(d_s, d_t) if d_s != d_t else nn.Identity()
        self.queries = TargetQueryGenerator(student.num_classes, c["copies"], c["num_random"],
                                            c["content_source"], c["seed"])
        self.weights = {"loss_lcmd": c["lcmd_weight"], "loss_tcld": c["tcld_weight"]}

    def forward(self, images: Tensor, pad_mask: Tensor, targets: list[dict]) -> dict[str, Tensor]:
        c = self.cfg
        plan = self.queries.plan(targets, images.device) if c["tcld"] else None
        student_groups = [self.queries.group_for(self.student, plan)] if plan is not None else None
        teacher_groups = [self.queries.group_for(self.teacher, plan)] if plan is not None else None
        student_out = self.student(images, pad_mask, targets, groups=student_groups)
        teacher_out = self.teacher_forward(images, pad_mask, groups=teacher_groups)
        losses = self.criterion(student_out, targets)
        if c["lcmd"]:
            losses["loss_lcmd"] = self.memory_loss(student_out, teacher_out, targets)
        if c["tcld"]:
            if plan is None:   # no objects and no general queries: keep the graph, add nothing
                losses["loss_tcld"] = student_out.layer_logits.sum() * 0.0
            else:
                losses["loss_tcld"] = self.logit_loss(student_out.groups["target"], teacher_out.groups["target"])
        return losses

    # -- L_lcmd ------------------------------------------------------------------------------
    def level_maps(self, out: DetectorOutput, adapt: bool) -> list[Tensor]:
        """Per-level [B,C,H,W] maps of the distilled representation."""
        c = self.cfg
        if c["feature_source"] == "backbone":
            maps = out.features
            if adapt:
                maps = [self.adapter(m.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) for m in maps]
            return maps
        tokens = out.memory + out.memory_pos if c["positional"] else out.memory
        if adapt:
            tokens = self.adapter(tokens)
        maps = []
        for (h, w), start in zip(out.spatial_shapes, out.level_start_index):
            maps.append(tokens[:, start:start + h * w].transpose(1, 2).reshape(tokens.shape[0], -1, h, w))
        return maps

    def memory_loss(self, student_out: DetectorOutput, teacher_out: DetectorOutput, targets) -> Tensor:
        c = self.cfg
        if student_out.spatial_shapes != teacher_out.spatial_shapes:
            raise ValueError(f"teacher and student memories have different levels: {teacher_out.spatial_shapes} "
                             f"vs {student_out.spatial_shapes}; choose sizes with the same feature levels")
        student_maps = self.level_maps(student_out, adapt=True)
        teacher_maps = self.level_maps(teacher_out, adapt=False)
        masks = memory_masks(targets, teacher_out.memory_padding_mask, teacher_out.spatial_shapes,
                             teacher_out.level_start_index, teacher_out.valid_ratios)
        batch = student_out.memory.shape[0]
        loss = student_out.memory.new_zeros(())
        for s_map, t_map, (location, scale, image) in zip(student_maps, teacher_maps, masks):
            sq = ((t_map.float() - s_map.float()) ** 2).sum(1)          # [B,H,W], summed over channels
            if c["location_mask"]:
                fg = (location * scale * sq).sum()
                bg = ((1 - location) * image * scale * sq).sum()
                loss = loss + c["alpha"] * fg + c["beta"] * bg
            else:
                n_valid = image.flatten(1).sum(1).clamp(min=1)[:, None, None]
                loss = loss + c["alpha"] * (image * sq / n_valid).sum()
        return loss / batch

    # -- L_tcld ------------------------------------------------------------------------------
    def logit_loss(self, student: GroupOutput, teacher: GroupOutput) -> Tensor:
        c = self.cfg
        valid = student.group.valid                                   # [B,N]
        s_layers, t_layers = student.layer_logits.shape[0], teacher.layer_logits.shape[0]
        layers = range(s_layers) if c["all_layers"] else [s_layers - 1]
        total = student.layer_logits.new_zeros(())
        for e in layers:
            te = aligned_layer(e, s_layers, t_layers)
            z_s, z_t = student.layer_logits[e][valid].float(), teacher.layer_logits[te][valid].float()
            b_s, b_t = student.layer_boxes[e][valid].float(), teacher.layer_boxes[te][valid].float()
            weight = z_t.sigmoid().max(-1).values.detach()            # teacher confidence
            norm = weight.sum().clamp(min=1e-6)
            temp = c["temperature"]
            if c["cls_loss"] == "kl":
                cls = F.kl_div(F.log_softmax(z_s / temp, -1), F.softmax(z_t / temp, -1), reduction="none").sum(-1)
            else:
                cls = F.binary_cross_entropy_with_logits(z_s / temp, (z_t / temp).sigmoid(), reduction="none").sum(-1)
                cls = cls - F.binary_cross_entropy_with_logits(z_t / temp, (z_t / temp).sigmoid(),
                                                               reduction="none").sum(-1)   # zero at equality
            cls = cls * temp ** 2
            l1 = (b_s - b_t).abs().sum(-1)
            giou = 1 - elementwise_generalized_box_iou(box_cxcywh_to_xyxy(b_s), box_cxcywh_to_xyxy(b_t))
            per_query = c["cls_weight"] * cls + c["l1_weight"] * l1 + c["giou_weight"] * giou
            total = total + (weight * per_query).sum() / norm
        return total
