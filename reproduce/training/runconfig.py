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
import sys
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


def route_override(key: str, profile: str) -> str:
    """The key an override lands on: profile keys (``train.``, ``image.``, ``student.`` ...)
    always land in the run's profile (for ``distill``, which also exists at the top level, the
    profile's options are the ones that win)."""
    return f"profiles.{profile}.{key}" if key.split(".", 1)[0] in PROFILE_KEYS else key


def override_items(overrides: list[str] | dict | None) -> list[tuple[str, Any, str]]:
    """``(key, value, as given)`` of each override: ``key.sub=value`` strings (YAML values)
    or a ``{dotted key: value}`` dict."""
    if isinstance(overrides, dict):
        return [(key, value, f"{key}={value!r}") for key, value in overrides.items()]
    items = []
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        items.append((key.strip(), parse_value(value), item))
    return items


def apply_overrides(params: dict, overrides: list[str] | dict | None, profile: str | None = None) -> dict:
    """A copy of ``params`` with ``key.sub=value`` overrides (a list of strings, YAML values)
    or a ``{dotted key: value}`` dict applied. Keys starting with a profile key (``train.``,
    ``image.``, ``student.`` ...) are applied to the run's profile (:func:`route_override`)."""
    params = copy.deepcopy(params)
    items = override_items(overrides)
    # the profile itself may be overridden; apply that first
    for key, value, _ in items:
        if key == "profile":
            params["profile"] = value
    profile = profile or params.get("profile")
    for key, value, _ in items:
        if key == "profile":
            continue
        key = route_override(key, profile)
        check_override(params, key, value)
        set_dotted(params, key, value)
    return params


#: rerouted keys already noted on stderr (a CLI may resolve several runs in one process)
_NOTED: set[str] = set()


def note_reroutes(overrides: list[str] | dict | None, profile: str) -> None:
    """Say on stderr, once per key and process, where a profile-relative ``-S train.lr=...``
    landed (``profiles.<profile>.train.lr``), so nobody looks for it at the top level. CLIs
    call it after the run resolved, so a mistake stays a one-line error."""
    for key, _, _ in override_items(overrides):
        routed = route_override(key, profile)
        if routed != key and key not in _NOTED:
            _NOTED.add(key)
            print(f"note: -S {key} -> {routed}", file=sys.stderr)


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
    return copy.deepcopy(getattr(METHODS[method], "DEFAULTS", None) or {})


def _defaults_layer(method: str) -> tuple[str, dict]:
    """``(source label, options)`` of a method's code defaults; none for a method ``distill``
    does not know (build_distiller names it when the run starts)."""
    from distill import METHODS
    if method not in METHODS:
        return "code default", {}
    return f"code default ({METHODS[method].__name__}.DEFAULTS)", method_defaults(method)


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
    schedule = _schedule_key(train, role)
    if not resolve_steps:
        steps = None
    elif schedule is None:
        steps_key = "teacher_steps" if role == "teacher" else "steps"
        raise ConfigError(f"profile {profile!r}: train needs {steps_key!r}, 'steps' or 'epochs'")
    elif schedule.endswith("steps"):
        steps = int(train[schedule])
    else:
        epochs = train[schedule]
        if dataset_len is None:
            dataset_len = count_images(data["train"])
        steps = steps_from_epochs(float(epochs), dataset_len, int(train["batch_size"]) * world_size)
        train["epochs"] = epochs
    if steps is not None and steps < 1:
        raise ConfigError(f"train steps must be >= 1, got {steps}")
    train["steps"] = steps
    for key in ("teacher_steps", "teacher_epochs"):
        train.pop(key, None)
    train["world_size"] = world_size

    distill = distill_options(params, prof, method) if method != "student" else {}

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


def _schedule_key(train: dict, role: str) -> str | None:
    """The train key a run's length comes from: the role's steps (``teacher_steps`` for
    teachers), else its epochs (``teacher_epochs``, then ``epochs``), else, for a teacher,
    the students' ``steps``; None when there is none."""
    steps_key, epochs_key = ("teacher_steps", "teacher_epochs") if role == "teacher" else ("steps", "epochs")
    order = (steps_key, epochs_key, "epochs") + (("steps",) if role == "teacher" else ())
    return next((key for key in order if train.get(key) is not None), None)


