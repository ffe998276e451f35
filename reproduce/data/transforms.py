"""Image and box transforms for DETR-style detectors, built on ``torchvision.transforms.v2``.

Boxes travel as ``tv_tensors.BoundingBoxes`` next to a ``tv_tensors.Image``, so every geometric
transform moves them with the pixels; no hand-written box arithmetic can drift out of sync.

Choices (``build_transforms(train, cfg)``; keys of ``cfg``, all optional):

* ``short_sides`` (list[int]) + ``max_size`` (int): keep-ratio resize so the short side is one
  of ``short_sides`` (random pick when training = DETR's multi-scale augmentation; the *last*
  one at evaluation, so put the evaluation scale last), with the long side capped at
  ``max_size``. Keeping the aspect ratio matters on KITTI (about 3.3:1): squashing to a square
  would distort exactly the thin, small pedestrians and cyclists the paper cares about.
  ``None``/empty disables resizing (native resolution, used by tests and tiny synthetic data).
* ``hflip`` (probability, train only): driving scenes and COCO are left/right symmetric, so
  flipping doubles the data for free; never at evaluation, which must be deterministic.
* ``photometric`` (bool, train only): mild brightness/contrast/saturation/hue jitter, for
  robustness to KITTI's exposure changes. Off by default because DETR's recipe does not use
  it and teacher/student comparisons should not depend on it.
* ``mean``/``std``: ImageNet statistics by default, since backbones are ImageNet-pretrained.
  Normalisation comes last so that every earlier step works on ``uint8`` pixels (cheaper, and
  ColorJitter's ranges are defined for [0, 1]/[0, 255] images, not standardised ones).

* ``detr_crop`` (bool, train only, default off): DETR's COCO training branch
  (facebookresearch/detr datasets/coco.py ``make_coco_transforms``, grade A): with probability
  0.5 the multi-scale resize above, otherwise resize the short side to one of 400/500/600 px,
  crop a random region of 384-600 px per side (:class:`RandomSizeCrop`), then the multi-scale
  resize. The coco profile turns it on; the mini and kitti profiles keep it off: on KITTI's
  wide, short frames crops mostly cut objects in half. Degenerate boxes are removed afterwards by
:func:`sanitize_target`, which the dataset always applies, whatever transforms it was given.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Jitter strengths: mild enough to keep colour cues (red tail lights, cyclist clothing) usable.
PHOTOMETRIC_JITTER = {"brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.02}
#: DETR's crop branch (detr datasets/coco.py): short sides before the crop, crop side range (grade A)
DETR_CROP_PRE_SIDES = (400, 500, 600)
DETR_CROP_SIZE = (384, 600)

DEFAULT_CFG: dict[str, Any] = {
    "short_sides": [800],
    "max_size": 1333,
    "hflip": 0.5,
    "photometric": False,
    "detr_crop": False,
    "mean": IMAGENET_MEAN,
    "std": IMAGENET_STD,
}

Transform = Callable[..., Any]


def build_transforms(train: bool, cfg: dict[str, Any] | None = None) -> v2.Compose:
    """Return the v2 pipeline ``(image, target) -> (image, target)`` for training or evaluation.

    ``cfg`` overrides :data:`DEFAULT_CFG` key by key; unknown keys are an error so that a typo
    in params.yaml cannot silently disable an augmentation.
    """
    cfg = _merge_cfg(cfg)
    steps: list[Transform] = []
    if train and cfg["hflip"] > 0:
        steps.append(v2.RandomHorizontalFlip(p=float(cfg["hflip"])))
    resize = _resize(train, cfg["short_sides"], cfg["max_size"])
    if train and cfg["detr_crop"]:
        if resize is None:
            raise ValueError("build_transforms: detr_crop needs short_sides (it ends with the multi-scale resize)")
        crop_branch = v2.Compose([v2.RandomShortestSize(min_size=list(DETR_CROP_PRE_SIDES)),
                                  RandomSizeCrop(*DETR_CROP_SIZE),
                                  _resize(train, cfg["short_sides"], cfg["max_size"])])
        steps.append(v2.RandomChoice([resize, crop_branch]))   # DETR's RandomSelect, p = 0.5
    elif resize is not None:
        steps.append(resize)
    if train and cfg["photometric"]:
        steps.append(v2.ColorJitter(**PHOTOMETRIC_JITTER))  # after resize: fewer pixels to jitter
    steps.append(v2.ToDtype(torch.float32, scale=True))  # images only; boxes keep their dtype
    steps.append(v2.Normalize(mean=list(cfg["mean"]), std=list(cfg["std"])))
    return v2.Compose(steps)


def _merge_cfg(cfg: dict[str, Any] | None) -> dict[str, Any]:
    cfg = dict(cfg or {})
    unknown = set(cfg) - set(DEFAULT_CFG)
    if unknown:
        raise ValueError(f"build_transforms: unknown option(s) {sorted(unknown)}; "
                         f"expected some of {sorted(DEFAULT_CFG)}")
    merged = {**DEFAULT_CFG, **cfg}
    if not 0.0 <= float(merged["hflip"]) <= 1.0:
        raise ValueError(f"build_transforms: hflip must be a probability, got {merged['hflip']}")
    return merged


def _resize(train: bool, short_sides: list[int] | None, max_size: int | None) -> Transform | None:
    """Keep-ratio resize; ``RandomShortestSize`` with one choice doubles as the eval resize.

    Using the same op for both keeps train and eval rounding identical, and unlike ``Resize``
    it accepts ``max_size`` equal to the short side (square caps for tiny synthetic images).
    """
    if not short_sides:
        return None
    sides = [int(s) for s in short_sides]
    if min(sides) <= 0 or (max_size is not None and max_size <= 0):
        raise ValueError(f"build_transforms: sizes must be positive ({sides}, {max_size})")
    choices = sides if train else sides[-1:]
    return v2.RandomShortestSize(min_size=choices, max_size=max_size)


class RandomSizeCrop(v2.Transform):
    """Crop a random ``h x w`` region, ``h`` and ``w`` drawn uniformly (inclusive) from
    ``[min_size, min(side, max_size)]``, at a uniformly random position: DETR's
    ``RandomSizeCrop`` (facebookresearch/detr datasets/transforms.py) as a v2 transform, so the
    boxes are shifted and clamped with the pixels; boxes cropped to nothing are removed later
    by :func:`sanitize_target`. A side shorter than ``min_size`` is kept whole (DETR would fail).
    Draws from torch's RNG, so a seeded sample gets the same crop every time."""

    def __init__(self, min_size: int, max_size: int):
        super().__init__()
        if not 0 < min_size <= max_size:
            raise ValueError(f"RandomSizeCrop: need 0 < min_size <= max_size, got {min_size}, {max_size}")
        self.min_size, self.max_size = int(min_size), int(max_size)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        from torchvision.transforms.v2._utils import query_size
        height, width = query_size(flat_inputs)

        def draw(side: int) -> int:
            low, high = min(self.min_size, side), min(side, self.max_size)
            return int(torch.randint(low, high + 1, ()).item())

        crop_h, crop_w = draw(height), draw(width)
        top = int(torch.randint(0, height - crop_h + 1, ()).item())
        left = int(torch.randint(0, width - crop_w + 1, ()).item())
        return {"top": top, "left": left, "height": crop_h, "width": crop_w}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(v2.functional.crop, inpt, **params)


