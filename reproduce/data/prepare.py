"""Convert KITTI (real or synthetic) and COCO 2017 to COCO-format JSON, one file per split.

Every later stage (training, distillation, pycocotools evaluation) reads only these JSON files,
so the conversion is the one place where raw-data quirks are decided:

* KITTI classes become contiguous category ids 1..K in the order of ``data.kitti.classes``;
  ``class_map`` folds extra KITTI types into a class; ``ignore_types`` (DontCare) become
  ``iscrowd=1`` ignore regions, one copy per category, so that pycocotools ignores detections
  of *any* class that fall inside them, as the KITTI devkit does; every other type is dropped.
* COCO keeps its original (non-contiguous) category ids and image ids, so that predictions can
  be scored against the official JSON unchanged.
* Bad input fails loudly with a :class:`PrepareError` naming the file (and line), and nothing
  is written unless every split converted: all splits are built in memory first, then each
  JSON goes to a temp file in the output directory and is moved into place with ``os.replace``.

Usage::

    python -m reproduce.prepare --dataset {synth,kitti,coco,custom} [--raw DIR] [--out DIR]
                                [--params params.yaml]

writes ``data/prepared/<profile>/`` by default, the profile being the one that uses the
dataset (``synth`` -> ``mini``), i.e. exactly what ``python -m reproduce.stages prepare``
writes and training reads.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import struct
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Sequence


from reproduce.core.config import ConfigError, get_dotted, load_params

#: Boxes may overshoot the image by this many pixels (KITTI boxes are 0-based floats that
#: often touch the border; COCO boxes carry float rounding).
BOX_TOLERANCE = 1.0
KITTI_FIELDS = 15
KITTI_SPLITS = ("train", "val", "test")
COCO_SPLITS = ("train", "val")
#: KITTI frames are PNG; the MMDetection "kitti_tiny" variant ships JPEGs, so accept both.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # length 0, type IEND, fixed CRC
JPEG_SOI = b"\xff\xd8"
JPEG_EOI = b"\xff\xd9"
# SOF0..SOF15 carry the frame size; C4 (DHT), C8 (JPG) and CC (DAC) share the range but do not.
JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
JPEG_STANDALONE = frozenset(range(0xD0, 0xDA)) | {0x01}


class PrepareError(ValueError):
    """Input that cannot be converted; the message starts with the file (and line) at fault."""


class progress:
    """Per-image progress: a bar on a terminal; in a log (a DVC stage) a plain line every
    tenth of the images, at most one per 10 s, plus the last, not hundreds of carriage-return
    updates. Used as a context manager: on
    an error the bar is closed (and erased) before the one-line message is printed."""

    def __init__(self, items: Sequence, desc: str):
        from reproduce.core.progress import Progress
        self.items = items
        self.bar = Progress(len(items), desc, unit="images", rate_unit="img", min_interval=10.0)

    def __iter__(self):
        for item in self.items:
            yield item
            self.bar.update(1)

    def __enter__(self) -> "progress":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()


@dataclass(frozen=True)
class KittiObject:
    """One parsed ``label_2`` line (only the fields a 2D detector needs)."""

    type: str
    truncated: float
    occluded: int
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels


# --------------------------------------------------------------------------- image headers


def image_size(path: Path, display: str) -> tuple[int, int]:
    """Return ``(width, height)`` from the PNG/JPEG header without decoding the pixels.

    Decoding 7,481 KITTI frames just to learn their size would take minutes; the header is a few
    bytes. The end-of-file marker is checked too, which cheaply catches truncated downloads.
    """
    try:
        with path.open("rb") as f:
            head = f.read(32)
            if head.startswith(PNG_SIGNATURE):
                return _png_size(f, head, display)
            if head.startswith(JPEG_SOI):
                return _jpeg_size(f, display)
    except OSError as err:
        raise PrepareError(f"{display}: cannot read image ({err.strerror})") from err
    if not head:
        raise PrepareError(f"{display}: empty image file")
    raise PrepareError(f"{display}: not a PNG or JPEG file")


def _png_size(f: BinaryIO, head: bytes, display: str) -> tuple[int, int]:
    """Read IHDR (always the first chunk) and require the file to end with IEND."""
    if len(head) < 24 or head[12:16] != b"IHDR" or struct.unpack(">I", head[8:12])[0] != 13:
        raise PrepareError(f"{display}: PNG without a valid IHDR chunk")
    width, height = struct.unpack(">II", head[16:24])
    if width == 0 or height == 0:
        raise PrepareError(f"{display}: PNG header gives a zero size")
    f.seek(0, os.SEEK_END)
    if f.tell() < len(PNG_SIGNATURE) + 25 + len(PNG_IEND):
        raise PrepareError(f"{display}: truncated PNG (too short)")
    f.seek(-len(PNG_IEND), os.SEEK_END)
    if f.read(len(PNG_IEND)) != PNG_IEND:
        raise PrepareError(f"{display}: truncated PNG (no IEND chunk at the end)")
    return width, height


def _jpeg_size(f: BinaryIO, display: str) -> tuple[int, int]:
    """Walk the JPEG markers to the first SOF segment; require an EOI marker at the end."""
    f.seek(2)
    size = None
    while size is None:
        byte = f.read(1)
        if byte != b"\xff":
            raise PrepareError(f"{display}: corrupt JPEG (no SOF marker before the image data)")
        marker = f.read(1)
        while marker == b"\xff":  # fill bytes
            marker = f.read(1)
        if not marker:
            raise PrepareError(f"{display}: truncated JPEG (header)")
        code = marker[0]
        if code in JPEG_STANDALONE:
            continue
        seg = f.read(2)
        if len(seg) < 2:
            raise PrepareError(f"{display}: truncated JPEG (header)")
        length = struct.unpack(">H", seg)[0]
        if code in JPEG_SOF:
            body = f.read(5)
            if len(body) < 5:
                raise PrepareError(f"{display}: truncated JPEG (SOF segment)")
            height, width = struct.unpack(">HH", body[1:5])
            size = (width, height)
        else:
            f.seek(length - 2, os.SEEK_CUR)
    if size[0] == 0 or size[1] == 0:
        raise PrepareError(f"{display}: JPEG header gives a zero size")
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - 1024))
    if not f.read().rstrip(b"\x00\r\n").endswith(JPEG_EOI):
        raise PrepareError(f"{display}: truncated JPEG (no EOI marker at the end)")
    return size


# --------------------------------------------------------------------------- KITTI labels


def parse_label_line(line: str, where: str) -> KittiObject:
    """Parse one ``label_2`` line; ``where`` (``file:line``) prefixes every error."""
    fields = line.split()
    if len(fields) != KITTI_FIELDS:
        raise PrepareError(f"{where}: expected {KITTI_FIELDS} fields, got {len(fields)}")
    values = []
    for name, text in zip(("truncated", "occluded", "alpha", "x1", "y1", "x2", "y2"), fields[1:8]):
        try:
            value = float(text)
        except ValueError:
            raise PrepareError(f"{where}: {name} is not a number: {text!r}") from None
        if not math.isfinite(value):
            raise PrepareError(f"{where}: {name} is not finite: {text!r}")
        values.append(value)
    for text in fields[8:]:  # 3D fields: unused, but a non-number means a corrupt line
        try:
            float(text)
        except ValueError:
            raise PrepareError(f"{where}: non-numeric value {text!r}") from None
    truncated, occluded, _alpha, x1, y1, x2, y2 = values
    if x2 <= x1 or y2 <= y1:
        raise PrepareError(f"{where}: empty box (x1={x1:g}, y1={y1:g}, x2={x2:g}, y2={y2:g})")
    return KittiObject(fields[0], truncated, int(occluded), (x1, y1, x2, y2))


def check_box_inside(box: Sequence[float], width: int, height: int, where: str) -> None:
    """Reject an ``x1,y1,x2,y2`` box that leaves the image by more than ``BOX_TOLERANCE``."""
    x1, y1, x2, y2 = box
    tol = BOX_TOLERANCE
    if x1 < -tol or y1 < -tol or x2 > width + tol or y2 > height + tol:
        raise PrepareError(
            f"{where}: box ({x1:g}, {y1:g}, {x2:g}, {y2:g}) lies outside the "
            f"{width}x{height} image"
        )


def parse_label_file(path: Path, display: str, width: int, height: int) -> list[KittiObject]:
    """Parse and check a whole ``label_2`` file (blank lines are allowed and skipped)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise PrepareError(f"{display}: cannot read label file ({err})") from err
    objects = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{display}:{lineno}"
        obj = parse_label_line(line, where)
        check_box_inside(obj.box, width, height, where)
        objects.append(obj)
    return objects


