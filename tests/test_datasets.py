"""DetectionDataset, build_transforms and collate on the prepared KITTI and COCO samples."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader
from torchvision import tv_tensors
from torchvision.transforms import v2

from reproduce.data.datasets import DetectionDataset
from reproduce.data.prepare import prepare_coco, prepare_kitti
from reproduce.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transforms, collate, \
    sanitize_target

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
KITTI = SHARED / "kitti_sample"
COCO = SHARED / "coco_sample"

pytestmark = pytest.mark.skipif(not KITTI.is_dir() or not COCO.is_dir(),
                                reason="../shared/data samples not available")

NATIVE = {"short_sides": None}  # no resize: boxes must come back exactly as in the JSON


@pytest.fixture(scope="module")
def kitti_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("kitti")
    prepare_kitti(KITTI, out, ["Car", "Pedestrian", "Cyclist"], {}, ["DontCare"], 0.5, 0)
    return out / "val.json"


@pytest.fixture(scope="module")
def coco_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("coco")
    raw = root / "raw"
    raw.mkdir()
    for split in ("train2017", "val2017"):
        (raw / split).symlink_to(COCO / "images" / split, target_is_directory=True)
    (raw / "annotations").symlink_to(COCO / "annotations", target_is_directory=True)
    prepare_coco(raw, root / "prepared")
    return root / "prepared" / "val.json"


def json_boxes(json_path: Path, image_id: int) -> tuple[torch.Tensor, list[int], torch.Tensor]:
    """Object boxes (XYXY pixels), their category ids and the distinct ignore boxes."""
    data = json.loads(json_path.read_text())
    anns = [a for a in data["annotations"] if a["image_id"] == image_id]

    def xyxy(a: dict) -> list[float]:
        x, y, w, h = a["bbox"]
        return [x, y, x + w, y + h]

    objects = [a for a in anns if not a["iscrowd"]]
    ignore = list(dict.fromkeys(tuple(xyxy(a)) for a in anns if a["iscrowd"]))
    return (torch.tensor([xyxy(a) for a in objects], dtype=torch.float32).reshape(-1, 4),
            [a["category_id"] for a in objects],
            torch.tensor(ignore, dtype=torch.float32).reshape(-1, 4))


def to_pixels(boxes: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """Normalised cxcywh -> XYXY pixels of an image of ``size`` = (h, w)."""
    h, w = size.tolist()
    cx, cy, bw, bh = (boxes * torch.tensor([w, h, w, h])).unbind(-1)
    return torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1)


def index_with_objects(ds: DetectionDataset, minimum: int = 2) -> int:
    return next(i for i in range(len(ds)) if len(ds._labels[i]) >= minimum)


def test_item_shapes_and_dtypes(kitti_json: Path) -> None:
    ds = DetectionDataset(kitti_json, transforms=build_transforms(False, NATIVE))
    assert len(ds) == 43 and ds.image_ids == sorted(ds.image_ids)
    assert ds.image_root == KITTI  # from info.image_root
    assert ds.label_to_category_id == [1, 2, 3]
    assert ds.category_id_to_label == {1: 0, 2: 1, 3: 2}
    image, target = ds[index_with_objects(ds)]
    assert image.dtype == torch.float32 and image.ndim == 3 and image.shape[0] == 3
    assert type(image) is torch.Tensor  # not a tv_tensor subclass leaking into models
    n = len(target["labels"])
    assert target["boxes"].shape == (n, 4) and target["boxes"].dtype == torch.float32
    assert target["labels"].dtype == torch.int64
    assert target["ignore_boxes"].dtype == torch.float32 and target["ignore_boxes"].shape[1] == 4
    assert isinstance(target["image_id"], int)
    assert target["orig_size"].dtype == torch.long and target["size"].dtype == torch.long
    assert target["size"].tolist() == list(image.shape[-2:]) == target["orig_size"].tolist()
    assert ((target["boxes"] >= 0) & (target["boxes"] <= 1)).all()
    assert (target["boxes"][:, 2:] > 0).all()


def test_normalisation_uses_imagenet_stats(kitti_json: Path) -> None:
    ds = DetectionDataset(kitti_json)  # default transforms: no resize, just normalise
    image, _ = ds[0]
    raw = ds._sizes[0]
    assert tuple(image.shape[-2:]) == raw
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert image.min() >= (0 - mean.max()) / std.min() - 1e-4
    assert image.max() <= (1 - mean.min()) / std.min() + 1e-4


@pytest.mark.parametrize("which", ["kitti", "coco"])
def test_boxes_equal_json_without_resize(which: str, kitti_json: Path, coco_json: Path) -> None:
    json_path = kitti_json if which == "kitti" else coco_json
    ds = DetectionDataset(json_path, transforms=build_transforms(False, NATIVE))
    for index in range(0, len(ds), max(1, len(ds) // 6)):
        _, target = ds[index]
        boxes, category_ids, ignore = json_boxes(json_path, target["image_id"])
        assert torch.allclose(to_pixels(target["boxes"], target["size"]), boxes, atol=1e-3)
        assert [ds.label_to_category_id[i] for i in target["labels"]] == category_ids
        assert torch.allclose(to_pixels(target["ignore_boxes"], target["size"]), ignore, atol=1e-3)


def test_boxes_follow_resize(kitti_json: Path) -> None:
    native = DetectionDataset(kitti_json, transforms=build_transforms(False, NATIVE))
    resized = DetectionDataset(kitti_json, transforms=build_transforms(
        False, {"short_sides": [200], "max_size": 2000}))
    index = index_with_objects(native)
    image, target = resized[index]
    _, reference = native[index]
    assert min(image.shape[-2:]) == 200
    assert target["size"].tolist() == list(image.shape[-2:])
    assert target["orig_size"].tolist() == reference["orig_size"].tolist()
    # Normalised boxes are resolution-free: identical up to the resize's rounding of the size.
    assert torch.allclose(target["boxes"], reference["boxes"], atol=2e-3)
    boxes, _, _ = json_boxes(kitti_json, target["image_id"])
    assert torch.allclose(to_pixels(target["boxes"], target["orig_size"]), boxes, atol=1.0)


def test_hflip_mirrors_boxes_and_pixels(kitti_json: Path) -> None:
    plain = DetectionDataset(kitti_json, transforms=build_transforms(False, NATIVE))
    flipped = DetectionDataset(kitti_json, transforms=build_transforms(
        True, {"short_sides": None, "hflip": 1.0, "photometric": False}))
    index = index_with_objects(plain)
    image, target = plain[index]
    image_f, target_f = flipped[index]
    assert torch.equal(image_f, image.flip(-1))
    expected = target["boxes"].clone()
    expected[:, 0] = 1.0 - expected[:, 0]
    assert torch.allclose(target_f["boxes"], expected, atol=1e-5)
    assert torch.equal(target_f["labels"], target["labels"])
    assert len(target_f["ignore_boxes"]) == len(target["ignore_boxes"])


def test_keep_ratio_resize_respects_max_size(kitti_json: Path) -> None:
    capped = DetectionDataset(kitti_json, transforms=build_transforms(
        False, {"short_sides": [800], "max_size": 1333}))
    free = DetectionDataset(kitti_json, transforms=build_transforms(
        False, {"short_sides": [800], "max_size": None}))
    image, target = capped[0]
    h0, w0 = target["orig_size"].tolist()
    h, w = image.shape[-2:]
    assert max(h, w) <= 1333 and min(h, w) < 800  # KITTI is ~3.3:1, so the cap binds
    assert abs(w / h - w0 / h0) < 0.02  # aspect ratio kept
    assert min(free[0][0].shape[-2:]) == 800


def test_multiscale_training_picks_listed_sizes(kitti_json: Path) -> None:
    ds = DetectionDataset(kitti_json, transforms=build_transforms(
        True, {"short_sides": [96, 128, 160], "max_size": 1333, "photometric": True}))
    torch.manual_seed(0)
    shorts = {min(ds[0][0].shape[-2:]) for _ in range(12)}
    assert shorts <= {96, 128, 160} and len(shorts) > 1
    eval_ds = DetectionDataset(kitti_json, transforms=build_transforms(
        False, {"short_sides": [96, 128, 160], "max_size": 1333}))
    assert min(eval_ds[0][0].shape[-2:]) == 160  # evaluation uses the last scale


def test_empty_images_load_and_collate(coco_json: Path) -> None:
    ds = DetectionDataset(coco_json, transforms=build_transforms(
        False, {"short_sides": [128], "max_size": 256}))
    empty = [ds.image_ids.index(i) for i in (58636, 226111)]
    for index in empty:
        _, target = ds[index]
        assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
        assert target["labels"].shape == (0,) and target["labels"].dtype == torch.int64
        assert target["ignore_boxes"].shape == (0, 4)
    images, mask, targets = collate([ds[empty[0]], ds[0], ds[empty[1]]])
    assert images.shape[0] == 3 and mask.shape == (3, *images.shape[-2:])
    assert [t["image_id"] for t in targets] == [58636, ds.image_ids[0], 226111]


def test_coco_labels_are_contiguous(coco_json: Path) -> None:
    ds = DetectionDataset(coco_json)
    assert ds.num_classes == 80 and len(ds.label_to_category_id) == 80
    assert ds.label_to_category_id == sorted(ds.label_to_category_id)
    assert ds.category_id_to_label[1] == 0 and ds.category_id_to_label[90] == 79
    labels = torch.cat([torch.from_numpy(lab) for lab in ds._labels])
    assert labels.min() >= 0 and labels.max() <= 79


def test_collate_pads_and_masks(coco_json: Path) -> None:
    ds = DetectionDataset(coco_json)  # native COCO sizes differ between images
    items = [ds[0], ds[1], ds[2]]
    images, mask, targets = collate(items)
    heights = [img.shape[1] for img, _ in items]
    widths = [img.shape[2] for img, _ in items]
    assert len(set(zip(heights, widths))) > 1
    assert images.shape == (3, 3, max(heights), max(widths))
    assert mask.dtype == torch.bool
    for b, (image, target) in enumerate(items):
        h, w = image.shape[-2:]
        expected = torch.ones(mask.shape[1:], dtype=torch.bool)
        expected[:h, :w] = False
        assert torch.equal(mask[b], expected)
        assert torch.equal(images[b, :, :h, :w], image)
        assert images[b][:, mask[b]].abs().sum() == 0
        assert targets[b] is target  # boxes stay normalised to the unpadded image


def test_dataloader_batches(kitti_json: Path) -> None:
    ds = DetectionDataset(kitti_json, transforms=build_transforms(
        True, {"short_sides": [64, 96], "max_size": 400}))
    images, mask, targets = next(iter(DataLoader(ds, batch_size=4, collate_fn=collate)))
    assert images.shape[:2] == (4, 3) and mask.shape == (4, *images.shape[-2:])
    assert len(targets) == 4


def test_dontcare_ignore_boxes_present(kitti_json: Path) -> None:
    ds = DetectionDataset(kitti_json, transforms=build_transforms(False, NATIVE))
    index = ds.image_ids.index(1)  # frame 000001: 4 DontCare lines, written once per class
    _, target = ds[index]
    assert target["ignore_boxes"].shape == (4, 4)
    label = (KITTI / "training" / "label_2" / "000001.txt").read_text().splitlines()
    dontcare = [[float(v) for v in line.split()[4:8]] for line in label
                if line.startswith("DontCare")]
    assert torch.allclose(to_pixels(target["ignore_boxes"], target["size"]),
                          torch.tensor(dontcare), atol=1e-3)
    assert sum(len(g) for g in ds._ignore) == 85  # README: 85 DontCare lines in val


def test_degenerate_boxes_dropped_after_crop(kitti_json: Path) -> None:
    native = DetectionDataset(kitti_json, transforms=build_transforms(False, NATIVE))
    index = index_with_objects(native, minimum=4)
    _, full = native[index]
    crop = v2.Compose([v2.CenterCrop((120, 200)), *build_transforms(False, NATIVE).transforms])
    cropped = DetectionDataset(kitti_json, transforms=crop)
    image, target = cropped[index]
    assert image.shape[-2:] == (120, 200)
    assert len(target["boxes"]) == len(target["labels"]) < len(full["labels"])
    assert (target["boxes"][:, 2:] > 0).all()


def test_sanitize_keeps_labels_aligned() -> None:
    boxes = tv_tensors.BoundingBoxes(
        torch.tensor([[0, 0, 10, 10], [5, 5, 5, 9], [2, 3, 50, 8], [60, 1, 70, 4]]),
        format="XYXY", canvas_size=(20, 40))
    target = {"boxes": boxes, "labels": torch.tensor([0, 1, 2, 3]),
              "ignore_boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY",
                                                       canvas_size=(20, 40))}
    out = sanitize_target(target)
    assert out["labels"].tolist() == [0, 2]  # zero width and fully-outside boxes dropped
    assert out["boxes"].tolist() == [[0, 0, 10, 10], [2, 3, 40, 8]]  # clamped to the canvas
    assert out["ignore_boxes"].shape == (0, 4)


def test_build_transforms_rejects_unknown_keys() -> None:
    with pytest.raises(ValueError, match="unknown option"):
        build_transforms(True, {"short_side": [800]})
    with pytest.raises(ValueError, match="probability"):
        build_transforms(True, {"hflip": 2})


def _crop_branch_only(cfg: dict) -> v2.Compose:
    """The train pipeline with DETR's RandomSelect forced onto its crop branch."""
    pipeline = build_transforms(True, cfg)
    select = next(t for t in pipeline.transforms if isinstance(t, v2.RandomChoice))
    select.p = [0.0, 1.0]
    return pipeline