def sanitize_target(target: dict[str, Any], min_size: float = 0.0) -> dict[str, Any]:
    """Clamp boxes to the canvas and drop those no wider/taller than ``min_size`` pixels.

    ``SanitizeBoundingBoxes`` would do this for one box set, but the target carries two
    (objects and ignore regions), so both are filtered here, keeping ``labels`` aligned with
    ``boxes``. ``min_size=0`` keeps any non-empty box, like DETR: tiny far-away objects are
    real objects, only boxes a transform has collapsed to nothing are removed.
    """
    out = dict(target)
    boxes, keep = _clamp_and_keep(target["boxes"], min_size)
    out["boxes"] = boxes[keep]
    out["labels"] = target["labels"][keep]
    if "ignore_boxes" in target:
        ignore, keep_ignore = _clamp_and_keep(target["ignore_boxes"], min_size)
        out["ignore_boxes"] = ignore[keep_ignore]
    return out


def _clamp_and_keep(boxes: tv_tensors.BoundingBoxes,
                    min_size: float) -> tuple[tv_tensors.BoundingBoxes, torch.Tensor]:
    xyxy = v2.functional.convert_bounding_box_format(
        boxes, new_format=tv_tensors.BoundingBoxFormat.XYXY)
    xyxy = v2.functional.clamp_bounding_boxes(xyxy)
    width = xyxy[:, 2] - xyxy[:, 0]
    height = xyxy[:, 3] - xyxy[:, 1]
    return xyxy, (width > min_size) & (height > min_size)


def collate(
    batch: list[tuple[torch.Tensor, dict]],
) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """Stack a batch of differently sized images: ``(images, pad_mask, targets)``.

    Images are zero-padded at the bottom/right to the batch's largest height and width (zero is
    the dataset mean after normalisation). ``pad_mask[b, y, x]`` is True on padding, the DETR
    convention: the transformer's key-padding mask and the positional encoding use it so the
    padding never counts as image content. Targets are returned unchanged, so their boxes stay
    normalised to each image's own *unpadded* size (``target["size"]``), as in DETR: the
    prediction heads output boxes relative to the valid region, not to the padded canvas.
    """
    images = [image for image, _ in batch]
    targets = [target for _, target in batch]
    channels = images[0].shape[0]
    height = max(image.shape[-2] for image in images)
    width = max(image.shape[-1] for image in images)
    padded = images[0].new_zeros((len(images), channels, height, width))
    pad_mask = torch.ones((len(images), height, width), dtype=torch.bool)
    for i, image in enumerate(images):
        h, w = image.shape[-2:]
        padded[i, :, :h, :w] = image
        pad_mask[i, :h, :w] = False
    return padded, pad_mask, targets
