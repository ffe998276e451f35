"""Evaluation: our metrics equal a direct pycocotools run and hand-derived values; ids map back
to the original image / category ids; zero detections give AP 0 without crashing."""
from __future__ import annotations

import contextlib
import copy
import io
import json

import pytest
import torch
from torch import nn

from reproduce.evaluation.evaluate import coco_metrics, evaluate_model, postprocess, predict, to_coco_results

CATS = [{"id": 5, "name": "car"}, {"id": 9, "name": "person"}]


def gt_dict():
    """Image 10 (100x200): a car and a person; image 20 (80x60): a person."""
    return {
        "images": [{"id": 10, "width": 200, "height": 100, "file_name": "a.png"},
                   {"id": 20, "width": 60, "height": 80, "file_name": "b.png"}],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 5, "bbox": [10, 10, 50, 40], "area": 2000, "iscrowd": 0},
            {"id": 2, "image_id": 10, "category_id": 9, "bbox": [120, 20, 30, 60], "area": 1800, "iscrowd": 0},
            {"id": 3, "image_id": 20, "category_id": 9, "bbox": [5, 5, 40, 50], "area": 2000, "iscrowd": 0},
        ],
        "categories": copy.deepcopy(CATS),
    }


def direct_cocoeval(gt, dets):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(copy.deepcopy(dets)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def perfect_dets(gt):
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]), "score": 0.9}
            for a in gt["annotations"]]


def test_perfect_detections():
    gt = gt_dict()
    m = coco_metrics(gt, perfect_dets(gt))
    assert m["AP"] == pytest.approx(1.0) and m["AP50"] == pytest.approx(1.0) and m["AP75"] == pytest.approx(1.0)
    assert m["per_class_AP"] == {"car": pytest.approx(1.0), "person": pytest.approx(1.0)}
    assert m["APs"] is None and m["APl"] is None          # no small / large GT: undefined, not 0
    assert m["APm"] == pytest.approx(1.0)


def test_known_ious_match_cocoeval_and_hand_values():
    gt = gt_dict()
    dets = [
        # car: IoU 0.62 (height 40 -> 24.8 inside the GT): a TP for IoU thresholds 0.50..0.60 only
        {"image_id": 10, "category_id": 5, "bbox": [10, 10, 50, 24.8], "score": 0.8},
        # person in image 10: exact
        {"image_id": 10, "category_id": 9, "bbox": [120, 20, 30, 60], "score": 0.7},
        # person in image 20: a false positive with a higher score elsewhere, then an exact hit
        {"image_id": 20, "category_id": 9, "bbox": [40, 60, 10, 10], "score": 0.95},
        {"image_id": 20, "category_id": 9, "bbox": [5, 5, 40, 50], "score": 0.6},
        # a detection of the wrong class on the car (FP for person in image 10)
        {"image_id": 10, "category_id": 9, "bbox": [10, 10, 50, 40], "score": 0.1},
    ]
    ours = coco_metrics(gt, dets)
    ev = direct_cocoeval(gt, dets)
    for name, value in zip(("AP", "AP50", "AP75", "APs", "APm", "APl"), ev.stats[:6]):
        expected = None if value < 0 else value
        assert ours[name] == (pytest.approx(expected) if expected is not None else None), name
    # hand-derived: car AP = 3/10 (TP at IoU .50, .55, .60); person: 2 GT, ranked FP(.95),
    # TP(.7), TP(.6), FP(.1) at every threshold -> precision 1/2 at recall 1/2 and 2/3 at recall 1
    # -> interpolated precision 2/3 at all 101 recall points -> AP 2/3.
    assert ours["per_class_AP"]["car"] == pytest.approx(0.3)
    assert ours["per_class_AP"]["person"] == pytest.approx(2 / 3)
    assert ours["AP50"] == pytest.approx((1.0 + 2 / 3) / 2)
    assert ours["AP75"] == pytest.approx((0.0 + 2 / 3) / 2)
    assert ours["AP"] == pytest.approx((0.3 + 2 / 3) / 2)
    precision = ev.eval["precision"]
    assert ours["per_class_AP"]["car"] == pytest.approx(precision[:, :, 0, 0, -1].mean())


