"""One run's complete configuration, resolved from params.yaml.

A *run* trains one detector in one role (teacher or student) with one method (``student`` =
no distillation, or a KD method, which always trains the student's model). Everything the
training and evaluation code reads comes from the dict :func:`resolve_run` returns, and that
dict is stored in checkpoints and summaries, so a result can always be traced to its knobs.
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import yaml

from models.build import detector_config
from reproduce.config import ConfigError, set_dotted

ROLES = ("teacher", "student")
SPLITS = ("train", "val", "test")
#: keys of a profile; ``-S train.lr=...`` is shorthand for ``profiles.<profile>.train.lr=...``
PROFILE_KEYS = ("dataset", "student", "teacher", "image", "train", "eval", "distill")

TRAIN_DEFAULTS: dict[str, Any] = {
    "batch_size": 2, "lr": 1e-4, "lr_backbone_mult": 1.0, "lr_linear_proj_mult": 0.1,
    "weight_decay": 1e-4, "warmup_steps": 0, "lr_drop": 0.8, "clip_max_norm": 0.1,
    "ema": False, "ema_decay": 0.9997, "amp": False, "num_workers": 0, "log_every": 25,
    "checkpoint_every": 1000, "find_unused_parameters": False,
}


_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)$")


def parse_value(text: str) -> Any:
    """A YAML value, except that ``1e-3`` is a float (YAML 1.1 wants ``1.0e-3``)."""
    value = yaml.safe_load(text)
    if isinstance(value, str) and _FLOAT.match(value.strip()):
        return float(value)
    return value


def apply_overrides(params: dict, overrides: list[str] | dict | None, profile: str | None = None) -> dict:
    """A copy of ``params`` with ``key.sub=value`` overrides (a list of strings, YAML values)
    or a ``{dotted key: value}`` dict applied. Keys starting with a profile key (``train.``,
    ``image.``, ``student.`` ...) are applied to the run's profile."""
    params = copy.deepcopy(params)
    if not overrides:
        return params
    items = []
    if isinstance(overrides, dict):
        items = list(overrides.items())
    else:
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"override {item!r}: expected key.sub=value")
            items.append((key.strip(), parse_value(value)))
    # the profile itself may be overridden; apply that first
    for key, value in items:
        if key == "profile":
            params["profile"] = value
    profile = profile or params.get("profile")
    for key, value in items:
        if key == "profile":
            continue
        head = key.split(".", 1)[0]
        # profile keys always land in the run's profile (for ``distill``, which also exists at the
        # top level, the profile's options are the ones that win)
        if head in PROFILE_KEYS:
            key = f"profiles.{profile}.{key}"
        set_dotted(params, key, value)
    return params


def model_config(params: dict, detector: str, role: str, profile: str | None = None) -> dict:
    """``detector_config`` of a role's size and overrides in a profile."""
    if role not in ROLES:
        raise ConfigError(f"role must be one of {ROLES}, got {role!r}")
    prof = _profile(params, profile)
    if role not in prof:
        raise ConfigError(f"profile has no {role!r} section")
    spec = prof[role] or {}
    # per_detector: {<detector>: {...}} is applied over overrides for that detector only
    overrides = {**(spec.get("overrides") or {}), **((spec.get("per_detector") or {}).get(detector) or {})}
    return detector_config(detector, spec.get("size", "paper"), **overrides)


def count_images(json_path: str | Path) -> int:
    with open(json_path) as f:
        return len(json.load(f)["images"])


def steps_from_epochs(epochs: float, dataset_len: int, global_batch: int) -> int:
    """Optimizer steps of ``epochs`` passes with ``drop_last`` batches (DistributedSampler)."""
    per_epoch = dataset_len // global_batch
    if per_epoch < 1:
        raise ConfigError(f"dataset of {dataset_len} images is smaller than one global batch ({global_batch})")
    return int(round(epochs * per_epoch))


