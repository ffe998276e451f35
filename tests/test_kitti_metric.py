"""reproduce.evaluation.kitti_metric on hand-made cases whose KITTI AP can be worked out by hand.

Conventions of the hand calculations:

* ``sampling="exact"``: AP(R40) = mean over r = 1/40 .. 40/40 of the best precision at
  recall >= r (0 if r is never reached); AP(11) the same over r = 0, 0.1, ..., 1.
* ``sampling="devkit"`` (the official procedure) reads precision at sampled threshold
  *indices*, which stand for recall i/40 only with >= 41 valid GTs. So the devkit is checked on
  the same scene tiled over 41+ images (same curve, so the same hand-worked AP), and its
  small-set behaviour has its own test.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from reproduce.evaluation.kitti_metric import (
    box_overlap, coco_detections_to_kitti, coco_ground_truth_to_kitti, devkit_thresholds,
    kitti_ap, label_2_for_coco_images, load_label_2, load_label_dir, pr_curve, average_precision,
)

KITTI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "kitti_sample"
BOX = [100.0, 100.0, 200.0, 200.0]        # 100 px high: valid at every difficulty
OTHER = [300.0, 100.0, 400.0, 200.0]      # overlaps nothing of BOX
TILE = 41                                 # enough valid GTs for the devkit's index = recall


def gt(box=BOX, type="Car", truncated=0.0, occluded=0):
    return {"type": type, "truncated": truncated, "occluded": occluded, "bbox": list(box)}


def det(box=BOX, score=1.0, type="Car"):
    return {"type": type, "bbox": list(box), "score": score}


def ap(gts, dets, cls="Car", sampling="exact", recall_points=40, **kw):
    """{difficulty: AP} for one class."""
    return kitti_ap(gts, dets, (cls,), recall_points, sampling=sampling, **kw)[cls]


def both(gts, dets, cls="Car", recall_points=40):
    """AP of one scene: exact on the scene, devkit on the scene tiled TILE times."""
    exact = ap([gts], [dets], cls, "exact", recall_points)
    devkit = ap([gts] * TILE, [dets] * TILE, cls, "devkit", recall_points)
    return exact, devkit


def assert_aps(result, easy, moderate, hard):
    got = (result["easy"], result["moderate"], result["hard"])
    for g, want in zip(got, (easy, moderate, hard)):
        if want is None:
            assert math.isnan(g), got
        else:
            assert g == pytest.approx(want, abs=1e-9), got


# --------------------------------------------------------------------------- basics


def test_perfect_detection_is_100():
    for result in both([gt()], [det()]):
        assert_aps(result, 100, 100, 100)


def test_output_layout_and_nan_without_ground_truth():
    out = kitti_ap([[gt()]], [[det()]], sampling="exact")
    assert set(out) == {"Car", "Pedestrian", "Cyclist", "mAP_moderate"}
    assert_aps(out["Car"], 100, 100, 100)
    assert_aps(out["Pedestrian"], None, None, None)   # no Pedestrian GT: undefined, not 0
    assert out["mAP_moderate"] == 100                   # mean over the defined classes


def test_tp_with_one_higher_scoring_fp_is_50():
    """One GT, its TP at score 0.5, a FP elsewhere at 0.9. Thresholds are the TP scores only,
    so the one operating point is recall 1, precision 1/2 (the FP scores higher, so it is in).
    Every recall point r <= 1 then has interpolated precision 0.5: R40 = 11-point = 50."""
    dets = [det(score=0.5), det(OTHER, score=0.9)]
    for result in both([gt()], dets):
        assert_aps(result, 50, 50, 50)
    assert_aps(ap([[gt()]], [dets], recall_points=11), 50, 50, 50)
    # A FP scoring below the last TP is never counted: no threshold reaches it.
    assert_aps(ap([[gt()]], [[det(score=0.9), det(OTHER, score=0.5)]]), 100, 100, 100)


def test_devkit_sampling_on_small_sets():
    """With n <= 40 GTs every TP score is a threshold and index n - 1 already has recall 1;
    indices n..40 stay 0. Perfect detections: R40 = (n - 1) / 40, 11-point = #{0,4,..<n}/11."""
    with pytest.warns(UserWarning, match="fewer than 41"):
        assert_aps(ap([[gt()]] * 10, [[det()]] * 10, sampling="devkit"), 22.5, 22.5, 22.5)
    with pytest.warns(UserWarning):
        assert_aps(ap([[gt()]] * 10, [[det()]] * 10, sampling="devkit", recall_points=11),
                   *[300 / 11] * 3)
    with pytest.warns(UserWarning):
        assert_aps(ap([[gt()]], [[det()]], sampling="devkit"), 0, 0, 0)   # one GT: R40 = 0
    with pytest.warns(UserWarning):
        assert_aps(ap([[gt()]] * 40, [[det()]] * 40, sampling="devkit"), 97.5, 97.5, 97.5)
    assert_aps(ap([[gt()]] * 41, [[det()]] * 41, sampling="devkit"), 100, 100, 100)


