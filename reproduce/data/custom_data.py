"""Your own COCO-format dataset (the ``custom`` profile): one instances JSON and one image folder
per split, named in ``params.yaml``::

    data:
      custom:
        train: {annotations: data/raw/custom/train.json, images: data/raw/custom/train}
        val:   {annotations: data/raw/custom/val.json,   images: data/raw/custom/val}
        test:  null            # optional third split

``python -m reproduce.stages prepare --profile custom`` (or ``python -m reproduce.prepare
--dataset custom``) checks every split with the same validation as COCO 2017
(``reproduce.data.prepare.validate_coco``: ids, boxes inside the image, categories known), checks
that each image file exists in its folder, drops segmentations and zero-size boxes, and writes
``data/prepared/custom/<split>.json`` with ``info.image_root`` set to the split's image folder.
Category ids are kept as they are (labels are their sorted order, ``reproduce.data.datasets``), so
every split must list the same categories. Relative paths are relative to the repository root
(where every entry point runs). Unknown splits or keys are errors, so a typo cannot silently
train on the wrong files.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from reproduce.data.prepare import PrepareError, _load_json, validate_coco, write_outputs

SPLITS = ("train", "val", "test")
REQUIRED_SPLITS = ("train", "val")
SPLIT_KEYS = ("annotations", "images")


def check_custom_config(custom: Any) -> dict[str, dict]:
    """``{split: {"annotations": Path, "images": Path}}`` from ``data.custom``; a missing,
    unknown or malformed entry is a :class:`PrepareError` naming the key."""
    where = "params: data.custom"
    if not isinstance(custom, dict):
        raise PrepareError(f"{where}: expected a mapping of splits (train, val[, test]), got {custom!r}")
    unknown = sorted(set(custom) - set(SPLITS))
    if unknown:
        raise PrepareError(f"{where}: unknown split {unknown[0]!r}; the splits are {', '.join(SPLITS)}")
    splits = {}
    for split in SPLITS:
        entry = custom.get(split)
        if entry is None:
            if split in REQUIRED_SPLITS:
                raise PrepareError(f"{where}.{split}: missing; give {{annotations: FILE.json, images: FOLDER}}")
            continue
        if not isinstance(entry, dict):
            raise PrepareError(f"{where}.{split}: expected {{annotations: FILE.json, images: FOLDER}}, got {entry!r}")
        bad = sorted(set(entry) - set(SPLIT_KEYS))
        if bad:
            raise PrepareError(f"{where}.{split}: unknown key {bad[0]!r}; the keys are {', '.join(SPLIT_KEYS)}")
        for key in SPLIT_KEYS:
            if not isinstance(entry.get(key), str) or not entry[key]:
                raise PrepareError(f"{where}.{split}.{key}: missing (a path)")
        splits[split] = {key: Path(entry[key]) for key in SPLIT_KEYS}
    return splits


def check_custom_files(custom: Any) -> list[Path]:
    """The configured annotation files and image folders, each checked to exist (the ``raw``
    stage of the custom profile: there is nothing to download)."""
    paths = []
    for split, entry in check_custom_config(custom).items():
        if not entry["annotations"].is_file():
            raise PrepareError(f"params: data.custom.{split}.annotations: {entry['annotations']}: no such file")
        if not entry["images"].is_dir():
            raise PrepareError(f"params: data.custom.{split}.images: {entry['images']}: no such folder")
        paths += [entry["annotations"], entry["images"]]
    return paths


def convert_custom_split(split: str, annotations: Path, images_dir: Path) -> dict:
    """One split as a prepared JSON (see the module docstring)."""
    display = str(annotations)
    data = _load_json(annotations, display)
    images, _categories, degenerate = validate_coco(data, display)
    if not images_dir.is_dir():
        raise PrepareError(f"params: data.custom.{split}.images: {images_dir}: no such folder")
    for image_id, image in images.items():
        if not (images_dir / image["file_name"]).is_file():
            raise PrepareError(f"{display}: image id {image_id}: {image['file_name']} is not in {images_dir}")
    out_annotations = []
    for ann in data["annotations"]:
        if ann["id"] in degenerate:
            continue
        slim = {k: v for k, v in ann.items() if k != "segmentation"}
        slim["ignore"] = ann["iscrowd"]
        out_annotations.append(slim)
    info = {"dataset": "custom", "split": split, "source": display, "image_root": str(images_dir),
            "split_source": "params data.custom", "dropped_degenerate_boxes": len(degenerate)}
    return {"info": info, "images": [images[i] for i in sorted(images)], "annotations": out_annotations,
            "categories": sorted(data["categories"], key=lambda c: c["id"])}


def prepare_custom(custom: Any, out: str | Path | None) -> dict[str, dict]:
    """Convert every configured split; writes ``<out>/<split>.json`` unless ``out`` is None."""
    splits = check_custom_config(custom)
    outputs = {split: convert_custom_split(split, e["annotations"], e["images"]) for split, e in splits.items()}
    reference = [(c["id"], c["name"]) for c in outputs["train"]["categories"]]
    for split, data in outputs.items():
        if [(c["id"], c["name"]) for c in data["categories"]] != reference:
            raise PrepareError(f"params: data.custom.{split}: its categories differ from train's; every split "
                               "must list the same categories (ids and names)")
    if out is not None:
        write_outputs(Path(out), outputs)
    return outputs