# --------------------------------------------------------------------------- KITTI splits


def read_imageset(path: Path, display: str) -> list[tuple[str, int]]:
    """Return ``(frame id, line number)`` pairs of an ImageSets file, rejecting duplicates."""
    entries: list[tuple[str, int]] = []
    seen: set[str] = set()
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        frame = line.strip()
        if not frame:
            continue
        if not frame.isdigit():
            raise PrepareError(f"{display}:{lineno}: frame id {frame!r} is not a number")
        if frame in seen:
            raise PrepareError(f"{display}:{lineno}: frame {frame} listed twice")
        seen.add(frame)
        entries.append((frame, lineno))
    return entries


def seeded_split(ids: Sequence[str], val_fraction: float, seed: int) -> dict[str, list[str]]:
    """Deterministic train/val split of ``ids`` (sorted first, so listing order is irrelevant)."""
    if not 0.0 <= val_fraction <= 1.0:
        raise PrepareError(f"params: data.kitti.val_fraction must be in [0, 1], got {val_fraction}")
    shuffled = sorted(ids)
    random.Random(seed).shuffle(shuffled)
    n_val = round(len(shuffled) * val_fraction)
    return {"train": sorted(shuffled[n_val:]), "val": sorted(shuffled[:n_val])}


@dataclass(frozen=True)
class SplitPlan:
    """Where one split's frames come from, so errors can point at the listing line."""

    frames: list[tuple[str, str]]  # (frame id, "where it was listed")
    image_dir: str  # relative to the raw root
    label_dir: str | None  # None: unlabelled (official KITTI testing/)
    source: str