def test_devkit_thresholds_sample_even_recall_steps():
    # 80 GTs: recall target k/40 = 2k/80 is hit exactly by the (2k)-th TP, i.e. index 2k - 1.
    scores = [1 - i / 100 for i in range(80)]
    kept = devkit_thresholds(scores, 80)
    assert len(kept) == 41
    assert kept == [scores[0]] + [scores[2 * k - 1] for k in range(1, 41)]
    assert devkit_thresholds([0.3], 1) == [0.3]


def test_11_point_vs_40_point_on_a_known_curve():
    """80 images with one Car each. Images 0-39: TP at 0.9. Images 40-79: a FP at 0.8 and the TP
    at 0.7. Operating points: (recall 0.5, precision 1) and (recall 1, precision 80/120 = 2/3).
    R40: 20 points at r <= 0.5 get 1, 20 get 2/3 -> (20 + 40/3) / 40 = 83.33.
    11-point: r = 0 .. 0.5 (6 points) get 1, 0.6 .. 1 (5) get 2/3 -> (6 + 10/3) / 11 = 84.85."""
    gts = [[gt()] for _ in range(80)]
    dets = [[det(score=0.9)] for _ in range(40)] + [[det(score=0.7), det(OTHER, score=0.8)]
                                                     for _ in range(40)]
    r40, r11 = 100 * (20 + 40 / 3) / 40, 100 * (6 + 10 / 3) / 11
    for sampling in ("exact", "devkit"):
        assert_aps(ap(gts, dets, sampling=sampling), r40, r40, r40)
        assert_aps(ap(gts, dets, sampling=sampling, recall_points=11), r11, r11, r11)
    curve = pr_curve(gts, dets, "Car", "moderate", sampling="exact")
    assert list(curve["recall"]) == [0.5, 1.0]
    assert list(curve["precision"]) == pytest.approx([1.0, 2 / 3])
    assert average_precision(curve, 11) == pytest.approx(r11)


# --------------------------------------------------------------------------- ignore rules


def test_detection_on_dontcare_region_is_ignored():
    dc = {"type": "DontCare", "truncated": -1, "occluded": -1, "bbox": OTHER}
    for result in both([gt(), dc], [det(score=0.5), det(OTHER, score=0.9)]):
        assert_aps(result, 100, 100, 100)          # the 0.9 FP would otherwise halve AP


def test_dontcare_cover_uses_detection_area_and_class_threshold():
    """The devkit compares intersection / detection area with the class's IoU threshold:
    a detection 60 % inside a DontCare box is ignored for Pedestrian (> 0.5), not for Car."""
    dc = {"type": "DontCare", "bbox": [300.0, 100.0, 400.0, 200.0]}
    half_in = [340.0, 100.0, 440.0, 200.0]        # 60 x 100 of 100 x 100 inside
    for cls, want in (("Car", 50), ("Pedestrian", 100)):
        result = ap([[gt(type=cls), dc]], [[det(score=0.5, type=cls), det(half_in, 0.9, cls)]], cls)
        assert_aps(result, want, want, want)
    # Wholly inside a larger DontCare box: IoU is small, but the cover is 1 -> ignored.
    big = {"type": "DontCare", "bbox": [250.0, 50.0, 550.0, 350.0]}
    assert_aps(ap([[gt(), big]], [[det(score=0.5), det(OTHER, 0.9)]]), 100, 100, 100)


