"""Each detector, tiny, must overfit one fixed batch of synthetic images to AP50 >= 0.9.

The images (64x128) hold 1-3 clearly coloured, non-overlapping rectangles on a grey
background; class = colour. Training uses the real engine step (``train_step``: criterion
with auxiliary / encoder / denoising losses, AdamW, gradient clipping) and evaluation the
real post-processing + pycocotools, on that same batch. A detector that cannot do this has a
bug in its forward pass, matching, losses or post-processing.

Settings per detector (lr, step budget, size overrides) come from a sweep over batch seeds
0-5 (steps to AP50 >= 0.9, checked every 25): Deformable DETR 100-125, DINO 75-175, DAB-DETR
150-375. DAB-DETR reads a single feature level, which at stride 32 would be a 2x4 grid on
these images, so it reads C4 (stride 16; the CPU sizes do so too, pinned here); with global
attention it converges slower than the deformable detectors, hence its larger budget.
Training stops as soon as the batch is fitted, so a passing run takes fewer steps than the
budget (seed 0: ~100 / ~175 / ~250 steps). One thread: on a shared 2-core machine, two
OpenMP threads were 3-40x slower.
"""
from __future__ import annotations

import time

import pytest
import torch

from distill import build_distiller
from models.build import build_criterion, build_detector, detector_config
from reproduce.training.engine import build_optimizer, seed_everything, train_step
from reproduce.pipeline.regression import NUM_CLASSES, batch_metrics, synthetic_batch

SETTINGS = {
    "dab_detr": {"lr": 2e-3, "steps": 400, "overrides": {"backbone": {"levels": [4]}}},
    # 2e-3 since the original's xavier transformer init (models/transformer.py): at 1e-3 seed 0
    # stalled at AP50 0.84 in 300 steps; at 2e-3 seeds 0-2 fit in 75
    "deformable_detr": {"lr": 2e-3, "steps": 300, "overrides": {}},
    "dino": {"lr": 1e-3, "steps": 300, "overrides": {}},
}
CHECK_EVERY = 25


def overfit(detector: str, seed: int = 0, lr: float | None = None, steps: int | None = None,
            overrides: dict | None = None) -> tuple[float, int, list]:
    """Train on the fixed batch until AP50 >= 0.9 (checked every CHECK_EVERY steps) or ``steps``.
    Returns (best AP50, steps used, [(step, loss, AP50), ...])."""
    s = SETTINGS[detector]
    lr, steps = lr or s["lr"], steps or s["steps"]
    overrides = s["overrides"] if overrides is None else overrides
    seed_everything(seed)
    images, pad_mask, targets, gt = synthetic_batch(seed=seed)
    model = build_detector(detector_config(detector, "tiny", **overrides), NUM_CLASSES)
    distiller = build_distiller("student", model, build_criterion(detector, NUM_CLASSES))
    optimizer = build_optimizer(distiller, {"lr": lr, "lr_backbone_mult": 1.0, "lr_linear_proj_mult": 1.0,
                                            "weight_decay": 1e-4})
    curve, best = [], 0.0
    for step in range(1, steps + 1):
        out = train_step(distiller, distiller, images, pad_mask, targets, optimizer, clip_max_norm=0.1)
        assert not out["skipped"], f"non-finite loss at step {step}"
        if step % CHECK_EVERY == 0:
            ap = batch_metrics(model, images, pad_mask, targets, gt)["AP50"]
            curve.append((step, round(out["loss"], 3), round(ap, 3)))
            best = max(best, ap)
            if ap >= 0.9:
                return ap, step, curve
    return best, steps, curve


@pytest.mark.parametrize("detector", ["dab_detr", "deformable_detr", "dino"])
def test_overfits_one_batch(detector):
    old = torch.get_num_threads()
    # one thread: on a shared 2-core machine two OpenMP threads can be 10-40x slower (spinning)
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        ap, steps, curve = overfit(detector)
        elapsed = time.perf_counter() - start
    finally:
        torch.set_num_threads(old)
    assert ap >= 0.9, f"{detector}: AP50 {ap:.3f} after {steps} steps ({elapsed:.0f} s); (step, loss, AP50): {curve}"