def test_zero_detections_is_zero_ap():
    m = coco_metrics(gt_dict(), [])
    assert m["AP"] == 0.0 and m["AP50"] == 0.0 and m["n_detections"] == 0
    assert m["per_class_AP"] == {"car": 0.0, "person": 0.0}


def test_postprocess_topk_and_scaling():
    logits = torch.full((1, 60, 3), -10.0)
    logits[0, 7, 2] = 5.0            # best pair: query 7, class 2
    logits[0, 3, 0] = 4.0
    boxes = torch.zeros(1, 60, 4) + 0.1
    boxes[0, 7] = torch.tensor([0.5, 0.25, 0.2, 0.1])
    (scores, labels, xyxy), = postprocess(logits, boxes, torch.tensor([[100, 200]]))
    assert scores.shape == (100,) and labels.shape == (100,) and xyxy.shape == (100, 4)   # 180 pairs -> top 100
    assert labels[0] == 2 and scores[0] == pytest.approx(torch.sigmoid(torch.tensor(5.0)).item())
    assert labels[1] == 0
    assert xyxy[0].tolist() == pytest.approx([80.0, 20.0, 120.0, 30.0])     # (w=200, h=100)
    dets = to_coco_results([42], [(scores, labels, xyxy)], [1, 4, 8])
    assert dets[0]["image_id"] == 42 and dets[0]["category_id"] == 8
    assert dets[0]["bbox"] == pytest.approx([80.0, 20.0, 40.0, 10.0])


class OracleModel(nn.Module):
    """Predicts each image's GT exactly, by reading it from a lookup keyed by image content."""

    def __init__(self, table, num_classes, queries=10):
        super().__init__()
        self.table, self.k, self.q = table, num_classes, queries
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, images, pad_mask, targets=None):
        from types import SimpleNamespace
        b = images.shape[0]
        logits = torch.full((b, self.q, self.k), -8.0)
        boxes = torch.full((b, self.q, 4), 0.05)
        for i in range(b):
            key = round(float(images[i, 0, 0, 0]), 3)
            for j, (label, box) in enumerate(self.table[key]):
                logits[i, j, label] = 6.0
                boxes[i, j] = torch.tensor(box)
        return SimpleNamespace(logits=logits, boxes=boxes)


def test_evaluate_model_maps_ids_and_rescales(tmp_path):
    """A dataset with non-contiguous image/category ids, evaluated after a resize (so the
    model's boxes are relative to the resized image): perfect predictions must give AP 1."""
    from torchvision.io import write_png

    from reproduce.data.datasets import DetectionDataset
    from reproduce.data.transforms import build_transforms
    gt = gt_dict()
    sizes = {10: (100, 200), 20: (80, 60)}
    table, fill = {}, {10: 30, 20: 200}
    for img in gt["images"]:
        h, w = sizes[img["id"]]
        write_png(torch.full((3, h, w), fill[img["id"]], dtype=torch.uint8), str(tmp_path / img["file_name"]))
    cat_to_label = {5: 0, 9: 1}
    for img in gt["images"]:
        h, w = sizes[img["id"]]
        pixel = (fill[img["id"]] / 255 - 0.485) / 0.229
        entries = []
        for a in gt["annotations"]:
            if a["image_id"] == img["id"]:
                x, y, bw, bh = a["bbox"]
                entries.append((cat_to_label[a["category_id"]], [(x + bw / 2) / w, (y + bh / 2) / h, bw / w, bh / h]))
        table[round(pixel, 3)] = entries
    gt["info"] = {"image_root": str(tmp_path)}
    path = tmp_path / "val.json"
    path.write_text(json.dumps(gt))
    ds = DetectionDataset(path, transforms=build_transforms(False, {"short_sides": [48], "max_size": 400}))
    assert ds.label_to_category_id == [5, 9]
    model = OracleModel(table, 2)
    dets = predict(model, ds, batch_size=2)
    assert {d["image_id"] for d in dets} == {10, 20} and {d["category_id"] for d in dets} == {5, 9}
    best = max((d for d in dets if d["image_id"] == 20), key=lambda d: d["score"])
    assert best["category_id"] == 9 and best["bbox"] == pytest.approx([5, 5, 40, 50], abs=1e-3)
    m = evaluate_model(model, ds, batch_size=2, device="cpu")
    assert m["AP"] == pytest.approx(1.0) and m["AP50"] == pytest.approx(1.0) and m["n_images"] == 2
    assert m["per_class_AP"] == {"car": pytest.approx(1.0), "person": pytest.approx(1.0)}


