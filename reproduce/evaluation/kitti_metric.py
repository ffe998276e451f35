"""KITTI's own 2D detection AP (Car / Pedestrian / Cyclist at Easy / Moderate / Hard).

Written for this project from the definition in the KITTI object devkit
(``cpp/evaluate_object.cpp``, 2D "image" metric), so that numbers are comparable with papers
that quote KITTI AP rather than COCO AP. numpy only. The devkit's rules, as implemented here:

* **Classes and IoU.** Car needs IoU > 0.7, Pedestrian and Cyclist IoU > 0.5 (strictly
  greater: IoU exactly 0.7 is a miss). Boxes are continuous ``x1, y1, x2, y2`` pixels, areas
  without KITTI-VOC's "+1". Type names compare case-insensitively.
* **Difficulty** (``MIN_HEIGHT``, ``MAX_OCCLUSION``, ``MAX_TRUNCATION``): a ground truth (GT)
  of the class counts for a difficulty if its height ``y2 - y1 >= 40 / 25 / 25`` px,
  ``occluded <= 0 / 1 / 2`` and ``truncated <= 0.15 / 0.30 / 0.50`` (Easy / Moderate / Hard).
  Levels are cumulative: Hard contains Moderate contains Easy.
* **Ignored GTs** are a class GT that fails the difficulty, and the neighbouring class (Van
  for Car, Person_sitting for Pedestrian; Cyclist has none). They are neither TP nor FN, and a
  detection matched to one is neither TP nor FP. Every other type (Truck, Tram, Misc, the
  other classes) is skipped altogether, so a Car detection on a Truck is a FP.
* **Ignored detections**: a detection lower than the minimum height (the devkit truncates
  its height to an integer first) is ignored, never a FP. Quirk kept from the devkit: this
  holds for *any* detected type, so a too-small detection of another class may still be
  matched to (and so hide) a GT of the evaluated class. Detections of other types are skipped.
* **DontCare**: an unmatched detection whose intersection with a DontCare box, divided by
  the *detection's* area, exceeds the class's IoU threshold (0.7 for Car, 0.5 otherwise: the
  devkit reuses ``MIN_OVERLAP``, it is not a fixed 0.5) is not a FP.
* **Matching** (``computeStatistics``) is not score-ordered: the GTs are visited in *file
  order*, and each takes one unassigned detection with IoU above the threshold. When scores
  are collected (first pass) it takes the highest-scoring one; when TP/FP are counted at a
  score threshold (second pass) it takes the one with the largest IoU among the detections
  scoring ``>= threshold``, preferring a non-ignored one. The result can depend on GT order.
* **Score thresholds** (``getThresholds``): the first pass collects the scores of the TPs,
  sorted descending; the devkit keeps the scores at which recall is closest to ``0, 1/40,
  2/40, ..., 1`` (41 sample points) and counts TP/FP/FN at each of them.
* **AP**: precision at threshold *index* i is replaced by the maximum precision at indices
  ``>= i`` (recall is monotone in the index). R40 (the devkit default since 2019) is the mean
  of indices 1..40, the older 11-point AP the mean of indices 0, 4, ..., 40; both x 100.

Devkit quirk for small sets (``sampling="devkit"``): index i stands for recall i/40 only when
the class has at least 41 valid GTs. With n <= 40 GTs every TP score is a threshold and
recall 1 is reached at index n - 1, so indices n..40 stay at precision 0: a perfect detector
of n GTs gets R40 = 100 * (n - 1) / 40 (0 for one GT). The official test set is large enough
never to hit this; this repository's KITTI sample (8 val Cyclists) and small synthetic splits
are not. ``sampling="exact"`` therefore evaluates the definition the devkit approximates: the
same two-pass matching, but at *every* TP score, and AP as the mean over recall points r
(1/40..1, or 0, 0.1, ..., 1) of the maximum precision at recall >= r (0 if r is never
reached), recall being ``tp / (tp + fn)``. On large sets the two agree closely.

Deviations from the devkit (deliberate): a class/difficulty without any valid GT gets
``nan`` (the devkit prints 0, and skips a class that has no detection at all; here every
requested class is evaluated); ``mAP_moderate`` averages the classes that are not ``nan``.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "CLASS_MIN_OVERLAP", "DIFFICULTIES", "box_overlap", "devkit_thresholds", "pr_curve",
    "average_precision", "kitti_ap", "load_label_2", "load_label_dir", "label_2_for_coco_images",
    "coco_ground_truth_to_kitti", "coco_detections_to_kitti",
]

#: Minimum IoU (strictly exceeded) per class, the devkit's ``MIN_OVERLAP[IMAGE]``.
CLASS_MIN_OVERLAP = {"car": 0.7, "pedestrian": 0.5, "cyclist": 0.5}
#: GT types ignored (not skipped) for a class, the devkit's "neighbouring classes".
NEIGHBOUR_CLASS = {"car": "van", "pedestrian": "person_sitting"}
DONTCARE = "dontcare"
DIFFICULTIES = ("easy", "moderate", "hard")
MIN_HEIGHT = (40, 25, 25)          # px, at KITTI's ~375 px image height
MAX_OCCLUSION = (0, 1, 2)
MAX_TRUNCATION = (0.15, 0.30, 0.50)
N_SAMPLE_PTS = 41                  # recall 0, 1/40, ..., 1
SAMPLINGS = ("devkit", "exact")


# --------------------------------------------------------------------------- boxes


def box_overlap(a: np.ndarray, b: np.ndarray, criterion: str = "iou") -> np.ndarray:
    """Overlap matrix ``[len(a), len(b)]`` of ``x1, y1, x2, y2`` boxes, as the devkit's
    ``imageBoxOverlap``: ``"iou"`` (intersection over union) or ``"a"`` (intersection over the
    area of the box from ``a``, used for detections against DontCare regions)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    w = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    h = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.where((w > 0) & (h > 0), w * h, 0.0)
    area_a = ((a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]))[:, None]
    if criterion == "iou":
        denom = area_a + ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))[None, :] - inter
    elif criterion == "a":
        denom = np.broadcast_to(area_a, inter.shape)
    else:
        raise ValueError(f"criterion must be 'iou' or 'a', got {criterion!r}")
    out = np.zeros_like(inter)
    np.divide(inter, denom, out=out, where=inter > 0)   # no overlap -> 0, as the devkit
    return out


