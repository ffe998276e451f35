"""Checkpoints that survive a kill at any moment and resume a run bit for bit.

A training checkpoint (``<out>/checkpoint.pth``) holds everything the next step depends on:
student weights, the distiller's KD heads, optimiser, LR scheduler, AMP grad scaler, EMA, the
step/epoch/batch position in the data, every RNG (torch CPU and CUDA, numpy, Python's
``random``, per rank), counters and the run config. It never holds the teacher: the teacher is
not in the distiller's module tree, and :func:`training_state` asserts no ``teacher`` key slipped
in. Everything is stored as tensors or plain Python types so ``torch.load(weights_only=True)``
reads it (no pickled code is executed when loading someone else's checkpoint).

Writes are atomic: a temp file in the same directory, flushed and fsynced, then ``os.replace``
(atomic on POSIX) and a directory fsync. A crash mid-write leaves the previous checkpoint intact.

The final model (``<out>/model.pth``) is ``{"model": student state_dict, "meta": {...}}``; with
EMA enabled the state_dict is the EMA weights. :func:`load_model_state` reads that, a training
checkpoint (EMA preferred) or a bare state_dict.
"""
from __future__ import annotations

import os
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_NAME = "checkpoint.pth"
MODEL_NAME = "model.pth"
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------- atomic I/O

def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temp file next to ``path``, fsync, then ``os.replace`` into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used for what it was given for; the message names the file."""


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """``torch.load(weights_only=True)``; a missing, corrupt or foreign file is a
    :class:`CheckpointError` naming it. The error never suggests ``weights_only=False``: loading
    a stranger's file that way would run whatever code it holds."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:       # unpickling, zip and tensor errors have no common base
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(err).__name__}): corrupt, truncated, "
                              "or not written by torch.save of tensors and plain types") from None


# ---------------------------------------------------------------------------- RNG states

def rng_state() -> dict:
    """Every global RNG of this process, as tensors and plain types (weights_only-safe)."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(np_state[0]), "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": int(py_version), "internal": list(py_internal), "gauss": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = [s.cpu() for s in state["cuda"]]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


# ---------------------------------------------------------------------------- checkpoints

def _cpu(obj: Any) -> Any:
    """Tensors to CPU, recursively (checkpoints load on any device)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


def training_state(*, student: torch.nn.Module, kd_state: dict, optimizer, scheduler, scaler=None,
                   ema=None, step: int, epoch: int, batch_in_epoch: int, rng_states: list[dict],
                   loader_generator: torch.Generator | None = None, counters: dict | None = None,
                   config: dict | None = None) -> dict:
    """The checkpoint dict (see the module docstring); ``rng_states`` has one entry per rank."""
    ckpt = {
        "format": FORMAT_VERSION,
        "model": _cpu(student.state_dict()),
        "kd": _cpu(dict(kd_state)),
        "optimizer": _cpu(optimizer.state_dict()),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "ema": ema.state_dict() if ema is not None else None,
        "step": int(step),
        "epoch": int(epoch),
        "batch_in_epoch": int(batch_in_epoch),
        "rng": rng_states,
        "loader_generator": loader_generator.get_state() if loader_generator is not None else None,
        "counters": dict(counters or {}),
        "config": config or {},
    }
    bad = [k for k in list(ckpt["model"]) + list(ckpt["kd"]) if k.split(".")[0] == "teacher"]
    if bad:
        raise RuntimeError(f"teacher weights must never be checkpointed; found {bad[:3]}")
    return ckpt


def save_checkpoint(ckpt: dict, out_dir: str | Path, name: str = CHECKPOINT_NAME) -> Path:
    return atomic_save(ckpt, Path(out_dir) / name)