def plan_kitti_splits(raw: Path, val_fraction: float, split_seed: int) -> dict[str, SplitPlan]:
    """Use ``ImageSets/{train,val,test}.txt`` when present, else a seeded split of all frames.

    The official KITTI ``test.txt`` lists frames of ``testing/`` whose ids overlap the training
    ids, so the test split reads ``testing/`` whenever that folder exists.
    """
    sets = raw / "ImageSets"
    if (sets / "train.txt").is_file() or (sets / "val.txt").is_file():
        return _plan_from_imagesets(raw, sets)
    image_dir = raw / "training" / "image_2"
    if not image_dir.is_dir():
        raise PrepareError(f"{image_dir}: image folder not found (is --raw a KITTI root?)")
    ids = sorted({p.stem for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES})
    bad = [i for i in ids if not i.isdigit()]
    if bad:
        raise PrepareError(f"training/image_2/{bad[0]}: frame id is not a number")
    source = f"seeded(val_fraction={val_fraction}, seed={split_seed})"
    return {
        split: SplitPlan([(i, "training/image_2") for i in chosen], "training/image_2",
                         "training/label_2", source)
        for split, chosen in seeded_split(ids, val_fraction, split_seed).items()
    }


def _plan_from_imagesets(raw: Path, sets: Path) -> dict[str, SplitPlan]:
    plans: dict[str, SplitPlan] = {}
    for split in KITTI_SPLITS:
        path = sets / f"{split}.txt"
        if not path.is_file():
            continue
        display = f"ImageSets/{split}.txt"
        frames = [(i, f"{display}:{n}") for i, n in read_imageset(path, display)]
        official_test = split == "test" and (raw / "testing" / "image_2").is_dir()
        root = "testing" if official_test else "training"
        label_dir = f"{root}/label_2"
        if root == "testing" and not (raw / label_dir).is_dir():
            label_dir = None
        plans[split] = SplitPlan(frames, f"{root}/image_2", label_dir, display)
    _reject_overlap(plans)
    return plans


def _reject_overlap(plans: dict[str, SplitPlan]) -> None:
    """Frames shared by two splits of the same folder would leak training data into evaluation."""
    names = list(plans)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if plans[a].image_dir != plans[b].image_dir:
                continue
            shared = sorted({f for f, _ in plans[a].frames} & {f for f, _ in plans[b].frames})
            if shared:
                raise PrepareError(
                    f"ImageSets/{b}.txt: {len(shared)} frame(s) also in ImageSets/{a}.txt "
                    f"(first: {shared[0]})"
                )