# --------------------------------------------------------------------------- per-image data


@dataclass
class _Frame:
    """One image's GT and detections as arrays, with the class-independent overlaps."""

    gt_type: np.ndarray      # [G] lower-case type names
    gt_height: np.ndarray    # [G] y2 - y1 (float, as the devkit)
    truncated: np.ndarray    # [G]
    occluded: np.ndarray     # [G]
    det_type: np.ndarray     # [D] lower-case
    det_height: np.ndarray   # [D] |y2 - y1| truncated to an integer, as the devkit
    score: np.ndarray        # [D]
    iou: np.ndarray          # [D, G]
    dc_cover: np.ndarray     # [D, C] intersection / detection area, C DontCare regions


def _field(obj: Mapping[str, Any], key: str, where: str) -> Any:
    try:
        return obj[key]
    except KeyError:
        raise ValueError(f"{where}: missing {key!r} (KITTI needs type, bbox, truncated, "
                         f"occluded for ground truth; type, bbox, score for detections)") from None


def _frame(gt: Sequence[Mapping[str, Any]], det: Sequence[Mapping[str, Any]], index: int) -> _Frame:
    gt_type = np.array([str(_field(o, "type", f"image {index} gt")).lower() for o in gt], dtype=object)
    is_dc = gt_type == DONTCARE
    gt_box = np.array([_field(o, "bbox", f"image {index} gt") for o in gt], dtype=np.float64).reshape(-1, 4)
    # DontCare lines carry -1 for truncated/occluded; other GTs must state them.
    trunc = np.array([-1.0 if dc else float(_field(o, "truncated", f"image {index} gt"))
                      for o, dc in zip(gt, is_dc)], dtype=np.float64)
    occ = np.array([-1 if dc else int(_field(o, "occluded", f"image {index} gt"))
                    for o, dc in zip(gt, is_dc)], dtype=np.int64)
    det_type = np.array([str(_field(o, "type", f"image {index} det")).lower() for o in det], dtype=object)
    det_box = np.array([_field(o, "bbox", f"image {index} det") for o in det], dtype=np.float64).reshape(-1, 4)
    score = np.array([float(_field(o, "score", f"image {index} det")) for o in det], dtype=np.float64)
    return _Frame(
        gt_type=gt_type, gt_height=gt_box[:, 3] - gt_box[:, 1], truncated=trunc, occluded=occ,
        det_type=det_type, det_height=np.trunc(np.abs(det_box[:, 3] - det_box[:, 1])), score=score,
        iou=box_overlap(det_box, gt_box), dc_cover=box_overlap(det_box, gt_box[is_dc], "a"),
    )


