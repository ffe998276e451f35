"""Issue 13: every KD method on every detector, and each fixed departure pinned by a hand value.

- zero KD loss for an identical student in *train* mode with denoising groups present;
- teacher outputs carry no grad_fn; teacher decoded once per step (KD-DETR);
- extra query groups are isolated from the detection queries with mixed widths;
- unknown options are rejected with the valid names; kd_weight is the one outer scalar;
- hand-computed values: layer pairing, FGD extent / two GcBlocks, MGD scaling, DETRDistill BCE
  and per-stage masks, CLoCKDistill's GKD reductions, GT-aware weight and general queries.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

from distill import METHODS, build_distiller
from distill.clockdistill import CLoCKDistill
from distill.gt_masks import location_scale_masks
from distill.layers import layer_pairs
from distill.logit_losses import soft_bce
from distill.target_queries import TargetQueryGenerator
from models.build import build_criterion, build_detector, detector_config
from models.outputs import GroupOutput, QueryGroup
from tests.test_baselines import make_batch

torch.set_num_threads(1)
K = 3
DETECTORS = ["dab_detr", "deformable_detr", "dino"]
KD_METHODS = sorted(m for m in METHODS if m != "student")
SMALL = {"kd_detr": {"num_general": 4}, "clockdistill": {"num_random": 2}}
SUPERVISED = {"loss_qpad_cls", "loss_qpad_bbox", "loss_qpad_giou"}     # DETRDistill's GT-supervised part


def tiny(detector: str, **overrides):
    if detector != "dino":
        overrides.setdefault("denoising", True)        # DN groups present in the student's train pass
    return build_detector(detector_config(detector, "tiny", **overrides), K)


def distiller(detector, method, teacher=None, seed=0, cfg=None, **student_overrides):
    torch.manual_seed(seed)
    student = tiny(detector, **student_overrides)
    teacher = copy.deepcopy(student) if teacher is None else teacher
    return build_distiller(method, student, build_criterion(detector, K), teacher=teacher,
                           cfg={**SMALL.get(method, {}), **(cfg or {})}).train()


def record_teacher(d):
    calls = []
    original = d.teacher_forward

    def wrapped(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append(out)
        return out
    d.teacher_forward = wrapped
    return calls


@pytest.mark.parametrize("detector", DETECTORS)
@pytest.mark.parametrize("method", [m for m in KD_METHODS if m != "mgd"])
def test_identical_student_in_train_mode_with_denoising_has_zero_kd_loss(method, detector):
    d = distiller(detector, method)
    assert d.student.training and d.student.denoising
    calls = record_teacher(d)
    seen = {}
    original = d.student.forward

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        seen["groups"] = set(out.groups)
        return out
    d.student.forward = spy
    images, pad_mask, targets = make_batch(1)
    losses = d(images, pad_mask, targets)
    assert "dn" in seen["groups"]
    for key in set(d.weights) - SUPERVISED:
        assert abs(losses[key].item()) < 1e-5, (key, losses[key].item())
    for out in calls:                                         # teacher outputs carry no grad_fn
        for name in ("layer_logits", "layer_boxes", "layer_states", "memory"):
            assert getattr(out, name).grad_fn is None
        assert all(g.layer_logits.grad_fn is None for g in out.groups.values())
        assert all(f.grad_fn is None for f in out.features)
    assert len(calls) == 1 or method != "kd_detr"              # KD-DETR: one teacher pass


@pytest.mark.parametrize("detector", DETECTORS)
@pytest.mark.parametrize("method", ["kd_detr", "detrdistill", "clockdistill"])
def test_query_groups_are_isolated_with_mixed_widths(method, detector):
    torch.manual_seed(5)
    teacher = tiny(detector, d_model=64, dec_layers=3)
    d = distiller(detector, method, teacher=teacher).eval()
    outs = []
    original = d.student.forward
    d.student.forward = lambda *a, **k: outs.append(original(*a, **k)) or outs[-1]
    images, pad_mask, targets = make_batch()
    with torch.no_grad():
        d(images, pad_mask, targets)
        plain = original(images, pad_mask)
    assert outs[0].groups, "the method injected no group"
    assert torch.allclose(outs[0].layer_logits, plain.layer_logits, atol=1e-5)
    assert torch.allclose(outs[0].layer_boxes, plain.layer_boxes, atol=1e-5)


@pytest.mark.parametrize("method", KD_METHODS)
def test_unknown_options_are_rejected_with_valid_names(method):
    with pytest.raises(ValueError, match="alpah.*valid options: .*kd_weight"):
        distiller("dino", method, cfg={"alpah": 1})


def test_kd_weight_is_the_outer_scalar():
    d = distiller("dino", "fitnet")
    losses = {"loss_cls": torch.tensor(1.0), "loss_bbox": torch.tensor(0.0), "loss_giou": torch.tensor(0.0),
              "loss_fitnet": torch.tensor(0.5)}
    base = d.total(losses)
    d.kd_weight = 3.0
    assert torch.allclose(d.total(losses) - base, torch.tensor(2 * 0.5))


# -- pinned departures --------------------------------------------------------------------------
def test_one_layer_pairing_rule():
    assert layer_pairs(4, 6) == [(0, 1), (1, 2), (2, 4), (3, 5)]
    from distill.clockdistill import aligned_layer
    assert [aligned_layer(i, 4, 6) for i in range(4)] == [1, 2, 4, 5]


def test_fgd_extent_box_inside_one_cell():
    image = torch.ones(1, 8, 26, dtype=torch.bool)
    boxes = torch.tensor([[[10.5 / 26, 3.5 / 8, 0.2 / 26, 0.2 / 8]]])      # inside cell (3, 10)
    valid, ratio = torch.ones(1, 1, dtype=torch.bool), torch.ones(1, 2)
    m_inc, s_inc = location_scale_masks(boxes, valid, image, ratio, "inclusive")
    m_ovl, s_ovl = location_scale_masks(boxes, valid, image, ratio, "overlap")
    assert m_inc.sum() == 4 and m_inc[0, 3:5, 10:12].all() and torch.allclose(s_inc[0, 3, 10], torch.tensor(0.25))
    assert m_ovl.sum() == 1 and s_ovl[0, 3, 10] == 1
    assert torch.allclose(s_inc[0, 0, 0], torch.tensor(1 / (8 * 26 - 4)))


def test_fgd_trains_two_gcblocks():
    torch.manual_seed(0)
    d = distiller("dino", "fgd", teacher=tiny("dino", d_model=64))
    assert d.gc_teacher is not None
    assert {id(p) for p in d.gc_teacher.parameters()}.isdisjoint({id(p) for p in d.gc_student.parameters()})
    images, pad_mask, targets = make_batch()
    losses = d(images, pad_mask, targets)
    d.total(losses).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in d.gc_teacher.parameters())


def test_mgd_reference_scaling():
    d = distiller("dino", "mgd", teacher=tiny("dino", d_model=64))
    images, pad_mask, targets = make_batch()
    with torch.no_grad():
        s_out, t_out = d.student(images, pad_mask), d.teacher_forward(images, pad_mask)
        d.cfg["reduction"] = "sum"
        summed = d.mgd_loss(s_out, t_out, generator=torch.Generator().manual_seed(0))
        d.cfg["reduction"] = "reference"
        scaled = d.mgd_loss(s_out, t_out, generator=torch.Generator().manual_seed(0))
    # image 0: 64 x 96 px -> full grids; image 1 smaller: valid cells per image, x 64 channels
    cells = sum((~t_out.memory_padding_mask).sum().item() for _ in [0]) / 2
    assert torch.allclose(scaled, summed * 22000 * 256 / (cells * 64), rtol=1e-5)


def test_detrdistill_class_loss_is_plain_bce_gradient():
    z = torch.tensor([0.0], requires_grad=True)
    p = torch.tensor([0.25])
    value = soft_bce(z, p)
    value.sum().backward()
    # BCE(0, 0.25) = ln 2 = 0.693147; entropy(0.25) = 0.562335 -> 0.130812; d/dz = sigmoid(0) - p
    assert abs(value.item() - 0.130812) < 1e-5
    assert abs(z.grad.item() - 0.25) < 1e-6


def test_detrdistill_pairs_and_stage_masks():
    d = distiller("dino", "detrdistill", cfg={"tafd_topk": 2, "feature_score": "cls"})
    logits = torch.tensor([[[0.0, 3.0, -5.0], [2.0, -5.0, 1.0]]])            # [B=1,Q=2,K=3]
    query, score = d.pair_weights(logits, torch.rand(1, 2, 4), [{"boxes": torch.zeros(0, 4)}])
    assert query.tolist() == [[0, 1]]                                          # (0,1) then (1,0)
    assert torch.allclose(score, torch.sigmoid(torch.tensor([[3.0, 2.0]])))
    states = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    ft = torch.tensor([[[[1.0, 0.0, -1.0]], [[0.0, 1.0, 0.0]]]])             # [1,C=2,H=1,W=3]
    mask = d.stage_mask(states, torch.tensor([[0]]), torch.tensor([[1.0]]), ft, torch.ones(1, 1, 3, dtype=torch.bool))
    assert torch.allclose(mask, torch.tensor([[[1.0, 0.0, 0.0]]]))            # cos 1, 0, -1 -> clamp
    # one mask per teacher stage: the loss sums over stages (3 here) and levels
    torch.manual_seed(1)
    d = distiller("dino", "detrdistill", teacher=tiny("dino", dec_layers=3), cfg={"feature_score": "cls"})
    images, pad_mask, targets = make_batch()
    with torch.no_grad():
        s_out, t_out = d.student(images, pad_mask), d.teacher_forward(images, pad_mask)
        total = d.tafd(s_out, t_out, targets)
        t_last = copy.copy(t_out)
        t_last.layer_logits, t_last.layer_states, t_last.layer_boxes = (
            t_out.layer_logits[-1:], t_out.layer_states[-1:], t_out.layer_boxes[-1:])
        assert total > d.tafd(s_out, t_last, targets) > 0


@pytest.mark.parametrize("detector", DETECTORS)
def test_teacher_own_queries_enter_the_student(detector):
    d = distiller(detector, "detrdistill")
    images, pad_mask, _ = make_batch()
    t_out = d.teacher_forward(images, pad_mask)
    group = d.teacher_query_group(t_out)
    assert torch.equal(group.boxes, t_out.layer_references[0])
    if detector == "dino":
        assert torch.equal(group.content[0], d.teacher.tgt_embed.weight)
    elif detector == "dab_detr":
        assert group.content.abs().sum() == 0


def clock_group(logits, boxes, labels=None):
    valid = torch.ones(logits.shape[1:3], dtype=torch.bool)
    group = QueryGroup("target", torch.zeros(*logits.shape[1:3], 4), boxes[0], valid=valid,
                       meta={"labels": labels} if labels is not None else {})
    return GroupOutput(logits, boxes, torch.zeros(1), torch.zeros(1), group)


def test_clockdistill_gkd_reductions():
    d = distiller("dino", "clockdistill")
    logits = torch.zeros(1, 1, 1, 3)
    s_box = torch.tensor([[[[0.5, 0.5, 0.2, 0.2]]]])
    t_box = torch.tensor([[[[0.6, 0.5, 0.2, 0.2]]]])
    # identical logits: class term 0; L1 = 0.1 summed, 0.025 averaged; 1 - GIoU = 1 - 1/3
    mean = d.logit_loss(clock_group(logits, s_box), clock_group(logits, t_box))
    assert abs(mean.item() - (5 * 0.025 + 2 * 2 / 3)) < 1e-5
    d.cfg["l1_reduction"] = "sum"
    assert abs(d.logit_loss(clock_group(logits, s_box), clock_group(logits, t_box)).item()
               - (5 * 0.1 + 2 * 2 / 3)) < 1e-5
    # class term: KL of softmax(z/T) at T = 10, mean over 2 classes, x T^2
    d.cfg["l1_reduction"] = "mean"
    z_t = torch.tensor([[[[10 * math.log(3.0), 0.0]]]])                        # softmax(z/10) = (3/4, 1/4)
    z_s = torch.zeros(1, 1, 1, 2)                                              # (1/2, 1/2)
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    got = d.logit_loss(clock_group(z_s, t_box), clock_group(z_t, t_box)).item()
    assert abs(got - kl / 2 * 100) < 1e-4
    d.cfg["cls_reduction"] = "sum"
    assert abs(d.logit_loss(clock_group(z_s, t_box), clock_group(z_t, t_box)).item() - kl * 100) < 1e-4


def test_clockdistill_gt_aware_weight():
    d = distiller("dino", "clockdistill", cfg={"query_weight": "teacher_gt"})
    z_t = torch.tensor([[2.0, 0.0, -1.0]])
    assert torch.allclose(d.query_weights(z_t, torch.tensor([1])), torch.sigmoid(torch.tensor([0.0])))
    assert torch.allclose(d.query_weights(z_t, torch.tensor([K])), torch.sigmoid(torch.tensor([2.0])))  # general


def test_clockdistill_general_queries_have_own_content_and_copies_change_nothing():
    gen = TargetQueryGenerator(K, copies=1, num_random=3)
    _, _, targets = make_batch()
    plan = gen.plan(targets, torch.device("cpu"))
    content = gen.group_for(tiny("dino"), plan).content[0, -3:]
    assert not torch.allclose(content[0], content[1]) and not torch.allclose(content[1], content[2])
    values = []
    for copies in (1, 3):
        torch.manual_seed(7)
        teacher = tiny("dino")
        d = distiller("dino", "clockdistill", teacher=teacher, seed=2, cfg={"copies": copies, "num_random": 0})
        images, pad_mask, targets = make_batch()
        with torch.no_grad():
            values.append(d(images, pad_mask, targets)["loss_tcld"].item())
    assert values[0] > 0 and abs(values[0] - values[1]) < 1e-5 * values[0]