# --------------------------------------------------------------------------- KITTI conversion


def kitti_type_map(
    classes: Sequence[str], class_map: dict[str, str], ignore_types: Iterable[str]
) -> dict[str, int]:
    """Map KITTI type -> category id (1..K); checks the mapping itself is consistent."""
    if not classes or len(set(classes)) != len(classes):
        raise PrepareError(f"params: data.kitti.classes must be unique and non-empty: {classes}")
    type_map = {name: i for i, name in enumerate(classes, start=1)}
    for src, dst in (class_map or {}).items():
        if dst not in type_map or src in classes:
            raise PrepareError(f"params: data.kitti.class_map {src!r}: {dst!r} must map a "
                               f"non-class type onto one of {list(classes)}")
        type_map[src] = type_map[dst]
    clash = set(ignore_types) & set(type_map)
    if clash:
        raise PrepareError(f"params: data.kitti.ignore_types overlap the classes: {sorted(clash)}")
    return type_map


def find_image(raw: Path, image_dir: str, frame: str, where: str) -> str:
    """Return the image path of ``frame`` relative to ``raw`` (PNG first, then JPEG)."""
    for suffix in IMAGE_SUFFIXES:
        rel = f"{image_dir}/{frame}{suffix}"
        if (raw / rel).is_file():
            return rel
    raise PrepareError(f"{where}: frame {frame} has no image ({image_dir}/{frame}.png)")


def convert_kitti_split(
    raw: Path, plan: SplitPlan, type_map: dict[str, int], ignore_types: set[str],
    num_classes: int, desc: str = "prepare",
) -> tuple[list[dict], list[dict]]:
    """Build the ``images`` and ``annotations`` lists of one split."""
    images: list[dict] = []
    annotations: list[dict] = []
    frames = sorted(plan.frames, key=lambda item: int(item[0]))
    with progress(frames, desc) as bar:
        for frame, where in bar:
            _convert_kitti_frame(raw, plan, frame, where, type_map, ignore_types, num_classes,
                                 images, annotations)
    return images, annotations


def _convert_kitti_frame(raw: Path, plan: SplitPlan, frame: str, where: str,
                         type_map: dict[str, int], ignore_types: set[str], num_classes: int,
                         images: list[dict], annotations: list[dict]) -> None:
    """Append one frame's image entry and annotations (ignore regions once per category)."""
    file_name = find_image(raw, plan.image_dir, frame, where)
    width, height = image_size(raw / file_name, file_name)
    image_id = int(frame)
    images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
    if plan.label_dir is None:
        return
    label_rel = f"{plan.label_dir}/{frame}.txt"
    if not (raw / label_rel).is_file():
        raise PrepareError(f"{where}: frame {frame} has no label file ({label_rel})")
    for obj in parse_label_file(raw / label_rel, label_rel, width, height):
        if obj.type in ignore_types:
            category_ids, crowd = range(1, num_classes + 1), 1
        elif obj.type in type_map:
            category_ids, crowd = [type_map[obj.type]], 0
        else:
            continue
        for category_id in category_ids:
            annotations.append(
                _kitti_annotation(len(annotations) + 1, image_id, category_id, obj, crowd))


def _kitti_annotation(ann_id: int, image_id: int, category_id: int, obj: KittiObject,
                      crowd: int) -> dict[str, Any]:
    x1, y1, x2, y2 = obj.box
    w, h = round(x2 - x1, 4), round(y2 - y1, 4)  # KITTI stores 2 decimals; drop float noise
    return {
        "id": ann_id, "image_id": image_id, "category_id": category_id,
        "bbox": [x1, y1, w, h], "area": round(w * h, 4),
        "iscrowd": crowd, "ignore": crowd,
        "truncated": obj.truncated, "occluded": obj.occluded, "kitti_type": obj.type,
    }