def _clean(f: _Frame, cls: str, level: int, min_height: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """The devkit's ``cleanData``: per GT 0 (valid), 1 (ignored), -1 (skipped); per detection
    0 (evaluated), 1 (ignored: too small, whatever its type), -1 (other type, skipped)."""
    own = f.gt_type == cls
    out = ((f.occluded > MAX_OCCLUSION[level]) | (f.truncated > MAX_TRUNCATION[level])
           | (f.gt_height < min_height[level]))
    ig_gt = np.full(len(own), -1, dtype=np.int8)
    ig_gt[(f.gt_type == NEIGHBOUR_CLASS.get(cls)) | (own & out)] = 1
    ig_gt[own & ~out] = 0
    ig_det = np.where(f.det_height < min_height[level], 1, np.where(f.det_type == cls, 0, -1))
    return ig_gt, ig_det.astype(np.int8)


def _statistics(iou: np.ndarray, score: np.ndarray, in_dc: np.ndarray, ig_gt: np.ndarray,
                ig_det: np.ndarray, min_overlap: float,
                thresh: float | None) -> tuple[int, int, int, list[float]]:
    """The devkit's ``computeStatistics`` for one image: ``(tp, fp, fn, tp_scores)``.

    ``thresh=None`` is the first pass (each GT takes the highest-scoring candidate, FPs are not
    counted); otherwise only detections scoring ``>= thresh`` take part and each GT, in file
    order, takes the candidate of largest IoU (the first one on ties, a non-ignored detection
    before an ignored one), and FPs are counted, less those inside a DontCare region
    (``in_dc``). ``iou`` is ``[D, G]``; the other arrays are per detection / per GT.
    """
    usable = ig_det != -1
    if thresh is not None:
        usable = usable & (score >= thresh)
    assigned = np.zeros(len(ig_det), dtype=bool)
    tp = fn = 0
    tp_scores: list[float] = []
    for i in np.flatnonzero(ig_gt != -1):
        cand = usable & ~assigned & (iou[:, i] > min_overlap)
        if not cand.any():
            fn += int(ig_gt[i] == 0)
            continue
        if thresh is None:
            j = int(np.argmax(np.where(cand, score, -np.inf)))
        else:
            valid = cand & (ig_det == 0)
            j = int(np.argmax(np.where(valid, iou[:, i], -np.inf)) if valid.any() else np.argmax(cand))
        assigned[j] = True
        if ig_gt[i] == 0 and ig_det[j] == 0:
            tp += 1
            tp_scores.append(float(score[j]))
    fp = 0 if thresh is None else int(np.count_nonzero(usable & ~assigned & (ig_det == 0) & ~in_dc))
    return tp, fp, fn, tp_scores


def devkit_thresholds(tp_scores: Iterable[float], n_gt: int, n_sample_pts: int = N_SAMPLE_PTS) -> list[float]:
    """The devkit's ``getThresholds``: from the TP scores (descending), keep the score at which
    recall ``(i + 1) / n_gt`` is the closest to the next target ``0, 1/40, 2/40, ...`` (a
    score is skipped when the next one is closer); the last score is always kept."""
    v = sorted(tp_scores, reverse=True)
    kept: list[float] = []
    current = 0.0
    for i, s in enumerate(v):
        last = i == len(v) - 1
        l_recall = (i + 1) / n_gt
        r_recall = l_recall if last else (i + 2) / n_gt
        if not last and (r_recall - current) < (current - l_recall):
            continue
        kept.append(s)
        current += 1.0 / (n_sample_pts - 1.0)
    return kept[:n_sample_pts]   # (the C++ would write past its 41-entry array)


# --------------------------------------------------------------------------- curves and AP


def _level(difficulty: str | int) -> int:
    if isinstance(difficulty, str):
        if difficulty.lower() not in DIFFICULTIES:
            raise ValueError(f"difficulty must be one of {DIFFICULTIES}, got {difficulty!r}")
        return DIFFICULTIES.index(difficulty.lower())
    return int(difficulty)


def _min_overlap(cls: str, min_overlap: Mapping[str, float] | None) -> float:
    table = {k.lower(): v for k, v in (min_overlap or {}).items()}
    value = table.get(cls, CLASS_MIN_OVERLAP.get(cls))
    if value is None:
        raise ValueError(f"no IoU threshold for class {cls!r}: pass min_overlap={{{cls!r}: ...}}")
    return float(value)


def _pr_frames(frames: Sequence[_Frame], cls: str, difficulty: str | int, sampling: str,
               min_height: Sequence[float], min_overlap: Mapping[str, float] | None) -> dict:
    cls = cls.lower()
    level = _level(difficulty)
    thr = _min_overlap(cls, min_overlap)
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    # Per image: the detections that can match some GT ("near"), and the scores of the others
    # that would be FPs ("lone": never a candidate, so FP exactly when above the threshold).
    images = []
    n_gt = 0
    tp_scores: list[float] = []
    for f in frames:
        g, d = _clean(f, cls, level, min_height)
        n_gt += int(np.count_nonzero(g == 0))
        in_dc = (f.dc_cover > thr).any(axis=1)
        near = (d != -1) & (f.iou[:, g != -1] > thr).any(axis=1)
        lone = np.sort(f.score[~near & (d == 0) & ~in_dc])
        sub = (f.iou[near], f.score[near], in_dc[near], g, d[near])
        images.append((sub, lone))
        tp_scores += _statistics(*sub, thr, None)[3]
    if sampling == "devkit":
        thresholds = np.array(devkit_thresholds(tp_scores, n_gt) if n_gt else [], dtype=np.float64)
    else:
        thresholds = np.unique(np.asarray(tp_scores, dtype=np.float64))[::-1]
    tp, fp, fn = (np.zeros(len(thresholds), dtype=np.int64) for _ in range(3))
    for sub, lone in images:
        fp += len(lone) - np.searchsorted(lone, thresholds, side="left")
        score, ig_gt = sub[1], sub[3]
        if not (ig_gt != -1).any():
            continue
        # The matching only changes at this image's own candidate scores: evaluate each
        # distinct set of surviving candidates once.
        levels = np.unique(score)
        key = np.searchsorted(levels, thresholds, side="left")
        for k in np.unique(key):
            at = key == k
            s = _statistics(*sub, thr, levels[k] if k < len(levels) else math.inf)
            tp[at] += s[0]
            fp[at] += s[1]
            fn[at] += s[2]
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        recall = np.where(tp + fn > 0, tp / (tp + fn), 0.0)
    return {"thresholds": thresholds, "precision": precision, "recall": recall, "n_gt": n_gt,
            "sampling": sampling}


def pr_curve(gts: Sequence[Sequence[Mapping[str, Any]]], dets: Sequence[Sequence[Mapping[str, Any]]],
             cls: str, difficulty: str | int, *, sampling: str = "devkit",
             min_height: Sequence[float] = MIN_HEIGHT,
             min_overlap: Mapping[str, float] | None = None) -> dict:
    """Precision and recall of one class at one difficulty, at the evaluated score thresholds.

    Returns ``{"thresholds", "precision", "recall", "n_gt", "sampling"}`` (arrays in threshold
    order, scores descending): the devkit's 41 (or fewer) sampled thresholds for
    ``sampling="devkit"``, every distinct TP score for ``"exact"``. Feed it to
    :func:`average_precision`."""
    frames = [_frame(g, d, i) for i, (g, d) in enumerate(_paired(gts, dets))]
    return _pr_frames(frames, cls, difficulty, sampling, min_height, min_overlap)


def average_precision(curve: Mapping[str, Any], recall_points: int = 40) -> float:
    """AP in [0, 100] from :func:`pr_curve`: R40 (``recall_points=40``) or 11-point; ``nan``
    when there is no valid GT."""
    if recall_points not in (11, 40):
        raise ValueError(f"recall_points must be 40 (R40) or 11, got {recall_points!r}")
    if not curve["n_gt"]:
        return math.nan
    precision, recall = np.asarray(curve["precision"]), np.asarray(curve["recall"])
    if curve["sampling"] == "devkit":
        # index i <-> recall i/40; precision at i := max over indices >= i; unused indices are 0
        p = np.zeros(N_SAMPLE_PTS)
        p[:len(precision)] = precision
        p = np.maximum.accumulate(p[::-1])[::-1]
        picked = p[1:] if recall_points == 40 else p[::4]
        return float(picked.mean() * 100.0)
    grid = np.arange(1, 41) / 40.0 if recall_points == 40 else np.arange(11) / 10.0
    interp = [precision[recall >= r - 1e-12].max(initial=0.0) for r in grid]
    return float(np.mean(interp) * 100.0)


def _paired(gts, dets):
    if len(gts) != len(dets):
        raise ValueError(f"{len(gts)} images of ground truth but {len(dets)} of detections")
    return zip(gts, dets)


def kitti_ap(gts: Sequence[Sequence[Mapping[str, Any]]], dets: Sequence[Sequence[Mapping[str, Any]]],
             classes: Sequence[str] = ("Car", "Pedestrian", "Cyclist"), recall_points: int = 40, *,
             sampling: str = "devkit", min_height: Sequence[float] = MIN_HEIGHT,
             min_overlap: Mapping[str, float] | None = None) -> dict[str, Any]:
    """KITTI 2D AP per class and difficulty, in [0, 100] like the devkit.

    ``gts[i]`` / ``dets[i]`` are the objects of image i: GT dicts with ``type``, ``bbox``
    ``[x1, y1, x2, y2]`` (pixels), ``truncated``, ``occluded`` (DontCare entries need only
    type and bbox); detection dicts with ``type``, ``bbox``, ``score``. ``sampling``:
    ``"devkit"`` (the official procedure; warns when a class has 1..40 valid GTs, where it
    under-reports, see the module docstring) or ``"exact"``. ``min_height`` can be scaled for
    images that are not ~375 px high (e.g. ``h / 375 * 40`` ...). Returns
    ``{"Car": {"easy": ap, "moderate": ap, "hard": ap}, ..., "mAP_moderate": mean}``.
    """
    frames = [_frame(g, d, i) for i, (g, d) in enumerate(_paired(gts, dets))]
    out: dict[str, Any] = {}
    small: list[str] = []
    for cls in classes:
        out[cls] = {}
        for name in DIFFICULTIES:
            curve = _pr_frames(frames, cls, name, sampling, min_height, min_overlap)
            out[cls][name] = average_precision(curve, recall_points)
            if sampling == "devkit" and 0 < curve["n_gt"] < N_SAMPLE_PTS:
                small.append(f"{cls}/{name} ({curve['n_gt']})")
    if small:
        warnings.warn("KITTI devkit sampling with fewer than 41 valid GTs caps AP below 100 "
                      f"(R40 <= 100 * (n - 1) / 40): {', '.join(small)}; use sampling='exact'",
                      stacklevel=2)
    moderate = [out[c]["moderate"] for c in classes if not math.isnan(out[c]["moderate"])]
    out["mAP_moderate"] = float(np.mean(moderate)) if moderate else math.nan
    return out


# --------------------------------------------------------------------------- loaders


def load_label_2(path: str | Path) -> list[dict]:
    """Objects of one KITTI ``label_2`` file (15 fields a line) or results file (16: + score):
    dicts with ``type, truncated, occluded, alpha, bbox [x1, y1, x2, y2]`` (+ ``score``)."""
    objects = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) not in (15, 16):
            raise ValueError(f"{path}:{lineno}: expected 15 or 16 fields, got {len(fields)}")
        obj = {"type": fields[0], "truncated": float(fields[1]), "occluded": int(float(fields[2])),
               "alpha": float(fields[3]), "bbox": [float(v) for v in fields[4:8]]}
        if len(fields) == 16:
            obj["score"] = float(fields[15])
        objects.append(obj)
    return objects


