"""Regression check: the first steps of a short deterministic training run reproduce their
stored loss trajectory, on any x86-64 CPU.

``python -m reproduce.regression`` trains each tiny detector on a fixed batch of synthetic
images (coloured rectangles, class = colour; seed 0) for ``STEPS`` optimizer steps and prints
every step's total loss and the loss terms of the first and last step; ``--update`` stores them
in ``results/regression/short_runs.json``, which ``tests/test_regression.py`` compares against.
The stored values are produced by this code, never typed in.

Why a loss trajectory and not the AP of a longer run: training is chaotic. Float rounding
differs between CPUs (vector widths, oneDNN/MKL kernels, thread count), and a few tens of steps
amplify a 1e-7 difference until a Hungarian assignment flips; after that the runs diverge (at 60
steps the AP of one Deformable DETR run ranged over 0.15-0.26 across CPU settings of one
machine). Over the first ``STEPS`` steps the divergence is still at rounding level, while any
change to a loss weight, an initialisation or a matcher cost moves the losses by orders of
magnitude more (``tests/test_regression.py`` demonstrates each).

``--measure-spread`` reruns the trajectories in subprocesses under other CPU settings
(``ATEN_CPU_CAPABILITY``, oneDNN/MKL instruction sets, 1 and 2 threads), records the largest
relative difference to the stored trajectory, and sets the tolerance to ``SPREAD_MARGIN`` times
it (floored at ``MIN_TOLERANCE``): what other machines may add is unknown, the margin is what we
allow for it, and the changes we must catch are far above it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

from distill import build_distiller
from models.build import build_criterion, build_detector, detector_config
from reproduce.training.engine import build_optimizer, seed_everything, train_step
from reproduce.evaluation.evaluate import coco_metrics, postprocess, to_coco_results

STORED = Path("results/regression/short_runs.json")
STEPS = 10
SPREAD_MARGIN = 50
MIN_TOLERANCE = 1e-5
# lr and size overrides per detector (the overfit test's settings)
SHORT_RUNS = {
    "dab_detr": {"lr": 2e-3, "overrides": {"backbone": {"levels": [4]}}},
    "deformable_detr": {"lr": 1e-3, "overrides": {}},
    "dino": {"lr": 1e-3, "overrides": {}},
}
# CPU settings the spread is measured under: (name, environment, torch threads)
VARIANTS = [
    ("native, 1 thread", {}, 1),
    ("native, 2 threads", {}, 2),
    ("ATEN_CPU_CAPABILITY=avx2", {"ATEN_CPU_CAPABILITY": "avx2"}, 1),
    ("ATEN_CPU_CAPABILITY=default (no SIMD kernels)", {"ATEN_CPU_CAPABILITY": "default"}, 1),
    ("ATEN_CPU_CAPABILITY=default, 2 threads", {"ATEN_CPU_CAPABILITY": "default"}, 2),
    ("oneDNN SSE4.1, MKL SSE4.2", {"ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}, 1),
]

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


def short_run(detector: str, seed: int = 0, steps: int = STEPS, threads: int = 1) -> dict:
    """Train the tiny detector for ``steps`` steps on the fixed batch: every step's total loss
    and the (unweighted) loss terms of the first and the last step."""
    s = SHORT_RUNS[detector]
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        seed_everything(seed)
        images, pad_mask, targets, _ = synthetic_batch(seed=seed)
        model = build_detector(detector_config(detector, "tiny", **s["overrides"]), NUM_CLASSES)
        distiller = build_distiller("student", model, build_criterion(detector, NUM_CLASSES))
        optimizer = build_optimizer(distiller, {"lr": s["lr"], "lr_backbone_mult": 1.0, "lr_linear_proj_mult": 1.0,
                                                "weight_decay": 1e-4})
        losses, terms = [], []
        for _ in range(steps):
            out = train_step(distiller, distiller, images, pad_mask, targets, optimizer, clip_max_norm=0.1)
            losses.append(out["loss"])
            terms.append({k: float(v) for k, v in sorted(out["losses"].items())})
    finally:
        torch.set_num_threads(old)
    return {"seed": seed, "steps": steps, "loss": losses, "terms_first": terms[0], "terms_last": terms[-1]}


def _flatten(run: dict) -> dict[str, float]:
    values = {f"loss[step {i + 1}]": v for i, v in enumerate(run["loss"])}
    values.update({f"{k} (step 1)": v for k, v in run["terms_first"].items()})
    values.update({f"{k} (step {run['steps']})": v for k, v in run["terms_last"].items()})
    return values


def relative_differences(now: dict, stored: dict) -> dict[str, float]:
    """``|now - stored| / max(|stored|, 1e-3)`` per value; a missing or extra loss term counts as
    an infinite difference (a criterion that gained or lost a term is a change)."""
    a, b = _flatten(now), _flatten(stored)
    diffs = {}
    for key in sorted(set(a) | set(b)):
        if key not in a or key not in b or not (math.isfinite(a[key]) and math.isfinite(b[key])):
            diffs[key] = math.inf
        else:
            diffs[key] = abs(a[key] - b[key]) / max(abs(b[key]), 1e-3)
    return diffs


def mismatches(now: dict, stored: dict, tolerance: float) -> list[str]:
    """Human-readable lines for every value further than ``tolerance`` (relative) from stored."""
    a, b = _flatten(now), _flatten(stored)
    return [f"{k}: {a.get(k)} vs stored {b.get(k)} (relative difference {d:.1e} > {tolerance:.1e})"
            for k, d in relative_differences(now, stored).items() if d > tolerance]


def load_stored(path: Path = STORED) -> dict:
    return json.loads(Path(path).read_text())


def measure_spread(stored: dict) -> dict:
    """Rerun every detector's trajectory under each of ``VARIANTS`` in a fresh process (the CPU
    capability is read at import) and return the largest relative difference to ``stored``."""
    rows, worst = [], 0.0
    for name, env, threads in VARIANTS:
        cmd = [sys.executable, "-m", "reproduce.regression", "--threads", str(threads)]
        proc = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, check=True)
        runs = json.loads(proc.stdout)
        per_detector = {det: max(relative_differences(runs[det], stored["results"][det]).values())
                        for det in stored["results"]}
        worst = max(worst, *per_detector.values())
        rows.append({"variant": name, "threads": threads, "max_relative_difference": per_detector})
        print(f"{name}: " + ", ".join(f"{d} {v:.1e}" for d, v in per_detector.items()), file=sys.stderr)
    tolerance = max(MIN_TOLERANCE, float(f"{SPREAD_MARGIN * worst:.0e}"))
    return {"variants": rows, "max_relative_difference": worst, "margin": SPREAD_MARGIN, "tolerance": tolerance}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reproduce.regression", description=__doc__.splitlines()[0])
    parser.add_argument("--update", action="store_true", help=f"store the trajectories in {STORED}")
    parser.add_argument("--measure-spread", action="store_true",
                        help=f"rerun under other CPU settings; store the spread and tolerance in {STORED}")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.measure_spread:
        stored = load_stored()
        stored["spread"] = measure_spread(stored)
        stored["tolerance_rel"] = stored["spread"]["tolerance"]
        STORED.write_text(json.dumps(stored, indent=2) + "\n")
        print(f"max relative difference {stored['spread']['max_relative_difference']:.1e}; "
              f"tolerance {stored['tolerance_rel']:.0e} -> {STORED}", file=sys.stderr)
        return 0
    results = {det: short_run(det, threads=args.threads) for det in SHORT_RUNS}
    print(json.dumps(results, indent=2))
    if args.update:
        STORED.parent.mkdir(parents=True, exist_ok=True)
        payload = {"command": "python -m reproduce.regression --update, then --measure-spread",
                   "torch": torch.__version__, "cpu": _cpu_name(), "steps": STEPS,
                   "tolerance_rel": None, "results": results}
        STORED.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    sys.exit(main())
