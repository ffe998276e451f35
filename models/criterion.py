"""Set-prediction losses of DETR-style detectors (DETR, Deformable DETR, DINO).

Losses are returned unweighted; ``SetCriterion.total`` applies the weights. Key scheme:
``loss_{cls,bbox,giou}`` for the last decoder layer, ``..._{i}`` for earlier layers
(i = 0..L-2), ``..._enc`` for two-stage encoder proposals, ``..._dn`` / ``..._dn_{i}`` for
DINO's denoising group. Every other query group (e.g. distillation's target-aware queries) is
ignored: it is neither matched nor supervised by the detection loss.
"""
from __future__ import annotations

import re

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .box_ops import box_cxcywh_to_xyxy, elementwise_generalized_box_iou
from .matcher import HungarianMatcher, Indices
from .outputs import DetectorOutput, GroupOutput
from .query_groups import denoising_targets

DEFAULT_WEIGHTS = {"loss_cls": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}
_SUFFIX = re.compile(r"(_enc|_dn)?(_\d+)?$")


def base_name(key: str) -> str:
    """``loss_cls_dn_3`` -> ``loss_cls``; strips the layer / encoder / denoising suffixes."""
    return _SUFFIX.sub("", key, count=1)


def sigmoid_focal_loss(
    logits: Tensor,
    targets: Tensor,
    num_boxes: float,
    alpha: float = 0.25,
    gamma: float = 2.0,
    valid: Tensor | None = None,
) -> Tensor:
    """Focal loss (Lin et al., 2017, RetinaNet) on logits [B,Q,K] with 0/1 targets [B,Q,K].

    Normalisation as in Deformable DETR: per-element losses are averaged over the query axis,
    summed over batch and classes, and divided by ``num_boxes``. (Deformable DETR and DINO then
    multiply by Q, so the loss they optimise is sum / num_boxes; ``SetCriterion`` does the same.)
    ``valid`` [B,Q] bool zeroes slots that must not contribute at all (padding).
    """
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    if valid is not None:
        loss = loss * valid[..., None].to(loss.dtype)
    return loss.mean(1).sum() / num_boxes


def _num_boxes(targets: list[dict], device: torch.device) -> float:
    """Average GT count per rank (DETR): all-reduced so every rank normalises identically."""
    n = torch.as_tensor([float(sum(t["labels"].numel() for t in targets))], device=device)
    world = 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(n)
        world = dist.get_world_size()
    return torch.clamp(n / world, min=1).item()


