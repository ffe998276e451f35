"""Regression check: a short deterministic training run reproduces its stored mAP.

``python -m reproduce.regression`` trains each tiny detector for a fixed number of steps on a
fixed batch of synthetic images (coloured rectangles, class = colour; seed 0, one thread) and
prints COCO AP / AP50 on that batch; ``--update`` stores them in
``results/regression/short_runs.json``, which ``tests/test_regression.py`` compares against.
The stored values are produced by this code, never typed in. Tolerance: the run is bitwise
deterministic on one machine; across CPUs, float rounding differs (vector widths), and a
short, unconverged run amplifies that, hence an absolute tolerance on AP.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from distill import build_distiller
from models.build import build_criterion, build_detector, detector_config
from reproduce.engine import build_optimizer, seed_everything, train_step
from reproduce.evaluate import coco_metrics, postprocess, to_coco_results

STORED = Path("results/regression/short_runs.json")
TOLERANCE_AP = 0.05
# lr, steps and size overrides per detector (fixed steps: the AP is mid-curve, so it moves
# when the training changes)
SHORT_RUNS = {
    "dab_detr": {"lr": 2e-3, "steps": 120, "overrides": {"backbone": {"levels": [4]}}},
    "deformable_detr": {"lr": 1e-3, "steps": 60, "overrides": {}},
    "dino": {"lr": 1e-3, "steps": 60, "overrides": {}},
}

NUM_CLASSES = 3
COLORS = torch.tensor([[230, 40, 40], [40, 200, 40], [40, 80, 240]], dtype=torch.float32)



def synthetic_batch(n: int = 4, height: int = 64, width: int = 128, seed: int = 0):
    """``(images, pad_mask, targets, coco_gt)``: image i holds 1 + i % 3 rectangles."""
    g = torch.Generator().manual_seed(seed)
    images = torch.empty(n, 3, height, width)
    targets, gt_images, gt_anns = [], [], []
    for i in range(n):
        img = torch.full((3, height, width), 50.0)
        boxes, labels = [], []
        for j in range(1 + i % 3):
            for _ in range(100):      # rejection-sample a box that overlaps no earlier one
                bw = int(torch.randint(16, 40, (1,), generator=g))
                bh = int(torch.randint(14, 36, (1,), generator=g))
                x = int(torch.randint(0, width - bw, (1,), generator=g))
                y = int(torch.randint(0, height - bh, (1,), generator=g))
                if all(x >= b[2] or x + bw <= b[0] or y >= b[3] or y + bh <= b[1] for b in boxes):
                    break
            c = (i + j) % NUM_CLASSES
            img[:, y:y + bh, x:x + bw] = COLORS[c][:, None, None]
            boxes.append((x, y, x + bw, y + bh))
            labels.append(c)
            gt_anns.append({"id": len(gt_anns) + 1, "image_id": i + 1, "category_id": c + 1,
                            "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": 0})
        images[i] = (img / 255 - 0.45) / 0.25
        b = torch.tensor(boxes, dtype=torch.float32)
        cxcywh = torch.stack([(b[:, 0] + b[:, 2]) / 2 / width, (b[:, 1] + b[:, 3]) / 2 / height,
                              (b[:, 2] - b[:, 0]) / width, (b[:, 3] - b[:, 1]) / height], 1)
        targets.append({"boxes": cxcywh, "labels": torch.tensor(labels), "image_id": i + 1,
                        "orig_size": torch.tensor([height, width]), "size": torch.tensor([height, width])})
        gt_images.append({"id": i + 1, "width": width, "height": height, "file_name": f"{i}.png"})
    gt = {"images": gt_images, "annotations": gt_anns,
          "categories": [{"id": c + 1, "name": f"class{c}"} for c in range(NUM_CLASSES)]}
    return images, torch.zeros(n, height, width, dtype=torch.bool), targets, gt


def batch_metrics(model, images, pad_mask, targets, gt) -> dict:
    model.eval()
    with torch.no_grad():
        out = model(images, pad_mask)
    model.train()
    per_image = postprocess(out.logits, out.boxes, torch.stack([t["orig_size"] for t in targets]))
    dets = to_coco_results([t["image_id"] for t in targets], per_image, list(range(1, NUM_CLASSES + 1)))
    return coco_metrics(gt, dets)


def short_run(detector: str, seed: int = 0) -> dict:
    """Train the tiny detector for its fixed number of steps; AP and AP50 on the batch."""
    s = SHORT_RUNS[detector]
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seed_everything(seed)
        images, pad_mask, targets, gt = synthetic_batch(seed=seed)
        model = build_detector(detector_config(detector, "tiny", **s["overrides"]), NUM_CLASSES)
        distiller = build_distiller("student", model, build_criterion(detector, NUM_CLASSES))
        optimizer = build_optimizer(distiller, {"lr": s["lr"], "lr_backbone_mult": 1.0, "lr_linear_proj_mult": 1.0,
                                                "weight_decay": 1e-4})
        for _ in range(s["steps"]):
            train_step(distiller, distiller, images, pad_mask, targets, optimizer, clip_max_norm=0.1)
        metrics = batch_metrics(model, images, pad_mask, targets, gt)
    finally:
        torch.set_num_threads(old)
    return {"AP": round(metrics["AP"], 4), "AP50": round(metrics["AP50"], 4), "steps": s["steps"], "seed": seed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reproduce.regression", description=__doc__.splitlines()[0])
    parser.add_argument("--update", action="store_true", help=f"store the results in {STORED}")
    args = parser.parse_args(argv)
    results = {det: short_run(det) for det in SHORT_RUNS}
    print(json.dumps(results, indent=2))
    if args.update:
        STORED.parent.mkdir(parents=True, exist_ok=True)
        payload = {"tolerance_AP": TOLERANCE_AP, "command": "python -m reproduce.regression --update",
                   "torch": torch.__version__, "results": results}
        STORED.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