def prepare_kitti(
    raw: str | Path,
    out: str | Path | None,
    classes: Sequence[str] = ("Car", "Pedestrian", "Cyclist"),
    class_map: dict[str, str] | None = None,
    ignore_types: Iterable[str] = ("DontCare",),
    val_fraction: float = 0.5,
    split_seed: int = 0,
    *,
    dataset: str = "kitti",
) -> dict[str, dict]:
    """Convert a KITTI-layout root (real KITTI or the synthetic set) to COCO dicts per split.

    Writes ``<out>/<split>.json`` atomically unless ``out`` is None; returns split -> dict.
    """
    raw_path = Path(raw)
    if not raw_path.is_dir():
        raise PrepareError(f"{raw}: raw data folder not found")
    class_map = dict(class_map or {})
    ignore = set(ignore_types)
    type_map = kitti_type_map(list(classes), class_map, ignore)
    categories = [{"id": i, "name": n, "supercategory": "kitti"}
                  for i, n in enumerate(classes, start=1)]
    outputs = {}
    for split, plan in plan_kitti_splits(raw_path, val_fraction, split_seed).items():
        images, annotations = convert_kitti_split(raw_path, plan, type_map, ignore, len(classes),
                                                  desc=f"{dataset} {split}")
        info = {
            "dataset": dataset, "split": split, "source": "kitti label_2",
            "image_root": str(raw), "classes": list(classes), "class_map": class_map,
            "ignore_types": sorted(ignore), "split_source": plan.source,
            "labelled": plan.label_dir is not None,
        }
        outputs[split] = {"info": info, "images": images, "annotations": annotations,
                          "categories": categories}
    if out is not None:
        write_outputs(Path(out), outputs)
    return outputs


# --------------------------------------------------------------------------- COCO


def _load_json(path: Path, display: str) -> Any:
    if not path.is_file():
        raise PrepareError(f"{display}: annotation file not found")
    try:
        with path.open() as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise PrepareError(f"{display}:{err.lineno}: invalid JSON ({err.msg})") from err
    except (OSError, UnicodeDecodeError) as err:
        raise PrepareError(f"{display}: cannot read ({err})") from err


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _require(item: Any, keys: Sequence[str], where: str) -> None:
    if not isinstance(item, dict):
        raise PrepareError(f"{where}: expected an object")
    missing = [k for k in keys if k not in item]
    if missing:
        raise PrepareError(f"{where}: missing key(s) {missing}")


def _index_unique(items: list, where: str, keys: Sequence[str]) -> dict[int, dict]:
    """Check each item has ``keys`` and an int ``id`` unique in the list; index by id."""
    index: dict[int, dict] = {}
    for i, item in enumerate(items):
        at = f"{where}[{i}]"
        _require(item, keys, at)
        if not _is_int(item["id"]):
            raise PrepareError(f"{at}: id must be an integer, got {item['id']!r}")
        if item["id"] in index:
            raise PrepareError(f"{at}: duplicate id {item['id']}")
        index[item["id"]] = item
    return index


def validate_coco(data: Any, display: str) -> tuple[dict[int, dict], dict[int, dict], set[int]]:
    """Check an instances JSON; return (images by id, categories by id, degenerate ann ids).

    Zero-width/height boxes are not fatal: official train2017 has two (ids 918 and one in image
    550395, cocoapi issue #355) and DETR-style loaders drop them anyway; they are reported back
    so the caller can drop and count them. Everything else that is wrong is an error.
    """
    _require(data, ("images", "annotations", "categories"), display)
    for key in ("images", "annotations", "categories"):
        if not isinstance(data[key], list):
            raise PrepareError(f"{display}: {key!r} must be a list")
    images = _index_unique(data["images"], f"{display}: images",
                           ("id", "file_name", "width", "height"))
    for image_id, image in images.items():
        if not isinstance(image["file_name"], str) or not image["file_name"]:
            raise PrepareError(f"{display}: image id {image_id}: file_name must be a non-empty "
                               f"string")
        if not (_is_int(image["width"]) and _is_int(image["height"])
                and image["width"] > 0 and image["height"] > 0):
            raise PrepareError(f"{display}: image id {image_id}: width/height must be positive "
                               f"integers")
    categories = _index_unique(data["categories"], f"{display}: categories", ("id", "name"))
    _index_unique(data["annotations"], f"{display}: annotations",
                  ("id", "image_id", "category_id", "bbox", "area", "iscrowd"))
    degenerate = set()
    for ann in data["annotations"]:
        if _check_coco_annotation(ann, images, categories, f"{display}: annotation id {ann['id']}"):
            degenerate.add(ann["id"])
    return images, categories, degenerate


