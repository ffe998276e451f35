"""Hugging Face ``DabDetrForObjectDetection`` -> our models/dab_detr.py DABDETR.

Module layout read from transformers models/dab_detr/modeling_dab_detr.py (v4.57) and its
configuration_dab_detr.py; both follow IDEA-Research/DAB-DETR models/DAB_DETR/{DABDETR,transformer}.py,
which models/dab_detr.py follows too. tests/test_hf_dab_detr.py runs both models on the same
random weights and checks every intermediate output (grade A for the mapping).

``model_config`` refuses every HF option our model does not implement (one line naming it);
``state_dict`` maps each HF key to exactly one of ours, checks that every key of ours was
produced and every HF key consumed, and fails otherwise.
"""
from __future__ import annotations

import math
import re

import torch

from .resnet import (PLAIN_TIMM_RESNETS, TIMM_PREFIXES, ConvertError, backbone_state, check_hf_resnet_config,
                     expected_state)

# ``bbox_predictor`` and ``model.decoder.bbox_embed`` are one tied module in HF (the shared box
# head, used for the anchor updates and the reported boxes): both copies are read, checked equal
TIED_BOX_HEAD = ("bbox_predictor.", "model.decoder.bbox_embed.")

# HF option -> the value our model implements (anything else is refused)
FIXED_OPTIONS = {"query_dim": 4, "keep_query_pos": False, "num_patterns": 0, "normalize_before": False,
                 "temperature_height": 20, "temperature_width": 20, "attention_dropout": 0.0}

# decoder-layer module names: HF (under model.decoder.layers.N.) -> ours (under decoder.layers.N.)
_DECODER_LAYER = {
    "self_attn.self_attn_query_content_proj": "sa_qcontent", "self_attn.self_attn_query_pos_proj": "sa_qpos",
    "self_attn.self_attn_key_content_proj": "sa_kcontent", "self_attn.self_attn_key_pos_proj": "sa_kpos",
    "self_attn.self_attn_value_proj": "sa_v", "self_attn.self_attn.output_proj": "sa_out",
    "self_attn.self_attn_layer_norm": "norm1",
    "cross_attn.cross_attn_query_content_proj": "ca_qcontent", "cross_attn.cross_attn_query_pos_proj": "ca_qpos",
    "cross_attn.cross_attn_key_content_proj": "ca_kcontent", "cross_attn.cross_attn_key_pos_proj": "ca_kpos",
    "cross_attn.cross_attn_value_proj": "ca_v", "cross_attn.cross_attn_query_pos_sine_proj": "ca_qpos_sine",
    "cross_attn.cross_attn.output_proj": "ca_out", "cross_attn.cross_attn_layer_norm": "norm2",
    "mlp.fc1": "ffn.linear1", "mlp.fc2": "ffn.linear2", "mlp.final_layer_norm": "ffn.norm",
    "mlp.activation_fn": "ffn.activation",
}
_ENCODER_LAYER = {
    "self_attn.q_proj": "self_attn.q_proj", "self_attn.k_proj": "self_attn.k_proj",
    "self_attn.v_proj": "self_attn.v_proj", "self_attn.out_proj": "self_attn.out_proj",
    "self_attn_layer_norm": "norm", "fc1": "ffn.linear1", "fc2": "ffn.linear2",
    "final_layer_norm": "ffn.norm", "activation_fn": "ffn.activation",
}
# whole-model modules with the same structure on both sides
_MODULES = {"model.input_projection": "input_proj.0.0", "model.encoder.query_scale": "encoder.query_scale",
            "model.decoder.layernorm": "decoder.norm", "model.decoder.query_scale": "decoder.query_scale",
            "model.decoder.ref_point_head": "decoder.ref_point_head",
            "model.decoder.ref_anchor_head": "decoder.ref_anchor_head"}
