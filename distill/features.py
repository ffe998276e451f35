"""Shared feature helpers: per-level validity masks, level maps of the memory, adapters.

Every feature method (FitNet, FGD, MGD, DETRDistill's feature term, CLoCKDistill's L_lcmd)
reads the same two representations of a DetectorOutput: the projected backbone maps
(``features``, the "neck") or the encoder memory reshaped into per-level maps. Adapters exist
only when widths differ, so a student identical to its teacher has zero feature loss; with a
paper-built teacher (same transformer, larger backbone) the widths agree and none is created.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.outputs import DetectorOutput


def model_width(model: nn.Module) -> int:
    return int(model.d_model)


def model_levels(model: nn.Module) -> int:
    return int(getattr(model, "num_feature_levels", 1))


def check_same_levels(student: nn.Module, teacher: nn.Module, method: str) -> int:
    ls, lt = model_levels(student), model_levels(teacher)
    if ls != lt:
        raise ValueError(f"{method}: student has {ls} feature levels, teacher {lt}; "
                         "feature distillation needs the same levels")
    return ls


def level_valid_masks(out: DetectorOutput) -> list[Tensor]:
    """Per level a [B,H,W] bool mask, True on cells that belong to the image (not padding)."""
    masks = []
    for (h, w), start in zip(out.spatial_shapes, out.level_start_index):
        pad = out.memory_padding_mask[:, start:start + h * w]
        masks.append(~pad.reshape(pad.shape[0], h, w))
    return masks


def token_level_maps(tokens: Tensor, out: DetectorOutput) -> list[Tensor]:
    """[B,S,C] tokens of a flattened multi-level memory -> per level [B,C,H,W] maps."""
    maps = []
    for (h, w), start in zip(out.spatial_shapes, out.level_start_index):
        maps.append(tokens[:, start:start + h * w].transpose(1, 2).reshape(tokens.shape[0], -1, h, w))
    return maps


class FeatureAdapters(nn.Module):
    """One 1x1 conv (student width -> teacher width) per level; none when the widths agree."""

    def __init__(self, student_channels: int, teacher_channels: int, num_levels: int):
        super().__init__()
        self.identity = student_channels == teacher_channels
        self.convs = nn.ModuleList(
            [] if self.identity else
            [nn.Conv2d(student_channels, teacher_channels, 1) for _ in range(num_levels)]
        )

    def forward(self, features: list[Tensor], sizes: list[tuple[int, int]] | None = None) -> list[Tensor]:
        out = []
        for i, f in enumerate(features):
            if not self.identity:
                f = self.convs[i](f)
            if sizes is not None and tuple(f.shape[-2:]) != tuple(sizes[i]):
                f = F.interpolate(f, size=sizes[i], mode="bilinear", align_corners=False)
            out.append(f)
        return out


def token_adapter(student_width: int, teacher_width: int) -> nn.Module:
    """The token form of a 1x1 conv adapter (a Linear on [B,S,C]); identity for equal widths."""
    return nn.Linear(student_width, teacher_width) if student_width != teacher_width else nn.Identity()


def aligned_features(adapters: FeatureAdapters, student_out: DetectorOutput,
                     teacher_out: DetectorOutput) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Per level (adapted student map, teacher map, valid mask [B,H,W]) in float32.

    The valid mask is the teacher's (the student's is the same when strides agree)."""
    if len(student_out.features) != len(teacher_out.features):
        raise ValueError(f"student has {len(student_out.features)} feature levels, "
                         f"teacher {len(teacher_out.features)}")
    sizes = [tuple(t.shape[-2:]) for t in teacher_out.features]
    student = adapters([f.float() for f in student_out.features], sizes)
    valid = level_valid_masks(teacher_out)
    return [(s, t.detach().float(), v) for s, t, v in zip(student, teacher_out.features, valid)]


def masked_mean_sq(diff_sq: Tensor, valid: Tensor) -> Tensor:
    """Mean of a [B,C,H,W] squared error over the channels and valid cells of all images."""
    v = valid[:, None].to(diff_sq.dtype)
    count = v.sum() * diff_sq.shape[1]
    return (diff_sq * v).sum() / count.clamp(min=1.0)
