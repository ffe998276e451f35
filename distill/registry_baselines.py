"""The baseline KD methods by name, for ``distill/__init__.py`` METHODS."""
from __future__ import annotations

from .base import Distiller
from .detrdistill import DETRDistill
from .fgd import FGD
from .fitnet import FitNet
from .kd_detr import KDDETR
from .mgd import MGD

BASELINES: dict[str, type[Distiller]] = {
    "fitnet": FitNet,
    "fgd": FGD,
    "mgd": MGD,
    "kd_detr": KDDETR,
    "detrdistill": DETRDistill,
}

__all__ = ["BASELINES"]
