"""DINO's pieces against hand-checked values (DINO has no transformers implementation to compare
with). Source: IDEA-Research/DINO config/DINO/DINO_4scale.py and models/dino/{dn_components.py,
position_encoding.py, deformable_transformer.py}."""
from __future__ import annotations

import math

import pytest
import torch

from models.box_ops import box_cxcywh_to_xyxy, inverse_sigmoid
from models.build import SIZES, build_detector, detector_config
from models.position_encoding import sine_position_embedding
from models.query_groups import contrastive_denoising_group, denoising_group_count


@pytest.mark.parametrize("num_dn, max_gt, rule, groups", [
    (100, 1, "dino", 100),    # dn_number 100 -> 200 queries -> 200 // (2 * 1)
    (100, 3, "dino", 33),     # 200 // 6
    (100, 7, "dino", 14),     # 200 // 14
    (100, 150, "dino", 1),    # 200 // 300 = 0 -> 1
    (30, 5, "dino", 60),      # 60 < 100: DINO keeps dn_number = 60 groups, whatever max_gt
    (30, 5, "dynamic", 6),    # our CPU sizes: 60 // 10
    (12, 2, "dynamic", 6),
])
def test_denoising_group_count(num_dn, max_gt, rule, groups):
    assert denoising_group_count(num_dn, max_gt, rule) == groups


def test_denoising_group_size_and_box_noise_scale():
    gt = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.6, 0.1, 0.3], [0.7, 0.3, 0.2, 0.1]])
    targets = [{"boxes": gt, "labels": torch.tensor([0, 1, 2])}, {"boxes": gt[:1], "labels": torch.tensor([1])}]
    embed = torch.nn.Embedding(4, 8)
    with torch.device("meta"):     # only the configuration is read
        model = build_detector(detector_config("dino", "paper"), num_classes=3, load_weights=False)
    assert model.dn_cfg["box_noise_scale"] == 0.4 and model.dn_cfg["num_dn_queries"] == 100
    dn = contrastive_denoising_group(targets, embed, 3, generator=torch.Generator().manual_seed(0),
                                     **model.dn_cfg)
    assert dn.meta["num_groups"] == 33 and dn.num_queries == 33 * 2 * 3
    # corner displacement = sign * u * (w/2 or h/2) * 0.4, u in [0, 1) for positives, [1, 2) negatives
    boxes = dn.boxes[0].view(33, 2, 3, 4)
    moved = (box_cxcywh_to_xyxy(boxes) - box_cxcywh_to_xyxy(gt)).abs()
    half = (gt[:, 2:] / 2).repeat(1, 2)
    ratio = moved / (0.4 * half)
    assert ratio[:, 0].max() < 1 + 1e-4, "positives move less than 0.4 x half the box"
    assert ratio[:, 1].min() > 1 - 1e-4 and ratio[:, 1].max() < 2 + 1e-4, "negatives move 1-2 x that"


def test_dino_positions_have_temperature_20_and_no_offset():
    with torch.device("meta"):     # only the configuration is read
        for size in SIZES:
            model = build_detector(detector_config("dino", size), 3, load_weights=False)
            assert (model.pos_temperature, model.pos_offset) == (20.0, 0.0), size
        deformable = build_detector(detector_config("deformable_detr", "paper"), 3, load_weights=False)
    assert (deformable.pos_temperature, deformable.pos_offset) == (10000.0, -0.5)
    # one row of two cells, 4 features per axis: x = (1, 2) / 2 * 2pi = (pi, 2pi); y = 2pi;
    # dim_t = 20 ** (2 * (i // 2) / 4) = (1, 1, sqrt 20, sqrt 20)
    pos = sine_position_embedding(torch.zeros(1, 1, 2, dtype=torch.bool), 4, temperature=20.0, offset=0.0)
    expected, t = [], math.sqrt(20)
    for x in (math.pi, 2 * math.pi):
        y = 2 * math.pi
        feats_y = [math.sin(y), math.cos(y), math.sin(y / t), math.cos(y / t)]
        feats_x = [math.sin(x), math.cos(x), math.sin(x / t), math.cos(x / t)]
        expected.append(feats_y + feats_x)
    assert torch.allclose(pos[0, :, 0].T, torch.tensor(expected), atol=1e-5)


def test_dino_updates_anchors_from_the_unnormed_output(tiny_batch):
    torch.manual_seed(0)
    images, pad_mask, _ = tiny_batch
    model = build_detector(detector_config("dino", "tiny"), num_classes=3).eval()
    with torch.no_grad():   # a non-trivial box head and final norm, so the two readings differ
        for p in model.decoder.box_heads[0].parameters():
            p.normal_(0, 0.1)
        model.decoder.norm.weight.normal_(1, 0.5)
        model.decoder.norm.bias.normal_(0, 0.5)
    raw = []
    hook = model.decoder.layers[0].register_forward_hook(lambda m, i, o: raw.append(o[0]))
    with torch.no_grad():
        out = model(images, pad_mask)
    hook.remove()
    head, ref0 = model.decoder.box_heads[0], out.layer_references[0]
    with torch.no_grad():
        from_raw = (head(raw[0]) + inverse_sigmoid(ref0, 1e-3)).sigmoid()
        from_normed = (head(out.layer_states[0]) + inverse_sigmoid(ref0, 1e-3)).sigmoid()
        # reported boxes: the normed state on the previous layer's (undetached) anchor
        reported = (head(out.layer_states[1]) + inverse_sigmoid(out.layer_references[1], 1e-3)).sigmoid()
    assert torch.allclose(out.layer_references[1], from_raw, atol=1e-6)
    assert not torch.allclose(from_raw, from_normed, atol=1e-3)
    assert torch.allclose(out.layer_boxes[1], reported, atol=1e-6)
