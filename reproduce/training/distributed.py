"""Data-parallel helpers for ``torchrun``: process-group setup from the environment, rank-0
guards, and reductions that every rank enters identically.

``torchrun --nproc_per_node=N -m reproduce.train ...`` sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; a plain ``python -m reproduce.train`` sets none of them and runs as a single
process (rank 0 of 1) with no process group at all, so the same code path serves both.
NCCL is used on CUDA, gloo on CPU (tests run two gloo processes on a laptop CPU).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None, timeout_s: float | None = None) -> DistInfo:
    """Initialise the default process group from ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``.

    ``device``: "cuda", "cpu" or None (CUDA when available). Under torchrun each process
    takes GPU ``LOCAL_RANK``. Without those variables (or with WORLD_SIZE=1) nothing is
    initialised and a single-process DistInfo is returned. Calling it again when a group
    already exists just describes that group.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("device cuda requested but CUDA is not available")
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)
    if world_size > 1:
        kwargs = {}
        if timeout_s is not None:
            from datetime import timedelta
            kwargs["timeout"] = timedelta(seconds=timeout_s)
        backend = "nccl" if use_cuda else "gloo"
        if use_cuda:
            kwargs["device_id"] = dev
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, **kwargs)
    return DistInfo(rank, world_size, local_rank, dev)


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _device_for_collectives() -> torch.device:
    """NCCL needs CUDA tensors; gloo wants CPU ones."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_true(flag: bool) -> bool:
    """True on every rank if ``flag`` is True on any rank (one small all-reduce)."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=_device_for_collectives())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def union_keys(keys) -> list[str]:
    """Sorted union of every rank's key set (an all_gather of small Python objects)."""
    keys = sorted(set(keys))
    if not is_distributed():
        return keys
    gathered: list = [None] * get_world_size()
    dist.all_gather_object(gathered, keys)
    return sorted(set().union(*gathered))


def reduce_dict(values: dict[str, Tensor | float], keys: list[str] | None = None,
                average: bool = True) -> dict[str, float]:
    """All-reduce a dict of scalars over a *fixed* key set; returns plain floats.

    Ranks may hold different keys (DINO's denoising losses are absent on a rank whose batch had
    no objects), and an all-reduce over differently sized tensors would hang or mix values up.
    So the reduction runs over ``keys`` (every rank must pass the same list; default: the
    union of all ranks' keys, which costs an extra all_gather) in sorted order, with a missing
    key counted as 0.
    """
    if keys is None:
        keys = union_keys(values)
    keys = sorted(keys)
    if not keys:
        return {}
    device = _device_for_collectives()
    flat = torch.zeros(len(keys), dtype=torch.float64, device=device)
    for i, key in enumerate(keys):
        if key in values:
            v = values[key]
            flat[i] = v.detach().double().to(device).reshape(()) if isinstance(v, Tensor) else float(v)
    if is_distributed():
        dist.all_reduce(flat)
        if average:
            flat /= get_world_size()
    return {k: float(v) for k, v in zip(keys, flat.cpu().tolist())}


def all_gather_object(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` without a group)."""
    if not is_distributed():
        return [obj]
    gathered: list = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