def distill_options(params: dict, prof: dict, method: str) -> dict:
    """Every option a method runs with: its code defaults (``<Distiller>.DEFAULTS``), then
    params' ``distill.<method>``, then the profile's own ``distill.<method>`` (options tuned
    for one profile's scale must not leak into the paper-scale profiles). Spelled out here so
    config.json shows them all; the distiller's own merge of its defaults then changes nothing."""
    options = _defaults_layer(method)[1]
    options.update(copy.deepcopy(((params.get("distill") or {}).get(method)) or {}))
    options.update(copy.deepcopy(((prof.get("distill") or {}).get(method)) or {}))
    return options


# ---------------------------------------------------------------------------- provenance

def run_sources(params: dict, detector: str, role: str, method: str = "student",
                overrides: list[str] | dict | None = None, profile: str | None = None,
                resolve_steps: bool = True) -> dict[str, str]:
    """Where each leaf of the train / distill / image / eval sections of :func:`resolve_run`'s
    config comes from (``"train.lr": "params.yaml profiles.mini.train"``), so a reader of
    ``--print-config --explain`` need not retrace the layers by hand. The layers, lowest
    first, are the ones resolve_run merges; an override names itself."""
    applied = apply_overrides(params, overrides, profile)
    profile = profile or applied.get("profile")
    prof = _profile(applied, profile)
    routed = [(route_override(key, profile), text) for key, _, text in override_items(overrides)]
    base = f"profiles.{profile}"
    sources: dict[str, str] = {}

    def layer(section: str, values: dict, label: str, path: str | None = None) -> None:
        for key in values:
            given = _override_of(routed, f"{path}.{key}") if path else None
            sources[f"{section}.{key}"] = f"override -S {given}" if given else label

    train = dict(prof.get("train") or {})
    per_detector = (train.pop("per_detector", None) or {}).get(detector) or {}
    layer("train", TRAIN_DEFAULTS, "code default (TRAIN_DEFAULTS)")
    layer("train", train, f"params.yaml {base}.train", f"{base}.train")
    layer("train", per_detector, f"params.yaml {base}.train.per_detector.{detector}",
          f"{base}.train.per_detector.{detector}")
    _schedule_sources(sources, {**TRAIN_DEFAULTS, **train, **per_detector}, role, resolve_steps)
    if method != "student":
        label, defaults = _defaults_layer(method)
        layer("distill", defaults, label)
        layer("distill", (applied.get("distill") or {}).get(method) or {}, f"params.yaml distill.{method}",
              f"distill.{method}")
        layer("distill", (prof.get("distill") or {}).get(method) or {}, f"params.yaml {base}.distill.{method}",
              f"{base}.distill.{method}")
    layer("image", prof.get("image") or {}, f"params.yaml {base}.image", f"{base}.image")
    if prof.get("eval"):
        layer("eval", prof["eval"], f"params.yaml {base}.eval", f"{base}.eval")
    else:
        layer("eval", {"split": "val", "batch_size": 4}, "code default (resolve_run)")
    return sources


def _override_of(routed: list[tuple[str, str]], dotted: str) -> str | None:
    """The last override (as given) that set ``dotted`` or a section above it."""
    hits = [text for key, text in routed if dotted == key or dotted.startswith(key + ".")]
    return hits[-1] if hits else None


def _schedule_sources(sources: dict, train: dict, role: str, resolve_steps: bool) -> None:
    """``train.steps`` comes from the key :func:`_schedule_key` picks; the teacher keys are
    folded into it and dropped, as resolve_run does."""
    key = _schedule_key(train, role)
    if not resolve_steps:
        sources["train.steps"] = "not resolved (evaluation)"
    elif key is not None and key != "steps":
        sources["train.steps"] = f"{sources[f'train.{key}']} (from train.{key})"
        if key.endswith("epochs"):
            sources["train.epochs"] = sources[f"train.{key}"]
    for teacher_key in ("teacher_steps", "teacher_epochs"):
        sources.pop(f"train.{teacher_key}", None)
    sources["train.world_size"] = "runtime (WORLD_SIZE)"


def _profile(params: dict, profile: str | None) -> dict:
    profile = profile or params.get("profile")
    profiles = params.get("profiles") or {}
    if profile not in profiles:
        raise ConfigError(f"params: unknown profile {profile!r}; choose from {sorted(profiles)}")
    return profiles[profile]
