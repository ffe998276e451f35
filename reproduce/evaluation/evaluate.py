"""COCO-style evaluation of a trained detector with pycocotools.

Usage::

    python -m reproduce.evaluate --checkpoint runs/mini/dino/student/model.pth --detector dino
        [--role student] [--split val] [--out results/mini/dino/student.json]
        [--detections results/mini/dino/student_detections.json] [-S key=value ...]
    python -m reproduce.evaluate --detector dino [--checkpoint ...] --print-config [--explain]

Post-processing is Deformable DETR's (``PostProcess``): sigmoid scores of all (query, class)
pairs, the top-k pairs per image (a query may yield several classes; k per detector as in its
original repository, ``TOP_K``), boxes scaled from the normalised, *unpadded* resized image to
the original image size. Detections are written in
the COCO results format with the original image and category ids, so the prepared JSON scores
them as is. Metrics are fractions in [0, 1]; a metric COCO leaves undefined (-1: no ground
truth of that area range or class) is reported as ``null``.

KITTI-format data (the ``kitti`` profile and the synthetic scenes, whose prepared annotations
carry KITTI's ``truncated`` / ``occluded`` fields) also get KITTI's own 2D AP
(``reproduce.evaluation.kitti_metric``) under ``"kitti"``: Car / Pedestrian / Cyclist at Easy / Moderate /
Hard, R40, as fractions like the COCO numbers (the devkit prints x 100); see
:func:`kitti_metrics` for the ground truth, sampling and minimum heights used.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from models.box_ops import box_cxcywh_to_xyxy
from reproduce.core.config import (ConfigError, OneLineParser, add_print_config_arguments, load_params,
                                   print_run_config, write_json)
from reproduce.training.engine import capped_workers
from reproduce.core.progress import Progress

MAX_DETS = 100
# Detections kept per image, as each original repository evaluates: DAB-DETR (IDEA-Research/DAB-DETR
# models/DAB_DETR/DABDETR.py PostProcess num_select=300) and DINO (IDEA-Research/DINO config
# num_select=300) keep 300, Deformable DETR (fundamentalvision/Deformable-DETR models/
# deformable_detr.py PostProcess topk 100) keeps 100 (grade A). pycocotools' maxDets=100 still
# caps COCO AP at each image's 100 best-scoring detections, so the extra 200 change only KITTI AP
# and the detections file, as in those repositories.
TOP_K = {"dab_detr": 300, "deformable_detr": 100, "dino": 300}
KITTI_CLASSES = ("Car", "Pedestrian", "Cyclist")
KITTI_IMAGE_HEIGHT = 375        # px; the devkit's minimum box heights are for this image height
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


# ---------------------------------------------------------------------------- post-processing

@torch.no_grad()
def postprocess(logits: Tensor, boxes: Tensor, orig_sizes: Tensor, k: int = MAX_DETS):
    """Top-k (query, class) pairs per image. logits [B,Q,K], boxes [B,Q,4] normalised cxcywh,
    orig_sizes [B,2] (h, w). Returns per image (scores [k], labels [k], boxes [k,4] xyxy pixels)."""
    batch, queries, classes = logits.shape
    prob = logits.float().sigmoid().flatten(1)                      # [B, Q*K]
    k = min(k, queries * classes)
    scores, idx = prob.topk(k, dim=1)
    query_idx = torch.div(idx, classes, rounding_mode="floor")
    labels = idx % classes
    xyxy = box_cxcywh_to_xyxy(boxes.float())
    xyxy = torch.gather(xyxy, 1, query_idx[..., None].expand(-1, -1, 4))
    h, w = orig_sizes.float().unbind(-1)
    scale = torch.stack([w, h, w, h], -1)[:, None]
    xyxy = xyxy * scale
    return [(scores[b], labels[b], xyxy[b]) for b in range(batch)]


def to_coco_results(image_ids, per_image, label_to_category_id) -> list[dict]:
    """COCO results: ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``."""
    results = []
    for image_id, (scores, labels, xyxy) in zip(image_ids, per_image):
        xywh = torch.cat([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], 1).tolist()
        for score, label, box in zip(scores.tolist(), labels.tolist(), xywh):
            results.append({"image_id": int(image_id), "category_id": int(label_to_category_id[label]),
                            "bbox": [float(v) for v in box], "score": float(score)})
    return results


@torch.no_grad()
def predict(model: nn.Module, dataset, batch_size: int = 4, device: str | torch.device = "cpu",
            num_workers: int = 0, max_dets: int = MAX_DETS, amp_dtype: torch.dtype | None = None,
            progress: bool = True) -> list[dict]:
    """Run ``model`` in eval mode over ``dataset``; COCO-format detections (original ids).

    ``progress``: a bar on a terminal, a line every ~10% in a log (on CPU at paper scale this
    loop takes minutes). ``num_workers`` is capped at the cores there are (engine.capped_workers)."""
    from reproduce.data.transforms import collate
    device = torch.device(device)
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate,
                        num_workers=capped_workers(num_workers))
    results: list[dict] = []
    try:
        with Progress(len(dataset), "evaluate", unit="images", rate_unit="img", enabled=progress) as bar:
            for images, pad_mask, targets in loader:
                results += _predict_batch(model, images, pad_mask, targets, dataset.label_to_category_id,
                                          device, max_dets, amp_dtype)
                bar.update(len(targets))
    finally:
        model.train(was_training)
    return results


def _predict_batch(model, images, pad_mask, targets, label_to_category_id, device, max_dets, amp_dtype):
    """COCO-format detections of one collated batch."""
    images, pad_mask = images.to(device), pad_mask.to(device)
    ctx = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    with ctx:
        out = model(images, pad_mask)
    orig = torch.stack([t["orig_size"] for t in targets]).to(device)
    per_image = postprocess(out.logits, out.boxes, orig, max_dets)
    per_image = [tuple(x.cpu() for x in item) for item in per_image]
    return to_coco_results([t["image_id"] for t in targets], per_image, label_to_category_id)


# ---------------------------------------------------------------------------- metrics

def _quiet():
    return contextlib.redirect_stdout(io.StringIO())


def load_coco(gt):
    """A pycocotools COCO from a path, a dict, or a COCO object."""
    from pycocotools.coco import COCO
    if isinstance(gt, COCO):
        return gt
    coco = COCO()
    if isinstance(gt, (str, Path)):
        with open(gt) as f:
            coco.dataset = json.load(f)
    else:
        coco.dataset = dict(gt)
    coco.dataset["annotations"] = [dict(a) for a in coco.dataset.get("annotations", [])]
    for ann in coco.dataset["annotations"]:   # pycocotools needs area and iscrowd
        if "area" not in ann:
            ann["area"] = float(ann["bbox"][2] * ann["bbox"][3])
        ann.setdefault("iscrowd", 0)
    with _quiet():
        coco.createIndex()
    return coco


def _load_results(coco_gt, detections: list[dict]):
    """``coco_gt.loadRes`` that also accepts an empty list (pycocotools' own one crashes)."""
    from pycocotools.coco import COCO
    if detections:
        with _quiet():
            return coco_gt.loadRes([dict(d) for d in detections])
    empty = COCO()
    empty.dataset = {"images": list(coco_gt.dataset["images"]), "categories": list(coco_gt.dataset["categories"]),
                     "annotations": []}
    with _quiet():
        empty.createIndex()
    return empty


def _defined(x: float) -> float | None:
    return None if x < 0 else float(x)


def coco_metrics(gt, detections: list[dict], image_ids: list[int] | None = None) -> dict:
    """AP, AP50, AP75, APs, APm, APl, AR@1/10/100 (+ by area) and per-class AP with COCOeval.

    ``gt``: prepared JSON path, dict or COCO object; ``image_ids`` restricts evaluation (default:
    every image in ``gt``). Per-class AP is the mean of ``precision[:, :, k, area=all,
    maxDets=100]`` over IoU thresholds and recall points (Detectron2's per-category AP).
    """
    from pycocotools.cocoeval import COCOeval
    coco_gt = load_coco(gt)
    coco_dt = _load_results(coco_gt, detections)
    ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
    if image_ids is not None:
        ev.params.imgIds = sorted(int(i) for i in image_ids)
    with _quiet():
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    metrics: dict = {name: _defined(v) for name, v in zip(STAT_NAMES, ev.stats)}
    precision = ev.eval["precision"]        # [T, R, K, A, M]
    per_class = {}
    for k, cat_id in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        name = coco_gt.cats[cat_id].get("name", str(cat_id))
        per_class[name] = float(np.mean(p)) if p.size else None
    metrics["per_class_AP"] = per_class
    metrics["n_detections"] = len(detections)
    return metrics


def evaluate_model(model: nn.Module, dataset, batch_size: int = 4, device: str | torch.device = "cpu",
                   num_workers: int = 0, max_dets: int = MAX_DETS) -> dict:
    """Predict on ``dataset`` (a DetectionDataset) and score against its JSON with COCOeval
    (and KITTI's metric for KITTI-format data)."""
    detections = predict(model, dataset, batch_size, device, num_workers, max_dets)
    metrics = coco_metrics(dataset.json_path, detections, image_ids=list(dataset.image_ids))
    kitti = kitti_metrics(dataset.json_path, detections, image_ids=list(dataset.image_ids))
    if kitti is not None:
        metrics["kitti"] = kitti
    metrics["n_images"] = len(dataset)
    return metrics


# ---------------------------------------------------------------------------- KITTI's metric

def _read_gt(gt) -> dict:
    if isinstance(gt, (str, Path)):
        with open(gt) as f:
            return json.load(f)
    return getattr(gt, "dataset", gt)


def is_kitti_format(gt: dict) -> bool:
    """Whether a prepared JSON holds KITTI data: one of Car / Pedestrian / Cyclist among its
    categories and KITTI's ``truncated`` / ``occluded`` on every annotation."""
    names = {str(c.get("name", "")).lower() for c in gt.get("categories", [])}
    anns = gt.get("annotations", [])
    return (bool(names & {c.lower() for c in KITTI_CLASSES}) and bool(anns)
            and all("truncated" in a and "occluded" in a for a in anns))


def kitti_min_height(gt: dict) -> tuple[float, ...]:
    """The devkit's minimum box heights (40 / 25 / 25 px at KITTI's ~375 px image height),
    scaled to the median image height when that differs by more than 10% (grade D: the
    synthetic scenes are KITTI scaled to 128 px, where 40 px would drop most objects)."""
    from reproduce.evaluation.kitti_metric import MIN_HEIGHT
    heights = sorted(int(i["height"]) for i in gt["images"] if "height" in i)
    if not heights:
        return tuple(float(h) for h in MIN_HEIGHT)
    scale = heights[len(heights) // 2] / KITTI_IMAGE_HEIGHT
    if abs(scale - 1) <= 0.1:
        return tuple(float(h) for h in MIN_HEIGHT)
    return tuple(round(h * scale, 2) for h in MIN_HEIGHT)


def _kitti_ground_truth(gt: dict) -> tuple[list[list[dict]], str]:
    """KITTI GT per image: the raw ``label_2`` files when they are next to the images (they
    keep Van / Person_sitting, the devkit's ignored neighbours, which prepare drops), else the
    JSON's own annotations."""
    from reproduce.evaluation.kitti_metric import coco_ground_truth_to_kitti, label_2_for_coco_images
    root = (gt.get("info") or {}).get("image_root")
    if root:
        try:
            return label_2_for_coco_images(gt, root), "label_2"
        except (OSError, ValueError):
            pass
    return coco_ground_truth_to_kitti(gt), "json"


def kitti_metrics(gt, detections: list[dict], image_ids: list[int] | None = None) -> dict | None:
    """KITTI 2D AP (R40) of COCO-format detections, or None when ``gt`` is not KITTI data.

    Returns ``{"Car": {"easy", "moderate", "hard"}, ..., "mAP_moderate", "sampling",
    "min_height", "ground_truth", "recall_points"}`` with APs as fractions (``null`` for a
    class/difficulty without ground truth). ``sampling`` is the devkit's 41-threshold procedure,
    or ``"exact"`` (every TP score a threshold) when a class has 1..40 valid GTs, where the
    devkit's sampling caps AP below 100 (``reproduce.evaluation.kitti_metric`` module docstring).
    ``min_height``: :func:`kitti_min_height`. ``ground_truth``: ``"label_2"`` (raw labels) or
    ``"json"`` (prepared annotations, without Van / Person_sitting).
    """
    import math
    import warnings

    from reproduce.evaluation.kitti_metric import coco_detections_to_kitti, kitti_ap
    gt = _read_gt(gt)
    if not is_kitti_format(gt):
        return None
    if image_ids is not None:
        keep = {int(i) for i in image_ids}
        gt = {**gt, "images": [i for i in gt["images"] if int(i["id"]) in keep],
              "annotations": [a for a in gt["annotations"] if int(a["image_id"]) in keep]}
        detections = [d for d in detections if int(d["image_id"]) in keep]
    names = {str(c["name"]).lower(): str(c["name"]) for c in gt["categories"]}
    classes = [c for c in KITTI_CLASSES if c.lower() in names]
    gts, source = _kitti_ground_truth(gt)
    dets = coco_detections_to_kitti(detections, gt)
    min_height = kitti_min_height(gt)
    sampling = "devkit"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ap = kitti_ap(gts, dets, classes, sampling=sampling, min_height=min_height)
    if any("fewer than 41 valid GTs" in str(w.message) for w in caught):
        sampling = "exact"
        ap = kitti_ap(gts, dets, classes, sampling=sampling, min_height=min_height)

    def fraction(x: float) -> float | None:
        return None if math.isnan(x) else float(x) / 100

    out: dict = {cls: {level: fraction(v) for level, v in ap[cls].items()} for cls in classes}
    out.update({"mAP_moderate": fraction(ap["mAP_moderate"]), "sampling": sampling,
                "min_height": list(min_height), "ground_truth": source, "recall_points": 40})
    return out


# ---------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m reproduce.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, help="model.pth or checkpoint.pth (required to evaluate)")
    p.add_argument("--detector", required=True, choices=("dab_detr", "deformable_detr", "dino"))
    p.add_argument("--role", choices=("teacher", "student"),
                   help="model config to build when the checkpoint has none (default: from the checkpoint, "
                        "else student)")
    p.add_argument("--method", help="recorded in the metrics (default: from the checkpoint)")
    p.add_argument("--split", help="default: the profile's eval.split")
    p.add_argument("--ablation", help="tag the metrics as this ablation variant (ablation table, not Table 2)")
    p.add_argument("--out", type=Path, help="metrics JSON (default: print only)")
    p.add_argument("--detections", type=Path, help="also write the COCO-format detections here")
    p.add_argument("--profile")
    p.add_argument("--params", type=Path, default=Path("params.yaml"))
    p.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--device", choices=("cpu", "cuda"))
    add_print_config_arguments(p, "evaluates nothing (with --checkpoint, the model config is the file's)")
    return p


def eval_config(params: dict, args: argparse.Namespace) -> dict:
    """The run config evaluation reads, from params.yaml (overrides applied, schedule left
    unresolved), with this command's split and batch size in ``eval``."""
    from reproduce.training.runconfig import resolve_run
    cfg = resolve_run(params, args.detector, args.role or "student", overrides=args.overrides,
                      profile=args.profile, resolve_steps=False)
    cfg["eval"] = {**cfg["eval"], "split": args.split or cfg["eval"].get("split", "val"),
                   "batch_size": args.batch_size or int(cfg["eval"].get("batch_size", 4))}
    return cfg


def with_checkpoint(cfg: dict, args: argparse.Namespace, meta: dict) -> dict:
    """``cfg`` with what the checkpoint decides: load_detector builds the file's own model
    config (the profile's only for a bare state_dict), and its role and method are recorded.
    ``distill`` stays as resolved: evaluation builds no distiller."""
    return {**cfg, "model": meta.get("model_cfg") or cfg["model"],
            "role": args.role or meta.get("role") or "student",
            "method": args.method or meta.get("method") or "student"}


def eval_sources(params: dict, args: argparse.Namespace) -> dict[str, str]:
    """:func:`reproduce.training.runconfig.run_sources` of :func:`eval_config`'s config, with
    the command line's split and batch size."""
    from reproduce.training.runconfig import run_sources
    sources = run_sources(params, args.detector, args.role or "student", overrides=args.overrides,
                          profile=args.profile, resolve_steps=False)
    for key, flag in (("split", "--split"), ("batch_size", "--batch-size")):
        if getattr(args, key) is not None:
            sources[f"eval.{key}"] = f"command line {flag}"
        sources.setdefault(f"eval.{key}", "code default (evaluate)")
    return sources


def print_eval_config(cfg: dict, params: dict, args: argparse.Namespace) -> None:
    """``--print-config``: :func:`eval_config`'s ``cfg`` as evaluation would run it; the
    checkpoint (when given) is read for its recorded config only: no model is built and no
    data read."""
    from reproduce.training.checkpoint import load_model_state
    if args.checkpoint is not None:
        cfg = with_checkpoint(cfg, args, load_model_state(args.checkpoint)[1])
    print_run_config(cfg, eval_sources(params, args) if args.explain else None)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from reproduce.training.checkpoint import CheckpointError, load_detector
    from reproduce.data.datasets import DetectionDataset
    from reproduce.training.runconfig import note_reroutes
    from reproduce.data.transforms import build_transforms

    try:
        params = load_params(args.params)
        cfg = eval_config(params, args)
        note_reroutes(args.overrides, cfg["profile"])
        if args.print_config or args.explain:
            print_eval_config(cfg, params, args)
            return 0
        if args.checkpoint is None:
            raise ConfigError("--checkpoint is required (model.pth or checkpoint.pth)")
        split = cfg["eval"]["split"]
        json_path = cfg["data"].get(split) or str(Path(cfg["data"]["train"]).with_name(f"{split}.json"))
        dataset = DetectionDataset(json_path, transforms=build_transforms(False, cfg["image"]))
        # the file's own model config; the profile's only for a bare state_dict
        model, meta = load_detector(args.checkpoint, args.detector, num_classes=dataset.num_classes,
                                    default_cfg=cfg["model"])
    except (ConfigError, CheckpointError, FileNotFoundError) as err:
        print(f"evaluate: error: {err}", file=sys.stderr)
        return 1
    cfg = with_checkpoint(cfg, args, meta)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    batch_size = cfg["eval"]["batch_size"]

    top_k = TOP_K[args.detector]
    detections = predict(model, dataset, batch_size, device, max_dets=top_k)
    metrics = coco_metrics(json_path, detections, image_ids=list(dataset.image_ids))
    kitti = kitti_metrics(json_path, detections, image_ids=list(dataset.image_ids))
    if kitti is not None:
        metrics["kitti"] = kitti
    metrics.update({
        "top_k": top_k,
        "n_images": len(dataset),
        "detector": args.detector,
        "role": cfg["role"],
        "method": cfg["method"],
        "seed": meta.get("seed", cfg["seed"]),
        "steps": meta.get("steps"),
        "profile": meta.get("profile", cfg["profile"]),
        "dataset": cfg["dataset"],
        "split": split,
        "checkpoint": str(args.checkpoint),
        "ema": bool(meta.get("ema", False)),
        # the model config the metrics belong to (tables mark AP whose config differs from params.yaml's)
        "model_cfg": meta.get("model_cfg"),
    })
    if args.ablation:
        metrics["ablation"] = args.ablation
    if args.detections:
        args.detections.parent.mkdir(parents=True, exist_ok=True)
        args.detections.write_text(json.dumps(detections))
    if args.out:
        write_json(args.out, metrics)
    print(" ".join(f"{k} {metrics[k]:.4f}" if isinstance(metrics[k], float) else f"{k} -"
                   for k in STAT_NAMES[:6]))
    if kitti is not None:
        print("KITTI AP (R40, " + kitti["sampling"] + ") " + " ".join(
            f"{cls} {'/'.join('-' if kitti[cls][d] is None else f'{kitti[cls][d]:.4f}' for d in ('easy', 'moderate', 'hard'))}"
            for cls in KITTI_CLASSES if cls in kitti) + " (easy/moderate/hard)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
