"""The synthetic KITTI-layout generator: determinism, label format, classes, difficulty, CLI."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from reproduce.data import synth

W, H = 416, 128
SMALL = dict(num_train=6, num_val=2, num_test=2, width=W, height=H, difficulty=1.0)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    a = synth.generate(root / "a", seed=0, workers=1, progress=False, **SMALL)
    b = synth.generate(root / "b", seed=0, workers=2, progress=False, **SMALL)
    c = synth.generate(root / "c", seed=1, workers=1, progress=False, **SMALL)
    return a, b, c


def test_same_seed_identical_across_workers(datasets):
    a, b, _ = datasets
    da, db = synth.file_digests(a), synth.file_digests(b)
    assert len(da) == 3 * 10 + 3 + 1          # image, label, calib per id; 3 lists; meta
    assert da == db


def test_other_seed_differs(datasets):
    a, _, c = datasets
    da, dc = synth.file_digests(a), synth.file_digests(c)
    assert da.keys() == dc.keys()
    images = [k for k in da if k.endswith(".png")]
    assert all(da[k] != dc[k] for k in images)


def test_layout_and_splits(datasets):
    root = datasets[0]
    lists = {s: (root / "ImageSets" / f"{s}.txt").read_text().split() for s in synth.SPLITS}
    assert lists["train"] == [f"{i:06d}" for i in range(6)]
    assert lists["val"] == ["000006", "000007"]
    assert lists["test"] == ["000008", "000009"]
    ids = sorted(sum(lists.values(), []))
    for sub, ext in (("image_2", ".png"), ("label_2", ".txt"), ("calib", ".txt")):
        assert sorted(p.stem for p in (root / "training" / sub).iterdir()) == ids
        assert all(p.suffix == ext for p in (root / "training" / sub).iterdir())
    for i in ids:
        with Image.open(root / "training" / "image_2" / f"{i}.png") as im:
            assert im.size == (W, H) and im.mode == "RGB"
    meta = json.loads((root / "synth_meta.json").read_text())
    assert meta["seed"] == 0 and meta["num_train"] == 6 and meta["width"] == W
    assert meta["version"] == synth.GENERATOR_VERSION
    assert not list(root.parent.glob(".*tmp*")) and not list(root.parent.glob(".*old*"))


def _check_line(line: str):
    f = line.split()
    assert len(f) == 15, line
    kind, vals = f[0], [float(v) for v in f[1:]]
    trunc, occ, alpha, x1, y1, x2, y2, h, w, l, x, y, z, ry = vals
    assert 0 <= x1 < x2 <= W - 1 and 0 <= y1 < y2 <= H - 1, line
    if kind == "DontCare":
        assert f[1:4] == ["-1", "-1", "-10"] and f[8:] == ["-1", "-1", "-1", "-1000", "-1000",
                                                           "-1000", "-10"], line
        return
    assert kind in synth.CLASSES + synth.DISTRACTORS, line
    assert 0.0 <= trunc <= 1.0 and f[2] in {"0", "1", "2", "3"}, line
    assert -math.pi - 0.01 <= alpha <= math.pi + 0.01 and -math.pi - 0.01 <= ry <= math.pi + 0.01
    assert h > 0 and w > 0 and l > 0 and z > 0 and 1.0 < y < 2.5, line
    assert all(len(v.split(".")[1]) == 2 for v in f[4:8]), line      # KITTI: 2 decimals


def test_label_lines(datasets):
    n = 0
    for path in sorted((datasets[0] / "training" / "label_2").glob("*.txt")):
        for line in path.read_text().splitlines():
            _check_line(line)
            n += 1
    assert n > 10


def test_3d_boxes_project_onto_2d_boxes(datasets):
    """Untruncated labels: the 3-D box projected with P2 from calib gives the 2-D box."""
    root, checked = datasets[0], 0
    for path in sorted((root / "training" / "label_2").glob("*.txt")):
        calib = (root / "training" / "calib" / path.name).read_text().splitlines()
        p2 = np.array([float(v) for v in calib[2].split()[1:]]).reshape(3, 4)
        for line in path.read_text().splitlines():
            f = line.split()
            if f[0] == "DontCare" or float(f[1]) > 0:
                continue
            v = [float(x) for x in f[4:]]
            corners = synth.box_corners(v[4:7], v[7:10], v[10])
            uvw = p2 @ np.vstack([corners, np.ones(8)])
            u, w_ = uvw[0] / uvw[2], uvw[1] / uvw[2]
            np.testing.assert_allclose([u.min(), w_.min(), u.max(), w_.max()], v[0:4], atol=1.0)
            checked += 1
    assert checked > 5


def _sample(difficulty: float, n: int, seed: int = 3):
    return [synth.render(seed, "train", i, W, H, difficulty)[1] for i in range(n)]


def test_classes_present():
    kinds = {lb.type for labels in _sample(1.0, 30) for lb in labels}
    assert {"Car", "Pedestrian", "Cyclist"} <= kinds


def test_difficulty_makes_it_harder():
    def stats(d):
        labels = [lb for ls in _sample(d, 25) for lb in ls if lb.type in synth.CLASSES]
        heights = np.array([lb.box[3] - lb.box[1] for lb in labels])
        return np.mean(heights < 20), np.mean([lb.occluded > 0 for lb in labels])
    small0, occ0 = stats(0.0)
    small2, occ2 = stats(2.0)
    assert small2 > small0 + 0.1
    assert occ2 > occ0 + 0.05
    noise = [synth.Knobs.from_difficulty(d).noise for d in (0.0, 1.0, 2.0)]
    assert noise == sorted(noise) and noise[0] < noise[2]


def test_replaces_old_dataset_and_refuses_foreign_dir(tmp_path):
    out = tmp_path / "ds"
    kw = dict(seed=0, num_train=1, num_val=0, num_test=1, width=96, height=48, workers=1,
              progress=False)
    synth.generate(out, **kw)
    (out / "stale.txt").write_text("x")
    synth.generate(out, **kw)
    assert not (out / "stale.txt").exists()
    assert (out / "ImageSets" / "val.txt").read_text() == ""
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        synth.generate(foreign, **kw)
    assert (foreign / "keep.txt").exists()


def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
    def boom(task):
        raise RuntimeError("interrupted")
    monkeypatch.setattr(synth, "_write_one", boom)
    with pytest.raises(RuntimeError):
        synth.generate(tmp_path / "ds", seed=0, num_train=2, num_val=0, num_test=0, width=96,
                       height=48, workers=1, progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args", [["--width", "32"], ["--num-train", "-1"], ["--workers", "0"],
                                  ["--difficulty", "-1"], ["--width", "abc"]])
def test_cli_bad_arguments(args, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        synth.main(["--out", str(tmp_path / "x"), "--quiet", *args])
    assert exc.value.code != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error" in err
    assert not (tmp_path / "x").exists()


def test_cli_without_params_file(tmp_path):
    out = tmp_path / "cli"
    rc = synth.main(["--params", str(tmp_path / "missing.yaml"), "--out", str(out), "--quiet",
                     "--num-train", "2", "--num-val", "1", "--num-test", "0", "--workers", "1"])
    assert rc == 0
    meta = json.loads((out / "synth_meta.json").read_text())
    assert (meta["width"], meta["height"], meta["difficulty"]) == (416, 128, 1.0)
    assert len(list((out / "training" / "image_2").iterdir())) == 3


def test_defaults_match_params_yaml():
    from pathlib import Path
    if not Path("params.yaml").is_file():
        pytest.skip("no params.yaml")
    assert synth.load_settings("params.yaml") == synth.DEFAULTS


def test_no_progress_bar_off_a_terminal(tmp_path, capsys):
    """DVC logs are not terminals: a bar there would be one carriage-return update per image;
    a log gets a plain line every 5 s instead, and this loop is faster than that."""
    synth.generate(tmp_path / "ds", seed=0, num_train=2, num_val=0, num_test=0, width=96,
                   height=48, workers=1, progress=True)
    assert capsys.readouterr().err == ""