def _check_coco_annotation(ann: dict, images: dict[int, dict], categories: dict[int, dict],
                           where: str) -> bool:
    """Raise on a broken annotation; return True when its box has zero width or height."""
    if ann["image_id"] not in images:
        raise PrepareError(f"{where}: unknown image_id {ann['image_id']!r}")
    if ann["category_id"] not in categories:
        raise PrepareError(f"{where}: unknown category_id {ann['category_id']!r}")
    if ann["iscrowd"] not in (0, 1) or isinstance(ann["iscrowd"], bool):
        raise PrepareError(f"{where}: iscrowd must be 0 or 1, got {ann['iscrowd']!r}")
    if not _is_number(ann["area"]) or ann["area"] < 0:
        raise PrepareError(f"{where}: area must be a non-negative number, got {ann['area']!r}")
    bbox = ann["bbox"]
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
        raise PrepareError(f"{where}: bbox must be 4 numbers, got {bbox!r}")
    x, y, w, h = bbox
    if w < 0 or h < 0:
        raise PrepareError(f"{where}: bbox has a negative size {bbox}")
    image = images[ann["image_id"]]
    check_box_inside((x, y, x + w, y + h), image["width"], image["height"], where)
    return w == 0 or h == 0


def convert_coco_split(raw: Path, split: str, max_images: int | None) -> dict:
    """Validate one official split, subset it, and rewrite file names relative to ``raw``."""
    display = f"annotations/instances_{split}2017.json"
    data = _load_json(raw / display, display)
    images, _categories, degenerate = validate_coco(data, display)
    kept = sorted(images)
    if max_images is not None:
        kept = kept[:max_images]
    kept_set = set(kept)
    out_images = []
    with progress(kept, f"coco {split}") as bar:
        for image_id in bar:
            image = dict(images[image_id])
            image["file_name"] = f"{split}2017/{image['file_name']}"
            if not (raw / image["file_name"]).is_file():
                raise PrepareError(f"{display}: image id {image_id}: missing image "
                                   f"{image['file_name']}")
            out_images.append(image)
    annotations = []
    for ann in data["annotations"]:
        if ann["image_id"] in kept_set and ann["id"] not in degenerate:
            # Segmentations are not needed for box detection and are most of the file's size.
            slim = {k: v for k, v in ann.items() if k != "segmentation"}
            slim["ignore"] = ann["iscrowd"]
            annotations.append(slim)
    info = {
        "dataset": "coco", "split": split, "source": display, "image_root": str(raw),
        "split_source": "official", "max_images": max_images,
        "num_images_total": len(images), "dropped_degenerate_boxes": len(degenerate),
        "original_info": data.get("info"),
    }
    result = {"info": info, "images": out_images, "annotations": annotations,
              "categories": data["categories"]}
    if "licenses" in data:
        result["licenses"] = data["licenses"]
    return result


def prepare_coco(raw: str | Path, out: str | Path | None,
                 max_images: int | None = None) -> dict[str, dict]:
    """Validate and convert COCO 2017 train/val; writes ``<out>/<split>.json`` unless None."""
    raw_path = Path(raw)
    if not raw_path.is_dir():
        raise PrepareError(f"{raw}: raw data folder not found")
    if max_images is not None and (not _is_int(max_images) or max_images < 1):
        raise PrepareError(f"params: data.coco.max_images must be a positive integer or null, "
                           f"got {max_images!r}")
    outputs = {split: convert_coco_split(raw_path, split, max_images) for split in COCO_SPLITS}
    if out is not None:
        write_outputs(Path(out), outputs)
    return outputs


# --------------------------------------------------------------------------- output


def write_outputs(out: Path, outputs: dict[str, dict]) -> None:
    """Write every split atomically: temp files first, then ``os.replace`` them all.

    A crash or error while dumping leaves no partial JSON and no stale split from an earlier
    run next to fresh ones (split files this run did not produce are removed at the end).
    """
    out.mkdir(parents=True, exist_ok=True)
    temps: dict[str, str] = {}
    try:
        for split, data in outputs.items():
            fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{split}.", suffix=".json.tmp")
            temps[split] = tmp
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, separators=(",", ":"))
            os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are ordinary shared files
        for split, tmp in temps.items():
            os.replace(tmp, out / f"{split}.json")
    finally:
        for tmp in temps.values():
            if os.path.exists(tmp):
                os.unlink(tmp)
    for split in set(KITTI_SPLITS) - set(outputs):
        (out / f"{split}.json").unlink(missing_ok=True)