def test_height_30_counts_for_moderate_and_hard_only():
    """A 30 px Car (< 40 Easy minimum, >= 25) left undetected: ignored at Easy (not a FN),
    a FN at Moderate/Hard, where recall stops at 0.5 with precision 1 -> R40 = 20/40 = 50."""
    small = [500.0, 100.0, 600.0, 130.0]
    for result in both([gt(), gt(small)], [det(score=0.5)]):
        assert_aps(result, 100, 50, 50)
    # Detected (higher score): at Easy the GT and the 30 px detection are both ignored, so the
    # detection is no FP; at Moderate/Hard it is a TP.
    for result in both([gt(), gt(small)], [det(score=0.5), det(small, 0.9)]):
        assert_aps(result, 100, 100, 100)


def test_too_small_detection_is_not_a_false_positive():
    tiny = [300.0, 100.0, 400.0, 120.0]           # 20 px < 25: ignored at every difficulty
    for result in both([gt()], [det(score=0.5), det(tiny, 0.9)]):
        assert_aps(result, 100, 100, 100)


@pytest.mark.parametrize("field, value, want", [
    ("occluded", 2, (100, 100, 50)),     # only Hard allows occlusion 2
    ("occluded", 1, (100, 50, 50)),
    ("truncated", 0.4, (100, 100, 50)),  # > 0.30 (Moderate), <= 0.50 (Hard)
    ("truncated", 0.2, (100, 50, 50)),   # > 0.15 (Easy)
    ("truncated", 0.6, (100, 100, 100)), # beyond Hard: ignored everywhere
])
def test_occlusion_and_truncation_levels(field, value, want):
    """A clean Car detected plus an undetected one with the given occlusion/truncation: where
    the second counts, recall stops at 0.5 (AP 50); where it is ignored, AP stays 100."""
    hidden = gt(OTHER, **{field: value})
    for result in both([gt(), hidden], [det(score=0.5)]):
        assert_aps(result, *want)


def test_neighbour_classes_are_neither_tp_nor_fp():
    """A Car detection (0.9, above the real TP) on a Van is ignored; on a Truck it is a FP."""
    for other, want in (("Van", 100), ("Truck", 50)):
        for result in both([gt(), gt(OTHER, type=other)], [det(score=0.5), det(OTHER, 0.9)]):
            assert_aps(result, want, want, want)
    result = ap([[gt(type="Pedestrian"), gt(OTHER, type="Person_sitting")]],
                [[det(score=0.5, type="Pedestrian"), det(OTHER, 0.9, "Pedestrian")]], "Pedestrian")
    assert_aps(result, 100, 100, 100)
    # An undetected Van is no FN for Car either.
    assert_aps(ap([[gt(), gt(OTHER, type="Van")]], [[det()]]), 100, 100, 100)


def test_iou_thresholds_per_class():
    """Box [0,0,100,100] vs [0,0,100,h]: IoU = h / 100. Car needs IoU > 0.7 (strictly), so
    0.69 and exactly 0.7 miss (the GT is a FN and the detection a FP: AP 0); Pedestrian and
    Cyclist need > 0.5."""
    square = [0.0, 0.0, 100.0, 100.0]
    assert box_overlap([[0, 0, 100, 69]], [square])[0, 0] == pytest.approx(0.69)
    for h, cls, want in ((69, "Car", 0), (70, "Car", 0), (71, "Car", 100),
                         (69, "Pedestrian", 100), (50, "Pedestrian", 0), (51, "Cyclist", 100)):
        result = ap([[gt(square, type=cls)]], [[det([0, 0, 100, h], type=cls)]], cls)
        assert_aps(result, want, want, want)


def test_matching_follows_ground_truth_order_and_largest_iou():
    """The devkit visits GTs in file order, each taking the unassigned detection of largest IoU
    (not the highest score). Pedestrians A=[0,0,100,100], B=[20,0,120,100]; X=[10,0,110,100]
    (IoU 0.82 with both, score 0.8), Y=[0,0,70,100] (IoU 0.7 with A, 0.42 with B, score 0.9).
    A first: A takes X, B has no candidate left (FN), Y is a FP. Operating points (0.9: r 0.5,
    p 1), (0.8: r 0.5, p 0.5): R40 = 20/40 = 50. B first: B takes X, A takes Y: AP 100 (which is
    also what score-ordered greedy matching would give in both orders)."""
    a = gt([0, 0, 100, 100], "Pedestrian")
    b = gt([20, 0, 120, 100], "Pedestrian")
    dets = [det([10, 0, 110, 100], 0.8, "Pedestrian"), det([0, 0, 70, 100], 0.9, "Pedestrian")]
    assert_aps(ap([[a, b]], [dets], "Pedestrian"), 50, 50, 50)
    assert_aps(ap([[b, a]], [dets], "Pedestrian"), 100, 100, 100)


