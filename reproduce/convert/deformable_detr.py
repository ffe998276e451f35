"""Hugging Face ``DeformableDetrForObjectDetection`` -> our models/deformable_detr.py DeformableDETR.

Module layout read from transformers models/deformable_detr/modeling_deformable_detr.py (v4.57)
and configuration_deformable_detr.py; both follow fundamentalvision/Deformable-DETR
models/{deformable_detr,deformable_transformer}.py, which models/deformable_detr.py follows too.
tests/test_hf_deformable_detr.py runs both models on the same random weights in the one-stage,
box-refinement and two-stage modes and checks memory, every decoder layer's hidden states and
references, logits and boxes (grade A for the mapping).

``model_config`` refuses every HF option our model does not implement (one line naming it);
``state_dict`` maps each HF key to one of ours, checks that every key of ours was produced and
every HF key consumed (or is a listed alias), and fails otherwise.

HF keys read but not mapped on their own: ``model.decoder.bbox_embed.*`` and
``model.decoder.class_embed.*`` are HF's tied aliases of the top-level ``bbox_embed.*`` /
``class_embed.*`` (the same modules, hooked into the decoder for refinement / two-stage); they
are checked equal to them. Keys of ours with no HF counterpart: the backbone's unused ImageNet
classifier ``backbone.body.fc.*`` (zeros), and in one-stage mode ``pos_trans`` /
``pos_trans_norm``, which only our injected query groups use (models/deformable_detr.py); they
get our initialisation from a fixed seed, so HF's detections are unaffected.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from .resnet import (PLAIN_TIMM_RESNETS, TIMM_PREFIXES, ConvertError, backbone_state, check_hf_resnet_config,
                     expected_state)

# HF option -> the only value our model implements
FIXED_OPTIONS = {"activation_function": "relu", "position_embedding_type": "sine", "dilation": False,
                 "num_channels": 3}
# seed of the one-stage pos_trans, which HF does not have (module docstring)
EXTRA_SEED = 0

_ENCODER_LAYER = {"self_attn": "self_attn", "self_attn_layer_norm": "norm", "fc1": "ffn.linear1",
                  "fc2": "ffn.linear2", "final_layer_norm": "ffn.norm"}
_DECODER_LAYER = {"self_attn": "self_attn", "self_attn_layer_norm": "norm1", "encoder_attn": "cross_attn",
                  "encoder_attn_layer_norm": "norm2", "fc1": "ffn.linear1", "fc2": "ffn.linear2",
                  "final_layer_norm": "ffn.norm"}
_LAYER_KEY = re.compile(r"model\.(encoder|decoder)\.layers\.(\d+)\.([a-z_0-9]+)\.(.+)$")
_MODULES = {"model.level_embed": "level_embed", "model.input_proj.": "input_proj.",
            "model.enc_output.": "query_selection.enc_output.", "model.enc_output_norm.": "query_selection.enc_norm.",
            "model.pos_trans.": "pos_trans.", "model.pos_trans_norm.": "pos_trans_norm.",
            "model.query_position_embeddings.": "query_embed.", "model.reference_points.": "reference_points."}
_HEAD_KEY = re.compile(r"(class_embed|bbox_embed)\.(\d+)\.(.+)$")
_TIED_ALIAS = re.compile(r"model\.decoder\.(class_embed|bbox_embed)\.(\d+)\.(.+)$")


def _refuse(option: str, value, why: str) -> None:
    raise ConvertError(f"HF Deformable DETR option {option}={value!r} is not supported by "
                       f"models/deformable_detr.py ({why})")


def num_classes(hf_config: dict) -> int:
    """HF's class count (``len(id2label)``, as PretrainedConfig.num_labels)."""
    if hf_config.get("id2label"):
        return len(hf_config["id2label"])
    return int(hf_config.get("num_labels", 2))      # PretrainedConfig's default


