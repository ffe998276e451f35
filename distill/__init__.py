"""Knowledge distillation for DETRs: CLoCKDistill and the baseline methods behind one interface."""
from .base import Distiller, NotCacheable, freeze
from .clockdistill import CLoCKDistill
from .detrdistill import DETRDistill
from .fgd import FGD
from .fitnet import FitNet
from .kd_detr import KDDETR
from .mgd import MGD

# "student" is plain training: the Distiller without a teacher
METHODS: dict[str, type[Distiller]] = {
    "student": Distiller,
    "fitnet": FitNet,
    "fgd": FGD,
    "mgd": MGD,
    "kd_detr": KDDETR,
    "detrdistill": DETRDistill,
    "clockdistill": CLoCKDistill,
}


def build_distiller(method: str, student, criterion, teacher=None, cfg: dict | None = None) -> Distiller:
    """``Distiller(teacher, student, method_cfg)`` for a method name (see METHODS)."""
    if method not in METHODS:
        raise ValueError(f"unknown distillation method {method!r}; choose from {sorted(METHODS)}")
    return METHODS[method](student, criterion, teacher=teacher, cfg=cfg)


__all__ = ["METHODS", "CLoCKDistill", "DETRDistill", "Distiller", "FGD", "FitNet", "KDDETR", "MGD", "NotCacheable",
           "build_distiller", "freeze"]
