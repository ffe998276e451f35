"""Build a detector (and its criterion) from a config dict: one entry point for all code.

Sizes: ``paper`` sizes equal the original repositories' defaults (d=256, 6+6 layers,
300 / 900 queries, 4 levels; grade D for the paper itself, which does not list them) and start
from torchvision's ImageNet weights as those repositories do (``backbone.weights: imagenet``; see
models/backbone.py; pass ``weights: none`` to train from scratch); ``mini`` sizes train on a
2-core CPU; ``tiny`` is for unit tests. The slim backbones of mini / tiny always start random.
"""
from __future__ import annotations

import difflib
import inspect
from copy import deepcopy

from torch import nn

from .backbone import Backbone
from .criterion import SetCriterion
from .dab_detr import DABDETR
from .deformable_detr import DeformableDETR
from .dino import DINO
from .matcher import HungarianMatcher

DETECTORS = {"dab_detr": DABDETR, "deformable_detr": DeformableDETR, "dino": DINO}

# backbone levels each detector reads (DAB-DETR: C5 only; the others C3-C5 + extra levels)
_SLIM_TINY = {"name": "slim", "widths": [8, 16, 16, 32], "depths": [1, 1, 1, 1], "stem": 8}
_SLIM_MINI = {"name": "slim", "widths": [16, 32, 64, 128], "depths": [1, 1, 1, 1], "stem": 16}
# every DETR of the paper initialises its ResNet from torchvision's IMAGENET1K_V1 (models/backbone.py)
_IMAGENET = {"weights": "imagenet"}

SIZES: dict[str, dict[str, dict]] = {
    "paper": {
        "dab_detr": {"backbone": {"name": "resnet50", "levels": [5], **_IMAGENET}, "d_model": 256, "n_heads": 8,
                     "enc_layers": 6, "dec_layers": 6, "dim_feedforward": 2048, "num_queries": 300},
        "deformable_detr": {"backbone": {"name": "resnet50", "levels": [3, 4, 5], **_IMAGENET}, "d_model": 256,
                            "n_heads": 8, "enc_layers": 6, "dec_layers": 6, "dim_feedforward": 1024,
                            "num_queries": 300, "num_feature_levels": 4, "enc_points": 4, "dec_points": 4},
        "dino": {"backbone": {"name": "resnet50", "levels": [3, 4, 5], **_IMAGENET}, "d_model": 256, "n_heads": 8,
                 "enc_layers": 6, "dec_layers": 6, "dim_feedforward": 2048, "num_queries": 900,
                 "num_feature_levels": 4, "enc_points": 4, "dec_points": 4},
    },
    "mini": {
        # DAB-DETR reads one level; at 128 px image height C5 has 4 rows, so the CPU sizes read
        # C4 (stride 16), like DAB-DETR's DC5 variant. Its global cross-attention does not
        # localise within a CPU schedule from scratch, so the mini size uses the short-schedule
        # options of models/dab_detr.py and 100 queries (val probes, 1000 steps: AP 0.0008 without
        # them, 0.015 with them; results/tuning/dab_detr_mini_probe.json)
        # It also keeps our earlier, not DAB-DETR's, input / anchor-update variant (grade D, the
        # last six options; models/dab_detr.py): with DAB-DETR's own (the paper / tiny default) the
        # mini student reached val AP 0.0019 after 1000 steps against 0.0224 with them (one run each)
        "dab_detr": {"backbone": {**_SLIM_MINI, "levels": [4]}, "d_model": 64, "n_heads": 4, "enc_layers": 1,
                     "dec_layers": 2, "dim_feedforward": 128, "num_queries": 100, "random_refpoints_xy": True,
                     "anchor_init_wh": 0.05, "anchor_pos_temperature": 20.0, "positional_attention_init": "local",
                     "input_proj_norm": True, "input_proj_init": "xavier", "pos_offset": -0.5, "activation": "relu",
                     "anchor_update_normed": True, "freeze_anchor_xy": False},
        "deformable_detr": {"backbone": {**_SLIM_MINI, "levels": [4, 5]}, "d_model": 64, "n_heads": 4,
                            "enc_layers": 1, "dec_layers": 2, "dim_feedforward": 128, "num_queries": 30,
                            "num_feature_levels": 2, "enc_points": 2, "dec_points": 2, "dropout": 0.0},
        "dino": {"backbone": {**_SLIM_MINI, "levels": [4, 5]}, "d_model": 64, "n_heads": 4, "enc_layers": 1,
                 "dec_layers": 2, "dim_feedforward": 128, "num_queries": 30, "num_feature_levels": 2,
                 "enc_points": 2, "dec_points": 2, "num_dn_queries": 30,
                 # DINO's rule would keep 2 x 30 fixed groups of 2 x max_gt queries at this
                 # budget (models/query_groups.py denoising_group_count); grade D
                 "dn_groups": "dynamic"},
    },
    "tiny": {
        "dab_detr": {"backbone": {**_SLIM_TINY, "levels": [4]}, "d_model": 32, "n_heads": 2, "enc_layers": 1,
                     "dec_layers": 2, "dim_feedforward": 64, "num_queries": 12},
        "deformable_detr": {"backbone": {**_SLIM_TINY, "levels": [4, 5]}, "d_model": 32, "n_heads": 2,
                            "enc_layers": 1, "dec_layers": 2, "dim_feedforward": 64, "num_queries": 12,
                            "num_feature_levels": 3, "enc_points": 2, "dec_points": 2, "dropout": 0.0},
        "dino": {"backbone": {**_SLIM_TINY, "levels": [4, 5]}, "d_model": 32, "n_heads": 2, "enc_layers": 1,
                 "dec_layers": 2, "dim_feedforward": 64, "num_queries": 12, "num_feature_levels": 3,
                 "enc_points": 2, "dec_points": 2, "num_dn_queries": 12, "dn_groups": "dynamic"},
    },
}