def _backbone(hf_config: dict) -> dict:
    """Our ``backbone`` entry: torchvision ResNet name and the levels HF reads."""
    levels_wanted = int(hf_config.get("num_feature_levels", 4))
    if hf_config.get("use_timm_backbone", True):
        name = hf_config.get("backbone") or "resnet50"
        if name not in PLAIN_TIMM_RESNETS:
            _refuse("backbone", name, f"timm backbones convert only as {', '.join(PLAIN_TIMM_RESNETS)}")
        kwargs = dict(hf_config.get("backbone_kwargs") or {})
        if kwargs.get("output_stride") not in (None, 32):
            _refuse("backbone_kwargs.output_stride", kwargs["output_stride"], "our ResNets are not dilated")
        # DeformableDetrConvEncoder's default out_indices; timm index i = torchvision layer i = C(i+1)
        indices = kwargs.get("out_indices") or ((2, 3, 4) if levels_wanted > 1 else (4,))
        levels = [int(i) + 1 for i in indices]
    else:
        bcfg = hf_config.get("backbone_config")
        if hasattr(bcfg, "to_dict"):
            bcfg = bcfg.to_dict()
        if not isinstance(bcfg, dict) or bcfg.get("model_type", "resnet") != "resnet":
            kind = bcfg.get("model_type") if isinstance(bcfg, dict) else bcfg
            _refuse("backbone_config", kind, "only a transformers ResNet or a plain timm ResNet maps onto "
                                             "models/backbone.py")
        name = check_hf_resnet_config(bcfg)
        out = list(bcfg.get("out_features") or ["stage4"])
        if not all(re.fullmatch(r"stage[1-4]", s) for s in out):
            _refuse("backbone_config.out_features", out, "expected ResNet stages stage1..stage4")
        levels = [int(s[-1]) + 1 for s in out]            # stage N = C(N+1)
    if levels != sorted(set(levels)) or any(l not in (2, 3, 4, 5) for l in levels):
        _refuse("backbone levels", levels, "expected increasing ResNet stages C2..C5")
    if levels_wanted < len(levels):
        _refuse("num_feature_levels", levels_wanted, f"fewer than the {len(levels)} backbone levels read")
    return {"name": name, "levels": levels}


def model_config(hf_config: dict) -> dict:
    """Our ``detector_config("deformable_detr", "paper", ...)`` matching ``hf_config`` (num_classes:
    ``num_classes(hf_config)``). Dropout options only matter in training: HF's ``dropout`` is
    ours; its ``attention_dropout`` / ``activation_dropout`` (0 by default) are ``dropout`` in the
    original and in ours, and are not refused."""
    from models.build import detector_config

    hf_config = dict(hf_config)
    if hf_config.get("model_type", "deformable_detr") != "deformable_detr":
        _refuse("model_type", hf_config["model_type"], "this converter reads deformable_detr checkpoints")
    for option, ours in FIXED_OPTIONS.items():
        if option in hf_config and hf_config[option] != ours:
            _refuse(option, hf_config[option], f"ours is fixed at {ours!r}")
    for a, b, default in (("encoder_attention_heads", "decoder_attention_heads", 8),
                          ("encoder_ffn_dim", "decoder_ffn_dim", 1024)):
        if hf_config.get(a, default) != hf_config.get(b, default):
            _refuse(f"{a}/{b}", (hf_config.get(a), hf_config.get(b)), "one value serves encoder and decoder")
    two_stage, refine = bool(hf_config.get("two_stage", False)), bool(hf_config.get("with_box_refine", False))
    queries = int(hf_config.get("num_queries", 300))
    if two_stage:
        if not refine:
            _refuse("two_stage without with_box_refine", True, "transformers itself cannot run it (its encoder "
                                                               "head is decoder.bbox_embed[-1])")
        proposals = int(hf_config.get("two_stage_num_proposals", 300))
        if proposals != queries:
            _refuse("two_stage_num_proposals", proposals, f"ours selects num_queries={queries} proposals")
    d_model = int(hf_config.get("d_model", 256))
    if d_model % 32:
        _refuse("d_model", d_model, "HF's GroupNorm(32, d_model) needs a multiple of 32")
    return detector_config(
        "deformable_detr", "paper", backbone=_backbone(hf_config), d_model=d_model,
        n_heads=int(hf_config.get("encoder_attention_heads", 8)), enc_layers=int(hf_config.get("encoder_layers", 6)),
        dec_layers=int(hf_config.get("decoder_layers", 6)), dim_feedforward=int(hf_config.get("encoder_ffn_dim", 1024)),
        num_queries=queries, num_feature_levels=int(hf_config.get("num_feature_levels", 4)),
        enc_points=int(hf_config.get("encoder_n_points", 4)), dec_points=int(hf_config.get("decoder_n_points", 4)),
        dropout=float(hf_config.get("dropout", 0.1)), with_box_refine=refine, two_stage=two_stage)


