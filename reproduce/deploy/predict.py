"""Run a trained detector on image files: boxes drawn on each image, and the detections as JSON.

Usage::

    python -m reproduce.predict --checkpoint runs/mini/dino/student/model.pth IMAGE [IMAGE ...]
        --out predictions/ [--score-threshold 0.3] [--device cpu|cuda] [--detector dino]

The model is built from the checkpoint's own config (``reproduce.training.checkpoint.load_detector``;
EMA weights preferred). Each image goes through the evaluation transforms of the run's image
config (``config.json`` next to the checkpoint, or the config a training checkpoint holds) and
the evaluation post-processing (``reproduce.evaluation.evaluate.postprocess``: the top 100 (query, class)
pairs, boxes in original pixels), then detections scoring below ``--score-threshold`` are
dropped and boxes are clipped to the image.

Outputs in ``--out``: ``<image stem>.png``, the image at its original size with the boxes,
class names and scores drawn on it, and ``detections.json``, COCO results
(``reproduce.evaluation.evaluate.to_coco_results``) with the image's file name and the class name added:
``{"image_id": <position on the command line>, "file_name", "image_path", "category_id",
"category_name", "bbox": [x, y, w, h] in original pixels, "score"}``.

Class names come from the checkpoint's meta when it has them, else from the categories of the
run's prepared dataset JSON (``data.train`` of its config, or a smaller split of the same
dataset), else ``class<i>``; category ids likewise (else the label index).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from reproduce.core.config import OneLineParser, write_json

DETECTIONS_NAME = "detections.json"
#: box colours, one per class (cycled): distinct on photographs and on each other
PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
           "#fabed4", "#469990", "#dcbeff", "#9a6324", "#fffac8", "#800000", "#aaffc3", "#808000"]


class PredictError(ValueError):
    """A usage mistake (missing or unreadable image, unusable option); one line for the user."""


# ---------------------------------------------------------------------------- the run's config

def run_config(checkpoint: Path, meta: dict) -> dict | None:
    """The run config of ``checkpoint``: the one a training checkpoint holds, else the run's
    ``config.json`` next to the file; None when there is neither."""
    if isinstance(meta.get("config"), dict):
        return meta["config"]
    path = checkpoint.parent / "config.json"
    if path.is_file():
        try:
            cfg = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return cfg if isinstance(cfg, dict) else None
    return None


def class_names(meta: dict, cfg: dict | None, num_classes: int) -> tuple[list[str], list[int], str]:
    """``(names, category_ids, source)`` for labels ``0..num_classes-1``.

    From the checkpoint's meta (``class_names`` / ``categories``), else the categories of the
    run's prepared JSON (sorted by id, as :class:`reproduce.data.datasets.DetectionDataset` orders
    labels; the smallest split file is read, they all share the categories), else
    ``class<i>`` with the label index as category id."""
    cats = meta.get("categories")
    if isinstance(cats, list) and len(cats) == num_classes and all(isinstance(c, dict) for c in cats):
        cats = sorted(cats, key=lambda c: c["id"])
        return [str(c.get("name", c["id"])) for c in cats], [int(c["id"]) for c in cats], "the checkpoint"
    names = meta.get("class_names")
    if isinstance(names, list) and len(names) == num_classes:
        ids = meta.get("label_to_category_id")
        ids = [int(i) for i in ids] if isinstance(ids, list) and len(ids) == num_classes else list(range(num_classes))
        return [str(n) for n in names], ids, "the checkpoint"
    data = (cfg or {}).get("data") or {}
    candidates = [Path(p) for p in (data.get("train"), data.get("val"), data.get("test")) if isinstance(p, str)]
    candidates = sorted({p for p in candidates if p.is_file()}, key=lambda p: p.stat().st_size)
    for path in candidates:
        try:
            cats = json.loads(path.read_text()).get("categories")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(cats, list) and len(cats) == num_classes:
            cats = sorted(cats, key=lambda c: c["id"])
            return [str(c.get("name", c["id"])) for c in cats], [int(c["id"]) for c in cats], str(path)
    return [f"class{i}" for i in range(num_classes)], list(range(num_classes)), "none found"


# ---------------------------------------------------------------------------- inputs

def check_images(paths: Sequence[Path]) -> None:
    """Every path is an existing file and no two share a stem (their PNGs would collide)."""
    stems: dict[str, Path] = {}
    for path in paths:
        if not path.exists():
            raise PredictError(f"{path}: no such image file")
        if not path.is_file():
            raise PredictError(f"{path}: not a file")
        if path.stem in stems:
            raise PredictError(f"{stems[path.stem]} and {path} share the name {path.stem!r}: "
                               f"both would be written to {path.stem}.png; predict them into separate --out folders")
        stems[path.stem] = path


def read_image(path: Path) -> torch.Tensor:
    """``uint8 [3, H, W]`` (reproduce.data.datasets.load_image); a file that does not decode is a
    :class:`PredictError`."""
    from reproduce.data.datasets import load_image
    try:
        return load_image(path)
    except (RuntimeError, ValueError, OSError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PredictError(f"{path}: not a readable image ({reason[:120]})") from None


# ---------------------------------------------------------------------------- prediction

@torch.no_grad()
def detect(model: nn.Module, image: torch.Tensor, transforms, device: torch.device, score_threshold: float):
    """``(scores, labels, xyxy)`` in original pixels (clipped to the image) of the detections
    of one uint8 image scoring at least ``score_threshold``."""
    from reproduce.evaluation.evaluate import postprocess
    from reproduce.data.transforms import collate
    height, width = image.shape[-2:]
    x = transforms(image).as_subclass(torch.Tensor)
    images, pad_mask, _ = collate([(x, {})])
    out = model(images.to(device), pad_mask.to(device))
    orig = torch.tensor([[height, width]], device=device)
    scores, labels, xyxy = (t.cpu() for t in postprocess(out.logits, out.boxes, orig)[0])
    keep = scores >= score_threshold
    scores, labels, xyxy = scores[keep], labels[keep], xyxy[keep].clone()
    xyxy[:, 0::2] = xyxy[:, 0::2].clamp(0, width)
    xyxy[:, 1::2] = xyxy[:, 1::2].clamp(0, height)
    return scores, labels, xyxy


def draw(image: torch.Tensor, scores, labels, xyxy, names: list[str]) -> torch.Tensor:
    """The image with each box, its class name and score drawn on it (uint8 [3, H, W])."""
    from torchvision.utils import draw_bounding_boxes
    if len(scores) == 0:
        return image.as_subclass(torch.Tensor).clone()
    order = scores.argsort()            # best last: drawn on top
    text = [f"{names[int(labels[i])]} {float(scores[i]):.2f}" for i in order]
    colors = [PALETTE[int(labels[i]) % len(PALETTE)] for i in order]
    width = max(1, round(min(image.shape[-2:]) / 300))
    return draw_bounding_boxes(image.as_subclass(torch.Tensor), xyxy[order], labels=text, colors=colors,
                               width=width, fill_labels=True, label_colors="white")


def predict_images(model: nn.Module, paths: Sequence[Path], out_dir: Path, transforms, names: list[str],
                   category_ids: list[int], device: torch.device, score_threshold: float = 0.3) -> list[dict]:
    """Detect, draw and write ``<out>/<stem>.png`` for every image; returns the detections
    (COCO results with ``file_name``, ``image_path`` and ``category_name``), also written to
    ``<out>/detections.json``."""
    from torchvision.io import write_png
    from tqdm import tqdm

    from reproduce.evaluation.evaluate import to_coco_results
    name_of = dict(zip(category_ids, names))
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    detections: list[dict] = []
    for index, path in enumerate(tqdm(paths, desc="predict", unit="img", disable=None, dynamic_ncols=True)):
        image = read_image(path)
        scores, labels, xyxy = detect(model, image, transforms, device, score_threshold)
        write_png(draw(image, scores, labels, xyxy, names), str(out_dir / f"{path.stem}.png"))
        for det in to_coco_results([index], [(scores, labels, xyxy)], category_ids):
            detections.append({"image_id": det["image_id"], "file_name": path.name, "image_path": str(path),
                               "category_id": det["category_id"], "category_name": name_of[det["category_id"]],
                               "bbox": det["bbox"], "score": det["score"]})
    write_json(out_dir / DETECTIONS_NAME, detections, sort_keys=False)
    return detections


# ---------------------------------------------------------------------------- CLI

def _threshold(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m reproduce.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("images", type=Path, nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, ...)")
    p.add_argument("--checkpoint", type=Path, required=True, help="model.pth or checkpoint.pth of a run")
    p.add_argument("--out", type=Path, required=True, help="folder for <stem>.png and detections.json")
    p.add_argument("--score-threshold", type=_threshold, default=0.3,
                   help="drop detections scoring below this (default 0.3; 0 keeps the top 100 per image)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--detector", choices=("dab_detr", "deformable_detr", "dino"),
                   help="the detector the checkpoint must hold (default: whatever it holds)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from reproduce.training.checkpoint import CheckpointError, load_detector
    from reproduce.data.transforms import build_transforms

    try:
        check_images(args.images)
        if args.device == "cuda" and not torch.cuda.is_available():
            raise PredictError("--device cuda: no CUDA device is available")
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model, meta = load_detector(args.checkpoint, args.detector)
        cfg = run_config(args.checkpoint, meta)
        if cfg is None:
            print(f"predict: note: {args.checkpoint}: no run config found (config.json); "
                  "using the default evaluation transforms", file=sys.stderr)
        try:
            transforms = build_transforms(False, (cfg or {}).get("image"))
        except ValueError as err:
            raise PredictError(f"{args.checkpoint}: its run's image config is unusable: {err}") from None
        names, category_ids, source = class_names(meta, cfg, int(model.num_classes))
        if source == "none found":
            print(f"predict: note: {args.checkpoint}: no class names found (checkpoint meta or the run's "
                  "prepared dataset JSON); using class0, class1, ...", file=sys.stderr)
        model.to(device)
        detections = predict_images(model, args.images, args.out, transforms, names, category_ids, device,
                                    args.score_threshold)
    except (PredictError, CheckpointError) as err:
        print(f"predict: error: {err}", file=sys.stderr)
        return 1
    print(f"{len(detections)} detections on {len(args.images)} images (score >= {args.score_threshold:g}) "
          f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
