"""``reproduce.training.train --init-from``: fine-tuning from a checkpoint with another class count keeps
every weight but the class-dependent ones, which are re-initialised with a note."""
from __future__ import annotations

import pytest
import torch

from models.build import build_detector
from reproduce.training import train as train_cli
from reproduce.training.checkpoint import CheckpointError, load_model_state, save_model
from reproduce.training.runconfig import resolve_run
from reproduce.training.train import train
from tests.test_engine import make_toy_dataset, toy_params

pytestmark = pytest.mark.usefixtures("one_thread")


def source_checkpoint(path, cfg: dict, num_classes: int):
    """A "pretrained" DINO of the run's config, trained for ``num_classes`` classes."""
    torch.manual_seed(123)
    model = build_detector(cfg["model"], num_classes, load_weights=False)
    save_model(model.state_dict(), path, {"detector": cfg["detector"], "model_cfg": cfg["model"],
                                          "num_classes": num_classes, "role": "student", "method": "student"})
    return model.state_dict()


def test_init_from_another_class_count_reinitialises_the_class_heads(tmp_path, capsys):
    prepared = make_toy_dataset(tmp_path / "data", n=4)
    # lr 0: the saved model is exactly the start, so what was loaded can be read back
    params = toy_params(prepared, steps=1, lr=0.0, warmup_steps=0)
    cfg = resolve_run(params, "dino", "student")
    source = source_checkpoint(tmp_path / "coco80.pth", cfg, num_classes=5)
    summary = train(cfg, tmp_path / "run", resume="never", device="cpu", show_progress=False,
                    init_from=tmp_path / "coco80.pth")
    err = capsys.readouterr().err
    assert "trained for 5 classes, the dataset has 2: re-initialised" in err
    assert "decoder.class_heads.*" in err and "label_enc" in err
    assert summary["init_from"] == str(tmp_path / "coco80.pth")
    tuned, meta = load_model_state(tmp_path / "run" / "model.pth")
    assert meta["num_classes"] == 2
    assert tuned["label_enc.weight"].shape[0] == 3 and tuned["decoder.class_heads.0.weight"].shape[0] == 2
    same = [k for k in tuned if k in source and tuned[k].shape == source[k].shape]
    assert any(k.startswith("backbone.") for k in same) and any(k.startswith("encoder.") for k in same)
    for key in same:
        if tuned[key].is_floating_point():
            torch.testing.assert_close(tuned[key], source[key], msg=key)


def test_init_from_another_config_is_an_error(tmp_path):
    prepared = make_toy_dataset(tmp_path / "data", n=4)
    params = toy_params(prepared, steps=1)
    cfg = resolve_run(params, "dino", "student")
    other = dict(cfg, model={**cfg["model"], "d_model": 48})
    source_checkpoint(tmp_path / "other.pth", other, num_classes=2)
    with pytest.raises(CheckpointError, match="not the profile's --init-from model"):
        train(cfg, tmp_path / "run", resume="never", device="cpu", show_progress=False,
              init_from=tmp_path / "other.pth")
    assert not (tmp_path / "run").exists()


def test_cli_has_the_flag():
    args = train_cli.build_parser().parse_args(["--detector", "dino", "--role", "student", "--out", "x",
                                                "--init-from", "a.pth"])
    assert str(args.init_from) == "a.pth"
