"""``python -m reproduce.convert HF_DIR --out model.pth [--num-classes N]``.

Turns a Hugging Face detection checkpoint (a ``save_pretrained`` folder) into a model file of
this project (reproduce/training/checkpoint.py ``{"model", "meta"}``), which ``reproduce.training.train --teacher``
and ``reproduce.evaluation.evaluate --checkpoint`` read like one of our own runs. The detector is chosen by
``model_type``; each detector's module (``reproduce/convert/<detector>.py``) gives
``model_config(hf_config)`` (our config) and ``state_dict(hf_state, hf_config)`` (our keys). The
mapped weights must fill our model exactly (strict load): a key left over on either side is an
error, never a silently random layer.

Every user mistake is one line on stderr and a non-zero exit, and nothing is written to ``--out``
(the file is written atomically at the very end).
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import sys
from pathlib import Path
from typing import Sequence

import torch

from reproduce.training.checkpoint import class_dimension_delta, save_model, summarize_keys

from .hf_files import read_config, read_state, restore_shared_heads
from .resnet import ConvertError

#: model_type of config.json (transformers spells DAB-DETR's "dab-detr") -> our detector
#: (= the converter module's name); model types are compared with "-" read as "_"
SUPPORTED = {"deformable_detr": "deformable_detr", "dab_detr": "dab_detr"}
NOT_IN_TRANSFORMERS = {
    "dino": "DINO has no Hugging Face transformers implementation, so there is no HF DINO checkpoint to import "
            "(the official IDEA-Research/DINO .pth files use their own key layout, which is not mapped yet)",
}
#: seed of the fresh class heads when --num-classes differs from the checkpoint's (grade D)
REINIT_SEED = 0


def _model_key(model_type) -> str:
    return str(model_type or "").lower().replace("-", "_")


def converter(model_type: str | None):
    """The module converting ``model_type`` (reproduce/convert/<detector>.py)."""
    key = _model_key(model_type)
    if key in NOT_IN_TRANSFORMERS:
        raise ConvertError(f"model_type {model_type!r}: {NOT_IN_TRANSFORMERS[key]}")
    if key not in SUPPORTED:
        raise ConvertError(f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(SUPPORTED))}")
    try:
        return importlib.import_module(f"reproduce.convert.{SUPPORTED[key]}")
    except ModuleNotFoundError as err:
        if err.name != f"reproduce.convert.{SUPPORTED[key]}":
            raise
        raise ConvertError(f"model_type {model_type!r}: its converter reproduce/convert/{SUPPORTED[key]}.py "
                           "is not installed") from None


def hf_num_classes(hf_config: dict) -> int:
    """HF's class count: ``num_labels`` = ``len(id2label)`` (PretrainedConfig); 2 when neither is saved."""
    if hf_config.get("id2label"):
        return len(hf_config["id2label"])
    return int(hf_config.get("num_labels", 2))


def hf_class_names(hf_config: dict, num_classes: int) -> list[str] | None:
    labels = hf_config.get("id2label") or {}
    names = [labels.get(str(i), labels.get(i)) for i in range(num_classes)]
    return names if all(isinstance(n, str) for n in names) else None


def canonical_config(cfg: dict) -> dict:
    """``cfg`` without the options that only restate a constructor default and that the paper
    size does not name, so that a converted default-configured checkpoint has exactly the
    config the paper profiles build (``reproduce.training.train --teacher`` compares configs key by key;
    an explicit ``dropout: 0.1`` equal to the default would otherwise be a mismatch)."""
    from models.build import DETECTORS, detector_config

    named = detector_config(cfg["detector"], "paper")
    params = inspect.signature(DETECTORS[cfg["detector"]].__init__).parameters

    def is_default(key, value) -> bool:
        default = params[key].default if key in params else inspect.Parameter.empty
        if default is inspect.Parameter.empty:
            return False
        return (list(default) == list(value)) if isinstance(default, tuple) and isinstance(value, (list, tuple)) \
            else default == value

    return {k: v for k, v in cfg.items() if k in named or k in ("detector", "backbone") or not is_default(k, v)}


