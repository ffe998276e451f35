"""Hungarian matching of predictions to ground truth (DETR, Carion et al., 2020, Sec. 3.1).

Costs follow Deformable DETR (Zhu et al., 2021) and DINO (Zhang et al., 2023): a focal-style
classification cost on sigmoid probabilities, L1 on normalised cxcywh boxes and -GIoU on xyxy.
"""
from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from .box_ops import box_cxcywh_to_xyxy, generalized_box_iou

Indices = list[tuple[Tensor, Tensor]]


def _empty_indices() -> tuple[Tensor, Tensor]:
    empty = torch.zeros(0, dtype=torch.int64)
    return empty, empty.clone()


def match_cost(
    logits: Tensor,
    boxes: Tensor,
    tgt_labels: Tensor,
    tgt_boxes: Tensor,
    cost_class: float = 2.0,
    cost_bbox: float = 5.0,
    cost_giou: float = 2.0,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
) -> Tensor:
    """Pairwise matching cost [P,M] between P predictions (logits [P,K], boxes [P,4]) and M GT.

    Class cost (Deformable DETR, models/matcher.py): the focal loss of calling the prediction
    positive for the GT class minus that of calling it negative, so that a query is charged only
    for how much better "object of this class" fits it than "background" does.
    """
    prob = logits.sigmoid()
    neg = (1 - focal_alpha) * prob.pow(focal_gamma) * -(1 - prob + 1e-8).log()
    pos = focal_alpha * (1 - prob).pow(focal_gamma) * -(prob + 1e-8).log()
    c_class = pos[:, tgt_labels] - neg[:, tgt_labels]
    c_bbox = torch.cdist(boxes, tgt_boxes, p=1)
    c_giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes))
    return cost_bbox * c_bbox + cost_class * c_class + cost_giou * c_giou


def _assign(cost: Tensor) -> tuple[Tensor, Tensor]:
    """Optimal assignment of a [Q,M] cost matrix; rows (predictions) come back sorted."""
    if cost.shape[1] == 0:
        return _empty_indices()
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)


class HungarianMatcher(nn.Module):
    """One-to-one assignment of the Q queries of each image to its GT boxes.

    Returns, per image, ``(pred_idx, gt_idx)`` as CPU int64 tensors of equal length
    min(Q, num_gt): query ``pred_idx[j]`` is matched to GT ``gt_idx[j]``. Images without GT
    get two empty tensors. Callers move the indices to their device themselves.
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ):
        super().__init__()
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    def cost(self, logits: Tensor, boxes: Tensor, tgt_labels: Tensor, tgt_boxes: Tensor) -> Tensor:
        # float32 even under autocast: half-precision logs/GIoU can reorder near-ties or give inf
        with torch.autocast(device_type=logits.device.type, enabled=False):
            return match_cost(
                logits.float(), boxes.float(), tgt_labels.to(logits.device),
                tgt_boxes.to(logits.device).float(), self.cost_class, self.cost_bbox,
                self.cost_giou, self.focal_alpha, self.focal_gamma,
            )

    @torch.no_grad()
    def match_single(self, logits: Tensor, boxes: Tensor, target: dict) -> tuple[Tensor, Tensor]:
        """Matching of one image: logits [Q,K], boxes [Q,4] against one target dict."""
        if target["labels"].numel() == 0:
            return _empty_indices()
        return _assign(self.cost(logits, boxes, target["labels"], target["boxes"]))

    @torch.no_grad()
    def forward(self, logits: Tensor, boxes: Tensor, targets: list[dict]) -> Indices:
        """logits [B,Q,K], boxes [B,Q,4] -> per image (pred_idx, gt_idx)."""
        batch, queries = logits.shape[:2]
        sizes = [int(t["labels"].numel()) for t in targets]
        if sum(sizes) == 0:
            return [_empty_indices() for _ in targets]
        # One cost matrix for the whole batch (one kernel launch instead of B), then the
        # per-image blocks on the diagonal are solved separately, as in DETR.
        tgt_labels = torch.cat([t["labels"] for t in targets])
        tgt_boxes = torch.cat([t["boxes"] for t in targets])
        cost = self.cost(logits.flatten(0, 1), boxes.flatten(0, 1), tgt_labels, tgt_boxes)
        cost = cost.view(batch, queries, -1).cpu()
        return [_assign(c[i]) for i, c in enumerate(cost.split(sizes, dim=-1))]


def hungarian_match_single(
    logits: Tensor, boxes: Tensor, target: dict, matcher: HungarianMatcher | None = None
) -> tuple[Tensor, Tensor]:
    """Pure single-image matching (logits [Q,K], boxes [Q,4]); default matcher weights."""
    return (matcher or HungarianMatcher()).match_single(logits, boxes, target)
