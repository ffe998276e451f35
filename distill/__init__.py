"""Knowledge distillation for DETRs: CLoCKDistill and the baseline methods behind one interface."""
from .base import Distiller, freeze
from .clockdistill import CLoCKDistill
from .registry_baselines import BASELINES

METHODS: dict[str, type[Distiller]] = {"student": Distiller, **BASELINES, "clockdistill": CLoCKDistill}


def build_distiller(method: str, student, criterion, teacher=None, cfg: dict | None = None) -> Distiller:
    """``Distiller(teacher, student, method_cfg)`` for a method name (see METHODS)."""
    if method not in METHODS:
        raise ValueError(f"unknown distillation method {method!r}; choose from {sorted(METHODS)}")
    return METHODS[method](student, criterion, teacher=teacher, cfg=cfg)


__all__ = ["CLoCKDistill", "Distiller", "METHODS", "build_distiller", "freeze"]