def load_label_dir(folder: str | Path, frames: Iterable[str] | None = None) -> tuple[list[str], list[list[dict]]]:
    """``(frame ids, objects per frame)`` from a ``label_2`` folder: the given frame ids (e.g.
    an ImageSets file's lines) or every ``*.txt`` in name order."""
    folder = Path(folder)
    ids = list(frames) if frames is not None else sorted(p.stem for p in folder.glob("*.txt"))
    return ids, [load_label_2(folder / f"{i}.txt") for i in ids]


def label_2_for_coco_images(gt_json: Mapping[str, Any], root: str | Path | None = None) -> list[list[dict]]:
    """The original ``label_2`` objects of each image of a prepared KITTI/synthetic JSON, in
    ``images`` order: ``root`` (default ``info.image_root``) / ``file_name`` with ``image_2``
    replaced by ``label_2`` and a ``.txt`` suffix. Unlike the JSON annotations this keeps Van
    and Person_sitting, which the devkit needs as ignored neighbours."""
    root = Path(root if root is not None else gt_json["info"]["image_root"])
    out = []
    for image in gt_json["images"]:
        rel = Path(image["file_name"])
        out.append(load_label_2(root / rel.parent.parent / "label_2" / f"{rel.stem}.txt"))
    return out


def coco_ground_truth_to_kitti(gt_json: Mapping[str, Any]) -> list[list[dict]]:
    """KITTI GT per image (``images`` order) from a prepared COCO-format JSON.

    Uses the ``kitti_type``, ``truncated``, ``occluded`` fields that ``reproduce.data.prepare``
    stores (``kitti_type`` keeps a ``class_map``-folded Van a Van); crowd/ignore regions become
    one DontCare each (prepare writes a copy per category). Lossy: types prepare drops (Van,
    Person_sitting unless folded by ``class_map``) are missing, so Car detections on Vans count
    as FPs here; prefer :func:`label_2_for_coco_images` when the raw labels are at hand.
    """
    names = {c["id"]: c["name"] for c in gt_json["categories"]}
    index = {img["id"]: i for i, img in enumerate(gt_json["images"])}
    out: list[list[dict]] = [[] for _ in index]
    seen: list[set] = [set() for _ in index]
    for ann in gt_json["annotations"]:
        i = index[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        box = [x, y, x + w, y + h]
        if ann.get("iscrowd", 0) or ann.get("ignore", 0):
            if tuple(box) not in seen[i]:
                seen[i].add(tuple(box))
                out[i].append({"type": "DontCare", "truncated": -1.0, "occluded": -1, "bbox": box})
            continue
        if "truncated" not in ann or "occluded" not in ann:
            raise ValueError(f"annotation {ann.get('id')}: no KITTI truncated/occluded fields "
                             "(not a JSON prepared from KITTI labels)")
        out[i].append({"type": ann.get("kitti_type") or names[ann["category_id"]],
                       "truncated": float(ann["truncated"]), "occluded": int(ann["occluded"]),
                       "bbox": box})
    return out


def coco_detections_to_kitti(detections: Iterable[Mapping[str, Any]], gt_json: Mapping[str, Any]) -> list[list[dict]]:
    """COCO results (``image_id, category_id, bbox [x, y, w, h], score``) -> KITTI detections
    per image, in the order of ``gt_json["images"]``, typed by the JSON's category names."""
    names = {c["id"]: c["name"] for c in gt_json["categories"]}
    index = {img["id"]: i for i, img in enumerate(gt_json["images"])}
    out: list[list[dict]] = [[] for _ in index]
    for det in detections:
        if det["image_id"] not in index:
            raise ValueError(f"detection for image {det['image_id']}, which the JSON does not list")
        x, y, w, h = det["bbox"]
        out[index[det["image_id"]]].append({"type": names[det["category_id"]],
                                            "bbox": [x, y, x + w, y + h], "score": float(det["score"])})
    return out