def test_missing_kitti_fields_fail_loudly():
    with pytest.raises(ValueError, match="truncated"):
        kitti_ap([[{"type": "Car", "bbox": BOX, "occluded": 0}]], [[]])
    with pytest.raises(ValueError, match="images"):
        kitti_ap([[gt()]], [])


# --------------------------------------------------------------------------- loaders


LABEL_LINES = (
    "Car 0.00 0 1.85 387.63 181.54 423.81 203.12 1.67 1.87 3.69 -16.53 2.39 58.49 1.57\n"
    "\n"
    "DontCare -1 -1 -10 503.89 169.71 590.61 190.13 -1 -1 -1 -1000 -1000 -1000 -10\n"
)


def test_load_label_2_reads_labels_and_results(tmp_path):
    path = tmp_path / "000001.txt"
    path.write_text(LABEL_LINES + "Pedestrian 0.5 2 0 1 2 3 40 1 1 1 1 1 1 1 0.25\n")
    objs = load_label_2(path)
    assert [o["type"] for o in objs] == ["Car", "DontCare", "Pedestrian"]
    assert objs[0]["bbox"] == [387.63, 181.54, 423.81, 203.12]
    assert (objs[0]["truncated"], objs[0]["occluded"]) == (0.0, 0)
    assert "score" not in objs[0] and objs[2]["score"] == 0.25
    ids, per_frame = load_label_dir(tmp_path)
    assert ids == ["000001"] and len(per_frame[0]) == 3
    path.write_text("Car 0 0\n")
    with pytest.raises(ValueError, match="15 or 16 fields"):
        load_label_2(path)


def _prepared_json(tmp_path) -> dict:
    """A JSON as reproduce.data.prepare writes it: DontCare copied per category as iscrowd."""
    (tmp_path / "training" / "label_2").mkdir(parents=True)
    (tmp_path / "training" / "label_2" / "000007.txt").write_text(
        LABEL_LINES + "Van 0.00 0 0 10 10 110 110 1 1 1 1 1 1 1\n")
    ann = {"truncated": 0.0, "occluded": 0, "kitti_type": "Car", "iscrowd": 0, "ignore": 0}
    dc = {"truncated": -1.0, "occluded": -1, "kitti_type": "DontCare", "iscrowd": 1, "ignore": 1,
          "bbox": [503.89, 169.71, 86.72, 20.42]}
    return {
        "info": {"image_root": str(tmp_path)},
        "images": [{"id": 7, "file_name": "training/image_2/000007.png"},
                   {"id": 9, "file_name": "training/image_2/000009.png"}],
        "categories": [{"id": 1, "name": "Car"}, {"id": 2, "name": "Pedestrian"}],
        "annotations": [dict(ann, id=1, image_id=7, category_id=1, bbox=[387.63, 181.54, 36.18, 21.58]),
                        dict(dc, id=2, image_id=7, category_id=1), dict(dc, id=3, image_id=7, category_id=2)],
    }


def test_coco_conversions(tmp_path):
    data = _prepared_json(tmp_path)
    gts = coco_ground_truth_to_kitti(data)
    assert len(gts) == 2 and gts[1] == []
    assert [o["type"] for o in gts[0]] == ["Car", "DontCare"]        # DontCare deduplicated
    assert gts[0][0]["bbox"] == pytest.approx([387.63, 181.54, 423.81, 203.12])
    dets = coco_detections_to_kitti(
        [{"image_id": 9, "category_id": 2, "bbox": [1, 2, 3, 4], "score": 0.5}], data)
    assert dets == [[], [{"type": "Pedestrian", "bbox": [1, 2, 4, 6], "score": 0.5}]]
    with pytest.raises(ValueError, match="image 5"):
        coco_detections_to_kitti([{"image_id": 5, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1}], data)
    # The raw labels keep the Van the JSON lacks (a missing label file is an error).
    (tmp_path / "training" / "label_2" / "000009.txt").write_text("")
    raw = label_2_for_coco_images(data)
    assert [o["type"] for o in raw[0]] == ["Car", "DontCare", "Van"] and raw[1] == []
    plain = json.loads(json.dumps(data))
    for a in plain["annotations"]:
        del a["truncated"]
    with pytest.raises(ValueError, match="truncated"):
        coco_ground_truth_to_kitti(plain)


