"""Per-query prediction-matching terms shared by the logit methods (KD-DETR, DETRDistill)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from models.box_ops import box_cxcywh_to_xyxy, elementwise_generalized_box_iou


def binary_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Per-class Bernoulli KL(teacher || student) of sigmoid probabilities, summed over classes, x T^2.

    Equals sigmoid BCE against the teacher's probabilities minus the teacher's entropy: the
    same gradient as the BCE, and zero for an identical student."""
    zs, zt = student_logits.float() / temperature, teacher_logits.float() / temperature
    pt = torch.sigmoid(zt)
    kl = pt * (F.logsigmoid(zt) - F.logsigmoid(zs)) + (1 - pt) * (F.logsigmoid(-zt) - F.logsigmoid(-zs))
    return kl.sum(-1) * temperature ** 2


def soft_bce(student_logits: Tensor, target_prob: Tensor) -> Tensor:
    """Sigmoid BCE against soft targets minus the targets' entropy, per element (>= 0).

    The gradient w.r.t. the logits is sigmoid(z) - p, exactly the plain BCE's; the offset is a
    constant of the teacher, so the value is 0 when the student reproduces the targets."""
    p = target_prob.float().clamp(0, 1)
    bce = F.binary_cross_entropy_with_logits(student_logits.float(), p, reduction="none")
    entropy = F.binary_cross_entropy(p, p, reduction="none")
    return bce - entropy


def box_losses(student_boxes: Tensor, teacher_boxes: Tensor) -> tuple[Tensor, Tensor]:
    """Per-item L1 (summed over the 4 coordinates, DETR's form) and 1 - GIoU of aligned cxcywh boxes."""
    s, t = student_boxes.float(), teacher_boxes.float()
    l1 = (s - t).abs().sum(-1)
    giou = elementwise_generalized_box_iou(box_cxcywh_to_xyxy(s), box_cxcywh_to_xyxy(t))
    return l1, 1 - giou