def test_detr_crop_boxes_follow_the_crop(coco_json: Path) -> None:
    """The crop branch moves boxes with the pixels: every kept box lies inside the cropped image,
    and cropping then resizing equals the native boxes shifted by the crop offset and scaled."""
    from reproduce.data.transforms import RandomSizeCrop
    native = DetectionDataset(coco_json, transforms=build_transforms(False, NATIVE))
    index = index_with_objects(native, minimum=2)
    _, full = native[index]
    crop = RandomSizeCrop(384, 600)
    torch.manual_seed(3)
    pipeline = v2.Compose([crop, *build_transforms(False, NATIVE).transforms])
    cropped = DetectionDataset(coco_json, transforms=pipeline)
    torch.manual_seed(3)
    image, target = cropped[index]
    torch.manual_seed(3)
    h0, w0 = full["size"].tolist()
    params = crop.make_params([tv_tensors.Image(torch.zeros(3, h0, w0, dtype=torch.uint8))])
    assert tuple(image.shape[-2:]) == (params["height"], params["width"])
    assert 384 <= params["height"] <= 600 and 384 <= params["width"] <= 600
    shifted = to_pixels(full["boxes"], full["size"]) - torch.tensor([params["left"], params["top"]] * 2)
    clamped = shifted.clamp(min=0)
    clamped[:, 0::2] = clamped[:, 0::2].clamp(max=params["width"])
    clamped[:, 1::2] = clamped[:, 1::2].clamp(max=params["height"])
    kept = (clamped[:, 2] > clamped[:, 0]) & (clamped[:, 3] > clamped[:, 1])
    assert torch.allclose(to_pixels(target["boxes"], target["size"]), clamped[kept], atol=1e-3)
    assert target["labels"].tolist() == full["labels"][kept].tolist()

    # the whole branch: sizes end on the multi-scale resize, boxes stay inside the image
    cfg = {"short_sides": [480, 800], "max_size": 1333, "hflip": 0.0, "detr_crop": True}
    branch = DetectionDataset(coco_json, transforms=_crop_branch_only(cfg))
    for seed in range(4):
        torch.manual_seed(seed)
        image, target = branch[index]
        short = min(image.shape[-2:])     # RandomShortestSize rounds through the long side: +-1 px
        assert any(abs(short - side) <= 1 for side in (480, 800)) or max(image.shape[-2:]) == 1333
        assert ((target["boxes"] >= 0) & (target["boxes"] <= 1)).all()