class SetCriterion(nn.Module):
    """Focal classification + L1 + GIoU losses after Hungarian matching (Deformable DETR, DINO).

    ``weight_dict`` overrides the default weights per base name (Deformable DETR / DINO use
    ``{"loss_cls": 2.0}`` with the same box weights). ``last_indices`` holds the final decoder
    layer's matching of the latest forward (read by the DETRDistill baseline).
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        weight_dict: dict[str, float] | None = None,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        aux_loss: bool = True,
        encoder_binary_labels: bool = False,
    ):
        """``encoder_binary_labels``: the encoder-output loss matches and trains with every GT
        label set to 0 (Deformable DETR two-stage: fundamentalvision/Deformable-DETR
        models/deformable_detr.py ``SetCriterion.forward``, ``bin_targets``); otherwise with the
        full labels (DINO)."""
        super().__init__()
        self.encoder_binary_labels = encoder_binary_labels
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = {**DEFAULT_WEIGHTS, **(weight_dict or {})}
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.aux_loss = aux_loss
        self.last_indices: Indices | None = None

    # ---- loss on one set of predictions ---------------------------------------------------

    def set_losses(
        self,
        logits: Tensor,
        boxes: Tensor,
        batch_idx: Tensor,
        src_idx: Tensor,
        tgt_labels: Tensor,
        tgt_boxes: Tensor,
        num_boxes: float,
        valid: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Losses of logits [B,Q,K], boxes [B,Q,4] whose slots (batch_idx, src_idx) are
        assigned the GT (tgt_labels, tgt_boxes); every other slot is background."""
        # float32: the focal loss's log/pow are unstable in half precision
        logits, boxes = logits.float(), boxes.float()
        onehot = torch.zeros_like(logits)
        onehot[batch_idx, src_idx, tgt_labels] = 1.0
        loss_cls = sigmoid_focal_loss(
            logits, onehot, num_boxes, self.focal_alpha, self.focal_gamma, valid
        ) * logits.shape[1]
        # Indexing with empty indices still keeps ``boxes`` in the graph, so with no GT the box
        # losses are an exact 0 that back-propagates zeros (DDP sees every parameter used).
        src_boxes = boxes[batch_idx, src_idx]
        tgt_boxes = tgt_boxes.float()
        loss_bbox = F.l1_loss(src_boxes, tgt_boxes, reduction="sum") / num_boxes
        giou = elementwise_generalized_box_iou(
            box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(tgt_boxes)
        )
        loss_giou = (1 - giou).sum() / num_boxes
        return {"loss_cls": loss_cls, "loss_bbox": loss_bbox, "loss_giou": loss_giou}

    def matched_losses(
        self, logits: Tensor, boxes: Tensor, targets: list[dict], num_boxes: float
    ) -> tuple[dict[str, Tensor], Indices]:
        """Hungarian-match one prediction set to ``targets`` and compute its losses."""
        indices = self.matcher(logits, boxes, targets)
        device = logits.device
        batch_idx = torch.cat(
            [torch.full_like(src, b) for b, (src, _) in enumerate(indices)]
        ).to(device)
        src_idx = torch.cat([src for src, _ in indices]).to(device)
        tgt_labels = torch.cat(
            [t["labels"].to(device)[gt.to(device)] for t, (_, gt) in zip(targets, indices)]
        )
        tgt_boxes = torch.cat(
            [t["boxes"].to(device)[gt.to(device)] for t, (_, gt) in zip(targets, indices)]
        ).reshape(-1, 4)
        losses = self.set_losses(
            logits, boxes, batch_idx, src_idx, tgt_labels, tgt_boxes, num_boxes
        )
        return losses, indices

    @staticmethod
    def denoising_assignment(dn: GroupOutput, targets: list[dict]) -> dict:
        """Which DN slots reconstruct which GT: the same for every decoder layer, so built once."""
        device = dn.layer_logits.device
        meta = dn.group.meta
        assert len(meta["counts"]) == len(targets), "DN group was built for other targets"
        batch_idx, slot_idx, gt_idx, positive = (
            x.to(device) for x in denoising_targets(meta, targets)
        )
        # GT of (image b, index j) sits at offsets[b] + j in the concatenated targets
        counts = torch.as_tensor([t["labels"].numel() for t in targets], device=device)
        offsets = torch.cumsum(counts, 0) - counts
        flat = (offsets[batch_idx] + gt_idx)[positive]
        all_labels = torch.cat([t["labels"].to(device) for t in targets])
        all_boxes = torch.cat([t["boxes"].to(device) for t in targets]).reshape(-1, 4)
        return {"batch_idx": batch_idx[positive], "slot_idx": slot_idx[positive], "labels": all_labels[flat],
                "boxes": all_boxes[flat], "num_groups": meta["num_groups"],
                "valid": dn.group.valid.to(device) if dn.group.valid is not None else None}

    def denoising_losses(
        self, dn: GroupOutput, layer: int, assignment: dict, num_boxes: float
    ) -> dict[str, Tensor]:
        """DINO's DN losses (Sec. 3.3): positives reconstruct their GT (class + box), negatives
        are background in the focal loss, padding slots are left out; normalised by
        num_boxes * num_groups since every GT appears once per group."""
        a = assignment
        return self.set_losses(
            dn.layer_logits[layer], dn.layer_boxes[layer], a["batch_idx"], a["slot_idx"], a["labels"],
            a["boxes"], num_boxes * a["num_groups"], a["valid"],
        )

    # ---- public API ---------------------------------------------------------------------------

    def forward(self, outputs: DetectorOutput, targets: list[dict]) -> dict[str, Tensor]:
        """Unweighted losses of all decoder layers, encoder proposals and the DN group."""
        num_boxes = _num_boxes(targets, outputs.layer_logits.device)
        num_layers = outputs.layer_logits.shape[0]
        last = num_layers - 1
        layers = range(num_layers) if self.aux_loss else [last]

        def add(prefix_losses: dict[str, Tensor], suffix: str) -> None:
            losses.update({k + suffix: v for k, v in prefix_losses.items()})

        losses: dict[str, Tensor] = {}
        for layer in layers:
            # every layer is matched on its own predictions (DETR's auxiliary decoding losses)
            layer_losses, indices = self.matched_losses(
                outputs.layer_logits[layer], outputs.layer_boxes[layer], targets, num_boxes
            )
            if layer == last:
                self.last_indices = indices
            add(layer_losses, "" if layer == last else f"_{layer}")

        if outputs.enc_logits is not None:
            # DINO supervises the selected proposals with the full class targets; Deformable
            # DETR every token with binarised labels (its head ranks tokens by class 0)
            enc_targets = targets
            if self.encoder_binary_labels:
                enc_targets = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            enc_losses, _ = self.matched_losses(
                outputs.enc_logits, outputs.enc_boxes, enc_targets, num_boxes
            )
            add(enc_losses, "_enc")

        dn = outputs.groups.get("dn")
        if dn is not None:
            dn_layers = dn.layer_logits.shape[0]
            assignment = self.denoising_assignment(dn, targets)
            for layer in range(dn_layers) if self.aux_loss else [dn_layers - 1]:
                suffix = "_dn" if layer == dn_layers - 1 else f"_dn_{layer}"
                add(self.denoising_losses(dn, layer, assignment, num_boxes), suffix)
        return losses

    def total(self, loss_dict: dict[str, Tensor]) -> Tensor:
        """Weighted sum: each loss times the weight of its base name (suffixes stripped).

        Raises KeyError for a key whose base name has no weight, rather than silently
        dropping it.
        """
        terms = []
        for key, value in loss_dict.items():
            base = base_name(key)
            if base not in self.weight_dict:
                raise KeyError(f"no weight for loss {key!r} (base name {base!r})")
            terms.append(value * self.weight_dict[base])
        return torch.stack(terms).sum()
