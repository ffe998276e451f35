"""Reading a Hugging Face model directory (what ``save_pretrained`` writes) without running its code.

``config.json`` is plain JSON. Weights come from ``model.safetensors`` (safetensors' own loader:
a header and raw tensors, nothing executable), its sharded form (``model.safetensors.index.json``),
or, only when no safetensors file exists, ``pytorch_model.bin`` through
``torch.load(weights_only=True)`` (no pickled code runs).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .resnet import ConvertError

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
PYTORCH_NAME = "pytorch_model.bin"


def hf_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise ConvertError(f"{path}: no such directory (give the folder save_pretrained wrote, with {CONFIG_NAME})")
    return path


def read_config(directory: str | Path) -> dict:
    path = hf_dir(directory) / CONFIG_NAME
    if not path.is_file():
        raise ConvertError(f"{path}: no such file (not a Hugging Face model directory)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConvertError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ConvertError(f"{path}: holds a {type(config).__name__}, not a config object")
    return config


def read_state(directory: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the model's weights file(s), on CPU."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = hf_dir(directory)
    single, index = directory / SAFETENSORS_NAME, directory / SAFETENSORS_INDEX_NAME
    try:
        if single.is_file():
            return load_file(single, device="cpu")
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(load_file(directory / shard, device="cpu"))
            return state
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as err:
        raise ConvertError(f"{directory}: cannot read its safetensors weights ({' '.join(str(err).split())})") from None
    legacy = directory / PYTORCH_NAME
    if legacy.is_file():
        try:
            state = torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as err:   # unpickling errors have no common base
            raise ConvertError(f"{legacy}: not readable with weights_only=True ({type(err).__name__})") from None
        if not isinstance(state, dict):
            raise ConvertError(f"{legacy}: holds a {type(state).__name__}, not a state dict")
        return state
    raise ConvertError(f"{directory}: no weights file ({SAFETENSORS_NAME}, {SAFETENSORS_INDEX_NAME} or {PYTORCH_NAME})")


def restore_shared_heads(state: dict[str, torch.Tensor], hf_config: dict) -> dict[str, torch.Tensor]:
    """Undo ``save_pretrained``'s removal of shared tensors where the converters need every name.

    Deformable DETR without box refinement uses *one* class head and *one* box head for every
    decoder layer (transformers modeling_deformable_detr.py: ``nn.ModuleList([self.class_embed
    for _ in range(num_pred)])``); ``save_pretrained`` keeps only ``class_embed.0`` /
    ``bbox_embed.0`` of such shared tensors (the class's ``_tied_weights_keys``) and
    ``from_pretrained`` ties the rest back. This does the same: each missing ``.N`` copy is the
    ``.0`` tensor; keys present in the file are never replaced."""
    model_type = str(hf_config.get("model_type", "")).replace("-", "_")
    if model_type != "deformable_detr" or hf_config.get("with_box_refine", False):
        return state
    num_pred = int(hf_config.get("decoder_layers", 6)) + (1 if hf_config.get("two_stage", False) else 0)
    out = dict(state)
    for key, value in state.items():
        match = re.fullmatch(r"(class_embed|bbox_embed)\.0\.(.+)", key)
        if match:
            for index in range(1, num_pred):
                out.setdefault(f"{match.group(1)}.{index}.{match.group(2)}", value)
    return out