def find_resume(out_dir: str | Path, mode: str = "auto") -> Path | None:
    """``<out>/checkpoint.pth`` when ``mode`` is ``auto`` or ``unfinished`` and it exists (the
    trainer starts over from a *finished* checkpoint under ``unfinished``); None for ``never``;
    any other value is a path that must exist."""
    if mode == "never":
        return None
    if mode in ("auto", "unfinished"):
        path = Path(out_dir) / CHECKPOINT_NAME
        return path if path.is_file() else None
    path = Path(mode)
    if not path.is_file():
        raise FileNotFoundError(f"--resume {mode}: no such checkpoint")
    return path


def save_model(state_dict: dict, path: str | Path, meta: dict | None = None) -> Path:
    """The final student weights (``{"model": ..., "meta": ...}``), atomically."""
    bad = [k for k in state_dict if k.split(".")[0] == "teacher"]
    if bad:
        raise RuntimeError(f"teacher weights in a student model file: {bad[:3]}")
    return atomic_save({"model": _cpu(state_dict), "meta": meta or {}}, path)


def load_model_state(path: str | Path, prefer_ema: bool = True) -> tuple[dict, dict]:
    """``(state_dict, meta)`` of a model file, a training checkpoint (its EMA weights when
    present and ``prefer_ema``) or a bare state_dict; loaded with ``weights_only=True``."""
    obj = load(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a checkpoint of this project (holds a {type(obj).__name__})")
    if "model" in obj and isinstance(obj["model"], dict):
        meta = dict(obj.get("meta") or {})
        if isinstance(obj.get("config"), dict):       # a training checkpoint: meta from its run config
            config = obj["config"]
            total = (config.get("train") or {}).get("steps")
            meta.setdefault("config", config)
            meta.setdefault("steps", obj.get("step"))
            for key, value in (("detector", config.get("detector")), ("role", config.get("role")),
                               ("method", config.get("method")), ("model_cfg", config.get("model")),
                               ("total_steps", total)):
                meta.setdefault(key, value)
            if total is not None and obj.get("step") is not None:
                meta.setdefault("completed", int(obj["step"]) >= int(total))
        ema = obj.get("ema")
        if prefer_ema and isinstance(ema, dict) and ema.get("model"):
            return ema["model"], {**meta, "ema": True}
        return obj["model"], meta
    if all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, {}
    raise CheckpointError(f"{path}: not a checkpoint of this project (no model weights; keys {sorted(obj)[:5]})")


def load_detector(path: str | Path, detector: str | None, model_cfg: dict | None = None,
                  num_classes: int | None = None, *, require_completed: bool = False, what: str = "checkpoint",
                  default_cfg: dict | None = None, reinit_classes: bool = False) -> tuple[torch.nn.Module, dict]:
    """``(model, meta)``: the detector stored in ``path`` (EMA weights preferred), checked
    against what the caller expects before anything is built on it.

    ``detector``: the family the caller needs (None: the file's own). ``model_cfg``: the config
    the caller would build (a teacher must be the profile's teacher); None takes the file's own.
    ``num_classes``: the dataset's (None: the file's). ``require_completed``: refuse a run that
    stopped before the end of its schedule. ``what`` names the role in messages ("teacher",
    "checkpoint"). ``default_cfg``: what to build when the file holds no config (a bare
    state_dict). Every mismatch is a :class:`CheckpointError` naming the file and the first
    differences.

    ``reinit_classes`` (fine-tuning on another dataset, like DINO's ``--finetune_ignore``): when
    the file was trained for another class count than ``num_classes``, build the model for
    ``num_classes``, load every weight except the class-dependent ones (the entries whose shape
    differs from the file's in one dimension only, by the difference of the class counts: the
    class heads, the denoising label embedding), keep those freshly initialised, print one note
    on stderr naming them, and list them in ``meta["reinitialised"]``. Any other difference is
    still an error.
    """
    from models.build import build_detector

    state, meta = load_model_state(path)
    saved = meta.get("detector")
    if detector is None:
        detector = saved or (default_cfg or {}).get("detector")
        if not detector:
            raise CheckpointError(f"{path}: does not say which detector it holds; name it (--detector)")
    if saved and saved != detector:
        raise CheckpointError(f"{path}: holds a {saved} model, but the {what} must be a {detector}")
    saved_cfg = meta.get("model_cfg")
    if saved_cfg and model_cfg and saved_cfg != model_cfg:
        raise CheckpointError(f"{path}: its {detector} is not the profile's {what} model ("
                              + "; ".join(config_differences(saved_cfg, model_cfg)[:4]) + ")")
    saved_classes = meta.get("num_classes")
    if saved_classes and num_classes and int(saved_classes) != int(num_classes) and not reinit_classes:
        raise CheckpointError(f"{path}: trained for {saved_classes} classes, the dataset has {num_classes}")
    if require_completed and meta.get("completed") is False:
        raise CheckpointError(f"{path}: its run stopped at step {meta.get('steps')} of {meta.get('total_steps')}; "
                              "finish it first (rerun its train command) or pass --allow-unfinished-teacher")
    cfg = saved_cfg or model_cfg or default_cfg
    if cfg is None:
        raise CheckpointError(f"{path}: holds no model config; give the config to build")
    classes = int(num_classes or saved_classes or 0)
    if classes < 1:
        raise CheckpointError(f"{path}: holds no class count; give the dataset's")
    model = build_detector(cfg, classes, load_weights=False)   # the file's weights replace the backbone's
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    reinit: list[str] = []
    file_classes = saved_classes
    if reinit_classes and shapes and not (missing or unexpected):
        delta = class_dimension_delta({k: state[k] for k in shapes}, {k: expected[k] for k in shapes})
        if delta is not None and (not saved_classes or delta == classes - int(saved_classes)):
            reinit, shapes = shapes, []
            file_classes = classes - delta
    if missing or unexpected or shapes:
        first = (missing or unexpected or shapes)[0]
        raise CheckpointError(f"{path}: its weights do not fit a {detector} of this config ({len(missing)} missing, "
                              f"{len(unexpected)} unexpected, {len(shapes)} of another shape; first: {first})")
    if reinit:
        state = {k: v for k, v in state.items() if k not in set(reinit)}
        state.update({k: expected[k] for k in reinit})      # the fresh initialisation of the new model
        print(f"{path}: trained for {file_classes} classes, the dataset has {classes}: re-initialised "
              f"{', '.join(summarize_keys(reinit))} ({len(reinit)} tensors); every other weight loaded",
              file=sys.stderr, flush=True)
        meta = {**meta, "reinitialised": list(reinit), "file_num_classes": file_classes}
    model.load_state_dict(state)
    return model, meta


def class_dimension_delta(saved: dict, expected: dict) -> int | None:
    """``expected - saved`` size of the one dimension in which every pair of shapes differs,
    when that is the same non-zero number for all of them (the class dimension: ``K`` logits of
    a class head, ``K + 1`` rows of a label embedding); None when the shapes differ otherwise."""
    deltas = set()
    for key, tensor in saved.items():
        a, b = tuple(tensor.shape), tuple(expected[key].shape)
        if len(a) != len(b):
            return None
        diffs = [y - x for x, y in zip(a, b) if x != y]
        if len(diffs) != 1:
            return None
        deltas.add(diffs[0])
    return deltas.pop() if len(deltas) == 1 else None


def summarize_keys(keys: list[str]) -> list[str]:
    """Module names of state-dict keys, layer indices as ``*``, in first-seen order:
    ``decoder.class_heads.0.weight, decoder.class_heads.1.bias`` -> ``decoder.class_heads.*``."""
    out: list[str] = []
    for key in keys:
        parts = key.split(".")
        if len(parts) > 1 and parts[-1] in ("weight", "bias"):
            parts = parts[:-1]
        name = ".".join("*" if p.isdigit() else p for p in parts)
        if name not in out:
            out.append(name)
    return out


def config_differences(saved: dict, expected: dict, prefix: str = "") -> list[str]:
    """``"key: saved vs expected"`` for every differing (nested) key."""
    out = []
    for key in sorted(set(saved) | set(expected), key=str):
        a, b = saved.get(key), expected.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} in the file vs {b!r}")
    return out