# --------------------------------------------------------------------------- real sample


@pytest.mark.skipif(not (KITTI / "training" / "label_2").is_dir(), reason="KITTI sample not available")
def test_ground_truth_as_detections_on_the_kitti_sample():
    """The val split's own labels as detections (score 1): AP 100 wherever a class has valid GTs
    (exact sampling), and with the devkit's sampling where it has at least 41."""
    frames = (KITTI / "ImageSets" / "val.txt").read_text().split()
    ids, gts = load_label_dir(KITTI / "training" / "label_2", frames)
    assert len(ids) == 43
    dets = [[{"type": o["type"], "bbox": o["bbox"], "score": 1.0} for o in objs if o["type"] != "DontCare"]
            for objs in gts]
    exact = kitti_ap(gts, dets, sampling="exact")
    for cls in ("Car", "Pedestrian", "Cyclist"):
        for level in ("easy", "moderate", "hard"):
            n_gt = pr_curve(gts, dets, cls, level)["n_gt"]
            assert n_gt > 0 if cls == "Car" else True
            if n_gt:
                assert exact[cls][level] == 100, (cls, level)
            else:
                assert math.isnan(exact[cls][level])
            if n_gt >= 41:
                assert average_precision(pr_curve(gts, dets, cls, level)) == 100
    assert exact["mAP_moderate"] == 100


# --------------------------------------------------------------------------- literal devkit loop


def _devkit_loop_ap(gts, dets, cls, level):
    """A line-by-line Python rendering of the devkit's cleanData / computeStatistics /
    getThresholds / eval_class (scalar loops, no numpy), as an independent reference for the
    vectorised module. Returns (n_gt, R40, R11)."""
    from reproduce.evaluation.kitti_metric import MAX_OCCLUSION, MAX_TRUNCATION, MIN_HEIGHT
    thr = {"car": 0.7, "pedestrian": 0.5, "cyclist": 0.5}[cls]
    neighbour = {"car": "van", "pedestrian": "person_sitting"}.get(cls)

    def overlap(a, b, own_area=False):
        w, h = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
        if w <= 0 or h <= 0:
            return 0.0
        area_a, area_b = (a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1])
        return w * h / (area_a if own_area else area_a + area_b - w * h)

    def clean(gt, det):
        ig_gt, n = [], 0
        for g in gt:
            t = g["type"].lower()
            valid = 1 if t == cls else 0 if t == neighbour else -1
            out = (valid >= 0 and (g["occluded"] > MAX_OCCLUSION[level] or g["truncated"] > MAX_TRUNCATION[level])
                   or g["bbox"][3] - g["bbox"][1] < MIN_HEIGHT[level])
            ig_gt.append(0 if valid == 1 and not out else 1 if valid == 0 or valid == 1 else -1)
            n += ig_gt[-1] == 0
        dc = [g for g in gt if g["type"].lower() == "dontcare"]
        ig_det = [1 if int(abs(x["bbox"][1] - x["bbox"][3])) < MIN_HEIGHT[level]
                  else 0 if x["type"].lower() == cls else -1 for x in det]
        return ig_gt, dc, ig_det, n

    def stats(gt, det, dc, ig_gt, ig_det, compute_fp, thresh=0.0):
        no = -1e7
        assigned = [False] * len(det)
        low = [compute_fp and x["score"] < thresh for x in det]
        tp = fp = fn = 0
        v = []
        for i, g in enumerate(gt):
            if ig_gt[i] == -1:
                continue
            idx, valid, best, took_ignored = -1, no, 0.0, False
            for j, x in enumerate(det):
                if ig_det[j] == -1 or assigned[j] or low[j]:
                    continue
                o = overlap(x["bbox"], g["bbox"])
                if not compute_fp and o > thr and x["score"] > valid:
                    idx, valid = j, x["score"]
                elif compute_fp and o > thr and (o > best or took_ignored) and ig_det[j] == 0:
                    idx, valid, best, took_ignored = j, 1, o, False
                elif compute_fp and o > thr and valid == no and ig_det[j] == 1:
                    idx, valid, took_ignored = j, 1, True
            if valid == no and ig_gt[i] == 0:
                fn += 1
            elif valid != no and (ig_gt[i] == 1 or ig_det[idx] == 1):
                assigned[idx] = True
            elif valid != no:
                tp += 1
                v.append(det[idx]["score"])
                assigned[idx] = True
        if compute_fp:
            fp = sum(not (assigned[j] or ig_det[j] != 0 or low[j]) for j in range(len(det)))
            for c in dc:
                for j, x in enumerate(det):
                    if assigned[j] or ig_det[j] != 0 or low[j]:
                        continue
                    if overlap(x["bbox"], c["bbox"], own_area=True) > thr:
                        assigned[j] = True
                        fp -= 1
        return tp, fp, fn, v

    n_gt, v, cleaned = 0, [], []
    for gt, det in zip(gts, dets):
        ig_gt, dc, ig_det, n = clean(gt, det)
        n_gt += n
        cleaned.append((dc, ig_gt, ig_det))
        v += stats(gt, det, dc, ig_gt, ig_det, False)[3]
    v.sort(reverse=True)
    thresholds, current = [], 0.0
    for i, s in enumerate(v):
        l_rec = (i + 1) / n_gt
        r_rec = (i + 2) / n_gt if i < len(v) - 1 else l_rec
        if (r_rec - current) < (current - l_rec) and i < len(v) - 1:
            continue
        thresholds.append(s)
        current += 1 / 40
    precision = [0.0] * 41
    for k, t in enumerate(thresholds):
        tp = fp = 0
        for (gt, det), (dc, ig_gt, ig_det) in zip(zip(gts, dets), cleaned):
            a, b, _, _ = stats(gt, det, dc, ig_gt, ig_det, True, t)
            tp, fp = tp + a, fp + b
        precision[k] = tp / (tp + fp) if tp + fp else 0.0
    precision = [max(precision[i:]) for i in range(41)]
    return n_gt, sum(precision[1:]) / 40 * 100, sum(precision[::4]) / 11 * 100