def _load_strict(model: torch.nn.Module, state: dict, what: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        first = (missing or unexpected or shapes)[0]
        detail = (f"; shape {tuple(state[first].shape)} vs ours {tuple(expected[first].shape)}"
                  if first in shapes else "")
        raise ConvertError(f"{what}: the mapped weights do not fill our model ({len(missing)} missing, "
                           f"{len(unexpected)} unexpected, {len(shapes)} of another shape; first: {first}{detail})")
    model.load_state_dict(state, strict=True)


def _reinit_classes(model_cfg: dict, state: dict, file_classes: int, classes: int, what: str):
    """``(state for classes, reinitialised keys)``: the class-dependent tensors fresh, the rest kept
    (the rule of reproduce.training.checkpoint.load_detector's ``reinit_classes``, like DINO's
    ``--finetune_ignore``)."""
    from models.build import build_detector

    torch.manual_seed(REINIT_SEED)
    fresh = build_detector(model_cfg, classes, load_weights=False).state_dict()
    shapes = [k for k in fresh if tuple(fresh[k].shape) != tuple(state[k].shape)]
    delta = class_dimension_delta({k: state[k] for k in shapes}, {k: fresh[k] for k in shapes}) if shapes else None
    if delta != classes - file_classes:
        raise ConvertError(f"{what}: cannot re-initialise the class heads for {classes} classes "
                           f"(tensors of another shape: {shapes[:3]})")
    return {**state, **{k: fresh[k] for k in shapes}}, shapes


def convert(hf_path: str | Path, out: str | Path, num_classes: int | None = None,
            backbone_weights: str = "imagenet") -> tuple[Path, dict]:
    """Convert ``hf_path`` into the model file ``out``; returns ``(out, meta)``."""
    from models.build import build_detector

    hf_path = Path(hf_path)
    hf_config = read_config(hf_path)
    module = converter(hf_config.get("model_type"))
    detector = SUPPORTED[_model_key(hf_config["model_type"])]
    model_cfg = dict(module.model_config(hf_config))
    # backbone.weights names the initialisation of a model trained here; a converted model never
    # uses it (its backbone comes from the file). It is recorded as the paper profiles' teacher
    # choice (HF's checkpoints were trained from ImageNet ResNets, grade C), so the file passes
    # reproduce.training.train --teacher's check that it is the profile's teacher config.
    model_cfg["backbone"] = {**model_cfg["backbone"], "weights": backbone_weights}
    model_cfg = canonical_config(model_cfg)
    file_classes = int(getattr(module, "num_classes", hf_num_classes)(hf_config))
    state = module.state_dict(restore_shared_heads(read_state(hf_path), hf_config), hf_config)
    model = build_detector(model_cfg, file_classes, load_weights=False)
    _load_strict(model, state, str(hf_path))
    weights = model.state_dict()

    classes = int(num_classes or file_classes)
    meta = {"detector": detector, "role": "teacher", "method": "converted", "converted": True,
            "source": str(hf_path.resolve()), "hf_model_type": hf_config.get("model_type"),
            "hf_config": hf_config, "model_cfg": model_cfg, "num_classes": classes, "completed": True,
            "steps": None, "profile": None, "ema": False}
    if classes != file_classes:
        weights, reinit = _reinit_classes(model_cfg, weights, file_classes, classes, str(hf_path))
        print(f"convert: note: {hf_path} was trained for {file_classes} classes, --num-classes is {classes}: "
              f"re-initialised {', '.join(summarize_keys(reinit))} ({len(reinit)} tensors, seed {REINIT_SEED}), "
              "as DINO's --finetune_ignore; every other weight converted", file=sys.stderr, flush=True)
        meta.update(reinitialised=reinit, file_num_classes=file_classes)
    else:
        names = hf_class_names(hf_config, classes)
        if names:
            meta["class_names"] = names
    return save_model(weights, out, meta), meta


def build_parser() -> argparse.ArgumentParser:
    from reproduce.core.config import OneLineParser

    p = OneLineParser(prog="python -m reproduce.convert",
                      description="Import a Hugging Face Deformable DETR / DAB-DETR checkpoint (a save_pretrained "
                                  "folder with config.json and model.safetensors) as a model file of this project.")
    p.add_argument("hf_dir", type=Path, help="the Hugging Face model folder")
    p.add_argument("--out", type=Path, required=True, help="model file to write (e.g. model.pth)")
    p.add_argument("--num-classes", type=int, help="class count of the target dataset; when it differs from the "
                                                   "checkpoint's, the class heads are re-initialised")
    p.add_argument("--backbone-weights", default="imagenet",
                   help="backbone.weights recorded in the model config (default imagenet, the paper profiles' "
                        "teacher choice; the converted weights are used either way)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.num_classes is not None and args.num_classes < 1:
        print(f"convert: error: --num-classes must be positive, got {args.num_classes}", file=sys.stderr)
        return 1
    try:
        path, meta = convert(args.hf_dir, args.out, args.num_classes, args.backbone_weights)
    except ValueError as err:   # ConvertError, BackboneWeightsError, a converter's config check
        print(f"convert: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    print(f"wrote {path}: {meta['detector']} ({meta['model_cfg']['backbone']['name']}, {meta['num_classes']} classes) "
          f"from {meta['source']}")
    return 0
