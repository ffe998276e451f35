"""The data stages as dvc.yaml runs them: ``python -m reproduce.stages {raw,prepare} --profile P``.

Each test runs in its own empty working directory (the stages use ``data/raw/<profile>``
relative to it) with the download mirror pointed at a closed loopback port, so "no network"
is the same on every machine and nothing is ever fetched. The data are the KITTI / COCO
samples in ../shared/data, linked into the tree, never copied into the repository.
"""
from __future__ import annotations

import hashlib
import json
import re
import socket
from pathlib import Path

import pytest

from reproduce.data import download as dl
from reproduce.data import stages
from tests.test_download import kitti_tree

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"
SHARED = REPO.parent / "shared" / "data"
KITTI = SHARED / "kitti_sample"
COCO = SHARED / "coco_sample"

pytestmark = pytest.mark.skipif(not KITTI.is_dir() or not COCO.is_dir(),
                                reason="../shared/data samples not present")


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty checkout-like cwd whose downloads can only fail, at once, as offline."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv(dl.BASE_URL_ENV, f"http://127.0.0.1:{port}/mirror")
    monkeypatch.chdir(tmp_path)
    return tmp_path


PROGRESS_LINE = re.compile(r"^[\w ]+: \d+/\d+ images, [\d.]+ img/s(, ~\d+ (s|min) left)?$")


def progress_only(err: str) -> bool:
    """Off a terminal, stderr holds only plain progress lines (no carriage-return bar)."""
    return "\r" not in err and all(PROGRESS_LINE.match(line) for line in err.splitlines())


def run_stage(capsys, stage: str, profile: str) -> tuple[int, str, str]:
    rc = stages.main([stage, "--profile", profile, "--params", str(PARAMS)])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def place_coco_tree(root: Path) -> None:
    root.mkdir(parents=True)
    for split in ("train2017", "val2017"):
        (root / split).symlink_to(COCO / "images" / split, target_is_directory=True)
    (root / "annotations").symlink_to(COCO / "annotations", target_is_directory=True)


def images_per_split(prepared: Path) -> dict[str, int]:
    return {p.stem: len(json.loads(p.read_text())["images"]) for p in sorted(prepared.glob("*.json"))}


@pytest.mark.parametrize("image_sets, split", [(True, {"train": 58, "val": 43}),
                                               (False, {"train": 51, "val": 50})])
def test_placed_kitti_tree_is_used_then_prepared(workdir, capsys, image_sets, split):
    raw = workdir / "data" / "raw" / "kitti"
    kitti_tree(raw, image_sets)
    before = sorted(p.relative_to(raw) for p in raw.rglob("*"))

    rc, out, err = run_stage(capsys, "raw", "kitti")
    assert rc == 0 and progress_only(err), err
    note = [line for line in out.splitlines() if "using the extracted tree" in line]
    assert len(note) == 1 and note[0].startswith("data/raw/kitti: ")
    assert ("seeded split" in note[0]) is not image_sets
    assert sorted(p.relative_to(raw) for p in raw.rglob("*")) == before  # nothing added
    assert not (workdir / "data" / "archives").exists()

    rc, out, err = run_stage(capsys, "prepare", "kitti")
    assert rc == 0 and progress_only(err), err
    assert images_per_split(workdir / "data" / "prepared" / "kitti") == split


def test_placed_coco_tree_is_used_then_prepared(workdir, capsys):
    place_coco_tree(workdir / "data" / "raw" / "coco")
    rc, out, err = run_stage(capsys, "raw", "coco")
    assert rc == 0 and progress_only(err), err
    assert "data/raw/coco: using the extracted tree already there (188 files in val2017, " \
           "166 files in train2017); nothing downloaded" in out
    rc, out, err = run_stage(capsys, "prepare", "coco")
    assert rc == 0 and progress_only(err), err
    assert images_per_split(workdir / "data" / "prepared" / "coco") == {"train": 166, "val": 188}


@pytest.mark.parametrize("profile, archives", [
    ("kitti", "data_object_image_2.zip, data_object_label_2.zip, train.txt, val.txt"),
    ("coco", "annotations_trainval2017.zip, val2017.zip, train2017.zip")])
def test_no_data_and_no_network_is_one_line(workdir, capsys, profile, archives):
    rc, out, err = run_stage(capsys, "raw", profile)
    assert rc == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("error: raw: cannot reach 127.0.0.1:")
    assert f"either put the extracted tree in data/raw/{profile}/ (" in err
    assert f"or put {archives} in data/archives/{profile}/" in err
    assert f"python -m reproduce.download {profile} --list" in err


def test_placed_archive_of_wrong_size_is_reported_and_kept(workdir, capsys):
    """The real registry entry: the line gives the official size and SHA-256 to compare with."""
    (val,) = [a for a in dl.REGISTRY["kitti"] if a.name == "val.txt"]
    placed = workdir / "data" / "archives" / "kitti" / "val.txt"
    placed.parent.mkdir(parents=True)
    placed.write_bytes((KITTI / "ImageSets" / "val.txt").read_bytes())  # 43 of the 3769 ids
    digest = hashlib.sha256(placed.read_bytes()).hexdigest()

    rc, out, err = run_stage(capsys, "raw", "kitti")
    assert rc == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert f"data/archives/kitti/val.txt: {placed.stat().st_size} bytes" in err
    assert f"{val.size} bytes with SHA-256 {val.sha256}; left untouched" in err
    assert hashlib.sha256(placed.read_bytes()).hexdigest() == digest


def test_bad_profile_is_one_line(workdir, capsys):
    rc, out, err = run_stage(capsys, "raw", "kitty")
    assert rc == 1 and err.count("\n") == 1 and "no profile 'kitty'" in err
