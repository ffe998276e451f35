"""Build a teacher's output cache for every KD run of a detector: ``python -m reproduce.teacher_cache``.

Usage::

    python -m reproduce.teacher_cache --detector dino --profile mini
        --teacher runs/mini/dino/teacher/model.pth --out runs/mini/dino/teacher_cache.pt

The profile's training augmentation must be deterministic per (image, flip): one short side, no
crop, no photometric jitter. Then every training input is one of two tensors per image, and the
builder runs the frozen teacher once on each, with the query groups of each cacheable method in
params.yaml's ``methods`` (``Distiller.teacher_groups``; KD-DETR redraws its points every step
and keeps the live teacher). With any other augmentation the builder writes an empty cache that
says why, and the KD runs use the live teacher. Batches are the training batch size: at batch
>= 2 the teacher's encoder output does not depend on the other images of the batch (measured
bitwise on CPU), only the decoder's query-group padding rounds differently (~1e-6).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import DataLoader

from distill import NotCacheable, build_distiller
from distill.teacher_cache import TeacherCache, file_sha256, input_key
from models.build import build_criterion, build_detector
from reproduce.core.config import ConfigError, OneLineParser, load_params
from reproduce.core.progress import Progress
from reproduce.training.runconfig import resolve_run
from reproduce.training.trainer import load_teacher

log = logging.getLogger("reproduce.teacher_cache")


def random_augmentation(image_cfg: dict) -> str | None:
    """Why the training transforms are random beyond the flip, or None when they are not."""
    reasons = []
    if len(image_cfg.get("short_sides") or []) > 1:
        reasons.append(f"{len(image_cfg['short_sides'])} short sides")
    if image_cfg.get("detr_crop"):
        reasons.append("detr_crop")
    if image_cfg.get("photometric"):
        reasons.append("photometric jitter")
    return ", ".join(reasons) or None


def method_distillers(params: dict, detector: str, profile: str, teacher_path: Path, methods: list[str],
                      num_classes: int, overrides: list[str] | None = None) -> list:
    """``(method, distiller)`` for each method, all sharing one frozen teacher."""
    picked, teacher = [], None
    for method in methods:
        cfg = resolve_run(params, detector, "student", method, overrides=overrides, profile=profile)
        if teacher is None:
            teacher = load_teacher(teacher_path, cfg, num_classes)
        student = build_detector(cfg["model"], num_classes)
        distiller = build_distiller(method, student, build_criterion(detector, num_classes), teacher=teacher,
                                    cfg=cfg["distill"])
        picked.append((method, distiller))
    return picked


def build_cache(params: dict, detector: str, profile: str, teacher_path: Path, *, methods: list[str] | None = None,
                overrides: list[str] | None = None, max_batches: int | None = None,
                show_progress: bool = True) -> tuple[TeacherCache, dict]:
    """The cache of ``teacher_path`` over the profile's train split (both flips), and a report:
    which methods it serves, which keep the live teacher and why."""
    from reproduce.data.datasets import DetectionDataset
    from reproduce.data.transforms import build_transforms, collate
    methods = list(methods if methods is not None else params["methods"])
    report = {"detector": detector, "teacher": str(teacher_path), "served": [], "live": {}, "batches": 0}
    # the report is the cache's note: saved with it, read by the trainer (methods served, why empty)
    cache = TeacherCache(file_sha256(teacher_path), record=True, note=report)
    cfg = resolve_run(params, detector, "student", overrides=overrides, profile=profile)
    why = random_augmentation(cfg["image"])
    if why is not None:
        report["empty_because"] = f"training augmentation is random beyond the flip ({why})"
        return cache, report
    if not methods:
        report["empty_because"] = "no methods to serve"
        return cache, report
    train_images = DetectionDataset(cfg["data"]["train"])
    distillers = method_distillers(params, detector, profile, teacher_path, methods, train_images.num_classes,
                                   overrides)
    flips = (0.0, 1.0) if float(cfg["image"].get("hflip", 0.0)) > 0 else (0.0,)
    batch_size = max(2, int(cfg["train"]["batch_size"]))
    active = dict(distillers)
    for method, distiller in distillers:
        distiller.use_teacher_cache(cache)
    total = len(flips) * -(-len(train_images) // batch_size)
    if max_batches is not None:
        total = min(total, max_batches)
    with torch.no_grad(), Progress(total, "teacher cache", unit="batches", enabled=show_progress) as bar:
        for flip in flips:
            dataset = DetectionDataset(cfg["data"]["train"],
                                       transforms=build_transforms(True, {**cfg["image"], "hflip": flip}))
            loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
            for images, pad_mask, targets in loader:
                if max_batches is not None and report["batches"] >= max_batches:
                    break
                seen = set()
                for method, distiller in list(active.items()):
                    try:
                        groups = distiller.teacher_groups(images, targets)
                    except NotCacheable as err:
                        report["live"][method] = str(err)
                        del active[method]
                        continue
                    # methods feeding the teacher the same inputs share one pass
                    signature = tuple(input_key(images, pad_mask, groups, b) for b in range(len(targets)))
                    if signature not in seen:
                        seen.add(signature)
                        distiller.teacher_forward(images, pad_mask, groups=groups)
                report["batches"] += 1
                bar.update(1)
    report["served"] = sorted(active)
    return cache, report


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m reproduce.teacher_cache", description=__doc__.split("\n\n")[0])
    p.add_argument("--detector", required=True, choices=("dab_detr", "deformable_detr", "dino"))
    p.add_argument("--teacher", type=Path, required=True, help="the teacher's model.pth")
    p.add_argument("--out", type=Path, required=True, help="cache file, e.g. runs/mini/dino/teacher_cache.pt")
    p.add_argument("--profile")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--methods", help="comma-separated methods (default: params.yaml methods)")
    p.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--max-batches", type=int, help="stop after this many batches (tests)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        params = load_params(args.params)
        profile = args.profile or params["profile"]
        methods = args.methods.split(",") if args.methods else None
        cache, report = build_cache(params, args.detector, profile, args.teacher, methods=methods,
                                    overrides=args.overrides, max_batches=args.max_batches,
                                    show_progress=not args.no_progress)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"teacher_cache: error: {err}", file=sys.stderr)
        return 1
    cache.save(args.out)
    size = args.out.stat().st_size / 2**20
    if "empty_because" in report:
        log.info("%s: empty cache (%s); KD runs use the live teacher", args.out, report["empty_because"])
    else:
        log.info("%s: %d images, %d entries, %.0f MiB; serves %s; live teacher: %s", args.out, len(cache.images),
                 len(cache.entries), size, ", ".join(report["served"]) or "none",
                 ", ".join(report["live"]) or "none")
    return 0
