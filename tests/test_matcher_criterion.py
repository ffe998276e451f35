"""Hungarian matcher and set criterion on fake detector outputs (CPU, tiny tensors)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from models.criterion import SetCriterion, base_name, sigmoid_focal_loss
from models.matcher import HungarianMatcher, hungarian_match_single
from models.outputs import DetectorOutput, GroupOutput, QueryGroup
from models.query_groups import contrastive_denoising_group

B, Q, K, D, L = 3, 7, 5, 8, 3


def make_targets(counts, generator):
    targets = []
    for n in counts:
        cxcy = torch.rand(n, 2, generator=generator) * 0.6 + 0.2
        wh = torch.rand(n, 2, generator=generator) * 0.3 + 0.05
        labels = torch.randint(0, K, (n,), generator=generator)
        targets.append({"boxes": torch.cat([cxcy, wh], -1), "labels": labels})
    return targets


def rand_boxes(*shape, generator):
    cxcy = torch.rand(*shape, 2, generator=generator) * 0.6 + 0.2
    wh = torch.rand(*shape, 2, generator=generator) * 0.3 + 0.05
    return torch.cat([cxcy, wh], -1)


def leaf(x):
    return x.clone().requires_grad_(True)


def group_output(group, layers, generator):
    n = group.num_queries
    return GroupOutput(
        layer_logits=leaf(torch.randn(layers, B, n, K, generator=generator)),
        layer_boxes=leaf(rand_boxes(layers, B, n, generator=generator)),
        layer_states=torch.randn(layers, B, n, D, generator=generator),
        layer_references=rand_boxes(layers, B, n, generator=generator),
        group=group,
    )


def fake_output(generator, enc=True, groups=None):
    return DetectorOutput(
        layer_logits=leaf(torch.randn(L, B, Q, K, generator=generator)),
        layer_boxes=leaf(rand_boxes(L, B, Q, generator=generator)),
        layer_states=torch.randn(L, B, Q, D, generator=generator),
        layer_references=rand_boxes(L, B, Q, generator=generator),
        memory=torch.randn(B, 4, D, generator=generator),
        memory_pos=torch.randn(B, 4, D, generator=generator),
        memory_padding_mask=torch.zeros(B, 4, dtype=torch.bool),
        spatial_shapes=[(2, 2)],
        level_start_index=[0],
        valid_ratios=torch.ones(B, 1, 2),
        features=[torch.randn(B, D, 2, 2, generator=generator)],
        enc_logits=leaf(torch.randn(B, Q, K, generator=generator)) if enc else None,
        enc_boxes=leaf(rand_boxes(B, Q, generator=generator)) if enc else None,
        groups=groups or {},
    )


def dn_group(targets, generator):
    embed = nn.Embedding(K + 1, D)
    group = contrastive_denoising_group(targets, embed, K, num_dn_queries=12, generator=generator)
    assert group is not None
    return group


# ---- matcher ------------------------------------------------------------------------------


@pytest.mark.parametrize("counts", [(3, 0, 5), (0, 9, 1), (0, 0, 0)])
def test_batched_matches_per_image(counts):
    g = torch.Generator().manual_seed(0)
    targets = make_targets(counts, g)
    logits, boxes = torch.randn(B, Q, K, generator=g), rand_boxes(B, Q, generator=g)
    matcher = HungarianMatcher()
    batched = matcher(logits, boxes, targets)
    assert len(batched) == B
    for b, (src, gt) in enumerate(batched):
        ref_src, ref_gt = hungarian_match_single(logits[b], boxes[b], targets[b], matcher)
        assert src.dtype == gt.dtype == torch.int64
        assert len(src) == len(gt) == min(Q, counts[b])
        assert torch.equal(src, ref_src) and torch.equal(gt, ref_gt)
        assert len(set(src.tolist())) == len(src) and len(set(gt.tolist())) == len(gt)


def test_perfect_prediction_identity_and_zero_box_loss():
    g = torch.Generator().manual_seed(1)
    targets = make_targets([Q] * B, g)
    logits = torch.full((B, Q, K), -20.0)
    for b, t in enumerate(targets):
        logits[b, torch.arange(Q), t["labels"]] = 20.0
    boxes = torch.stack([t["boxes"] for t in targets])
    for src, gt in HungarianMatcher()(logits, boxes, targets):
        assert torch.equal(src, torch.arange(Q)) and torch.equal(gt, torch.arange(Q))

    out = fake_output(g, enc=False)
    out.layer_logits = leaf(logits[None].repeat(L, 1, 1, 1))
    out.layer_boxes = leaf(boxes[None].repeat(L, 1, 1, 1))
    losses = SetCriterion(K, HungarianMatcher())(out, targets)
    for key, value in losses.items():
        assert value.item() < 1e-5, key


def test_matcher_float32_under_autocast():
    g = torch.Generator().manual_seed(2)
    targets = make_targets([2, 3, 1], g)
    logits, boxes = torch.randn(B, Q, K, generator=g), rand_boxes(B, Q, generator=g)
    matcher = HungarianMatcher()
    ref = matcher(logits, boxes, targets)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        got = matcher(logits.bfloat16(), boxes.bfloat16(), targets)
        cost = matcher.cost(
            logits[0].bfloat16(), boxes[0].bfloat16(), targets[0]["labels"], targets[0]["boxes"]
        )
    assert cost.dtype == torch.float32
    assert all(len(a[0]) == len(b[0]) for a, b in zip(ref, got))


# ---- criterion ----------------------------------------------------------------------------


def expected_keys(dn=False, enc=True):
    names = ["loss_cls", "loss_bbox", "loss_giou"]
    keys = set(names) | {f"{n}_{i}" for n in names for i in range(L - 1)}
    if enc:
        keys |= {f"{n}_enc" for n in names}
    if dn:
        keys |= {f"{n}_dn" for n in names} | {f"{n}_dn_{i}" for n in names for i in range(L - 1)}
    return keys


@pytest.mark.parametrize("counts", [(2, 3, 1), (2, 0, 4), (0, 0, 0)])
def test_criterion_finite_scalars(counts):
    g = torch.Generator().manual_seed(3)
    targets = make_targets(counts, g)
    criterion = SetCriterion(K, HungarianMatcher())
    out = fake_output(g)
    losses = criterion(out, targets)
    assert set(losses) == expected_keys()
    for key, value in losses.items():
        assert value.dim() == 0 and torch.isfinite(value), key
    assert len(criterion.last_indices) == B
    total = criterion.total(losses)
    assert torch.isfinite(total)
    total.backward()
    # box losses stay in the graph even with no GT (DDP needs every parameter used)
    for tensor in (out.layer_logits, out.layer_boxes, out.enc_logits, out.enc_boxes):
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all()
    if sum(counts) == 0:
        assert losses["loss_bbox"].item() == 0 and losses["loss_giou"].item() == 0
        assert losses["loss_cls"].item() > 0          # queries still pushed to background
    else:
        assert out.layer_boxes.grad.abs().sum() > 0


def test_denoising_keys_and_padding_excluded():
    g = torch.Generator().manual_seed(4)
    targets = make_targets([2, 0, 3], g)
    group = dn_group(targets, g)
    dn = group_output(group, L, g)
    criterion = SetCriterion(K, HungarianMatcher())
    out = fake_output(g, groups={"dn": dn})
    losses = criterion(out, targets)
    assert set(losses) == expected_keys(dn=True)
    assert all(torch.isfinite(v) for v in losses.values())
    criterion.total(losses).backward()
    grad = dn.layer_logits.grad
    assert grad is not None and torch.isfinite(grad).all()
    padding = ~group.valid
    assert padding.any()
    assert grad[:, padding].abs().sum() == 0           # padding slots: no loss at all
    assert grad[:, group.valid].abs().sum() > 0        # positives and negatives: supervised
    assert dn.layer_boxes.grad.abs().sum() > 0


def test_other_groups_ignored():
    g = torch.Generator().manual_seed(5)
    targets = make_targets([1, 2, 0], g)
    out = fake_output(g)
    criterion = SetCriterion(K, HungarianMatcher())
    ref = criterion(out, targets)
    extra = QueryGroup(
        name="target", content=torch.randn(B, 4, D), boxes=rand_boxes(B, 4, generator=g)
    )
    out.groups = {"target": group_output(extra, L, g)}
    got = criterion(out, targets)
    assert set(got) == set(ref)
    for key in ref:
        assert torch.equal(got[key], ref[key]), key
    criterion.total(got).backward()
    assert out.groups["target"].layer_logits.grad is None


def test_total_weights_and_names():
    assert base_name("loss_cls") == "loss_cls"
    assert base_name("loss_bbox_3") == "loss_bbox"
    assert base_name("loss_giou_enc") == "loss_giou"
    assert base_name("loss_cls_dn") == "loss_cls"
    assert base_name("loss_cls_dn_0") == "loss_cls"
    criterion = SetCriterion(K, HungarianMatcher(), weight_dict={"loss_cls": 2.0})
    one = torch.tensor(1.0)
    losses = {"loss_cls": one, "loss_cls_dn_1": one, "loss_bbox_enc": one, "loss_giou_0": one}
    assert criterion.total(losses).item() == pytest.approx(2 + 2 + 5 + 2)
    with pytest.raises(KeyError):
        criterion.total({"loss_kd": one})


def test_focal_loss_normalisation():
    logits = torch.zeros(1, 4, 2)
    targets = torch.zeros(1, 4, 2)
    # p = 0.5 everywhere, all background: each element is (1 - alpha) * 0.5^2 * log 2
    per_element = 0.75 * 0.25 * math.log(2)
    got = sigmoid_focal_loss(logits, targets, num_boxes=2.0)
    # mean over the 4 queries, sum over the 2 classes, / num_boxes
    assert got.item() == pytest.approx(per_element * 2 / 2)
