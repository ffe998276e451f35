"""ResNet weights from Hugging Face checkpoints to torchvision's key layout (models/backbone.py).

HF detection models carry their ResNet in one of two layouts:

* ``use_timm_backbone=False``: transformers' own ``ResNetBackbone`` (transformers
  models/resnet/modeling_resnet.py), ``embedder.embedder.{convolution,normalization}`` and
  ``encoder.stages.S.layers.B.{layer.K,shortcut}.{convolution,normalization}``. Inside
  ``DeformableDetrForObjectDetection`` / ``DabDetrForObjectDetection`` it sits under
  ``model.backbone.conv_encoder.model.`` (modeling_deformable_detr.py DeformableDetrConvEncoder,
  modeling_dab_detr.py DabDetrConvEncoder: ``self.model = load_backbone(config)``).
* ``use_timm_backbone=True`` (what the hub checkpoints SenseTime/deformable-detr and
  IDEA-Research/dab-detr-resnet-50 carry): a timm ``features_only`` ResNet, under the same prefix
  in Deformable DETR (it calls timm's ``create_model`` itself) and one level deeper,
  ``...model._backbone.``, in DAB-DETR (``load_backbone`` wraps it in transformers' TimmBackbone).
  timm keeps torchvision's names (huggingface/pytorch-image-models timm/models/resnet.py:
  ``conv1``, ``bn1``, ``layerL`` of blocks with ``conv1..3`` / ``bn1..3`` / ``downsample.0/1``),
  so only the prefix goes, as long as the stem and shortcuts are the plain ("b", torchvision)
  variant; the deep-stem / avg-down variants (resnet50d etc.) have other keys and are refused.

Both mappings are exact renames (grade A: the module definitions were read, and the tests run
HF's ResNet and torchvision's on the same weights). Keys that only the source has are handled
deliberately: ``num_batches_tracked`` (a training counter of BatchNorm, meaningless for the
FrozenBatchNorm2d our backbone uses) and timm / torchvision's ``fc`` classifier are dropped;
anything else unknown is an error rather than silently lost.
"""
from __future__ import annotations

import re

import torch


class ConvertError(ValueError):
    """A source checkpoint that cannot be mapped; one line naming what does not fit."""


HF_DETR_BACKBONE_PREFIX = "model.backbone.conv_encoder.model."
#: where a timm ResNet sits: one level deeper in DAB-DETR (TimmBackbone), directly in Deformable DETR
TIMM_PREFIXES = (HF_DETR_BACKBONE_PREFIX + "_backbone.", HF_DETR_BACKBONE_PREFIX)
#: timm ResNets whose keys are torchvision's (plain stem and shortcuts)
PLAIN_TIMM_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
#: our Backbone's torchvision ResNet (models/backbone.py)
OUR_BACKBONE_PREFIX = "backbone.body."
_BN_FIELDS = ("weight", "bias", "running_mean", "running_var")
# torchvision ResNet names per (block type, depths) of the HF / timm configs
TORCHVISION_DEPTHS = {("basic", (2, 2, 2, 2)): "resnet18", ("basic", (3, 4, 6, 3)): "resnet34",
                      ("bottleneck", (3, 4, 6, 3)): "resnet50", ("bottleneck", (3, 4, 23, 3)): "resnet101"}

_HF_STEM = re.compile(r"embedder\.embedder\.(convolution|normalization)\.(\w+)$")
_HF_BLOCK = re.compile(r"encoder\.stages\.(\d+)\.layers\.(\d+)\.(?:layer\.(\d+)|(shortcut))\.(convolution|normalization)"
                       r"\.(\w+)$")
_TIMM_KEY = re.compile(r"(conv1\.weight|bn1\.\w+|layer[1-4]\.\d+\.(?:conv[1-3]\.weight|bn[1-3]\.\w+|"
                       r"downsample\.0\.weight|downsample\.1\.\w+))$")


def _under(state: dict, prefix: str) -> dict:
    sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not sub:
        raise ConvertError(f"no backbone weights under {prefix!r} (first keys: {sorted(state)[:3]})")
    return sub


def _dropped(key: str) -> bool:
    """Source-only keys dropped on purpose (module docstring)."""
    return key.endswith("num_batches_tracked") or key.startswith("fc.")


def _check_norm_field(field: str, key: str) -> None:
    if field not in _BN_FIELDS:
        raise ConvertError(f"backbone key {key!r}: unknown batch-norm field {field!r}")


