"""Baseline KD methods (FitNet, FGD, MGD, KD-DETR, DETRDistill) on the three tiny detectors.

For every method x detector: one training step with a wider, deeper teacher (finite losses,
gradients reach the student and the KD heads and never the teacher, teacher stays in eval mode,
no teacher keys in the checkpoint); zero KD loss for a student identical to its teacher (and
positive after perturbing it); MGD instead: positive loss that falls when only its generator
trains. CPU, 1 thread, 2 images of 64 x 96.
"""
from __future__ import annotations

import copy

import pytest
import torch

from distill.fgd import gt_masks
from distill.kd_detr import layer_pairs
from distill import METHODS as ALL_METHODS

BASELINES = {k: v for k, v in ALL_METHODS.items() if k not in ("student", "clockdistill")}
from models.build import build_criterion, build_detector, detector_config

torch.set_num_threads(1)

K = 3
DETECTORS = ["dab_detr", "deformable_detr", "dino"]
METHODS = sorted(BASELINES)
# small point counts so the tiny decoders stay fast
# detrdistill: an untrained teacher's top-100 boxes may all miss the GT (cls x IoU = 0, no mask)
CFG = {"kd_detr": {"num_general": 4}, "detrdistill": {"feature_score": "cls"}}
# an untrained teacher's decoder states all point one way, often away from every feature cell
# (cos < 0 everywhere: an empty target-aware mask); the mask is pinned in test_distill_numeric.py
POSITIVE_EXEMPT = {"loss_tafd"}
ZERO_EXEMPT = {"detrdistill": {"loss_qpad_cls", "loss_qpad_bbox", "loss_qpad_giou"}}   # GT-supervised


def make_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, 64, 96, generator=g)
    pad_mask = torch.zeros(2, 64, 96, dtype=torch.bool)
    pad_mask[1, :, 72:] = True                     # second image is 64 x 72, padded on the right
    pad_mask[1, 48:, :] = True                     # ... and 48 rows high
    images[pad_mask[:, None].expand_as(images)] = 0
    targets = [
        # small boxes, so that even the 2 x 3 C5 grid of DAB-DETR keeps background cells
        {"boxes": torch.tensor([[0.2, 0.3, 0.2, 0.3]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[0.25, 0.3, 0.3, 0.3], [0.75, 0.7, 0.2, 0.2]]), "labels": torch.tensor([0, 2])},
    ]
    return images, pad_mask, targets


def build(detector: str, method: str, identical: bool, seed: int = 0):
    torch.manual_seed(seed)
    student = build_detector(detector_config(detector, "tiny"), K)
    if identical:
        teacher = copy.deepcopy(student)
    else:
        teacher = build_detector(detector_config(detector, "tiny", d_model=64, dec_layers=3, num_queries=16), K)
    criterion = build_criterion(detector, K)
    distiller = BASELINES[method](student, criterion, teacher=teacher, cfg=CFG.get(method))
    return distiller.train(), teacher


def kd_keys(distiller) -> set[str]:
    return set(distiller.weights)


@pytest.mark.parametrize("detector", DETECTORS)
@pytest.mark.parametrize("method", METHODS)
def test_training_step(method, detector):
    d, teacher = build(detector, method, identical=False)
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not teacher_ids & {id(p) for p in d.parameters()}

    images, pad_mask, targets = make_batch()
    losses = d(images, pad_mask, targets)
    assert kd_keys(d) <= set(losses), f"missing KD keys {kd_keys(d) - set(losses)}"
    for key, value in losses.items():
        assert torch.isfinite(value).all(), key
    for key in kd_keys(d) - POSITIVE_EXEMPT:
        assert losses[key].item() > 0, key
    d.total(losses).backward()

    assert not teacher.training
    assert all(p.grad is None for p in teacher.parameters())
    student_grads = [p.grad for p in d.student.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in student_grads)
    heads = [(n, p) for n, p in d.named_parameters() if not n.startswith(("student.", "criterion."))]
    for name, p in heads:
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    if heads and not (kd_keys(d) & POSITIVE_EXEMPT):     # DETRDistill's adapter feeds only loss_tafd
        assert any(p.grad.abs().sum() > 0 for _, p in heads)
    if method != "kd_detr":       # widths differ (32 vs 64): feature methods need an adapter
        assert any(n.startswith("adapters.") for n, _ in heads)

    state = d.state_dict()
    assert state and not [k for k in state if k.startswith("teacher")]
    assert not [k for k in d.kd_state_dict() if k.startswith("student.")]
    d.eval()
    d.train()
    assert d.student.training and not teacher.training


