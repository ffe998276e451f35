"""reproduce.data.prepare on the real KITTI/COCO samples and on deliberately corrupted copies.

The samples are read in place from ../shared/data (never copied into the repository); the
bad-input cases copy two or three frames into tmp_path and break them one way each.
"""
from __future__ import annotations

import copy
import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Callable

import pytest
from PIL import Image

from reproduce.data.prepare import PrepareError, image_size, main, prepare_coco, prepare_kitti

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
KITTI = SHARED / "kitti_sample"
COCO = SHARED / "coco_sample"
PARAMS = REPO / "params.yaml"

pytestmark = pytest.mark.skipif(not KITTI.is_dir() or not COCO.is_dir(),
                                reason="../shared/data samples not available")

CLASSES = ["Car", "Pedestrian", "Cyclist"]


def objects(data: dict) -> list[dict]:
    return [a for a in data["annotations"] if not a["iscrowd"]]


def class_counts(outputs: dict[str, dict]) -> Counter:
    names = {c["id"]: c["name"] for c in outputs["train"]["categories"]}
    return Counter(names[a["category_id"]] for d in outputs.values() for a in objects(d))


def make_coco_raw(root: Path) -> Path:
    """A COCO-layout root made of symlinks to the shared sample (nothing copied)."""
    root.mkdir(parents=True, exist_ok=True)
    for split in ("train2017", "val2017"):
        (root / split).symlink_to(COCO / "images" / split, target_is_directory=True)
    (root / "annotations").symlink_to(COCO / "annotations", target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def kitti_out() -> dict[str, dict]:
    return prepare_kitti(KITTI, None, CLASSES, {}, ["DontCare"], 0.5, 0)


@pytest.fixture(scope="module")
def coco_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_coco_raw(tmp_path_factory.mktemp("coco") / "raw")


@pytest.fixture(scope="module")
def coco_out(coco_raw: Path) -> dict[str, dict]:
    return prepare_coco(coco_raw, None)


# --------------------------------------------------------------------------- KITTI sample


def test_kitti_sample_counts_and_splits(kitti_out: dict[str, dict]) -> None:
    assert set(kitti_out) == {"train", "val"}  # no test.txt in the sample
    assert class_counts(kitti_out) == {"Car": 303, "Pedestrian": 47, "Cyclist": 18}
    assert len(kitti_out["train"]["images"]) == 58
    assert len(kitti_out["val"]["images"]) == 43
    for split, data in kitti_out.items():
        listed = (KITTI / "ImageSets" / f"{split}.txt").read_text().split()
        assert sorted(im["id"] for im in data["images"]) == sorted(int(i) for i in listed)
        assert data["info"]["split_source"] == f"ImageSets/{split}.txt"
        assert data["info"]["image_root"] == str(KITTI)
        ann_ids = [a["id"] for a in data["annotations"]]
        assert ann_ids == list(range(1, len(ann_ids) + 1))


def test_kitti_categories_contiguous(kitti_out: dict[str, dict]) -> None:
    for data in kitti_out.values():
        assert data["categories"] == [
            {"id": i, "name": n, "supercategory": "kitti"} for i, n in enumerate(CLASSES, 1)]
        assert {a["category_id"] for a in data["annotations"]} == {1, 2, 3}


def test_kitti_dontcare_become_ignore_regions(kitti_out: dict[str, dict]) -> None:
    crowd = [a for d in kitti_out.values() for a in d["annotations"] if a["iscrowd"]]
    assert all(a["ignore"] == 1 and a["kitti_type"] == "DontCare" for a in crowd)
    assert len(crowd) == 237 * 3  # one copy per category (README: 237 DontCare lines)
    regions = Counter((a["image_id"], tuple(a["bbox"])) for a in crowd)
    assert set(regions.values()) == {3}
    assert all(a["ignore"] == 0 for d in kitti_out.values() for a in objects(d))


def test_kitti_box_and_image_fields(kitti_out: dict[str, dict]) -> None:
    train = kitti_out["train"]
    image = next(im for im in train["images"] if im["id"] == 0)
    assert image == {"id": 0, "file_name": "training/image_2/000000.png",
                     "width": 1224, "height": 370}
    (ped,) = [a for a in train["annotations"] if a["image_id"] == 0]
    assert ped["bbox"] == pytest.approx([712.40, 143.00, 810.73 - 712.40, 307.92 - 143.00])
    assert ped["area"] == pytest.approx(ped["bbox"][2] * ped["bbox"][3], rel=1e-6)
    assert (ped["category_id"], ped["kitti_type"], ped["truncated"], ped["occluded"]) == \
        (2, "Pedestrian", 0.0, 0)


def test_kitti_sizes_match_decoded_images(kitti_out: dict[str, dict]) -> None:
    for data in kitti_out.values():
        for image in data["images"]:
            with Image.open(KITTI / image["file_name"]) as pil:
                pil.load()  # a full decode, not just the header
                assert (image["width"], image["height"]) == pil.size


def test_kitti_class_map_folds_types() -> None:
    out = prepare_kitti(KITTI, None, CLASSES, {"Van": "Car"}, ["DontCare"], 0.5, 0)
    assert class_counts(out) == {"Car": 303 + 34, "Pedestrian": 47, "Cyclist": 18}
    vans = [a for d in out.values() for a in d["annotations"] if a["kitti_type"] == "Van"]
    assert len(vans) == 34 and {a["category_id"] for a in vans} == {1}


@pytest.mark.parametrize("class_map, ignore", [({"Van": "Truck"}, ["DontCare"]),
                                               ({}, ["DontCare", "Car"])])
def test_kitti_bad_class_config(class_map: dict, ignore: list, tmp_path: Path) -> None:
    with pytest.raises(PrepareError, match="params: data.kitti"):
        prepare_kitti(KITTI, tmp_path, CLASSES, class_map, ignore, 0.5, 0)
    assert not list(tmp_path.iterdir())


def test_seeded_split_without_imagesets(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "training").symlink_to(KITTI / "training", target_is_directory=True)
    first = prepare_kitti(raw, None, CLASSES, {}, ["DontCare"], 0.3, 7)
    again = prepare_kitti(raw, None, CLASSES, {}, ["DontCare"], 0.3, 7)
    other = prepare_kitti(raw, None, CLASSES, {}, ["DontCare"], 0.3, 8)
    ids = {s: [im["id"] for im in d["images"]] for s, d in first.items()}
    assert first == again
    assert ids != {s: [im["id"] for im in d["images"]] for s, d in other.items()}
    assert sorted(ids["train"] + ids["val"]) == list(range(101))
    assert len(ids["val"]) == round(101 * 0.3)
    assert first["val"]["info"]["split_source"] == "seeded(val_fraction=0.3, seed=7)"
    assert class_counts(first) == {"Car": 303, "Pedestrian": 47, "Cyclist": 18}


def test_kitti_writes_json_per_split(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = prepare_kitti(KITTI, out, CLASSES, {}, ["DontCare"], 0.5, 0)
    assert sorted(p.name for p in out.iterdir()) == ["train.json", "val.json"]
    for split in ("train", "val"):
        assert json.loads((out / f"{split}.json").read_text()) == result[split]


# --------------------------------------------------------------------------- KITTI bad input


FRAMES = ("000000", "000001", "000002")


@pytest.fixture
def small_kitti(tmp_path: Path) -> Path:
    """Three real frames in KITTI layout: train = 000000, 000001; val = 000002."""
    raw = tmp_path / "raw"
    for sub in ("image_2", "label_2"):
        (raw / "training" / sub).mkdir(parents=True)
    for frame in FRAMES:
        shutil.copy(KITTI / "training" / "image_2" / f"{frame}.png", raw / "training" / "image_2")
        shutil.copy(KITTI / "training" / "label_2" / f"{frame}.txt", raw / "training" / "label_2")
    (raw / "ImageSets").mkdir()
    (raw / "ImageSets" / "train.txt").write_text("000000\n000001\n")
    (raw / "ImageSets" / "val.txt").write_text("000002\n")
    return raw


def edit_label(raw: Path, frame: str, lineno: int, edit: Callable[[list[str]], list[str]]) -> None:
    path = raw / "training" / "label_2" / f"{frame}.txt"
    lines = path.read_text().splitlines()
    lines[lineno - 1] = " ".join(edit(lines[lineno - 1].split()))
    path.write_text("\n".join(lines) + "\n")


def set_field(index: int, value: str) -> Callable[[list[str]], list[str]]:
    return lambda fields: fields[:index] + [value] + fields[index + 1:]


def truncate_png(raw: Path) -> None:
    path = raw / "training" / "image_2" / "000001.png"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


LABEL_CASES = {
    "14 fields": (lambda f: f[:-1], "expected 15 fields, got 14"),
    "16 fields": (lambda f: f + ["0.9"], "expected 15 fields, got 16"),
    "non-numeric box": (set_field(5, "abc"), "y1 is not a number"),
    "non-numeric 3d": (set_field(12, "x"), "non-numeric value"),
    "x2 <= x1": (set_field(6, "387.63"), "empty box"),
    "y2 < y1": (set_field(7, "100"), "empty box"),
    "outside image": (set_field(6, "1300.5"), "outside the 1242x375 image"),
    "negative x1": (set_field(4, "-3"), "outside"),
}


@pytest.mark.parametrize("case", LABEL_CASES)
def test_bad_label_line_names_file_and_line(case: str, small_kitti: Path, tmp_path: Path) -> None:
    edit, message = LABEL_CASES[case]
    edit_label(small_kitti, "000001", 2, edit)  # line 2 is the Car
    out = tmp_path / "out"
    with pytest.raises(PrepareError, match=rf"^training/label_2/000001\.txt:2: .*{message}"):
        prepare_kitti(small_kitti, out, CLASSES, {}, ["DontCare"], 0.5, 0)
    assert not out.exists() or not list(out.iterdir())


def _remove(rel: str) -> Callable[[Path], None]:
    return lambda raw: (raw / rel).unlink()


def _write(rel: str, data: bytes) -> Callable[[Path], None]:
    return lambda raw: (raw / rel).write_bytes(data)


FILE_CASES = {
    "missing image": (_remove("training/image_2/000002.png"),
                      r"^ImageSets/val\.txt:1: frame 000002 has no image"),
    "missing label": (_remove("training/label_2/000001.txt"),
                      r"^ImageSets/train\.txt:2: frame 000001 has no label file"),
    "truncated png": (truncate_png, r"^training/image_2/000001\.png: truncated PNG"),
    "not a png": (_write("training/image_2/000001.png", b"GIF89a" + b"\0" * 100),
                  r"^training/image_2/000001\.png: not a PNG or JPEG"),
    "empty png": (_write("training/image_2/000001.png", b""),
                  r"^training/image_2/000001\.png: empty image file"),
    "bad png header": (_write("training/image_2/000001.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 40),
                       r"^training/image_2/000001\.png: PNG without a valid IHDR"),
    "bad id": (_write("ImageSets/val.txt", b"000002\nabc\n"),
               r"^ImageSets/val\.txt:2: frame id 'abc' is not a number"),
    "duplicate id": (_write("ImageSets/val.txt", b"000002\n000002\n"),
                     r"^ImageSets/val\.txt:2: frame 000002 listed twice"),
    "train/val overlap": (_write("ImageSets/val.txt", b"000002\n000000\n"),
                          r"^ImageSets/val\.txt: 1 frame\(s\) also in ImageSets/train\.txt"),
}


@pytest.mark.parametrize("case", FILE_CASES)
def test_bad_files_name_the_file(case: str, small_kitti: Path, tmp_path: Path) -> None:
    corrupt, message = FILE_CASES[case]
    corrupt(small_kitti)
    out = tmp_path / "out"
    with pytest.raises(PrepareError, match=message):
        prepare_kitti(small_kitti, out, CLASSES, {}, ["DontCare"], 0.5, 0)
    assert not out.exists() or not list(out.iterdir())


def test_failed_run_keeps_previous_outputs(small_kitti: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    prepare_kitti(small_kitti, out, CLASSES, {}, ["DontCare"], 0.5, 0)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    truncate_png(small_kitti)
    with pytest.raises(PrepareError):
        prepare_kitti(small_kitti, out, CLASSES, {}, ["DontCare"], 0.5, 0)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temp files either


def test_unlabelled_official_test_split(small_kitti: Path) -> None:
    """KITTI's test.txt lists testing/ frames (ids overlapping training's), without labels."""
    (small_kitti / "testing" / "image_2").mkdir(parents=True)
    shutil.copy(small_kitti / "training" / "image_2" / "000000.png",
                small_kitti / "testing" / "image_2" / "000000.png")
    (small_kitti / "ImageSets" / "test.txt").write_text("000000\n")
    out = prepare_kitti(small_kitti, None, CLASSES, {}, ["DontCare"], 0.5, 0)
    assert out["test"]["images"][0]["file_name"] == "testing/image_2/000000.png"
    assert out["test"]["annotations"] == [] and out["test"]["info"]["labelled"] is False


# --------------------------------------------------------------------------- image headers


def test_jpeg_header_size_and_truncation(tmp_path: Path) -> None:
    jpgs = sorted((COCO / "images" / "val2017").glob("*.jpg"))[:5]
    for path in jpgs:
        with Image.open(path) as pil:
            assert image_size(path, path.name) == pil.size
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(jpgs[0].read_bytes()[:5000])
    with pytest.raises(PrepareError, match=r"^cut\.jpg: truncated JPEG"):
        image_size(cut, "cut.jpg")


# --------------------------------------------------------------------------- COCO


def test_coco_sample(coco_out: dict[str, dict], coco_raw: Path) -> None:
    originals = {s: json.loads((COCO / "annotations" / f"instances_{s}2017.json").read_text())
                 for s in ("train", "val")}
    for split, data in coco_out.items():
        assert len(data["categories"]) == 80
        assert data["categories"] == originals[split]["categories"]  # original ids 1..90
        assert max(c["id"] for c in data["categories"]) == 90
        orig = originals[split]
        assert sorted(im["id"] for im in data["images"]) == \
            sorted(im["id"] for im in orig["images"])
        assert len(data["annotations"]) == len(orig["annotations"])
        assert all("segmentation" not in a for a in data["annotations"])
        assert all(a["ignore"] == a["iscrowd"] for a in data["annotations"])
        for image in data["images"]:
            assert image["file_name"] == f"{split}2017/{image['id']:012d}.jpg"
            assert (coco_raw / image["file_name"]).is_file()
        assert data["info"]["image_root"] == str(coco_raw)
    assert len(coco_out["train"]["images"]) == 166 and len(coco_out["val"]["images"]) == 188
    with_anns = {a["image_id"] for a in coco_out["val"]["annotations"]}
    empty = {im["id"] for im in coco_out["val"]["images"]} - with_anns
    assert empty == {58636, 226111}


def test_coco_max_images_subsets(coco_raw: Path, coco_out: dict[str, dict]) -> None:
    small = prepare_coco(coco_raw, None, max_images=5)
    for split, data in small.items():
        first = sorted(im["id"] for im in coco_out[split]["images"])[:5]
        assert [im["id"] for im in data["images"]] == first
        expected = [a for a in coco_out[split]["annotations"] if a["image_id"] in first]
        assert data["annotations"] == expected
        assert data["info"]["max_images"] == 5


def test_coco_writes_outputs(coco_raw: Path, tmp_path: Path) -> None:
    prepare_coco(coco_raw, tmp_path / "out", max_images=3)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["train.json", "val.json"]


@pytest.fixture(scope="module")
def coco_val_json() -> dict:
    return json.loads((COCO / "annotations" / "instances_val2017.json").read_text())


def _ann(data: dict, key: str, value: object) -> None:
    data["annotations"][3][key] = value


COCO_CASES: dict[str, tuple[Callable[[dict], None], str]] = {
    "missing key": (lambda d: d.pop("categories"), r"missing key\(s\) \['categories'\]"),
    "ann missing bbox": (lambda d: d["annotations"][3].pop("bbox"), r"annotations\[3\]: missing"),
    "unknown category": (lambda d: _ann(d, "category_id", 12), "unknown category_id 12"),
    "unknown image": (lambda d: _ann(d, "image_id", 1), "unknown image_id 1"),
    "duplicate ann id": (lambda d: _ann(d, "id", d["annotations"][0]["id"]), "duplicate id"),
    "duplicate image id": (lambda d: d["images"][1].update(id=d["images"][0]["id"]),
                           "duplicate id"),
    "bbox 3 numbers": (lambda d: _ann(d, "bbox", [1, 2, 3]), "bbox must be 4 numbers"),
    "bbox string": (lambda d: _ann(d, "bbox", [1, 2, "3", 4]), "bbox must be 4 numbers"),
    "negative width": (lambda d: _ann(d, "bbox", [10, 10, -5, 4]), "negative size"),
    "negative x": (lambda d: _ann(d, "bbox", [-8, 10, 5, 4]), "outside"),
    "outside image": (lambda d: _ann(d, "bbox", [10, 10, 5000, 4]), "outside"),
    "bad iscrowd": (lambda d: _ann(d, "iscrowd", 2), "iscrowd must be 0 or 1"),
    "missing image file": (lambda d: d["images"][0].update(file_name="nope.jpg"),
                           "missing image val2017/nope.jpg"),
}


def make_bad_coco(root: Path, data: dict | str) -> Path:
    """Symlinked images + train JSON; a (corrupted) val JSON written into tmp."""
    root.mkdir()
    for split in ("train2017", "val2017"):
        (root / split).symlink_to(COCO / "images" / split, target_is_directory=True)
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_train2017.json").symlink_to(
        COCO / "annotations" / "instances_train2017.json")
    text = data if isinstance(data, str) else json.dumps(data)
    (root / "annotations" / "instances_val2017.json").write_text(text)
    return root


@pytest.mark.parametrize("case", COCO_CASES)
def test_bad_coco_names_the_file(case: str, coco_val_json: dict, tmp_path: Path) -> None:
    corrupt, message = COCO_CASES[case]
    data = copy.deepcopy(coco_val_json)
    corrupt(data)
    raw = make_bad_coco(tmp_path / "raw", data)
    out = tmp_path / "out"
    with pytest.raises(PrepareError, match=rf"^annotations/instances_val2017\.json.*{message}"):
        prepare_coco(raw, out)
    assert not out.exists()


def test_bad_coco_json_syntax(tmp_path: Path) -> None:
    raw = make_bad_coco(tmp_path / "raw", '{"images": [\n  {"id": 1,,}\n]}')
    with pytest.raises(PrepareError, match=r"^annotations/instances_val2017\.json:2: invalid JSON"):
        prepare_coco(raw, tmp_path / "out")


def test_coco_zero_size_boxes_dropped_and_counted(coco_val_json: dict, tmp_path: Path) -> None:
    """Official train2017 has two zero-height boxes (cocoapi#355): drop them, do not fail."""
    data = copy.deepcopy(coco_val_json)
    bad_id = data["annotations"][3]["id"]
    data["annotations"][3]["bbox"][3] = 0.0
    out = prepare_coco(make_bad_coco(tmp_path / "raw", data), None)
    assert out["val"]["info"]["dropped_degenerate_boxes"] == 1
    assert bad_id not in {a["id"] for a in out["val"]["annotations"]}
    assert len(out["val"]["annotations"]) == len(data["annotations"]) - 1


def test_coco_bad_max_images(coco_raw: Path) -> None:
    with pytest.raises(PrepareError, match="max_images"):
        prepare_coco(coco_raw, None, max_images=0)


# --------------------------------------------------------------------------- CLI


def test_cli_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code = main(["--dataset", "kitti", "--raw", str(KITTI), "--out", str(out),
                 "--params", str(PARAMS)])
    assert code == 0
    stdout = capsys.readouterr().out
    assert "train: 58 images; Car 189, Pedestrian 25, Cyclist 10; 152 ignore regions" in stdout
    assert "val: 43 images; Car 114, Pedestrian 22, Cyclist 8; 85 ignore regions" in stdout
    assert (out / "train.json").is_file() and (out / "val.json").is_file()


def test_cli_synth_uses_kitti_code(small_kitti: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["--dataset", "synth", "--raw", str(small_kitti), "--out", str(out),
                 "--params", str(PARAMS)]) == 0
    assert json.loads((out / "val.json").read_text())["info"]["dataset"] == "synth"


def test_cli_error_is_one_line(small_kitti: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    edit_label(small_kitti, "000001", 3, lambda f: f[:-1])
    out = tmp_path / "out"
    code = main(["--dataset", "kitti", "--raw", str(small_kitti), "--out", str(out),
                 "--params", str(PARAMS)])
    err = capsys.readouterr().err
    assert code != 0
    assert err == "prepare: error: training/label_2/000001.txt:3: expected 15 fields, got 14\n"
    assert not out.exists()


def test_cli_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "--dataset" in capsys.readouterr().out


def test_cli_synth_default_out_is_where_the_mini_profile_reads(
        small_kitti: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Training reads data/prepared/<profile>: synth is the mini profile's dataset."""
    monkeypatch.chdir(tmp_path)
    assert main(["--dataset", "synth", "--raw", str(small_kitti), "--params", str(PARAMS)]) == 0
    captured = capsys.readouterr()
    assert "to data/prepared/mini (read by profile mini)" in captured.out
    assert sorted(p.name for p in (tmp_path / "data" / "prepared").iterdir()) == ["mini"]
    # off a terminal: plain progress lines, no carriage-return bar
    assert "\r" not in captured.err and all(" images, " in line for line in captured.err.splitlines())