def test_detr_crop_is_deterministic_under_a_seed(coco_json: Path) -> None:
    cfg = {"short_sides": [480, 512, 544], "max_size": 1333, "detr_crop": True}
    ds = DetectionDataset(coco_json, transforms=build_transforms(True, cfg))
    runs = []
    for _ in range(2):
        torch.manual_seed(11)
        runs.append([ds[i] for i in range(min(4, len(ds)))])
    for (img_a, tgt_a), (img_b, tgt_b) in zip(*runs):
        assert torch.equal(img_a, img_b) and torch.equal(tgt_a["boxes"], tgt_b["boxes"])
    torch.manual_seed(12)
    other = [ds[i][0].shape for i in range(min(4, len(ds)))]
    assert other != [img.shape for img, _ in runs[0]] or len(ds) == 0


def test_detr_crop_is_off_by_default_and_train_only() -> None:
    assert not any(isinstance(t, v2.RandomChoice) for t in build_transforms(True, {}).transforms)
    assert not any(isinstance(t, v2.RandomChoice) for t in build_transforms(False, {"detr_crop": True}).transforms)
    with pytest.raises(ValueError, match="detr_crop needs short_sides"):
        build_transforms(True, {"short_sides": None, "detr_crop": True})
    with pytest.raises(ValueError, match="unknown option"):
        build_transforms(True, {"detr_crops": True})
