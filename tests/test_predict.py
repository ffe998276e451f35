"""``python -m reproduce.predict``: a tiny trained model on real COCO sample images; mistakes are
one line on stderr with a non-zero exit code."""
from __future__ import annotations

import json

import pytest
import torch
from torchvision.io import decode_image

from reproduce.deploy import predict as predict_cli
from reproduce.training.runconfig import resolve_run
from reproduce.training.train import train
from tests.conftest import SHARED_DATA
from tests.test_engine import make_toy_dataset, toy_params

pytestmark = pytest.mark.usefixtures("one_thread")

COCO_IMAGES = SHARED_DATA / "coco_sample" / "images" / "val2017"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A DINO student trained for 2 steps on the toy dataset (categories red=3, green=7)."""
    root = tmp_path_factory.mktemp("predict")
    prepared = make_toy_dataset(root / "data", n=4)
    params = toy_params(prepared, steps=2, checkpoint_every=1)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(resolve_run(params, "dino", "student"), root / "run", resume="never", device="cpu",
              show_progress=False)
    finally:
        torch.set_num_threads(old)
    return root / "run"


@pytest.fixture(scope="module")
def coco_images():
    images = sorted(COCO_IMAGES.glob("*.jpg"))[:2]
    if len(images) < 2:
        pytest.skip(f"no COCO sample images under {COCO_IMAGES}")
    return images


def _one_error_line(capsys):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_predict_draws_and_writes_detections(run_dir, coco_images, tmp_path, capsys):
    out = tmp_path / "pred"
    rc = predict_cli.main(["--checkpoint", str(run_dir / "model.pth"), *map(str, coco_images), "--out", str(out),
                           "--score-threshold", "0", "--device", "cpu"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "detections on 2 images" in captured.out
    sizes = {}
    for path in coco_images:
        original = decode_image(str(path))
        drawn = decode_image(str(out / f"{path.stem}.png"))
        assert drawn.shape == original.shape            # 3 x H x W: drawn at the original size
        assert not torch.equal(drawn, original)         # something was drawn
        sizes[path.name] = original.shape[-2:]
    detections = json.loads((out / "detections.json").read_text())
    assert {d["file_name"] for d in detections} == set(sizes)
    # threshold 0: the top 100 (query, class) pairs of each image (12 queries x 2 classes here)
    per_image = {name: sum(d["file_name"] == name for d in detections) for name in sizes}
    assert set(per_image.values()) == {24}
    for d in detections:
        h, w = sizes[d["file_name"]]
        x, y, bw, bh = d["bbox"]
        assert 0 <= x and 0 <= y and bw >= 0 and bh >= 0 and x + bw <= w + 1e-3 and y + bh <= h + 1e-3, d
        assert 0.0 <= d["score"] <= 1.0
        # names and ids from the run's prepared JSON (config.json next to model.pth)
        assert (d["category_id"], d["category_name"]) in {(3, "red"), (7, "green")}
        assert d["image_id"] in (0, 1) and d["image_path"].endswith(d["file_name"])


def test_predict_threshold_filters(run_dir, coco_images, tmp_path):
    out = tmp_path / "pred"
    assert predict_cli.main(["--checkpoint", str(run_dir / "model.pth"), str(coco_images[0]), "--out", str(out),
                             "--score-threshold", "1"]) == 0
    assert json.loads((out / "detections.json").read_text()) == []
    assert (out / f"{coco_images[0].stem}.png").is_file()


def test_predict_without_run_config_names_classes_by_index(run_dir, coco_images, tmp_path, capsys):
    """A model.pth copied away from its run: class<i> names, default transforms, a note each."""
    lone = tmp_path / "lone" / "model.pth"
    lone.parent.mkdir()
    lone.write_bytes((run_dir / "model.pth").read_bytes())
    out = tmp_path / "pred"
    assert predict_cli.main(["--checkpoint", str(lone), str(coco_images[0]), "--out", str(out),
                             "--score-threshold", "0"]) == 0
    err = capsys.readouterr().err
    assert "no run config found" in err and "no class names found" in err
    names = {(d["category_id"], d["category_name"]) for d in json.loads((out / "detections.json").read_text())}
    assert names <= {(0, "class0"), (1, "class1")} and names


def _bad_inputs(run_dir, tmp_path, coco_images):
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("not a jpeg")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x00" * 2048)
    model = str(run_dir / "model.pth")
    image = str(coco_images[0])
    return [
        ("missing_image", [model, str(tmp_path / "nowhere.jpg")], "nowhere.jpg: no such image file"),
        ("unreadable_image", [model, str(not_an_image)], "notes.jpg: not a readable image"),
        ("bad_checkpoint", [str(corrupt), image], "corrupt.pth: not a readable checkpoint"),
        ("missing_checkpoint", [str(tmp_path / "none.pth"), image], "none.pth: no such checkpoint file"),
        ("other_detector", [model, image, "--detector", "dab_detr"],
         "holds a dino model, but the checkpoint must be a dab_detr"),
        ("bad_threshold", [model, image, "--score-threshold", "2"], "--score-threshold: expected a number in [0, 1]"),
    ]


CASES = ["missing_image", "unreadable_image", "bad_checkpoint", "missing_checkpoint", "other_detector",
         "bad_threshold"]


@pytest.mark.parametrize("case", CASES)
def test_predict_mistake_is_one_line(run_dir, coco_images, tmp_path, capsys, case):
    cases = {name: (args, text) for name, args, text in _bad_inputs(run_dir, tmp_path, coco_images)}
    (checkpoint, *rest), expected = cases[case]
    out = tmp_path / "out"
    try:
        rc = predict_cli.main(["--checkpoint", checkpoint, *rest, "--out", str(out), "--device", "cpu"])
    except SystemExit as exit_:          # argparse
        rc = exit_.code
    line = _one_error_line(capsys)
    assert rc not in (0, None) and expected in line, line
    assert line.startswith("predict: error:") or line.startswith("python -m reproduce.predict: error:")
    assert not (out / "detections.json").exists()