_LAYER_KEY = re.compile(r"model\.(encoder|decoder)\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def _refuse(option: str, value, why: str) -> None:
    raise ConvertError(f"HF DAB-DETR option {option}={value!r} is not supported by models/dab_detr.py ({why})")


def _backbone(hf_config: dict) -> dict:
    """Our ``backbone`` config entry (name, the one level read, weights loaded from the file)."""
    if hf_config.get("use_timm_backbone", True):
        name = hf_config.get("backbone") or "resnet50"
        if name not in PLAIN_TIMM_RESNETS:
            _refuse("backbone", name, f"timm backbones convert only as {', '.join(PLAIN_TIMM_RESNETS)}")
        kwargs = dict(hf_config.get("backbone_kwargs") or {})
        if hf_config.get("dilation") or kwargs.get("output_stride") not in (None, 32):
            _refuse("dilation", True, "our ResNets have no dilated (DC5) variant")
        stage = max(kwargs.get("out_indices") or [4])           # timm index i = torchvision layer i
        return {"name": name, "levels": [stage + 1], "weights": "none"}
    bcfg = hf_config.get("backbone_config")
    if hasattr(bcfg, "to_dict"):
        bcfg = bcfg.to_dict()
    kind = bcfg.get("model_type", "resnet") if isinstance(bcfg, dict) else bcfg
    if kind != "resnet":
        _refuse("backbone_config.model_type", kind, "only a transformers ResNet or a plain timm ResNet maps onto "
                "models/backbone.py")
    name = check_hf_resnet_config(bcfg)
    out = list(bcfg.get("out_features") or ["stage4"])
    if not all(re.fullmatch(r"stage[1-4]", s) for s in out):
        _refuse("backbone_config.out_features", out, "expected ResNet stages stage1..stage4")
    # DAB-DETR reads only the last feature map (DabDetrModel.forward: features[-1]); stage N = C(N+1)
    return {"name": name, "levels": [int(out[-1][-1]) + 1], "weights": "none"}


def model_config(hf_config: dict) -> dict:
    """Our ``detector_config("dab_detr", "paper", ...)`` matching ``hf_config`` (num_classes apart)."""
    from models.build import detector_config

    hf_config = dict(hf_config)
    for option, ours in FIXED_OPTIONS.items():
        if option in hf_config and hf_config[option] != ours:
            _refuse(option, hf_config[option], f"ours is fixed at {ours!r}")
    scale = hf_config.get("sine_position_embedding_scale")
    if scale is not None and not math.isclose(float(scale), 2 * math.pi):
        _refuse("sine_position_embedding_scale", scale, "ours is 2*pi")
    for a, b in (("encoder_attention_heads", "decoder_attention_heads"), ("encoder_ffn_dim", "decoder_ffn_dim")):
        if hf_config.get(a, 8 if "heads" in a else 2048) != hf_config.get(b, 8 if "heads" in b else 2048):
            _refuse(f"{a}/{b}", (hf_config.get(a), hf_config.get(b)), "one value serves encoder and decoder")
    activation = hf_config.get("activation_function", "prelu")
    if activation not in ("prelu", "relu"):
        _refuse("activation_function", activation, "our FFNs offer prelu or relu")
    activation_dropout = float(hf_config.get("activation_dropout", 0.0))
    dropout = float(hf_config.get("dropout", 0.1))
    if activation_dropout not in (0.0, dropout):
        # training only: our FFN applies ``dropout`` to its hidden layer as well
        _refuse("activation_dropout", activation_dropout, "ours equals dropout")
    return detector_config(
        "dab_detr", "paper", backbone=_backbone(hf_config), d_model=int(hf_config.get("hidden_size", 256)),
        n_heads=int(hf_config.get("encoder_attention_heads", 8)), enc_layers=int(hf_config.get("encoder_layers", 6)),
        dec_layers=int(hf_config.get("decoder_layers", 6)), dim_feedforward=int(hf_config.get("encoder_ffn_dim", 2048)),
        num_queries=int(hf_config.get("num_queries", 300)), dropout=dropout, activation=activation,
        random_refpoints_xy=bool(hf_config.get("random_refpoints_xy", False)))


def state_dict(hf_state: dict[str, torch.Tensor], hf_config: dict) -> dict[str, torch.Tensor]:
    """Our DABDETR state dict from HF's ``DabDetrForObjectDetection.state_dict()``."""
    hf_config = dict(hf_config)
    model_config(hf_config)                  # refuse unsupported options before mapping anything
    out, consumed = backbone_state(hf_state, hf_config.get("use_timm_backbone", True),
                                   _backbone(hf_config)["name"], TIMM_PREFIXES[0])
    num_layers = int(hf_config.get("decoder_layers", 6))

    def take(hf_key: str, ours: str) -> None:
        if hf_key in hf_state:
            out[ours] = hf_state[hf_key]
            consumed.add(hf_key)

    for key in list(hf_state):
        for hf_module, ours in _MODULES.items():
            if key.startswith(hf_module + "."):
                take(key, ours + key[len(hf_module):])
    for key in hf_state:
        match = _LAYER_KEY.match(key)
        if match:
            part, index, module, field = match.groups()
            table = _ENCODER_LAYER if part == "encoder" else _DECODER_LAYER
            if module in table:
                take(key, f"{part}.layers.{index}.{table[module]}.{field}")
    # anchors: HF's Embedding [Q,4] (inverse-sigmoid cx, cy, w, h) -> our xy / wh split
    anchors_key = "model.query_refpoint_embeddings.weight"
    if anchors_key in hf_state:
        out["refpoint_embed.xy"], out["refpoint_embed.wh"] = hf_state[anchors_key][:, :2], hf_state[anchors_key][:, 2:]
        consumed.add(anchors_key)
    # heads: one class head and one box head shared by all layers (bbox_embed_diff_each_layer=False)
    predictor, tied = TIED_BOX_HEAD
    for key in [k for k in hf_state if k.startswith(predictor) or k.startswith(tied)]:
        rest = key.split(".layers.", 1)[1] if ".layers." in key else None
        if rest is None:
            continue
        if key.startswith(tied) and predictor + "layers." + rest in hf_state:
            if not torch.equal(hf_state[key], hf_state[predictor + "layers." + rest]):
                raise ConvertError(f"{key} differs from {predictor}layers.{rest}: HF ties them (one shared box "
                                   "head); untied box heads are not DAB-DETR's default and not supported")
        for layer in range(num_layers):
            out[f"decoder.box_heads.{layer}.layers.{rest}"] = hf_state[key]
        consumed.add(key)
    for field in ("weight", "bias"):
        if f"class_embed.{field}" in hf_state:
            for layer in range(num_layers):
                out[f"decoder.class_heads.{layer}.{field}"] = hf_state[f"class_embed.{field}"]
            consumed.add(f"class_embed.{field}")

    left = sorted(set(hf_state) - consumed)
    if left:
        raise ConvertError(f"{len(left)} HF DAB-DETR keys have no place in our model (first: {left[:3]})")
    num_classes = hf_state["class_embed.weight"].shape[0] if "class_embed.weight" in hf_state else 1
    expected = expected_state(model_config(hf_config), num_classes)
    missing = sorted(set(expected) - set(out))
    extra = sorted(set(out) - set(expected))
    shapes = sorted(k for k in set(expected) & set(out) if tuple(expected[k].shape) != tuple(out[k].shape))
    if missing or extra or shapes:
        raise ConvertError(f"mapped HF DAB-DETR weights do not fill our model: {len(missing)} missing "
                           f"{missing[:3]}, {len(extra)} unexpected {extra[:3]}, {len(shapes)} of another shape "
                           f"{shapes[:3]}")
    return {k: v.clone() for k, v in out.items()}
