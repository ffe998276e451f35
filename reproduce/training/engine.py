"""Pieces of the training loop: optimiser groups, LR schedule, EMA, seeding, resumable data
order, one optimisation step with non-finite guarding, and the metrics log.

Determinism (CPU, fixed thread count): model randomness (dropout, DINO's denoising noise)
draws from the global RNGs, seeded once per rank and saved in checkpoints. Data randomness
(augmentations) does *not* share those streams: every sample is transformed under its own
RNG seeded from ``(seed, epoch, index)`` (:class:`SeededSamples`), so the data stream does not
depend on the number of loader workers, on prefetching, or on where a run was resumed. The
order of samples is ``DistributedSampler``'s seeded permutation per epoch; the data position
is just ``(epoch, batch_in_epoch)``.
"""
from __future__ import annotations

import csv
import math
import random
import time
from contextlib import nullcontext
from copy import deepcopy
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, DistributedSampler, Sampler

from reproduce.training import distributed as du

LINEAR_PROJ_NAMES = ("sampling_offsets", "reference_points")


# ---------------------------------------------------------------------------- seeding

def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and Python's ``random``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def worker_init_fn(worker_id: int) -> None:
    """Loader workers: numpy and ``random`` follow the worker's torch seed (which the loader
    derives from its seeded generator), instead of inheriting the parent's state."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one sample of one epoch (splitmix64 of the triple)."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    return x & (2**63 - 1)


def capped_workers(requested: int) -> int:
    """DataLoader workers: the requested number, at most the cores this process may use minus
    one (the main process), so that 4 workers on a 2-core machine do not oversubscribe it (and
    PyTorch's warning about it is not triggered)."""
    import os
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:          # not on Linux
        cores = os.cpu_count() or 1
    return max(0, min(int(requested), cores - 1))


class SeededSamples(Dataset):
    """Wraps a dataset so ``dataset[(epoch, index)]`` runs under RNGs seeded by (seed, epoch,
    index). The caller's global RNG states are restored afterwards (``num_workers=0`` loads in
    the training process, whose RNGs belong to the model)."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        s = sample_seed(self.seed, epoch, index)
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            random.seed(s)
            np.random.seed(s % 2**32)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


class ResumableBatchSampler(Sampler[list]):
    """Batches of ``(epoch, index)`` keys over this rank's shard, resumable mid-epoch.

    The per-epoch order is ``DistributedSampler(shuffle=True, seed, drop_last=True)`` (with
    ``num_replicas=1`` outside DDP, so one code path); incomplete batches are dropped.
    ``set_epoch(epoch, start_batch)`` skips the batches a resumed run already consumed without
    loading them.
    """

    def __init__(self, dataset_len: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True):
        self.sampler = DistributedSampler(range(dataset_len), num_replicas=world_size, rank=rank,
                                          shuffle=shuffle, seed=seed, drop_last=True)
        self.batch_size = batch_size
        self.epoch, self.start_batch = 0, 0
        if len(self) == 0 and self.start_batch == 0:
            raise ValueError(f"{dataset_len} images give no full batch of {batch_size} x {world_size} ranks")

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = int(epoch), int(start_batch)
        self.sampler.set_epoch(self.epoch)

    def batches_per_epoch(self) -> int:
        return len(self.sampler) // self.batch_size

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch() - self.start_batch)

    def __iter__(self) -> Iterator[list]:
        indices = list(self.sampler)
        for b in range(self.start_batch, self.batches_per_epoch()):
            yield [(self.epoch, i) for i in indices[b * self.batch_size:(b + 1) * self.batch_size]]


# ---------------------------------------------------------------------------- optimiser

def param_groups(model: nn.Module, lr: float, backbone_mult: float = 1.0, linear_proj_mult: float = 1.0,
                 weight_decay: float = 0.0) -> list[dict]:
    """AdamW groups of the Deformable DETR recipe over trainable parameters:
    ``backbone`` (lr x backbone_mult), ``linear_proj`` (names containing ``sampling_offsets`` or
    ``reference_points``: lr x linear_proj_mult), ``default``. Each group carries its
    ``lr_mult`` and ``name``. Weight decay applies to all, as in DETR."""
    groups: dict[str, list] = {"default": [], "backbone": [], "linear_proj": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "backbone" in name.split("."):
            groups["backbone"].append(p)
        elif any(key in name for key in LINEAR_PROJ_NAMES):
            groups["linear_proj"].append(p)
        else:
            groups["default"].append(p)
    mults = {"default": 1.0, "backbone": float(backbone_mult), "linear_proj": float(linear_proj_mult)}
    return [{"params": ps, "lr": lr * mults[g], "lr_mult": mults[g], "name": g, "weight_decay": weight_decay}
            for g, ps in groups.items() if ps]


def param_group_names(model: nn.Module) -> dict[str, str]:
    """Parameter name -> group name (the same rule as :func:`param_groups`), for inspection."""
    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "backbone" in name.split("."):
            out[name] = "backbone"
        elif any(key in name for key in LINEAR_PROJ_NAMES):
            out[name] = "linear_proj"
        else:
            out[name] = "default"
    return out


def build_optimizer(model: nn.Module, train_cfg: dict) -> torch.optim.AdamW:
    groups = param_groups(model, float(train_cfg["lr"]), train_cfg.get("lr_backbone_mult", 1.0),
                          train_cfg.get("lr_linear_proj_mult", 1.0), float(train_cfg.get("weight_decay", 0.0)))
    return torch.optim.AdamW(groups, lr=float(train_cfg["lr"]), weight_decay=float(train_cfg.get("weight_decay", 0.0)))


def lr_drop_step(train_cfg: dict) -> int | None:
    """The step from which the LR is x0.1: ``lr_drop`` is a fraction of ``steps`` (<= 1) or,
    when > 1, an absolute step; None disables the drop."""
    drop = train_cfg.get("lr_drop")
    if drop is None:
        return None
    drop = float(drop)
    return int(round(drop * int(train_cfg["steps"]))) if drop <= 1.0 else int(drop)


class LRFactor:
    """Linear warmup over ``warmup_steps`` (from 1/warmup to 1), then x0.1 from the drop step.
    A small class rather than a closure, so its state is a plain dict."""

    def __init__(self, warmup_steps: int, drop_step: int | None):
        self.warmup_steps, self.drop_step = int(warmup_steps or 0), drop_step

    def __call__(self, step: int) -> float:
        factor = 1.0
        if self.warmup_steps > 0 and step < self.warmup_steps:
            factor = (step + 1) / self.warmup_steps
        if self.drop_step is not None and step >= self.drop_step:
            factor *= 0.1
        return factor


def build_scheduler(optimizer: torch.optim.Optimizer, train_cfg: dict) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, LRFactor(train_cfg.get("warmup_steps", 0), lr_drop_step(train_cfg)))


# ---------------------------------------------------------------------------- EMA

class ModelEMA:
    """Exponential moving average of a model's floating-point state (DINO's ``--use_ema``).

    ``ema = decay * ema + (1 - decay) * current`` after every optimizer step, on parameters and
    float buffers; integer buffers are copied. The EMA copy is never trained or wrapped.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9997):
        self.module = deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = float(decay)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        current = model.state_dict()
        for name, ema_v in self.module.state_dict().items():
            v = current[name].detach()
            if ema_v.dtype.is_floating_point:
                ema_v.mul_(self.decay).add_(v.to(ema_v.dtype), alpha=1.0 - self.decay)
            else:
                ema_v.copy_(v)

    def state_dict(self) -> dict:
        return {"model": {k: v.detach().cpu() for k, v in self.module.state_dict().items()},
                "decay": self.decay, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.decay, self.updates = float(state["decay"]), int(state["updates"])


# ---------------------------------------------------------------------------- AMP

def amp_settings(train_cfg: dict, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, needs GradScaler). ``amp: true|bf16`` -> bfloat16 (no scaler),
    ``amp: fp16`` -> float16 with a GradScaler. CPU runs are always fp32."""
    amp = train_cfg.get("amp", False)
    if device.type != "cuda" or not amp:
        return None, False
    if amp in (True, "bf16", "bfloat16"):
        return torch.bfloat16, False
    if amp in ("fp16", "float16", "half"):
        return torch.float16, True
    raise ValueError(f"train.amp: expected true/false/bf16/fp16, got {amp!r}")


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else nullcontext()


# ---------------------------------------------------------------------------- one step

def targets_to(targets: list[dict], device: torch.device) -> list[dict]:
    return [{k: (v.to(device, non_blocking=True) if isinstance(v, Tensor) else v) for k, v in t.items()}
            for t in targets]


def train_step(model: nn.Module, distiller, images: Tensor, pad_mask: Tensor, targets: list[dict],
               optimizer: torch.optim.Optimizer, *, clip_max_norm: float = 0.0, scaler=None,
               amp_dtype: torch.dtype | None = None) -> dict:
    """Forward, backward, (skip-or-)step. ``model`` is the distiller or its DDP wrapper.

    A non-finite loss on any rank, or a non-finite gradient norm, skips the step on every rank:
    gradients are zeroed and the optimizer does not step. Backward still runs on a non-finite
    loss so that DDP's gradient all-reduce happens on every rank (a rank that skipped backward
    alone would deadlock the others). Returns ``{"losses": {name: detached tensor}, "loss":
    total (float), "grad_norm": float, "skipped": bool}``.
    """
    device = images.device
    with autocast(device, amp_dtype):
        losses = model(images, pad_mask, targets)
    total = distiller.total(losses)
    loss_finite = bool(torch.isfinite(total.detach()).item())
    if scaler is not None:
        scaler.scale(total).backward()
    else:
        total.backward()
    skip = du.any_true(not loss_finite)
    grad_norm = float("nan")
    if not skip:
        if scaler is not None:
            scaler.unscale_(optimizer)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if clip_max_norm and clip_max_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, clip_max_norm)
        else:
            norms = [torch.linalg.vector_norm(p.grad.detach()) for p in params if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
        grad_norm = float(norm)
        if scaler is not None:
            # the scaler skips inf/nan steps itself (and lowers its scale): not ours to count
            scaler.step(optimizer)
            scaler.update()
        elif not math.isfinite(grad_norm):
            skip = True        # identical on all ranks: gradients are all-reduced
        else:
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"losses": {k: v.detach() for k, v in losses.items()}, "loss": float(total.detach()),
            "grad_norm": grad_norm, "skipped": skip}


# ---------------------------------------------------------------------------- preemption

PREEMPTED_EXIT_CODE = 75        # EX_TEMPFAIL: "try again later"; rerunning the command resumes


class PreemptionNotice:
    """Records SIGTERM / SIGUSR1 (what SLURM and most schedulers send before killing a job) so
    that training stops at the next step boundary with a checkpoint, instead of dying mid-step.

    Used as a context manager around the loop; the previous handlers come back on exit. Only the
    main thread may install handlers, so elsewhere (a notebook's worker thread) it stays inert.
    """

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict = {}

    def _handler(self, signum, frame) -> None:
        import signal
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> "PreemptionNotice":
        import signal
        import threading
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                if hasattr(signal, name):
                    sig = getattr(signal, name)
                    self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        import signal
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def requested(self) -> bool:
        """True on every rank when any rank got the signal (ranks must stop at the same step)."""
        return du.any_true(self.signal_name is not None)


# ---------------------------------------------------------------------------- metrics log

class MetricWindow:
    """Sums of per-step values between two log rows (on device: no sync per step)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, Tensor | float] = {}
        self.counts: dict[str, int] = {}
        self.steps = 0
        self.skipped = 0
        self.started = time.perf_counter()

    def add(self, values: dict[str, Tensor | float]) -> None:
        self.steps += 1
        for k, v in values.items():
            v = v.detach().float() if isinstance(v, Tensor) else float(v)
            self.sums[k] = self.sums[k] + v if k in self.sums else v
            self.counts[k] = self.counts.get(k, 0) + 1


class CSVLog:
    """``train_log.csv`` with one row per log interval (``dvc plots`` reads it).

    Columns grow when a new loss term appears (the file is rewritten with the wider header);
    on resume, rows after the checkpoint's step are dropped, so the log of a resumed run equals
    that of an uninterrupted one.
    """

    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        self.fields: list[str] = []
        self.rows: list[dict] = []
        if self.path.is_file() and resume_step is not None:
            with self.path.open(newline="") as f:
                reader = csv.DictReader(f)
                self.fields = list(reader.fieldnames or [])
                self.rows = [r for r in reader if r.get("step") and int(float(r["step"])) <= resume_step]
            self._rewrite()
        elif self.path.exists():
            self.path.unlink()

    def append(self, row: dict) -> None:
        new = [k for k in row if k not in self.fields]
        self.rows.append(row)
        if new or not self.path.exists():
            self.fields += new
            self._rewrite()
        else:
            with self.path.open("a", newline="") as f:
                csv.DictWriter(f, self.fields, restval="").writerow(row)

    def _rewrite(self) -> None:
        tmp = self.path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, self.fields, restval="")
            writer.writeheader()
            writer.writerows(self.rows)
        tmp.replace(self.path)