def resnet_from_hf(hf_state: dict, prefix: str = HF_DETR_BACKBONE_PREFIX) -> dict[str, torch.Tensor]:
    """torchvision-ResNet state dict of the transformers ``ResNetBackbone`` under ``prefix``."""
    out: dict[str, torch.Tensor] = {}
    for key, value in _under(hf_state, prefix).items():
        if _dropped(key):
            continue
        stem, block = _HF_STEM.match(key), _HF_BLOCK.match(key)
        if stem:
            kind, field = stem.groups()
            name = "conv1" if kind == "convolution" else "bn1"
        elif block:
            stage, index, conv, shortcut, kind, field = block.groups()
            base = f"layer{int(stage) + 1}.{int(index)}."
            if shortcut:
                name = base + ("downsample.0" if kind == "convolution" else "downsample.1")
            else:      # layer.K is torchvision's conv{K+1} / bn{K+1}
                name = base + ("conv" if kind == "convolution" else "bn") + str(int(conv) + 1)
        else:
            raise ConvertError(f"backbone key {prefix + key!r} is not part of a transformers ResNet")
        if kind == "convolution" and field != "weight":
            raise ConvertError(f"backbone key {prefix + key!r}: ResNet convolutions have no {field}")
        if kind == "normalization":
            _check_norm_field(field, prefix + key)
        out[f"{name}.{field}"] = value
    return out


def resnet_from_timm(state: dict, prefix: str = HF_DETR_BACKBONE_PREFIX) -> dict[str, torch.Tensor]:
    """torchvision-ResNet state dict of a plain timm ResNet (``resnet18/34/50/101``) under ``prefix``."""
    out: dict[str, torch.Tensor] = {}
    for key, value in _under(state, prefix).items():
        if _dropped(key):
            continue
        if not _TIMM_KEY.match(key):
            hint = (" (a deep-stem / avg-down timm variant such as resnet50d, which torchvision has no "
                    "equivalent of)" if key.startswith("conv1.") or ".downsample.2." in key else "")
            raise ConvertError(f"backbone key {prefix + key!r} is not part of a plain timm ResNet{hint}")
        if ".bn" in key or key.startswith("bn1.") or ".downsample.1." in key:
            _check_norm_field(key.rsplit(".", 1)[1], prefix + key)
        out[key] = value
    return out


def torchvision_name(layer_type: str, depths) -> str:
    """The torchvision ResNet of an HF ``ResNetConfig`` (``layer_type``, ``depths``)."""
    name = TORCHVISION_DEPTHS.get((str(layer_type), tuple(int(d) for d in depths)))
    if name is None:
        raise ConvertError(f"HF ResNet with {layer_type} blocks and depths {list(depths)} has no torchvision "
                           f"equivalent in models/backbone.py (supported: {sorted(set(TORCHVISION_DEPTHS.values()))})")
    return name


def check_hf_resnet_config(backbone_config: dict) -> str:
    """The torchvision name of an HF ``ResNetConfig`` dict, after refusing the options that would
    make the same weights compute something else than torchvision's ResNet."""
    cfg = dict(backbone_config or {})
    name = torchvision_name(cfg.get("layer_type", "bottleneck"), cfg.get("depths", (3, 4, 6, 3)))
    wrong = {key: cfg[key] for key, expected in (("downsample_in_first_stage", False),
                                                 ("downsample_in_bottleneck", False),   # stride in the 3x3 (v1.5)
                                                 ("hidden_act", "relu"), ("embedding_size", 64),
                                                 ("num_channels", 3))
             if key in cfg and cfg[key] != expected}
    widths = [64, 128, 256, 512] if cfg.get("layer_type", "bottleneck") == "basic" else [256, 512, 1024, 2048]
    if "hidden_sizes" in cfg and list(cfg["hidden_sizes"]) != widths:
        wrong["hidden_sizes"] = cfg["hidden_sizes"]
    if wrong:
        raise ConvertError(f"HF ResNet options {wrong} differ from torchvision's {name}; cannot convert")
    return name


def backbone_state(hf_state: dict, use_timm: bool, name: str, timm_prefix: str) -> tuple[dict, set]:
    """Our backbone's keys from an HF detector's state, and the HF keys they consumed.
    ``timm_prefix``: where the timm ResNet sits when no key says otherwise."""
    if use_timm:
        prefix = next((p for p in TIMM_PREFIXES if any(k.startswith(p) for k in hf_state)), timm_prefix)
        mapped = resnet_from_timm(hf_state, prefix)
    else:
        prefix = HF_DETR_BACKBONE_PREFIX
        mapped = resnet_from_hf(hf_state, prefix)
    consumed = {k for k in hf_state if k.startswith(prefix)}
    out = {OUR_BACKBONE_PREFIX + k: v for k, v in mapped.items()}
    # torchvision's ResNet carries an ImageNet classifier our backbone never runs (it stops at the
    # last level read); HF has none, so it is filled with zeros to keep our state complete
    from models.backbone import Backbone

    width = Backbone.RESNETS[name]
    out[OUR_BACKBONE_PREFIX + "fc.weight"] = torch.zeros(1000, width)
    out[OUR_BACKBONE_PREFIX + "fc.bias"] = torch.zeros(1000)
    return out, consumed


def expected_state(cfg: dict, num_classes: int) -> dict:
    """Our model's state (shapes), built on the meta device so nothing is initialised."""
    from models.build import build_detector

    with torch.device("meta"):
        return build_detector(cfg, num_classes, load_weights=False).state_dict()
