"""KITTI's own metric in ``reproduce.evaluation.evaluate`` (next to COCO AP) and in Table 2, and the
per-detector top-k of the evaluation."""
from __future__ import annotations

import json

import pytest

from reproduce.evaluation import evaluate
from reproduce.report import tables
from tests.conftest import SHARED_DATA

KITTI = SHARED_DATA / "kitti_sample"


def kitti_json(height: int = 128, width: int = 416) -> dict:
    """Two images, a 20 px high Car and a Pedestrian with KITTI's fields, a DontCare region;
    no image_root, so the JSON's own annotations are the ground truth."""
    base = {"truncated": 0.0, "occluded": 0, "iscrowd": 0, "ignore": 0}
    return {
        "images": [{"id": 1, "file_name": "a.png", "width": width, "height": height},
                   {"id": 2, "file_name": "b.png", "width": width, "height": height}],
        "categories": [{"id": 1, "name": "Car"}, {"id": 2, "name": "Pedestrian"}, {"id": 3, "name": "Cyclist"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 40, 40, 20], "kitti_type": "Car", **base},
            {"id": 2, "image_id": 2, "category_id": 2, "bbox": [100, 30, 10, 30], "kitti_type": "Pedestrian", **base},
            {"id": 3, "image_id": 2, "category_id": 1, "bbox": [300, 0, 50, 50], "truncated": -1.0, "occluded": -1,
             "kitti_type": "DontCare", "iscrowd": 1, "ignore": 1},
        ],
    }


def det(image_id, category_id, bbox, score=0.9):
    return {"image_id": image_id, "category_id": category_id, "bbox": bbox, "score": score}


def test_perfect_detections_score_one_with_scaled_heights():
    gt = kitti_json()
    dets = [det(1, 1, [10, 40, 40, 20]), det(2, 2, [100, 30, 10, 30]),
            det(2, 1, [305, 5, 40, 40], 0.95)]          # inside the DontCare region: not a FP
    m = evaluate.kitti_metrics(gt, dets)
    # 128 px images: the devkit's 40 / 25 / 25 px scaled by 128 / 375, so the 20 px Car is Easy
    assert m["min_height"] == pytest.approx([13.65, 8.53, 8.53])
    assert m["Car"] == {"easy": 1.0, "moderate": 1.0, "hard": 1.0}
    assert m["Pedestrian"]["moderate"] == 1.0
    assert m["Cyclist"] == {"easy": None, "moderate": None, "hard": None}     # no Cyclist GT
    assert m["mAP_moderate"] == 1.0
    assert m["sampling"] == "exact" and m["ground_truth"] == "json"           # 1 GT per class


def test_iou_thresholds_per_class_and_image_subset():
    gt = kitti_json()
    # IoU 0.6 with each GT (shifted boxes): a miss for Car (needs > 0.7), a hit for Pedestrian (> 0.5)
    dets = [det(1, 1, [10 + 10, 40, 40, 20]), det(2, 2, [100, 30 + 7.5, 10, 30])]
    m = evaluate.kitti_metrics(gt, dets)
    assert m["Car"]["moderate"] == 0.0 and m["Pedestrian"]["moderate"] == 1.0
    only_first = evaluate.kitti_metrics(gt, dets, image_ids=[1])
    assert only_first["Pedestrian"]["moderate"] is None and only_first["Car"]["moderate"] == 0.0


def test_kitti_sized_images_keep_the_devkit_heights():
    m = evaluate.kitti_metrics(kitti_json(height=375, width=1242), [])
    assert m["min_height"] == [40.0, 25.0, 25.0]
    # at KITTI's own height the 20 px Car is below every minimum (40 / 25 / 25): no valid GT
    assert m["Car"] == {"easy": None, "moderate": None, "hard": None}
    assert m["Pedestrian"]["moderate"] == 0.0       # 30 px: Moderate, and not detected


def test_non_kitti_data_gets_no_kitti_metric():
    gt = kitti_json()
    for ann in gt["annotations"]:
        ann.pop("truncated"), ann.pop("occluded")
    assert evaluate.kitti_metrics(gt, []) is None
    coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "person"}]}
    assert evaluate.kitti_metrics(coco, []) is None


