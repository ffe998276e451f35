"""Our DAB-DETR computes Hugging Face's ``DabDetrForObjectDetection`` function, number for number.

A small HF model (resnet18 layout, d_model 64, 2+3 layers) gets *every* parameter and buffer
randomised (BatchNorm statistics, zero-initialised box head, PReLU slopes, anchors), so that a
wrong mapping cannot hide behind an initial value; reproduce/convert/dab_detr.py maps it into
ours; both run in eval mode in fp32 on a padded batch of two images of different sizes. Memory,
every decoder layer's (normed) state and anchor, and the final logits and boxes must agree to
1e-4.
"""
from __future__ import annotations

import pytest
import torch
import transformers   # a requirement (requirements.in): the reference runs in the default suite

from models.build import build_detector
from reproduce.convert import dab_detr as convert
from tests.hf_reference import padded_batch, randomise

TOL = 1e-4
NUM_CLASSES = 5


def hf_model(**overrides):
    resnet = transformers.ResNetConfig(layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512],
                                       embedding_size=64, out_features=["stage4"])
    cfg = dict(use_timm_backbone=False, use_pretrained_backbone=False, backbone=None, backbone_config=resnet,
               hidden_size=64, encoder_layers=2, decoder_layers=3, encoder_ffn_dim=96, decoder_ffn_dim=96,
               encoder_attention_heads=4, decoder_attention_heads=4, num_queries=7, num_labels=NUM_CLASSES)
    torch.manual_seed(0)
    model = transformers.DabDetrForObjectDetection(transformers.DabDetrConfig(**{**cfg, **overrides})).eval()
    randomise(model)
    return model


def ours_from(hf) -> torch.nn.Module:
    hf_config = hf.config.to_dict()
    model = build_detector(convert.model_config(hf_config), NUM_CLASSES, load_weights=False)
    model.load_state_dict(convert.state_dict(hf.state_dict(), hf_config), strict=True)
    return model.eval()


def max_diffs(hf, ours) -> dict[str, float]:
    images, pixel_mask = padded_batch([(160, 192), (112, 128)])
    with torch.no_grad():
        hf_out = hf(pixel_values=images, pixel_mask=pixel_mask, output_hidden_states=True)
        hf_inner = hf.model(pixel_values=images, pixel_mask=pixel_mask)
        out = ours(images, pixel_mask == 0)
    diff = lambda a, b: (a - b).abs().max().item()  # noqa: E731
    return {
        "memory": diff(out.memory, hf_out.encoder_last_hidden_state),
        "layer_states": diff(out.layer_states, hf_inner.intermediate_hidden_states),
        "layer_references": diff(out.layer_references, hf_inner.reference_points),
        "pred_logits": diff(out.logits, hf_out.logits),
        "pred_boxes": diff(out.boxes, hf_out.pred_boxes),
    }


@pytest.mark.parametrize("random_refpoints_xy", [False, True])
def test_dab_detr_matches_hugging_face(random_refpoints_xy):
    hf = hf_model(random_refpoints_xy=random_refpoints_xy)
    ours = ours_from(hf)
    assert ours.refpoint_embed.frozen_xy == random_refpoints_xy
    assert len(ours.decoder.layers) == 3
    diffs = max_diffs(hf, ours)
    assert all(v <= TOL for v in diffs.values()), diffs


def test_converter_refuses_what_it_cannot_map():
    hf = hf_model()
    config, state = hf.config.to_dict(), hf.state_dict()
    for option, value in (("keep_query_pos", True), ("num_patterns", 3), ("temperature_width", 10000),
                          ("normalize_before", True), ("activation_function", "gelu")):
        with pytest.raises(ValueError, match=option):
            convert.model_config({**config, option: value})
    with pytest.raises(ValueError, match="no place"):
        convert.state_dict({**state, "model.extra.weight": torch.zeros(1)}, config)
    with pytest.raises(ValueError, match="missing"):
        convert.state_dict({k: v for k, v in state.items() if k != "model.decoder.ref_anchor_head.layers.0.bias"},
                           config)
    untied = dict(state)
    untied["bbox_predictor.layers.0.bias"] = state["bbox_predictor.layers.0.bias"] + 1
    with pytest.raises(ValueError, match="ties"):
        convert.state_dict(untied, config)
