"""The ``custom`` profile: your own COCO-format JSON + image folder per split, tested with
``../shared/data/coco_sample`` used as if it were a user's dataset (read in place, never copied)."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from reproduce.core.config import load_params
from reproduce.data.custom_data import check_custom_config, prepare_custom
from reproduce.data.prepare import PrepareError
from tests.conftest import SHARED_DATA

COCO = SHARED_DATA / "coco_sample"
needs_sample = pytest.mark.skipif(not (COCO / "annotations" / "instances_val2017.json").is_file(),
                                  reason="COCO sample not available (../shared/data)")


def user_splits() -> dict:
    return {split: {"annotations": str(COCO / "annotations" / f"instances_{split}2017.json"),
                    "images": str(COCO / "images" / f"{split}2017")} for split in ("train", "val")}


def custom_params(tmp_path) -> dict:
    params = load_params("params.yaml")
    params["data"]["custom"] = user_splits()
    params["data"]["prepared"] = str(tmp_path / "prepared")
    return params


def test_params_yaml_has_the_custom_profile():
    params = load_params("params.yaml")
    assert params["profiles"]["custom"]["dataset"] == "custom"
    splits = check_custom_config(params["data"]["custom"])
    assert set(splits) == {"train", "val"}


@needs_sample
def test_prepare_stage_and_training_on_a_user_dataset(tmp_path):
    from reproduce.data.datasets import DetectionDataset
    from reproduce.training.runconfig import resolve_run
    from reproduce.data.stages import make_prepared
    from reproduce.training.train import train
    params = custom_params(tmp_path)
    outputs = make_prepared(params, "custom")
    assert set(outputs) == {"train", "val"}
    prepared = tmp_path / "prepared" / "custom"
    val = json.loads((prepared / "val.json").read_text())
    assert val["info"]["image_root"] == str(COCO / "images" / "val2017") and val["info"]["dataset"] == "custom"
    assert len(val["images"]) == 188 and all("segmentation" not in a for a in val["annotations"])
    assert not (COCO / "images" / "val2017" / "val.json").exists()
    ds = DetectionDataset(prepared / "val.json")
    image, target = ds[0]
    assert image.shape[0] == 3 and ds.num_classes == 80 and len(target["labels"]) > 0
    # one step of a tiny DINO on it, the profile's own pipeline with small CPU settings
    params["profiles"]["custom"].update(
        student={"size": "tiny"}, image={"short_sides": [96], "max_size": 128, "hflip": 0.5},
        train={**params["profiles"]["custom"]["train"], "epochs": None, "steps": 1, "amp": False, "num_workers": 0,
               "batch_size": 2, "checkpoint_every": 1})
    cfg = resolve_run(params, "dino", "student", profile="custom")
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = train(cfg, tmp_path / "run", resume="never", device="cpu", show_progress=False)
    finally:
        torch.set_num_threads(old)
    assert summary["steps"] == 1 and summary["num_classes"] == 80


@needs_sample
def test_user_mistakes_are_one_line_errors(tmp_path):
    splits = user_splits()
    with pytest.raises(PrepareError, match="unknown key 'image'"):
        check_custom_config({**splits, "val": {"annotations": "a.json", "image": "x"}})
    with pytest.raises(PrepareError, match="unknown split 'valid'"):
        check_custom_config({**splits, "valid": splits["val"]})
    with pytest.raises(PrepareError, match=r"data.custom.val: missing"):
        check_custom_config({"train": splits["train"]})
    with pytest.raises(PrepareError, match="is not in"):
        prepare_custom({"train": splits["train"], "val": {**splits["val"], "images": splits["train"]["images"]}},
                       None)
    other = json.loads((COCO / "annotations" / "instances_val2017.json").read_text())
    other = copy.deepcopy(other)
    other["categories"] = other["categories"][:-1]
    last = json.loads((COCO / "annotations" / "instances_val2017.json").read_text())["categories"][-1]["id"]
    other["annotations"] = [a for a in other["annotations"] if a["category_id"] != last]
    path = tmp_path / "val.json"
    path.write_text(json.dumps(other))
    with pytest.raises(PrepareError, match="categories differ from train's"):
        prepare_custom({"train": splits["train"], "val": {**splits["val"], "annotations": str(path)}}, None)
    assert not list(tmp_path.glob("prepared*"))