@pytest.mark.skipif(not (KITTI / "training" / "label_2").is_dir(), reason="KITTI sample not available")
def test_kitti_sample_ground_truth_as_detections_reads_label_2():
    from reproduce.data.prepare import prepare_kitti
    gt = prepare_kitti(KITTI, None)["val"]
    dets = [det(a["image_id"], a["category_id"], a["bbox"], 1.0) for a in gt["annotations"] if not a["iscrowd"]]
    m = evaluate.kitti_metrics(gt, dets)
    assert m["ground_truth"] == "label_2" and m["min_height"] == [40.0, 25.0, 25.0]
    assert m["mAP_moderate"] == 1.0 and m["Car"]["hard"] == 1.0


def test_top_k_follows_the_original_repositories():
    assert evaluate.TOP_K == {"dab_detr": 300, "deformable_detr": 100, "dino": 300}
    import torch
    logits, boxes = torch.randn(1, 200, 3), torch.rand(1, 200, 4)
    scores, _, _ = evaluate.postprocess(logits, boxes, torch.tensor([[100, 200]]), k=evaluate.TOP_K["dino"])[0]
    assert len(scores) == 300


def test_table2_gets_kitti_columns_where_present(tmp_path):
    base = {"AP": 0.1, "AP50": 0.2, "AP75": 0.05, "APs": 0.01, "APm": 0.1, "APl": 0.3, "seed": 0}
    kitti = {"Car": {"easy": 0.5, "moderate": 0.4, "hard": 0.3}, "Pedestrian": {"easy": None, "moderate": None,
             "hard": None}, "Cyclist": {"easy": 0.2, "moderate": 0.1, "hard": 0.1}, "mAP_moderate": 0.25}
    runs = [dict(base, detector="dino", method="student", kitti=kitti),
            dict(base, detector="dino", method="fgd")]
    rows = tables.build_rows(runs, {}, tables.MAIN_ORDER)
    student, fgd = rows
    assert student["KITTI Car (mod)"] == "40.0" and student["KITTI Ped (mod)"] == tables.DASH
    assert student["KITTI mAP (mod)"] == "25.0" and fgd["KITTI Car (mod)"] == tables.DASH
    assert list(student).index("KITTI Car (mod)") > list(student).index("APl")
    plain = tables.build_rows([dict(base, detector="dino", method="student")], {}, tables.MAIN_ORDER)
    assert not any(k.startswith("KITTI") for k in plain[0])
    json.dumps(rows)


def test_model_zoo_has_one_row_per_trained_checkpoint():
    from reproduce.core.config import load_params
    params = load_params("params.yaml")
    base = {"AP": 0.1, "steps": 500, "detector": "dino"}
    runs = [dict(base, method="teacher", seed=0, steps=1000), dict(base, method="student", seed=0),
            dict(base, method="student", seed=1), dict(base, method="clockdistill", seed=0, ablation="lcmd_only")]
    rows = tables.model_zoo_rows(runs, params, "mini")
    assert [r["role / method"] for r in rows] == ["teacher", "student", "student / ablation-lcmd_only"]
    teacher, student, ablation = rows
    assert teacher["file"] == "runs/mini/dino/teacher/model.pth" and "1000 steps" in teacher["config"]
    assert student["file"] == "runs/mini/dino/student{,-s1}/model.pth" and student["seeds"] == 2
    assert ablation["file"] == "runs/mini/dino/ablation-lcmd_only/model.pth"
    assert "queries" in teacher["config"] and teacher["AP x100"] == "10.0" + tables.UNRECORDED
    from reproduce.training.runconfig import model_config
    cfg = model_config(params, "dino", "student", "mini")
    assert tables.config_mark([{"model_cfg": cfg}], cfg) == ""
    assert tables.config_mark([{"model_cfg": {**cfg, "d_model": 1}}], cfg) == tables.OTHER_CONFIG