def _random_scenes(rng, n_images):
    types = ["Car", "Car", "Car", "Van", "Pedestrian", "Pedestrian", "Person_sitting", "Cyclist",
             "Truck", "DontCare"]

    def box():
        x, y = rng.uniform(0, 300), rng.uniform(0, 100)
        return [round(x, 2), round(y, 2), round(x + rng.uniform(10, 120), 2), round(y + rng.uniform(15, 120), 2)]

    gts, dets = [], []
    for _ in range(n_images):
        gt = [{"type": rng.choice(types), "truncated": rng.choice([0, 0, 0.1, 0.2, 0.4, 0.6]),
               "occluded": rng.choice([0, 0, 1, 2, 3]), "bbox": box()} for _ in range(rng.randint(0, 6))]
        det = []
        for g in gt:
            if g["type"] == "DontCare" or rng.random() < 0.2:
                continue
            kind = g["type"] if g["type"] in ("Car", "Pedestrian", "Cyclist") else rng.choice(["Car", "Pedestrian"])
            for _ in range(1 + (rng.random() < 0.3)):          # sometimes a duplicate
                b = [c + rng.gauss(0, 5) for c in g["bbox"]]
                if b[2] > b[0] and b[3] > b[1]:
                    det.append({"type": kind, "bbox": b, "score": round(rng.random(), 2)})  # ties
        det += [{"type": rng.choice(["Car", "Pedestrian", "Cyclist"]), "bbox": box(),
                 "score": round(rng.random(), 2)} for _ in range(rng.randint(0, 4))]
        gts.append(gt)
        dets.append(det)
    return gts, dets


@pytest.mark.filterwarnings("ignore:KITTI devkit sampling")
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_a_literal_devkit_loop_on_random_scenes(seed):
    import random
    gts, dets = _random_scenes(random.Random(seed), 60)
    r40, r11 = kitti_ap(gts, dets), kitti_ap(gts, dets, recall_points=11)
    for cls in ("Car", "Pedestrian", "Cyclist"):
        for level, name in enumerate(("easy", "moderate", "hard")):
            n_gt, want40, want11 = _devkit_loop_ap(gts, dets, cls.lower(), level)
            if not n_gt:
                assert math.isnan(r40[cls][name])
                continue
            assert r40[cls][name] == pytest.approx(want40, abs=1e-9), (cls, name)
            assert r11[cls][name] == pytest.approx(want11, abs=1e-9), (cls, name)
