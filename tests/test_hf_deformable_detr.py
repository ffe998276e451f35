"""Our Deformable DETR computes the same function as transformers' ``DeformableDetrForObjectDetection``.

A small HF model (ResNet-18 layout backbone, d_model 32, 4 levels) gets random values in
*every* parameter and buffer (batch-norm statistics and the zero-initialised heads included),
is converted with reproduce/convert/deformable_detr.py, and both run in eval mode, fp32, on a
padded batch of two images of different sizes. Memory, each decoder layer's hidden states and
references, logits and boxes must agree to 1e-4, in the three modes of the paper.
"""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from models.build import build_detector  # noqa: E402
from reproduce.convert import deformable_detr as convert  # noqa: E402
from reproduce.convert.resnet import ConvertError  # noqa: E402

TOLERANCE = 1e-4
MODES = {   # (with_box_refine, two_stage)
    "one_stage": (False, False),
    "box_refine": (True, False),
    "two_stage": (True, True),
}


def hf_config(with_box_refine: bool, two_stage: bool, classes: int = 3):
    backbone = transformers.ResNetConfig(layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512],
                                         embedding_size=64, out_features=["stage2", "stage3", "stage4"])
    return transformers.DeformableDetrConfig(
        use_timm_backbone=False, use_pretrained_backbone=False, backbone=None, backbone_config=backbone,
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=10, two_stage_num_proposals=10,
        num_feature_levels=4, encoder_n_points=2, decoder_n_points=2, with_box_refine=with_box_refine,
        two_stage=two_stage, num_labels=classes)


@torch.no_grad()
def randomise_(model: torch.nn.Module, seed: int = 0) -> None:
    """Random values everywhere, scaled so activations stay O(1) through the whole network."""
    g = torch.Generator().manual_seed(seed)
    seen = set()
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.data_ptr() in seen or not tensor.is_floating_point():
            continue
        seen.add(tensor.data_ptr())
        noise = torch.randn(tensor.shape, generator=g)
        if name.endswith("running_var"):
            value = torch.rand(tensor.shape, generator=g) + 0.5
        elif tensor.dim() > 1 and "embed" in name and "bbox_embed" not in name and "class_embed" not in name:
            value = noise                                           # level / query embeddings
        elif tensor.dim() > 1:
            value = noise / tensor[0].numel() ** 0.5                # weights: unit gain
        elif any(s in name for s in ("norm", "normalization", "layernorm")) and name.endswith("weight"):
            value = 1 + 0.2 * noise
        else:
            value = 0.2 * noise                                     # biases, BN shifts and means
        tensor.copy_(value)


def padded_batch():
    g = torch.Generator().manual_seed(1)
    pixels = torch.zeros(2, 3, 96, 128)
    valid = torch.zeros(2, 96, 128, dtype=torch.long)
    pixels[0] = torch.randn(3, 96, 128, generator=g)
    valid[0] = 1
    pixels[1, :, :72, :88] = torch.randn(3, 72, 88, generator=g)
    valid[1, :72, :88] = 1
    return pixels, valid


def both_models(mode: str, classes: int = 3):
    config = hf_config(*MODES[mode], classes=classes)
    torch.manual_seed(0)
    hf = transformers.DeformableDetrForObjectDetection(config).eval()
    randomise_(hf)
    hf_dict = config.to_dict()
    ours_cfg = convert.model_config(hf_dict)
    ours = build_detector(ours_cfg, convert.num_classes(hf_dict), load_weights=False)
    ours.load_state_dict(convert.state_dict(hf.state_dict(), hf_dict), strict=True)
    return hf, ours.eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@pytest.mark.parametrize("mode", MODES)
def test_matches_transformers(mode):
    refine, two_stage = MODES[mode]
    hf, ours = both_models(mode)
    pixels, valid = padded_batch()
    with torch.no_grad():
        theirs = hf(pixel_values=pixels, pixel_mask=valid)
        mine = ours(pixels, valid == 0)
    dims = theirs.init_reference_points.shape[-1]
    assert dims == (4 if two_stage else 2)
    diffs = {
        "memory": max_diff(mine.memory, theirs.encoder_last_hidden_state),
        "hidden_states": max_diff(mine.layer_states.transpose(0, 1), theirs.intermediate_hidden_states),
        "init_reference": max_diff(mine.layer_references[0][..., :dims], theirs.init_reference_points),
        "logits": max_diff(mine.logits, theirs.logits),
        "boxes": max_diff(mine.boxes, theirs.pred_boxes),
    }
    # HF's intermediate_reference_points[l]: the reference after layer l's update
    after = mine.layer_boxes if refine else mine.layer_references
    hf_refs = theirs.intermediate_reference_points.transpose(0, 1)
    diffs["references"] = max_diff(after[..., : hf_refs.shape[-1]], hf_refs)
    if refine:   # and what each later layer received
        diffs["received_references"] = max_diff(mine.layer_references[1:], hf_refs[:-1])
    if two_stage:
        diffs["enc_logits"] = max_diff(mine.enc_logits, theirs.enc_outputs_class)
        diffs["enc_boxes"] = max_diff(mine.enc_boxes, theirs.enc_outputs_coord_logits.sigmoid())
    assert max(diffs.values()) <= TOLERANCE, diffs
    assert mine.logits.abs().max() > 0.1 and mine.boxes.std() > 0.01, "outputs must not be trivial"