def summarize(outputs: dict[str, dict]) -> str:
    """One line per split: image count, per-class object counts, ignore regions."""
    lines = []
    for split, data in outputs.items():
        names = {c["id"]: c["name"] for c in data["categories"]}
        counts = Counter(a["category_id"] for a in data["annotations"] if not a.get("iscrowd"))
        regions = {(a["image_id"], tuple(a["bbox"])) for a in data["annotations"]
                   if a.get("iscrowd")}
        per_class = ", ".join(f"{names[c]} {counts[c]}" for c in sorted(names))
        lines.append(f"{split}: {len(data['images'])} images; {per_class}; "
                     f"{len(regions)} ignore regions")
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m reproduce.prepare",
        description="Convert a dataset to COCO-format JSON per split, by default into "
                    "data/prepared/<profile>/, where the profile using that dataset reads it "
                    "(synth -> mini).",
    )
    parser.add_argument("--dataset", required=True, choices=("synth", "kitti", "coco", "custom"))
    parser.add_argument("--raw", type=Path, help="raw data root (default: from params)")
    parser.add_argument("--out", type=Path,
                        help="output folder (default: data.prepared/<profile of the dataset>)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"),
                        help="params file (default: params.yaml)")
    return parser


def profile_of(params: dict, dataset: str) -> str:
    """The profile that trains on ``dataset`` (the first in params.yaml), else the dataset name.

    Training reads ``data/prepared/<profile>`` (dvc.yaml), so that, not the dataset name, is
    where a hand-run prepare must write: ``synth`` is read by ``mini``.
    """
    for name, profile in (params.get("profiles") or {}).items():
        if isinstance(profile, dict) and profile.get("dataset") == dataset:
            return name
    return dataset


def run(dataset: str, raw: Path | None, out: Path | None, params: dict) -> tuple[dict, Path]:
    """Resolve defaults from ``params['data']`` and convert; returns (outputs, out dir).

    The ``prepare`` stage calls this too, so the CLI and the pipeline cannot disagree.
    """
    out = out or Path(get_dotted(params, "data.prepared")) / profile_of(params, dataset)
    if dataset == "custom":     # your own COCO-format data: the paths are in data.custom, not a raw root
        from reproduce.data.custom_data import prepare_custom
        return prepare_custom(get_dotted(params, "data.custom"), out), out
    if dataset == "coco":
        raw = raw or Path(get_dotted(params, "data.coco.raw"))
        max_images = get_dotted(params, "data.coco").get("max_images")
        return prepare_coco(raw, out, max_images), out
    kitti = get_dotted(params, "data.kitti")
    if dataset == "synth":
        raw = raw or Path(get_dotted(params, "data.synth.out"))
        # The synthetic set follows KITTI's conventions; it may override them in data.synth.
        synth = get_dotted(params, "data.synth")
        kitti = {**kitti, **{k: v for k, v in synth.items() if k in kitti}}
    else:
        raw = raw or Path(kitti["raw"])
    outputs = prepare_kitti(
        raw, out, classes=kitti.get("classes", ["Car", "Pedestrian", "Cyclist"]),
        class_map=kitti.get("class_map") or {}, ignore_types=kitti.get("ignore_types") or [],
        val_fraction=kitti.get("val_fraction", 0.5), split_seed=kitti.get("split_seed", 0),
        dataset=dataset,
    )
    return outputs, out


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: a one-line error on stderr (no traceback) and exit code 1 on bad input."""
    args = build_parser().parse_args(argv)
    try:
        params = load_params(args.params)
        outputs, out = run(args.dataset, args.raw, args.out, params)
    except (PrepareError, ConfigError, OSError) as err:
        print(f"prepare: error: {err}", file=sys.stderr)
        return 1
    reader = "" if args.out else f" (read by profile {profile_of(params, args.dataset)})"
    print(f"wrote {', '.join(f'{s}.json' for s in outputs)} to {out}{reader}")
    print(summarize(outputs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