def _one_stage_pos_trans(d_model: int) -> dict:
    """Our initialisation of pos_trans / pos_trans_norm (xavier weight, as models/deformable_detr.py),
    from EXTRA_SEED: used only by injected query groups."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(EXTRA_SEED)
        linear, norm = nn.Linear(2 * d_model, 2 * d_model), nn.LayerNorm(2 * d_model)
        nn.init.xavier_uniform_(linear.weight)
    return {**{f"pos_trans.{k}": v.detach() for k, v in linear.state_dict().items()},
            **{f"pos_trans_norm.{k}": v.detach() for k, v in norm.state_dict().items()}}


def state_dict(hf_state: dict[str, torch.Tensor], hf_config: dict) -> dict[str, torch.Tensor]:
    """Our DeformableDETR state dict from HF's ``DeformableDetrForObjectDetection.state_dict()``."""
    hf_config = dict(hf_config)
    cfg = model_config(hf_config)               # refuse unsupported options before mapping anything
    layers, two_stage = cfg["dec_layers"], cfg["two_stage"]
    out, consumed = backbone_state(hf_state, hf_config.get("use_timm_backbone", True),
                                   _backbone(hf_config)["name"], TIMM_PREFIXES[-1])

    for key, value in hf_state.items():
        if key in consumed:
            continue
        match = _LAYER_KEY.match(key)
        if match:
            part, index, module, rest = match.groups()
            table = _ENCODER_LAYER if part == "encoder" else _DECODER_LAYER
            if module in table:
                out[f"{part}.layers.{index}.{table[module]}.{rest}"] = value
                consumed.add(key)
            continue
        for hf_prefix, ours in _MODULES.items():
            if key.startswith(hf_prefix):
                out[ours + key[len(hf_prefix):]] = value
                consumed.add(key)
                break

    # prediction heads: index < layers -> decoder layer heads; index == layers (two-stage) -> the
    # encoder head. The top-level copies are read; HF's decoder aliases are checked equal.
    heads = {}
    for key, value in hf_state.items():
        match = _HEAD_KEY.fullmatch(key)
        alias = _TIED_ALIAS.fullmatch(key)
        if match:
            heads[match.groups()] = value
            consumed.add(key)
        elif alias:
            consumed.add(key)
    for key, value in hf_state.items():
        alias = _TIED_ALIAS.fullmatch(key)
        if alias:
            if alias.groups() not in heads:
                heads[alias.groups()] = value       # a file saved without the tied top-level copy
            elif not torch.equal(heads[alias.groups()], value):
                raise ConvertError(f"{key} differs from {'.'.join(alias.groups())}: HF ties them; untied "
                                   "heads are not a DeformableDetrForObjectDetection checkpoint")
    for (kind, index, rest), value in heads.items():
        index = int(index)
        ours_kind = "class_heads" if kind == "class_embed" else "box_heads"
        if index < layers:
            out[f"decoder.{ours_kind}.{index}.{rest}"] = value
        elif two_stage and index == layers:
            out[f"query_selection.{'class_head' if kind == 'class_embed' else 'box_head'}.{rest}"] = value
        else:
            raise ConvertError(f"HF head {kind}.{index}.{rest}: no such head with {layers} decoder layers"
                               + (" (two-stage)" if two_stage else ""))

    if not two_stage:
        for key, value in _one_stage_pos_trans(cfg["d_model"]).items():
            out.setdefault(key, value)

    left = sorted(set(hf_state) - consumed)
    if left:
        raise ConvertError(f"{len(left)} HF Deformable DETR keys have no place in our model (first: {left[:3]})")
    classes = out["decoder.class_heads.0.weight"].shape[0] if "decoder.class_heads.0.weight" in out \
        else num_classes(hf_config)
    expected = expected_state(cfg, classes)
    missing = sorted(set(expected) - set(out))
    extra = sorted(set(out) - set(expected))
    if missing or extra:
        raise ConvertError(f"HF Deformable DETR weights do not fill our model: {len(missing)} keys missing "
                           f"(first: {missing[:3]}), {len(extra)} unexpected (first: {extra[:3]})")
    shapes = [k for k in expected if tuple(expected[k].shape) != tuple(out[k].shape)]
    if shapes:
        k = shapes[0]
        raise ConvertError(f"HF Deformable DETR key for {k}: shape {tuple(out[k].shape)}, ours "
                           f"{tuple(expected[k].shape)}")
    return out