def test_every_hf_key_is_used_and_unknown_ones_fail():
    hf, _ = both_models("two_stage")
    state = hf.state_dict()
    config = hf.config.to_dict()
    with pytest.raises(ConvertError, match="no place"):
        convert.state_dict({**state, "model.surprise.weight": torch.zeros(1)}, config)
    missing = {k: v for k, v in state.items() if not k.startswith("model.pos_trans.")}
    with pytest.raises(ConvertError, match="missing"):
        convert.state_dict(missing, config)


@pytest.mark.parametrize("option, value", [("activation_function", "gelu"), ("dilation", True),
                                           ("decoder_ffn_dim", 128), ("two_stage_num_proposals", 5)])
def test_unsupported_options_are_refused(option, value):
    config = hf_config(True, True).to_dict()
    config[option] = value
    with pytest.raises(ConvertError, match=option):
        convert.model_config(config)


def test_two_stage_encoder_loss_uses_binary_labels():
    """Deformable DETR trains its encoder head on every token as foreground-vs-background:
    the labels become 0 (Deformable-DETR models/deformable_detr.py ``bin_targets``)."""
    from models.build import build_criterion

    _, ours = both_models("two_stage")
    pixels, valid = padded_batch()
    out = ours(pixels, valid == 0)
    assert out.enc_logits.shape[1] == out.memory.shape[1], "every token is supervised"
    boxes = torch.tensor([[0.5, 0.5, 0.3, 0.4]])
    criterion = build_criterion("deformable_detr", 3)
    as_class_2 = criterion(out, [{"boxes": boxes, "labels": torch.tensor([2])}] * 2)
    as_class_0 = criterion(out, [{"boxes": boxes, "labels": torch.tensor([0])}] * 2)
    assert torch.equal(as_class_2["loss_cls_enc"], as_class_0["loss_cls_enc"])
    assert not torch.equal(as_class_2["loss_cls"], as_class_0["loss_cls"])
    assert not build_criterion("dino", 3).encoder_binary_labels


def test_one_stage_points_and_injected_box_groups_decode_in_one_pass():
    """One-stage detection queries keep their 2-D point references (and HF's outputs) while an
    injected group with 4-D boxes rides along in the same decoder pass."""
    from models.outputs import QueryGroup

    hf, ours = both_models("one_stage")
    pixels, valid = padded_batch()
    group = QueryGroup("target", torch.randn(2, 3, 32), torch.tensor([[0.4, 0.5, 0.2, 0.3]]).expand(2, 3, 4))
    with torch.no_grad():
        theirs = hf(pixel_values=pixels, pixel_mask=valid)
        mine = ours(pixels, valid == 0, groups=[group])
    assert max_diff(mine.logits, theirs.logits) <= TOLERANCE
    assert max_diff(mine.boxes, theirs.pred_boxes) <= TOLERANCE
    assert mine.groups["target"].layer_boxes.shape == (2, 2, 3, 4)


def test_mixed_point_and_box_references_equal_separate_calls():
    from models.deformable_attention import MultiScaleDeformableAttention

    torch.manual_seed(0)
    attn = MultiScaleDeformableAttention(16, n_levels=2, n_heads=2, n_points=2)
    shapes = [(4, 6), (2, 3)]
    query, value = torch.randn(2, 5, 16), torch.randn(2, 30, 16)
    boxes = torch.rand(2, 5, 2, 4) * 0.5 + 0.25
    points = torch.tensor([True, False, True, False, False])
    mixed, _ = attn(query, boxes, value, shapes, point_queries=points)
    as_points, _ = attn(query, boxes[..., :2], value, shapes)
    as_boxes, _ = attn(query, boxes, value, shapes)
    assert torch.allclose(mixed[:, points], as_points[:, points], atol=1e-6)
    assert torch.allclose(mixed[:, ~points], as_boxes[:, ~points], atol=1e-6)
