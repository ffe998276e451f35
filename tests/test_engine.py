"""Training engine: run config, optimiser groups, LR schedule, non-finite steps, outputs of a run.

Tiny models (``SIZES["tiny"]``) on a toy COCO-format dataset written to tmp_path; CPU only.
``make_toy_dataset`` / ``toy_params`` are shared with test_checkpoint.py and test_distributed.py.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from torchvision.io import write_png

from models.criterion import SetCriterion
from reproduce.training import checkpoint as ckpt_io
from reproduce.core.config import ConfigError, load_params
from reproduce.training.engine import (LRFactor, build_optimizer, build_scheduler, param_group_names, sample_seed,
                              train_step)
from reproduce.training.runconfig import resolve_run, steps_from_epochs
from reproduce.training.train import train

COLORS = [(230, 40, 40), (40, 200, 40), (40, 80, 240)]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_toy_dataset(root: Path, n: int = 6, height: int = 64, width: int = 96, seed: int = 0,
                     empty_image: bool = True) -> Path:
    """PNG images with 1-2 coloured rectangles (one image without objects) and a prepared-style
    JSON (non-contiguous category ids 3 and 7, image ids from 100) as train/val/test splits."""
    g = torch.Generator().manual_seed(seed)
    image_dir = root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(n):
        img = torch.full((3, height, width), 40, dtype=torch.uint8)
        count = 0 if (empty_image and i == n - 1) else 1 + i % 2
        for _ in range(count):
            bw, bh = (int(torch.randint(14, 30, (1,), generator=g)) for _ in range(2))
            x = int(torch.randint(0, width - bw, (1,), generator=g))
            y = int(torch.randint(0, height - bh, (1,), generator=g))
            c = int(torch.randint(0, 2, (1,), generator=g))
            img[:, y:y + bh, x:x + bw] = torch.tensor(COLORS[c], dtype=torch.uint8)[:, None, None]
            anns.append({"id": len(anns) + 1, "image_id": 100 + i, "category_id": (3, 7)[c],
                         "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": 0})
        write_png(img, str(image_dir / f"{i:03d}.png"))
        images.append({"id": 100 + i, "file_name": f"{i:03d}.png", "width": width, "height": height})
    data = {"info": {"image_root": str(image_dir)}, "images": images, "annotations": anns,
            "categories": [{"id": 3, "name": "red"}, {"id": 7, "name": "green"}]}
    prepared = root / "prepared" / "toy"
    prepared.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "test"):
        (prepared / f"{split}.json").write_text(json.dumps(data))
    return root / "prepared"


def toy_params(prepared: Path, **train) -> dict:
    """A params dict with one profile ``toy`` of tiny models on the toy dataset."""
    train_cfg = {"batch_size": 2, "steps": 4, "teacher_steps": 4, "lr": 2e-4, "lr_backbone_mult": 1.0,
                 "lr_linear_proj_mult": 0.1, "weight_decay": 1e-4, "warmup_steps": 2, "lr_drop": 0.75,
                 "clip_max_norm": 0.1, "ema": False, "ema_decay": 0.99, "amp": False, "num_workers": 0,
                 "log_every": 1, "checkpoint_every": 2}
    train_cfg.update(train)
    return {"seed": 0, "profile": "toy", "data": {"prepared": str(prepared)},
            "profiles": {"toy": {"dataset": "toy", "student": {"size": "tiny"},
                                 "teacher": {"size": "tiny", "overrides": {"d_model": 48}},
                                 "image": {"short_sides": None, "hflip": 0.5}, "train": train_cfg,
                                 "eval": {"split": "val", "batch_size": 2}}}}


# ---------------------------------------------------------------------------- run config

def test_resolve_run_from_params_yaml():
    params = load_params("params.yaml")
    student = resolve_run(params, "dino", "student", profile="mini")
    teacher = resolve_run(params, "dino", "teacher", profile="mini")
    prof = params["profiles"]["mini"]
    assert student["train"]["steps"] == prof["train"]["steps"]
    assert teacher["train"]["steps"] == prof["train"]["teacher_steps"]
    # the paper-built teacher: the student's transformer on a larger backbone
    for key in ("d_model", "dec_layers", "enc_layers", "dim_feedforward", "num_queries"):
        assert teacher["model"][key] == student["model"][key]
    assert teacher["model"]["backbone"] != student["model"]["backbone"]
    assert teacher["model"]["backbone"]["widths"] == prof["teacher"]["overrides"]["backbone"]["widths"]
    assert student["dataset"] == "synth"
    assert student["data"]["train"] == str(Path(params["data"]["prepared"]) / "mini" / "train.json")
    assert student["distill"] == {} and student["seed"] == params["seed"]
    # KD runs train the student's model and know the teacher's
    kd = resolve_run(params, "dino", "student", method="clockdistill", profile="mini")
    assert kd["model"] == student["model"] and kd["teacher_model"] == teacher["model"]
    # per_detector overrides reach only their detector
    dab_teacher = resolve_run(params, "dab_detr", "teacher", profile="mini")
    assert dab_teacher["model"]["num_queries"] == resolve_run(params, "dab_detr", "student")["model"]["num_queries"]
    assert dab_teacher["train"]["steps"] == prof["train"]["per_detector"]["dab_detr"]["teacher_steps"]
    assert resolve_run(params, "dab_detr", "student", profile="mini")["train"]["steps"] == prof["train"]["steps"]
    assert "per_detector" not in teacher["train"]
    # method options: code defaults, then the top-level distill.<method>, then the profile's; -S lands there
    from distill import METHODS
    assert kd["distill"] == {**METHODS["clockdistill"].DEFAULTS, **params["distill"]["clockdistill"],
                             **prof["distill"].get("clockdistill", {})}
    ablated = resolve_run(params, "dino", "student", method="clockdistill", profile="mini",
                          overrides=["distill.clockdistill.lcmd_weight=1", "distill.clockdistill.tcld=false"])
    assert ablated["distill"]["lcmd_weight"] == 1 and ablated["distill"]["tcld"] is False
    with pytest.raises(ConfigError):
        resolve_run(params, "dino", "teacher", method="clockdistill", profile="mini")
    # overrides: profile-relative shorthand and full dotted keys
    o = resolve_run(params, "dino", "student", profile="mini",
                    overrides=["train.lr=1e-3", "profiles.mini.train.steps=7"])
    assert o["train"]["lr"] == 1e-3 and o["train"]["steps"] == 7
    with pytest.raises(ConfigError, match="unknown distillation method 'x'"):
        resolve_run(params, "dino", "student", profile="mini", overrides=["distill.x.a=1"])


def test_epochs_become_steps(tmp_path):
    prepared = make_toy_dataset(tmp_path, n=6)
    params = toy_params(prepared)
    train_cfg = params["profiles"]["toy"]["train"]
    del train_cfg["steps"], train_cfg["teacher_steps"]
    train_cfg["epochs"] = 4
    cfg = resolve_run(params, "dab_detr", "student")                  # 6 images // 2 = 3 per epoch
    assert cfg["train"]["steps"] == 12
    assert resolve_run(params, "dab_detr", "teacher", world_size=2, dataset_len=10)["train"]["steps"] == 8
    assert steps_from_epochs(1.5, 100, 8) == 18
    params["distill"] = {"kdx": {"weight": 2.0}}
    assert resolve_run(params, "dab_detr", "student", method="kdx")["distill"] == {"weight": 2.0}


# ---------------------------------------------------------------------------- optimiser, schedule

def _tiny_distiller(detector="deformable_detr", num_classes=2):
    from distill import build_distiller
    from models.build import build_criterion, build_detector, detector_config
    torch.manual_seed(0)
    model = build_detector(detector_config(detector, "tiny"), num_classes)
    return build_distiller("student", model, build_criterion(detector, num_classes))


def test_param_groups_lr_multipliers():
    distiller = _tiny_distiller("deformable_detr")
    cfg = {"lr": 1e-3, "lr_backbone_mult": 0.5, "lr_linear_proj_mult": 0.1, "weight_decay": 1e-4}
    opt = build_optimizer(distiller, cfg)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert set(by_name) == {"default", "backbone", "linear_proj"}
    assert by_name["default"]["lr"] == pytest.approx(1e-3)
    assert by_name["backbone"]["lr"] == pytest.approx(5e-4)
    assert by_name["linear_proj"]["lr"] == pytest.approx(1e-4)
    names = param_group_names(distiller)
    params = dict(distiller.named_parameters())
    ids = {g["name"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    for name, group in names.items():
        assert id(params[name]) in ids[group]
        if "sampling_offsets" in name:
            assert group == "linear_proj"
        if name.startswith("student.backbone."):
            assert group == "backbone"
    assert any("sampling_offsets" in n for n in names)
    # every trainable parameter in exactly one group
    assert sum(len(g["params"]) for g in opt.param_groups) == len(names)
    assert len(names) == sum(p.requires_grad for p in distiller.parameters())

    # warmup then x0.1 drop, applied to each group's own lr
    sched = build_scheduler(opt, {"warmup_steps": 4, "lr_drop": 0.5, "steps": 20})
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"] / by_name["default"]["initial_lr"])
        opt.step()
        sched.step()
    assert lrs[:5] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    assert lrs[9] == pytest.approx(1.0) and lrs[10] == pytest.approx(0.1) and lrs[19] == pytest.approx(0.1)
    assert by_name["linear_proj"]["lr"] == pytest.approx(1e-5)
    assert LRFactor(0, None)(10**6) == 1.0


def test_sample_seeds_differ():
    seeds = {sample_seed(0, e, i) for e in range(3) for i in range(100)}
    assert len(seeds) == 300 and all(0 <= s < 2**63 for s in seeds)


# ---------------------------------------------------------------------------- non-finite losses

def _nan_on_calls(monkeypatch, calls: set[int]):
    original = SetCriterion.forward
    counter = {"n": 0}

    def forward(self, outputs, targets):
        counter["n"] += 1
        losses = original(self, outputs, targets)
        if counter["n"] in calls:
            losses["loss_cls"] = losses["loss_cls"] * float("nan")
        return losses

    monkeypatch.setattr(SetCriterion, "forward", forward)
    return counter


def test_train_step_skips_nonfinite_loss(monkeypatch):
    distiller = _tiny_distiller("dab_detr")
    opt = build_optimizer(distiller, {"lr": 1e-3})
    images = torch.randn(2, 3, 64, 96)
    pad = torch.zeros(2, 64, 96, dtype=torch.bool)
    targets = [{"boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3]]), "labels": torch.tensor([1])}] * 2
    _nan_on_calls(monkeypatch, {1})
    before = {k: v.clone() for k, v in distiller.state_dict().items()}
    out = train_step(distiller, distiller, images, pad, targets, opt, clip_max_norm=0.1)
    assert out["skipped"] and not math.isfinite(out["loss"])
    for k, v in distiller.state_dict().items():
        assert torch.equal(v, before[k]), k                       # no update at all
    assert all(p.grad is None for p in distiller.parameters())    # gradients cleared
    assert not opt.state                                          # Adam moments untouched
    out = train_step(distiller, distiller, images, pad, targets, opt, clip_max_norm=0.1)
    assert not out["skipped"] and math.isfinite(out["loss"])
    assert any(not torch.equal(v, before[k]) for k, v in distiller.state_dict().items())


def test_nonfinite_step_counted_in_run(tmp_path, monkeypatch):
    prepared = make_toy_dataset(tmp_path / "data")
    cfg = resolve_run(toy_params(prepared, steps=4), "dab_detr", "student")
    _nan_on_calls(monkeypatch, {2})
    summary = train(cfg, tmp_path / "run", resume="never", device="cpu", show_progress=False)
    assert summary["skipped_nonfinite_steps"] == 1 and summary["steps"] == 4
    rows = list(csv.DictReader((tmp_path / "run" / "train_log.csv").open()))
    assert [int(r["skipped"]) for r in rows] == [0, 1, 0, 0]
    assert all(math.isfinite(float(r["loss"])) for r in rows if r["loss"])
    state, _ = ckpt_io.load_model_state(tmp_path / "run" / "model.pth")
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    on_disk = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert on_disk["skipped_nonfinite_steps"] == 1


# ---------------------------------------------------------------------------- a tiny run

def test_tiny_run_writes_outputs(tmp_path):
    prepared = make_toy_dataset(tmp_path / "data")
    cfg = resolve_run(toy_params(prepared, steps=4, ema=True, log_every=2), "dino", "student")
    out = tmp_path / "runs" / "toy" / "dino" / "student"
    summary = train(cfg, out, resume="auto", device="cpu", show_progress=False)
    for name in ("checkpoint.pth", "model.pth", "train_log.csv", "train_summary.json", "config.json"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
    rows = list(csv.DictReader((out / "train_log.csv").open()))
    assert [int(r["step"]) for r in rows] == [2, 4]
    for key in ("lr", "loss", "loss_cls", "loss_bbox", "loss_giou", "loss_cls_enc", "loss_cls_dn", "s_per_step"):
        assert key in rows[0] and math.isfinite(float(rows[0][key])), key
    on_disk = json.loads((out / "train_summary.json").read_text())
    assert on_disk["steps"] == 4 and on_disk["completed"] and on_disk["skipped_nonfinite_steps"] == 0
    assert on_disk["mean_s_per_step"] > 0 and on_disk["config"]["detector"] == "dino"
    assert summary["steps"] == 4

    state = ckpt_io.load(out / "checkpoint.pth")
    assert state["step"] == 4 and state["config"] == json.loads(json.dumps(cfg))
    assert {"model", "kd", "optimizer", "scheduler", "ema", "rng", "loader_generator"} <= set(state)
    model_file = ckpt_io.load(out / "model.pth")
    assert model_file["meta"]["ema"] and model_file["meta"]["steps"] == 4
    # model.pth holds the EMA weights, which differ from the raw student weights
    assert any(not torch.equal(model_file["model"][k], state["model"][k]) for k in state["model"]
               if state["model"][k].is_floating_point())
    for k, v in state["ema"]["model"].items():
        assert torch.equal(v, model_file["model"][k])

    # the run is complete: calling again resumes and does nothing more
    again = train(cfg, out, resume="auto", device="cpu", show_progress=False)
    assert again["steps"] == 4 and again["session_steps"] == 0


def test_cli_smoke(tmp_path, monkeypatch):
    """``python -m reproduce.train`` with a params file and -S overrides (in-process)."""
    import yaml

    from reproduce.training import train as train_mod
    prepared = make_toy_dataset(tmp_path / "data", n=4)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(toy_params(prepared)))
    out = tmp_path / "run"
    rc = train_mod.main(["--detector", "deformable_detr", "--role", "teacher", "--out", str(out),
                         "--params", str(params_file), "-S", "train.teacher_steps=3", "--max-steps", "2",
                         "--device", "cpu", "--no-progress", "--seed", "3"])
    assert rc == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 2 and summary["total_steps"] == 3 and not summary["completed"]
    assert summary["config"]["seed"] == 3 and summary["config"]["model"]["d_model"] == 48


def test_data_stream_independent_of_workers(tmp_path):
    """Per-sample seeded augmentation: 0 or 2 loader workers train the very same weights."""
    prepared = make_toy_dataset(tmp_path / "data", n=4)
    states = []
    for workers in (0, 2):
        cfg = resolve_run(toy_params(prepared, steps=3, num_workers=workers), "deformable_detr", "student")
        train(cfg, tmp_path / f"w{workers}", resume="never", device="cpu", show_progress=False)
        states.append(ckpt_io.load(tmp_path / f"w{workers}" / "model.pth")["model"])
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
