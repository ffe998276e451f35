"""MGD baseline: masked generative distillation on the neck features.

Paper: Z. Yang, Z. Li, M. Shao, D. Shi, Z. Yuan, C. Yuan, *Masked Generative Distillation*,
ECCV 2022 (code: yzd-v/MGD; mmrazor ``MGDConnector`` + ``MGDLoss``).

Per level: the (aligned) student map is multiplied by a random binary mask that drops each cell
with probability lambda_mgd (the same mask for all channels); a generator (3x3 conv -> ReLU ->
3x3 conv, teacher width) must reconstruct the teacher map from it:
    L_mgd = sum_{levels,c,h,w} (G(f_align(F^S) * M) - F^T)^2 / B,   total += alpha_mgd * L_mgd.
Key ``loss_mgd``; its inner weight is alpha_mgd, the outer ``kd_weight`` (default 1) scales it.

Defaults: lambda_mgd = 0.65 and alpha_mgd = 2e-5 are MGD's *one-stage* detection settings
(RetinaNet / SOLO configs of yzd-v/MGD, mmrazor's mgd_fpn_retina_x101_retina_r50_2x_coco.py);
MGD's two-stage (Mask / Cascade Mask R-CNN) configs use other constants (alpha_mgd 5e-7,
lambda_mgd 0.45 in the cascade config we read). The detectors here are one-stage set
predictors, so the one-stage pair is used (grade D for DETRs).

Scale (``reduction``). MGD's loss is a *sum* over C x H x W, so its alpha_mgd is calibrated to
a COCO FPN (about 22k cells x 256 channels per image at 1333 x 800). At the mini size (about 260
cells x 64-96 channels) the same alpha is ~200x weaker than at home. ``reduction: reference``
(default, grade D) keeps MGD's strength: the summed error is rescaled by
(reference_cells x reference_channels) / (valid cells x channels of this batch, per image), i.e.
the loss equals what the same per-element error would give on a COCO FPN. ``reduction: sum`` is
MGD's literal sum (grade A); at COCO scale both agree.

Departures (grade D): padding cells are left out of the loss sum (they are still masked and
convolved like any other cell); the 1x1 align conv exists only when widths differ (as in MGD).

Zero-loss property: MGD's generator sits between student and teacher, so an identical student
does *not* give zero loss (the generator is not the identity, and the mask drops 65 % of the
cells). The test checks instead that the loss is positive and falls when only the generator
is trained for a few steps.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Distiller
from .features import FeatureAdapters, aligned_features, check_same_levels, model_width
from .options import check_choice

REDUCTIONS = ("reference", "sum")


class MGDGenerator(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True),
                                 nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class MGD(Distiller):
    """Masked generative distillation on every neck level (see the module docstring)."""

    name = "mgd"
    needs_teacher = True

    DEFAULTS = {
        "alpha_mgd": 2e-5,     # MGD's one-stage detection configs (RetinaNet, SOLO; mmrazor); grade D
        "lambda_mgd": 0.65,    # fraction of cells masked, same provenance; grade D
        "reduction": "reference",   # reference: MGD's strength at COCO scale (grade D) | sum (grade A)
        "reference_cells": 22000,   # cells of a COCO FPN per image (about; grade D)
        "reference_channels": 256,  # FPN width (grade A for MGD's setting)
        "kd_weight": 1.0,      # outer weight (1 = MGD's alpha_mgd)
    }

    def __init__(self, student, criterion, teacher=None, cfg=None):
        super().__init__(student, criterion, teacher, {**self.DEFAULTS, **(cfg or {})})
        check_choice(self.name, "reduction", self.cfg["reduction"], REDUCTIONS)
        levels = check_same_levels(student, self.teacher, self.name)
        c_t = model_width(self.teacher)
        self.adapters = FeatureAdapters(model_width(student), c_t, levels)
        self.generators = nn.ModuleList([MGDGenerator(c_t) for _ in range(levels)])
        self.weights = {"loss_mgd": float(self.cfg["alpha_mgd"])}

    def mgd_loss(self, student_out, teacher_out, generator: torch.Generator | None = None) -> Tensor:
        ratio = float(self.cfg["lambda_mgd"])
        total, elements = None, 0.0
        for level, (fs, ft, valid) in enumerate(aligned_features(self.adapters, student_out, teacher_out)):
            batch, channels, h, w = fs.shape
            keep = torch.rand(batch, 1, h, w, device=fs.device, generator=generator) >= ratio
            rebuilt = self.generators[level](fs * keep.to(fs.dtype))
            err = (rebuilt - ft).pow(2) * valid[:, None].to(fs.dtype)
            loss = err.sum() / batch
            total = loss if total is None else total + loss
            elements = elements + valid.float().sum() / batch * channels      # per image
        if self.cfg["reduction"] == "reference":
            reference = float(self.cfg["reference_cells"]) * float(self.cfg["reference_channels"])
            total = total * (reference / elements.clamp(min=1.0))
        return total

    def distill_losses(self, student_out, images, pad_mask, targets, groups):
        teacher_out = self.teacher_forward(images, pad_mask)
        return {"loss_mgd": self.mgd_loss(student_out, teacher_out)}