@pytest.mark.parametrize("detector", DETECTORS)
@pytest.mark.parametrize("method", [m for m in METHODS if m != "mgd"])
def test_zero_loss_for_identical_student(method, detector):
    d, _ = build(detector, method, identical=True)
    assert not [n for n, _ in d.named_parameters() if n.startswith("adapters.")]   # no adapter
    images, pad_mask, targets = make_batch(1)
    keys = kd_keys(d) - ZERO_EXEMPT.get(method, set())
    losses = d(images, pad_mask, targets)
    for key in keys:
        assert abs(losses[key].item()) < 1e-6, (key, losses[key].item())
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for p in d.student.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    losses = d(images, pad_mask, targets)
    for key in keys - POSITIVE_EXEMPT:
        assert losses[key].item() > 1e-6, (key, losses[key].item())


@pytest.mark.parametrize("detector", ["dab_detr", "dino"])
def test_mgd_generator_learns(detector):
    """MGD has no zero-loss point for an identical student: its loss must fall as the generator trains."""
    d, _ = build(detector, "mgd", identical=True)
    images, pad_mask, targets = make_batch()
    with torch.no_grad():
        s_out = d.student(images, pad_mask)
        t_out = d.teacher_forward(images, pad_mask)
    opt = torch.optim.Adam(d.generators.parameters(), lr=1e-2)
    values = []
    for _ in range(6):
        loss = d.mgd_loss(s_out, t_out, generator=torch.Generator().manual_seed(0))
        values.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert values[0] > 0
    assert values[-1] < 0.8 * values[0], values


def test_layer_pairs():
    assert layer_pairs(2, 3) == [(0, 1), (1, 2)]
    assert layer_pairs(3, 3) == [(0, 0), (1, 1), (2, 2)]
    assert layer_pairs(3, 2) == [(0, 0), (1, 1), (2, 1)]
    assert layer_pairs(6, 6, "last") == [(5, 5)]
    assert layer_pairs(4, 6) == [(0, 1), (1, 2), (2, 4), (3, 5)]     # ceil rule, shared by all methods


def test_fgd_masks():
    valid = torch.ones(2, 4, 8, dtype=torch.bool)
    valid[1, :, 4:] = False                                        # image 1 is half padding
    ratio = torch.tensor([[1.0, 1.0], [0.5, 1.0]])
    targets = [{"boxes": torch.tensor([[0.5, 0.5, 0.25, 0.5]]), "labels": torch.tensor([0])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    fg_fgd, _ = gt_masks(targets, valid, ratio)                    # FGD's inclusive extent (default)
    expected = torch.zeros(4, 8)
    expected[1:4, 3:6] = 1 / 9                                     # cols 3..ceil(5), rows 1..ceil(3)
    assert torch.allclose(fg_fgd[0], expected)
    fg, bg = gt_masks(targets, valid, ratio, "overlap")
    # box x in [3, 5) cells, y in [1, 3) cells: 4 cells of weight 1/4
    expected = torch.zeros(4, 8)
    expected[1:3, 3:5] = 0.25
    assert torch.allclose(fg[0], expected)
    assert torch.allclose(bg[0].sum(), torch.tensor(1.0)) and (bg[0][fg[0] > 0] == 0).all()
    assert torch.allclose(bg[0][0, 0], torch.tensor(1 / 28))
    assert fg[1].sum() == 0 and torch.allclose(bg[1].sum(), torch.tensor(1.0))
    assert (bg[1][:, 4:] == 0).all()                              # padding is neither fg nor bg
    # the same box on image 1 (half padding) lands on the image part of the grid
    fg1, _ = gt_masks([targets[1], targets[0]], valid, ratio, "overlap")
    assert fg1[1].nonzero()[:, 1].unique().tolist() == [1, 2]


def test_kd_detr_points_are_shared_and_isolated():
    d, teacher = build("dino", "kd_detr", identical=False)
    images, pad_mask, targets = make_batch()
    t_group, s_group = d.general_groups(images)
    assert torch.equal(t_group.boxes, s_group.boxes)
    assert t_group.content.shape[-1] == 64 and s_group.content.shape[-1] == 32
    assert torch.equal(t_group.content[..., :32], s_group.content)
    t2, _ = d.general_groups(images)                               # next step: new general anchors
    assert not torch.equal(t2.boxes[:, :4], t_group.boxes[:, :4])
    d.eval()
    with torch.no_grad():
        plain = d.student(images, pad_mask)
        with_points = d.student(images, pad_mask, groups=[s_group])
    assert torch.allclose(plain.layer_logits, with_points.layer_logits, atol=1e-5)
    assert with_points.groups["kd_points"].layer_logits.shape[2] == 4
