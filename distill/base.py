"""The one interface every training run goes through: ``loss_dict = distiller(images, pad_mask, targets)``.

A ``Distiller`` owns the trainable student, its detection criterion and the method's KD heads
(adapters). The frozen teacher is held *outside* the module tree (mmrazor's separation, made
structural): it is not in ``parameters()``, ``state_dict()``, the optimiser, DDP or the
student's checkpoints, it stays in eval mode whatever ``.train()`` is called on, and it runs
under ``no_grad``. Plain training (``method: student``) is a Distiller without a teacher.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from models.criterion import SetCriterion
from models.outputs import DetectorOutput, QueryGroup

from .options import resolve_options


class NotCacheable(Exception):
    """The method's teacher inputs are not a function of the batch (e.g. redrawn every step)."""


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class Distiller(nn.Module):
    """No distillation: the student and its detection loss. Methods override ``distill_losses``
    (and ``extra_groups`` when they inject queries into both decoders)."""

    name = "student"
    needs_teacher = False
    # option -> default; every method declares its own and always has ``kd_weight``, the one
    # outer scalar multiplying all its KD losses (1.0 = the paper's weights; what a tuning sweep
    # varies). Unknown options are rejected (distill/options.py).
    DEFAULTS: dict = {}

    def __init__(self, student: nn.Module, criterion: SetCriterion, teacher: nn.Module | None = None,
                 cfg: dict | None = None):
        super().__init__()
        self.student = student
        self.criterion = criterion
        self.cfg = resolve_options(self.name, type(self).DEFAULTS, cfg)
        self.kd_weight = float(self.cfg.get("kd_weight", 1.0))
        self.weights: dict[str, float] = {}     # KD loss name -> inner weight, filled by subclasses
        if self.needs_teacher and teacher is None:
            raise ValueError(f"method {self.name!r} needs a teacher checkpoint (--teacher)")
        object.__setattr__(self, "teacher", freeze(teacher) if teacher is not None else None)
        object.__setattr__(self, "teacher_cache", None)

    # -- the frozen teacher ------------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()            # BN, dropout and denoising stay off, always
        return self

    def _apply(self, fn, *args, **kwargs):
        # .to(device) / .half() reach the teacher too, although it is not a submodule
        super()._apply(fn, *args, **kwargs)
        if getattr(self, "teacher", None) is not None:
            self.teacher._apply(fn, *args, **kwargs)
        return self

    @torch.no_grad()
    def teacher_forward(self, images: Tensor, pad_mask: Tensor, groups: list[QueryGroup] | None = None,
                        **kwargs) -> DetectorOutput:
        """The frozen teacher's output: from ``teacher_cache`` where it holds these exact inputs
        (distill/teacher_cache.py), else computed live (and stored, if the cache records)."""
        cache = self.teacher_cache
        if cache is not None and not kwargs and not cache.record:
            cached = cache.lookup(images, pad_mask, groups)
            if cached is not None:
                return cached
        self.teacher.eval()
        out = self.teacher(images, pad_mask, groups=groups, **kwargs)
        if cache is not None and cache.record and not kwargs:
            cache.store(images, pad_mask, groups, out)
        return out

    def use_teacher_cache(self, cache) -> None:
        """Read (or, for the builder, record) teacher outputs through a TeacherCache."""
        object.__setattr__(self, "teacher_cache", cache)

    def teacher_groups(self, images: Tensor, targets: list[dict]) -> list[QueryGroup] | None:
        """The query groups this method feeds the teacher for a batch: what the cache builder
        replays. Methods whose teacher inputs change from step to step raise NotCacheable."""
        return None

    # -- training step -----------------------------------------------------------------------
    def extra_groups(self, targets: list[dict], images: Tensor) -> list[QueryGroup]:
        """Query groups fed identically to teacher and student (none without distillation)."""
        return []

    def distill_losses(self, student_out: DetectorOutput, images: Tensor, pad_mask: Tensor,
                       targets: list[dict], groups: list[QueryGroup]) -> dict[str, Tensor]:
        return {}

    def forward(self, images: Tensor, pad_mask: Tensor, targets: list[dict]) -> dict[str, Tensor]:
        groups = self.extra_groups(targets, images)
        student_out = self.student(images, pad_mask, targets, groups=groups or None)
        losses = self.criterion(student_out, targets)
        losses.update(self.distill_losses(student_out, images, pad_mask, targets, groups))
        return losses

    def total(self, losses: dict[str, Tensor]) -> Tensor:
        """Weighted sum: detection losses with the criterion's weights, KD losses with the method's
        inner weights times its outer ``kd_weight``."""
        det = {k: v for k, v in losses.items() if k not in self.weights}
        total = self.criterion.total(det)
        for key, weight in self.weights.items():
            if key in losses:
                total = total + self.kd_weight * weight * losses[key]
        return total

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def kd_state_dict(self) -> dict:
        """KD heads only (adapters etc.), for resuming a distillation run."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(("student.", "criterion."))}
