"""CLoCKDistill: zero when identical, gradients, location mask vs a loop, identical queries."""
from __future__ import annotations

import math

import pytest
import torch

from distill import build_distiller
from distill.location_mask import level_masks, memory_masks
from models import build_criterion, build_detector, detector_config

DETECTORS = ["dab_detr", "deformable_detr", "dino"]


def make(detector, teacher_d=None, cfg=None, copy=False):
    torch.manual_seed(0)
    student = build_detector(detector_config(detector, "tiny"), 3)
    if copy:
        teacher = build_detector(detector_config(detector, "tiny"), 3)
        teacher.load_state_dict(student.state_dict())
    else:
        teacher = build_detector(detector_config(detector, "tiny", d_model=teacher_d or 48), 3)
    return build_distiller("clockdistill", student, build_criterion(detector, 3), teacher=teacher, cfg=cfg), teacher


@pytest.mark.parametrize("detector", DETECTORS)
def test_zero_when_student_equals_teacher_positive_after_perturbation(detector, tiny_batch):
    images, pad_mask, targets = tiny_batch
    distiller, _ = make(detector, copy=True, cfg={"alpha": 1.0, "beta": 1.0})
    distiller.student.eval()   # no denoising noise / dropout differences
    losses = distiller(images, pad_mask, targets)
    assert abs(float(losses["loss_lcmd"])) < 1e-6
    assert abs(float(losses["loss_tcld"])) < 1e-4
    with torch.no_grad():
        for p in distiller.student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    losses = distiller(images, pad_mask, targets)
    assert float(losses["loss_lcmd"]) > 1e-4 and float(losses["loss_tcld"]) > 1e-4


@pytest.mark.parametrize("detector", DETECTORS)
def test_gradients_reach_student_and_adapter_never_teacher(detector, tiny_batch):
    images, pad_mask, targets = tiny_batch
    distiller, teacher = make(detector)
    distiller.train()
    assert not teacher.training, "the teacher stays in eval mode after .train()"
    losses = distiller(images, pad_mask, targets)
    assert {"loss_lcmd", "loss_tcld"} <= set(losses)
    distiller.total(losses).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(not p.requires_grad for p in teacher.parameters())
    assert distiller.adapter.weight.grad is not None and distiller.adapter.weight.grad.abs().sum() > 0
    assert not any(k.startswith("teacher") for k in distiller.state_dict())
    assert all(p is not q for p in distiller.trainable_parameters() for q in teacher.parameters())


def loop_masks(boxes, valid, padding, ratio):
    """Slow reference: per box, per cell."""
    b_, h_, w_ = padding.shape
    loc = torch.zeros(b_, h_, w_)
    fg_scale = torch.zeros(b_, h_, w_)
    for b in range(b_):
        cw, ch = float(ratio[b, 0]) * w_, float(ratio[b, 1]) * h_
        for g in range(boxes.shape[1]):
            if not valid[b, g]:
                continue
            cx, cy, w, h = boxes[b, g].tolist()
            c0, c1 = math.floor(max(cx - w / 2, 0) * cw), math.ceil(min(cx + w / 2, 1) * cw)
            r0, r1 = math.floor(max(cy - h / 2, 0) * ch), math.ceil(min(cy + h / 2, 1) * ch)
            c1, r1 = max(c1, c0 + 1), max(r1, r0 + 1)
            for r in range(h_):
                for c in range(w_):
                    if r0 <= r < r1 and c0 <= c < c1 and not padding[b, r, c]:
                        loc[b, r, c] = 1
                        fg_scale[b, r, c] = max(fg_scale[b, r, c], 1 / ((r1 - r0) * (c1 - c0)))
    image = (~padding).float()
    bg = (1 - loc) * image
    scale = loc * fg_scale + bg / bg.flatten(1).sum(1).clamp(min=1)[:, None, None]
    return loc, scale


