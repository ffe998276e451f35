"""Detectors as nn.Modules: DAB-DETR, Deformable DETR and DINO in pure PyTorch."""
from .build import DETECTORS, SIZES, build_criterion, build_detector, detector_config
from .outputs import DetectorOutput, GroupOutput, QueryGroup

__all__ = ["DETECTORS", "SIZES", "build_criterion", "build_detector", "detector_config", "DetectorOutput",
           "GroupOutput", "QueryGroup"]
