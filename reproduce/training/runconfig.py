"""One run's complete configuration, resolved from params.yaml.

A *run* trains one detector in one role (teacher or student) with one method (``student`` =
no distillation, or a KD method, which always trains the student's model). Everything the
training and evaluation code reads comes from the dict :func:`resolve_run` returns, and that
dict is stored in checkpoints and summaries, so a result can always be traced to its knobs.
"""
from __future__ import annotations

import copy
import difflib
import inspect
import json
import re
from pathlib import Path
from typing import Any

import yaml

from models.build import detector_config
from reproduce.core.config import ConfigError, set_dotted

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
        check_override(params, key, value)
        set_dotted(params, key, value)
    return params


# ---------------------------------------------------------------------------- override checks
# A typo in -S must not train the default silently: every key must exist in params.yaml (or be
# a documented option of the section it lands in) and keep its value's type.

#: optional keys of a section that params.yaml may leave out, by the section's last key
OPTIONAL_KEYS = {
    "train": set(TRAIN_DEFAULTS) | {"steps", "teacher_steps", "epochs", "teacher_epochs", "per_detector"},
    "student": {"size", "overrides", "per_detector"},
    "teacher": {"size", "overrides", "per_detector"},
    "eval": {"split", "batch_size"},
}
#: sections whose keys are free (checked where they are used: model overrides in model_config,
#: per-detector schedules by the train keys, class maps by the dataset)
OPEN_SECTIONS = {"overrides", "per_detector", "class_map"}
_TYPES = {bool: (bool,), int: (int,), float: (int, float), str: (str,), list: (list,), dict: (dict,)}


def _typo_hint(part: str, valid) -> str:
    valid = sorted(map(str, valid))
    close = difflib.get_close_matches(part, valid, n=1)
    return (f"did you mean {close[0]!r}? " if close else "") + f"valid keys there: {', '.join(valid)}"


def check_override(params: dict, key: str, value: Any) -> None:
    """Raise :class:`ConfigError` if ``key`` (dotted, already routed to its profile) is not a
    key of ``params`` or of its section's optional keys, or if ``value`` changes the type."""
    parts = key.split(".")
    node: Any = params
    shown = key.replace(f"profiles.{parts[1]}.", "", 1) if parts[0] == "profiles" and len(parts) > 2 else key
    for depth, part in enumerate(parts):
        where = ".".join(parts[:depth]) or "params.yaml"
        if depth and parts[depth - 1] in OPEN_SECTIONS:
            return
        if depth >= 2 and parts[depth - 2] == "distill":             # distill.<method>.<option>
            options = method_defaults(parts[depth - 1])
            if part not in options:
                raise ConfigError(f"-S {shown}: {parts[depth - 1]} has no option {part!r}; {_typo_hint(part, options)}")
            default = options[part] if not isinstance(node, dict) or part not in node else node[part]
            _check_type(shown, default, value)
            return
        if depth >= 1 and parts[depth - 1] == "distill" and part not in (node or {}):
            method_defaults(part)                                      # an unknown method is an error
            node = {}
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"-S {shown}: {where} is a value, not a section")
        if part not in node:
            optional = OPTIONAL_KEYS.get(parts[depth - 1], set()) if depth else set()
            if depth == 2 and parts[0] == "profiles":
                optional = set(PROFILE_KEYS)
            if part in optional:
                if depth + 1 < len(parts):                           # a section params.yaml leaves out
                    node = {}
                    continue
                _check_type(shown, TRAIN_DEFAULTS.get(part) if parts[depth - 1] == "train" else None, value)
                return
            hint = _typo_hint(part, set(node) | optional)
            if depth == 0 and part in _model_option_names():
                hint = f"model options go under student.overrides.{shown} or teacher.overrides.{shown}; " + hint
            raise ConfigError(f"-S {shown}: unknown key {part!r} in {where}; {hint}")
        node = node[part]
    _check_type(shown, node, value)


def _check_type(key: str, current: Any, value: Any) -> None:
    if current is None or value is None:
        return
    allowed = _TYPES.get(type(current))
    bad_bool = isinstance(value, bool) and not isinstance(current, bool)
    if allowed and (bad_bool or not isinstance(value, allowed)):
        raise ConfigError(f"-S {key}={value!r}: expected {type(current).__name__} like {current!r}, "
                          f"got {type(value).__name__}")


def method_defaults(method: str) -> dict:
    """A distillation method's options and their defaults (``<Distiller>.DEFAULTS``)."""
    from distill import METHODS
    if method not in METHODS:
        raise ConfigError(f"unknown distillation method {method!r}; {_typo_hint(method, METHODS)}")
    return dict(getattr(METHODS[method], "DEFAULTS", None) or {})


def check_model_overrides(detector: str, overrides: dict) -> None:
    """Model override keys must be constructor arguments of the detector (or of its backbone):
    the detectors accept and ignore unknown keywords, so a typo would build the default."""
    from models.backbone import Backbone
    from models.build import DETECTORS
    if detector not in DETECTORS:
        raise ConfigError(f"unknown detector {detector!r}; {_typo_hint(detector, DETECTORS)}")
    model_keys = _arguments(DETECTORS[detector]) | {"backbone"}
    for key, value in overrides.items():
        if key not in model_keys:
            raise ConfigError(f"model override {key!r}: not an option of {detector}; {_typo_hint(key, model_keys)}")
        if key == "backbone" and isinstance(value, dict):
            backbone_keys = _arguments(Backbone)
            for sub in value:
                if sub not in backbone_keys:
                    raise ConfigError(f"model override backbone.{sub}: not a backbone option; "
                                      f"{_typo_hint(sub, backbone_keys)}")


def _model_option_names() -> set[str]:
    from models.build import DETECTORS
    return set().union(*(_arguments(cls) for cls in DETECTORS.values())) | {"backbone"}


def _arguments(cls) -> set[str]:
    params = inspect.signature(cls.__init__).parameters.values()
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self", "num_classes"}


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
    check_model_overrides(detector, overrides)
    try:
        return detector_config(detector, spec.get("size", "paper"), **overrides)
    except ValueError as err:
        raise ConfigError(f"profile {role}: {err}") from None


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