def resolve_run(params: dict, detector: str, role: str, method: str = "student",
                overrides: list[str] | dict | None = None, profile: str | None = None,
                dataset_len: int | None = None, world_size: int = 1, resolve_steps: bool = True) -> dict:
    """The run's config: model, teacher model (KD), train schedule, image, eval, data, seed.

    ``train.steps`` is always resolved to an int: ``teacher_steps`` for teachers (falling back
    to ``steps``), ``steps`` for students and KD runs, or ``epochs`` (``teacher_epochs``)
    times the optimizer steps per epoch, ``dataset_len // (batch_size * world_size)``, where
    ``dataset_len`` defaults to the number of images in the prepared train JSON.
    ``resolve_steps=False`` (evaluation) leaves the schedule unresolved: ``train.steps`` None.
    """
    params = apply_overrides(params, overrides, profile)
    profile = profile or params.get("profile")
    prof = _profile(params, profile)
    if role not in ROLES:
        raise ConfigError(f"role must be one of {ROLES}, got {role!r}")
    if method != "student" and role != "student":
        raise ConfigError(f"method {method!r} distils into the student; use --role student")

    model = model_config(params, detector, role, profile)
    teacher_model = model_config(params, detector, "teacher", profile) if "teacher" in prof else None

    dataset = prof.get("dataset")
    if not dataset:
        raise ConfigError(f"profile {profile!r}: missing key 'dataset'")
    # prepared data is per profile (dvc.yaml: data/prepared/${profile}), not per dataset
    prepared = Path((params.get("data") or {}).get("prepared", "data/prepared")) / profile
    data = {split: str(prepared / f"{split}.json") for split in SPLITS}

    train = {**TRAIN_DEFAULTS, **(prof.get("train") or {})}
    # per_detector: {<detector>: {...}} is applied over the profile's schedule for that detector only
    train.update((train.pop("per_detector", None) or {}).get(detector) or {})
    steps_key, epochs_key = ("teacher_steps", "teacher_epochs") if role == "teacher" else ("steps", "epochs")
    if not resolve_steps:
        steps = None
    elif train.get(steps_key) is not None:
        steps = int(train[steps_key])
    elif train.get(epochs_key) is not None or train.get("epochs") is not None:
        epochs = train.get(epochs_key, train.get("epochs"))
        if dataset_len is None:
            dataset_len = count_images(data["train"])
        steps = steps_from_epochs(float(epochs), dataset_len, int(train["batch_size"]) * world_size)
        train["epochs"] = epochs
    elif role == "teacher" and train.get("steps") is not None:
        steps = int(train["steps"])
    else:
        raise ConfigError(f"profile {profile!r}: train needs {steps_key!r}, 'steps' or 'epochs'")
    if steps is not None and steps < 1:
        raise ConfigError(f"train steps must be >= 1, got {steps}")
    train["steps"] = steps
    for key in ("teacher_steps", "teacher_epochs"):
        train.pop(key, None)
    train["world_size"] = world_size

    distill = {}
    if method != "student":
        # method options: params' distill.<method>, then the profile's own distill.<method> on top
        # (options tuned for one profile's scale must not leak into the paper-scale profiles)
        distill = copy.deepcopy(((params.get("distill") or {}).get(method)) or {})
        distill.update(copy.deepcopy(((prof.get("distill") or {}).get(method)) or {}))

    return {
        "profile": profile,
        "detector": detector,
        "role": role,
        "method": method,
        "dataset": dataset,
        "data": data,
        "model": model,
        "teacher_model": teacher_model,
        "train": train,
        "image": copy.deepcopy(prof.get("image") or {}),
        "eval": copy.deepcopy(prof.get("eval") or {"split": "val", "batch_size": 4}),
        "seed": int(params.get("seed", 0)),
        "distill": distill,
    }


def _profile(params: dict, profile: str | None) -> dict:
    profile = profile or params.get("profile")
    profiles = params.get("profiles") or {}
    if profile not in profiles:
        raise ConfigError(f"params: unknown profile {profile!r}; choose from {sorted(profiles)}")
    return profiles[profile]