def test_location_mask_equals_loop_reference_on_every_level():
    g = torch.Generator().manual_seed(0)
    targets = []
    for n in (5, 0, 3):
        centres = torch.rand(n, 2, generator=g) * 0.8 + 0.1
        sizes = torch.rand(n, 2, generator=g) * 0.5 + 0.005      # from far below a cell to half the image
        targets.append({"boxes": torch.cat([centres, sizes], 1), "labels": torch.zeros(n, dtype=torch.long)})
    targets[2]["boxes"][1] = targets[2]["boxes"][0] * torch.tensor([1.0, 1.0, 0.5, 0.5])   # nested overlap
    shapes, starts, pads = [(16, 24), (8, 12), (4, 6)], [0, 384, 480], []
    image_extent = [(16, 24), (12, 20), (16, 10)]                    # padded images
    ratios = []
    for lvl, (h, w) in enumerate(shapes):
        pad = torch.ones(3, h, w, dtype=torch.bool)
        for b, (ih, iw) in enumerate(image_extent):
            pad[b, : math.ceil(ih * h / 16), : math.ceil(iw * w / 24)] = False
        pads.append(pad)
    padding = torch.cat([p.flatten(1) for p in pads], 1)
    valid_ratios = torch.stack([torch.stack([(~p[:, 0, :]).sum(1) / p.shape[2], (~p[:, :, 0]).sum(1) / p.shape[1]], -1)
                                for p in pads], 1).float()
    masks = memory_masks(targets, padding, shapes, starts, valid_ratios)
    from distill.location_mask import pad_boxes
    boxes, valid = pad_boxes(targets, torch.device("cpu"))
    for lvl, (location, scale, image) in enumerate(masks):
        ref_loc, ref_scale = loop_masks(boxes, valid, pads[lvl], valid_ratios[:, lvl])
        assert torch.equal(location, ref_loc), f"level {lvl}"
        assert torch.allclose(scale, ref_scale), f"level {lvl}"
        assert (location * pads[lvl]).sum() == 0 and (scale * pads[lvl]).sum() == 0
    # every box, however small, marks at least one cell on the finest level
    assert masks[0][0][0].sum() >= 1 and masks[0][0][1].sum() == 0


def test_teacher_and_student_get_identical_queries_and_masks(tiny_batch):
    images, pad_mask, targets = tiny_batch
    distiller, teacher = make("dino", teacher_d=32, cfg={"copies": 2, "num_random": 3})
    seen = {}

    def record(name, model):
        original = model.forward

        def forward(*args, groups=None, **kwargs):
            seen[name] = groups[0]
            return original(*args, groups=groups, **kwargs)
        model.forward = forward
    record("student", distiller.student)
    record("teacher", teacher)
    distiller.train()
    distiller(images, pad_mask, targets)
    s, t = seen["student"], seen["teacher"]
    assert s.content.shape == (2, 2 * 2 + 3, 32)
    for field in ("content", "boxes", "valid", "self_attn_mask"):
        assert torch.equal(getattr(s, field), getattr(t, field)), field
    assert not s.content.requires_grad and not s.see_detection_queries


def test_ablation_switches():
    for cfg, present, absent in (({"tcld": False}, "loss_lcmd", "loss_tcld"), ({"lcmd": False}, "loss_tcld", "loss_lcmd")):
        distiller, _ = make("deformable_detr", cfg=cfg)
        images = torch.randn(1, 3, 64, 96)
        losses = distiller(images, torch.zeros(1, 64, 96, dtype=torch.bool),
                           [{"boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3]]), "labels": torch.tensor([1])}])
        assert present in losses and absent not in losses
    with pytest.raises(ValueError, match="unknown options"):
        make("dino", cfg={"alhpa": 1.0})
    for source in ("backbone",):
        distiller, _ = make("dino", cfg={"feature_source": source, "location_mask": False, "positional": True})
        losses = distiller(torch.randn(1, 3, 64, 96), torch.zeros(1, 64, 96, dtype=torch.bool),
                           [{"boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3]]), "labels": torch.tensor([1])}])
        assert torch.isfinite(losses["loss_lcmd"])


def test_short_run_lowers_distillation_loss(tiny_batch):
    images, pad_mask, targets = tiny_batch
    distiller, _ = make("deformable_detr", cfg={"alpha": 1e-2, "beta": 1e-3})
    distiller.train()
    opt = torch.optim.AdamW(distiller.trainable_parameters(), lr=1e-3)
    kd = []
    for _ in range(25):
        losses = distiller(images, pad_mask, targets)
        kd.append(float(losses["loss_lcmd"] + losses["loss_tcld"]))
        opt.zero_grad()
        distiller.total(losses).backward()
        opt.step()
    assert sum(kd[-5:]) / 5 < 0.8 * sum(kd[:5]) / 5, kd