# loss weights of the original recipes (Deformable DETR: class 2; DINO / DAB-DETR: class 1)
LOSS_WEIGHTS = {
    "dab_detr": {"loss_cls": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0},
    "deformable_detr": {"loss_cls": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0},
    "dino": {"loss_cls": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0},
}


def detector_config(detector: str, size: str = "paper", **overrides) -> dict:
    """The full config of a named size, with overrides merged (nested for ``backbone``)."""
    if detector not in DETECTORS:
        raise ValueError(f"unknown detector {detector!r}; choose from {sorted(DETECTORS)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {sorted(SIZES)}")
    cfg = deepcopy(SIZES[size][detector])
    for key, value in overrides.items():
        if key == "backbone" and isinstance(value, dict):
            cfg["backbone"] = {**cfg["backbone"], **value}
        else:
            cfg[key] = value
    cfg["detector"] = detector
    return cfg


def build_detector(cfg: dict, num_classes: int, load_weights: bool = True) -> nn.Module:
    """``load_weights=False`` skips loading ``backbone.weights`` (the choice is still checked;
    the initialisation is identical): for a caller that loads a whole trained model over it,
    which then needs no ImageNet file. Raises models.backbone.BackboneWeightsError (a
    ValueError, one line) when the weights are not chosen, do not fit, or are unavailable."""
    cfg = deepcopy(cfg)
    name = cfg.pop("detector")
    backbone_cfg = cfg.pop("backbone")
    backbone_cfg["load_weights"] = load_weights
    backbone_cfg["levels"] = tuple(backbone_cfg.get("levels", (3, 4, 5)))
    for key in ("widths", "depths"):
        if key in backbone_cfg:
            backbone_cfg[key] = tuple(backbone_cfg[key])
    check_options(DETECTORS[name], cfg, f"{name} option")
    check_options(Backbone, backbone_cfg, "backbone option")
    backbone = Backbone(**backbone_cfg)
    return DETECTORS[name](backbone, num_classes=num_classes, **cfg)


def check_options(cls: type, options: dict, what: str) -> None:
    """A misspelt option must not build the default silently (``num_querys=5`` -> 300 queries):
    raise ValueError naming it, the closest valid name and every valid one."""
    valid = [n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "backbone", "num_classes")]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        hints = [f"{u!r}" + (f" (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(u, valid, 1)) else "")
                 for u in unknown]
        raise ValueError(f"unknown {what}{'s' if len(unknown) > 1 else ''} {', '.join(hints)}; "
                         f"valid: {', '.join(sorted(valid))}")


def build_criterion(detector: str, num_classes: int, weights: dict | None = None, **matcher_costs) -> SetCriterion:
    matcher = HungarianMatcher(**matcher_costs)
    weight_dict = {**LOSS_WEIGHTS[detector], **(weights or {})}
    # Deformable DETR trains its two-stage encoder head as a binary foreground head (criterion)
    return SetCriterion(num_classes, matcher, weight_dict=weight_dict,
                        encoder_binary_labels=detector == "deformable_detr")