def test_cli_writes_metrics_and_detections(tmp_path):
    """train 1 step -> ``python -m reproduce.evaluate`` (in-process) -> metrics + detections JSON."""
    import yaml

    from reproduce.evaluation import evaluate as evaluate_mod
    from reproduce.training.runconfig import resolve_run
    from reproduce.training.train import train
    from tests.test_engine import make_toy_dataset, toy_params
    torch.set_num_threads(1)
    prepared = make_toy_dataset(tmp_path / "data", n=4)
    params = toy_params(prepared, steps=1, teacher_steps=1)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    run = tmp_path / "runs" / "dino" / "teacher"
    train(resolve_run(params, "dino", "teacher"), run, resume="never", device="cpu", show_progress=False)
    out, dets = tmp_path / "results" / "teacher-s0.json", tmp_path / "results" / "dets.json"
    rc = evaluate_mod.main(["--checkpoint", str(run / "model.pth"), "--detector", "dino", "--params",
                            str(params_file), "--out", str(out), "--detections", str(dets), "--device", "cpu"])
    assert rc == 0
    metrics = json.loads(out.read_text())
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl", "per_class_AP", "seed", "steps", "detector", "method",
                "n_images"):
        assert key in metrics, key
    assert metrics["role"] == "teacher" and metrics["steps"] == 1 and metrics["n_images"] == 4
    assert set(metrics["per_class_AP"]) == {"red", "green"}
    detections = json.loads(dets.read_text())
    assert len(detections) == 4 * min(100, 12 * 2)          # tiny DINO: 12 queries x 2 classes per image
    assert {d["image_id"] for d in detections} == {100, 101, 102, 103}
    assert {d["category_id"] for d in detections} <= {3, 7}


class TinyImages(torch.utils.data.Dataset):
    """``n`` 8x8 images, each with its own id, in DetectionDataset's (image, target) form."""

    label_to_category_id = [5, 9]

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.zeros(3, 8, 8), {"image_id": 100 + i, "orig_size": torch.tensor([8, 8])}


class ConstantModel(nn.Module):
    def forward(self, images, pad_mask):
        from types import SimpleNamespace
        b = images.shape[0]
        return SimpleNamespace(logits=torch.zeros(b, 3, 2), boxes=torch.full((b, 3, 4), 0.5))


def test_predict_prints_progress_lines_in_a_log(capsys):
    """stderr is not a terminal under capsys (as in a DVC log): a few plain lines, no bar."""
    dets = predict(ConstantModel(), TinyImages(20), batch_size=2)
    assert {d["image_id"] for d in dets} == set(range(100, 120))
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1].startswith("evaluate: 20/20 images, ") and lines[-1].endswith(" img/s")
    assert "evaluate: 2/20 images, " in lines[0]
    assert len(lines) == 10 and not any("\r" in line for line in lines)     # one line per ~10%


def test_predict_progress_off_prints_nothing(capsys):
    predict(ConstantModel(), TinyImages(3), batch_size=2, progress=False)
    assert capsys.readouterr().err == ""


def test_progress_is_a_bar_on_a_terminal():
    """On a TTY the helper hands over to tqdm (carriage returns) and prints no log lines."""
    from reproduce.core.progress import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    with Progress(50, "evaluate", unit="images", rate_unit="img", stream=stream) as bar:
        for _ in range(50):
            bar.update()
    assert "\r" in stream.getvalue() and "evaluate: 50/50 images," not in stream.getvalue()


def test_progress_line_every_n_items():
    from reproduce.core.progress import Progress
    stream = io.StringIO()
    with Progress(500, "evaluate", unit="images", rate_unit="img", every=120, stream=stream) as bar:
        for _ in range(125):
            bar.update(4)
    lines = stream.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == [f"evaluate: {n}/500 images" for n in (120, 240, 360, 480, 500)]
    assert "left" in lines[0] and "left" not in lines[-1]
