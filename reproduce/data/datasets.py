"""A torch ``Dataset`` over the COCO-format JSON written by :mod:`reproduce.data.prepare`.

One class serves KITTI, the synthetic set and COCO, because ``prepare`` already normalised them
to the same format. Targets follow the DETR conventions the models and losses expect:

* ``labels`` are contiguous ``0..K-1`` (the classification head has K logits + "no object"),
  in the order of the JSON ``categories`` sorted by id; ``label_to_category_id`` maps back to the
  JSON ids (COCO's are 1..90 with gaps) when writing predictions for pycocotools.
* ``boxes`` are normalised ``cx, cy, w, h`` in [0, 1] relative to the transformed, *unpadded*
  image (``size``); ``orig_size`` lets evaluation scale predictions back to JSON pixels.
* ``ignore_boxes`` are the ``iscrowd``/``ignore`` regions (KITTI DontCare, COCO crowds),
  deduplicated: prepare writes a DontCare copy per category for pycocotools, but a region is a
  region. Training may use them to avoid penalising detections there.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2

from reproduce.data.transforms import build_transforms, collate, sanitize_target

__all__ = ["DetectionDataset", "collate", "load_image"]


class DetectionDataset(Dataset):
    """Images and targets of one prepared split (``data/prepared/<dataset>/<split>.json``).

    ``image_root`` defaults to the JSON's ``info.image_root`` (the raw root given to prepare);
    a relative root is resolved against the working directory, i.e. the repository root from
    which every entry point runs.

    Annotations are indexed once into per-image numpy arrays: with ``DataLoader`` workers, a
    list of small arrays is shared copy-on-write, whereas touching hundreds of thousands of
    Python dicts would slowly copy the whole COCO annotation list into every worker.
    """

    def __init__(self, json_path: str | Path, image_root: str | Path | None = None,
                 transforms: Callable[..., Any] | None = None) -> None:
        self.json_path = Path(json_path)
        with self.json_path.open() as f:
            data = json.load(f)
        self.info: dict = data.get("info", {})
        root = image_root if image_root is not None else self.info.get("image_root")
        if root is None:
            raise ValueError(f"{self.json_path}: no info.image_root; pass image_root")
        self.image_root = Path(root)
        # Default: no resize, just the float conversion + normalisation every model expects.
        self.transforms = (transforms if transforms is not None
                           else build_transforms(False, {"short_sides": None}))
        self.categories: list[dict] = sorted(data["categories"], key=lambda c: c["id"])
        self.label_to_category_id = [c["id"] for c in self.categories]
        self.category_id_to_label = {cid: i for i, cid in enumerate(self.label_to_category_id)}
        self.class_names = [c["name"] for c in self.categories]
        self.image_ids: list[int] = [image["id"] for image in data["images"]]
        self._files = [image["file_name"] for image in data["images"]]
        self._sizes = [(image["height"], image["width"]) for image in data["images"]]
        self._boxes, self._labels, self._ignore = self._index_annotations(data["annotations"])

    def _index_annotations(
        self, annotations: list[dict]
    ) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
        """Group boxes per image as XYXY pixel arrays; split objects from ignore regions."""
        position = {image_id: i for i, image_id in enumerate(self.image_ids)}
        boxes: list[list] = [[] for _ in self.image_ids]
        labels: list[list] = [[] for _ in self.image_ids]
        ignore: list[dict] = [{} for _ in self.image_ids]  # dict: ordered dedup
        for ann in annotations:
            i = position[ann["image_id"]]
            x, y, w, h = ann["bbox"]
            xyxy = (float(x), float(y), float(x + w), float(y + h))
            if ann.get("iscrowd", 0) or ann.get("ignore", 0):
                ignore[i][xyxy] = None
            else:
                boxes[i].append(xyxy)
                labels[i].append(self.category_id_to_label[ann["category_id"]])
        return ([np.asarray(b, dtype=np.float32).reshape(-1, 4) for b in boxes],
                [np.asarray(lab, dtype=np.int64) for lab in labels],
                [np.asarray(list(g), dtype=np.float32).reshape(-1, 4) for g in ignore])

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_path(self, index: int) -> Path:
        return self.image_root / self._files[index]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        image = load_image(self.image_path(index))
        height, width = image.shape[-2:]
        if (height, width) != self._sizes[index]:
            raise ValueError(f"{self.image_path(index)}: decoded size {width}x{height} differs "
                             f"from the JSON's {self._sizes[index][1]}x{self._sizes[index][0]}")
        canvas = (height, width)
        target = {
            "boxes": tv_tensors.BoundingBoxes(torch.from_numpy(self._boxes[index]),
                                              format="XYXY", canvas_size=canvas),
            "labels": torch.from_numpy(self._labels[index]),
            "ignore_boxes": tv_tensors.BoundingBoxes(torch.from_numpy(self._ignore[index]),
                                                     format="XYXY", canvas_size=canvas),
        }
        image, target = self.transforms(image, target)
        target = sanitize_target(target)
        new_size = tuple(image.shape[-2:])
        return image.as_subclass(torch.Tensor), {
            "boxes": normalize_boxes(target["boxes"], new_size),
            "labels": target["labels"].as_subclass(torch.Tensor).long(),
            "ignore_boxes": normalize_boxes(target["ignore_boxes"], new_size),
            "image_id": self.image_ids[index],
            "orig_size": torch.tensor(canvas, dtype=torch.long),
            "size": torch.tensor(new_size, dtype=torch.long),
        }


def load_image(path: str | Path) -> tv_tensors.Image:
    """Decode to a ``uint8 [3, H, W]`` image (grey/RGBA converted to RGB).

    EXIF orientation is *not* applied: COCO boxes refer to the stored pixel layout, and PIL
    based reference loaders (DETR, pycocotools demos) do not rotate either.
    """
    return tv_tensors.Image(decode_image(str(path), mode=ImageReadMode.RGB))


def normalize_boxes(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """XYXY pixel boxes -> ``cx, cy, w, h`` divided by the image ``(h, w)``, as plain floats."""
    cxcywh = v2.functional.convert_bounding_box_format(
        boxes.as_subclass(torch.Tensor).float(),
        old_format=tv_tensors.BoundingBoxFormat.XYXY,
        new_format=tv_tensors.BoundingBoxFormat.CXCYWH,
    )
    height, width = size
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    return (cxcywh / scale).clamp_(0.0, 1.0).reshape(-1, 4)
