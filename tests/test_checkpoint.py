"""Checkpoints: bitwise-exact resume, atomic writes, weights_only loading, no teacher inside."""
from __future__ import annotations

import csv
import os

import pytest
import torch
from torch import nn

import distill
from distill import Distiller
from reproduce.training import checkpoint as ckpt_io
from reproduce.training.runconfig import resolve_run
from reproduce.training.train import train
from tests.test_engine import make_toy_dataset, toy_params


pytestmark = pytest.mark.usefixtures("one_thread")


def _log_rows(path):
    rows = list(csv.DictReader(path.open()))
    for r in rows:
        r.pop("s_per_step")
    return rows


def test_resume_is_bitwise_identical(tmp_path):
    """N steps + resume + N steps == 2N uninterrupted: weights, optimiser, EMA, log, RNG.

    DINO draws denoising noise from the global RNG every step, hflip augmentation draws per
    sample, 6 images / batch 2 = 3 batches per epoch so the interruption (step 4) falls inside
    the second epoch, and the LR drop (step 6) and warmup lie on both sides of it.
    """
    prepared = make_toy_dataset(tmp_path / "data", n=6)
    params = toy_params(prepared, steps=8, warmup_steps=3, lr_drop=0.75, ema=True, checkpoint_every=3,
                        log_every=1)
    cfg = resolve_run(params, "dino", "student")
    full, part = tmp_path / "full", tmp_path / "part"
    train(cfg, full, resume="never", device="cpu", show_progress=False)
    first = train(cfg, part, resume="never", device="cpu", show_progress=False, max_steps=4)
    assert first["steps"] == 4 and not first["completed"]
    assert ckpt_io.load(part / "checkpoint.pth")["step"] == 4
    # a different global RNG state at restart must not matter: it is restored from the checkpoint
    torch.manual_seed(12345)
    second = train(cfg, part, resume="auto", device="cpu", show_progress=False)
    assert second["resumed_from_step"] == 4 and second["steps"] == 8 and second["completed"]

    a, b = ckpt_io.load(full / "checkpoint.pth"), ckpt_io.load(part / "checkpoint.pth")
    assert a["step"] == b["step"] == 8 and (a["epoch"], a["batch_in_epoch"]) == (b["epoch"], b["batch_in_epoch"])
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in a["ema"]["model"]:
        assert torch.equal(a["ema"]["model"][key], b["ema"]["model"][key]), key
    for pid, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][pid][name]), (pid, name)
    assert a["scheduler"] == b["scheduler"]
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])
    ma, mb = ckpt_io.load(full / "model.pth")["model"], ckpt_io.load(part / "model.pth")["model"]
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    assert _log_rows(full / "train_log.csv") == _log_rows(part / "train_log.csv")


def test_resume_after_kill_drops_stale_log_rows(tmp_path):
    """A run killed after its last checkpoint logged steps past it; resuming rewrites them."""
    prepared = make_toy_dataset(tmp_path / "data", n=4)
    cfg = resolve_run(toy_params(prepared, steps=4, checkpoint_every=2), "dab_detr", "student")
    out = tmp_path / "run"
    train(cfg, out, resume="never", device="cpu", show_progress=False, max_steps=2)
    with (out / "train_log.csv").open("a") as f:      # as if steps 3 were logged, then a kill
        f.write("3,1,0.0001,99.0\n")
    train(cfg, out, resume="auto", device="cpu", show_progress=False)
    steps = [int(r["step"]) for r in csv.DictReader((out / "train_log.csv").open())]
    assert steps == [1, 2, 3, 4]


def test_resume_unfinished_continues_a_partial_run_and_restarts_a_finished_one(tmp_path):
    """DVC stages pass --resume unfinished: an interrupted run continues, but a finished run
    (the stage reruns because a dependency changed) is trained again from step 0."""
    prepared = make_toy_dataset(tmp_path / "data", n=4)
    cfg = resolve_run(toy_params(prepared, steps=4, checkpoint_every=2), "dab_detr", "student")
    out = tmp_path / "run"
    train(cfg, out, resume="never", device="cpu", show_progress=False, max_steps=2)
    partial = train(cfg, out, resume="unfinished", device="cpu", show_progress=False)
    assert partial["resumed_from_step"] == 2 and partial["completed"]
    again = train(cfg, out, resume="unfinished", device="cpu", show_progress=False)
    assert again["resumed_from_step"] == 0 and again["steps"] == 4
    assert [int(r["step"]) for r in csv.DictReader((out / "train_log.csv").open())] == [1, 2, 3, 4]
    noop = train(cfg, out, resume="auto", device="cpu", show_progress=False)
    assert noop["resumed_from_step"] == 4


def _state(value: float) -> dict:
    return {"model": {"w": torch.full((3,), value)}, "step": int(value)}


def test_atomic_save_interrupted_by_replace(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    ckpt_io.atomic_save(_state(1.0), path)

    def fail(*args, **kwargs):
        raise OSError("killed before the rename")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        ckpt_io.atomic_save(_state(2.0), path)
    monkeypatch.undo()
    assert torch.equal(ckpt_io.load(path)["model"]["w"], torch.full((3,), 1.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth"]     # no temp file left


def test_atomic_save_interrupted_mid_write(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    ckpt_io.atomic_save(_state(1.0), path)
    real_save = torch.save

    def partial_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.seek(f.tell() // 2)
        f.truncate()
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", partial_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt_io.atomic_save(_state(2.0), path)
    monkeypatch.undo()
    state = ckpt_io.load(path)
    assert state["step"] == 1 and torch.equal(state["model"]["w"], torch.full((3,), 1.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth"]


def test_rng_state_roundtrip_weights_only(tmp_path):
    import random

    import numpy as np
    torch.manual_seed(3)
    np.random.seed(4)
    random.seed(5)
    np.random.normal()            # leaves a cached gaussian in numpy's state
    state = ckpt_io.rng_state()
    ckpt_io.atomic_save({"rng": state}, tmp_path / "r.pth")
    expected = (torch.rand(3), np.random.rand(3), np.random.normal(), random.random())
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    ckpt_io.set_rng_state(ckpt_io.load(tmp_path / "r.pth")["rng"])
    got = (torch.rand(3), np.random.rand(3), np.random.normal(), random.random())
    assert torch.equal(expected[0], got[0]) and (expected[1] == got[1]).all()
    assert expected[2] == got[2] and expected[3] == got[3]


class AdapterKD(Distiller):
    """A stand-in KD method with a trainable adapter and a loss reading the teacher."""

    name = "adapter_kd"
    needs_teacher = True

    def __init__(self, student, criterion, teacher=None, cfg=None):
        super().__init__(student, criterion, teacher, cfg)
        d_student, d_teacher = student.d_model, teacher.d_model
        self.adapter = nn.Linear(d_student, d_teacher)
        self.weights = {"loss_kd": 1.0}

    def distill_losses(self, student_out, images, pad_mask, targets, groups):
        with torch.no_grad():
            teacher_out = self.teacher_forward(images, pad_mask)
        mapped = self.adapter(student_out.memory)
        return {"loss_kd": (mapped - teacher_out.memory).pow(2).mean()}


def test_kd_checkpoint_has_kd_heads_but_no_teacher(tmp_path, monkeypatch):
    monkeypatch.setitem(distill.METHODS, "adapter_kd", AdapterKD)
    prepared = make_toy_dataset(tmp_path / "data", n=4)
    params = toy_params(prepared, steps=2, teacher_steps=2)
    teacher_cfg = resolve_run(params, "dab_detr", "teacher")
    train(teacher_cfg, tmp_path / "teacher", resume="never", device="cpu", show_progress=False)
    teacher_file = ckpt_io.load(tmp_path / "teacher" / "model.pth")
    assert teacher_file["meta"]["model_cfg"]["d_model"] == 48

    kd_cfg = resolve_run(params, "dab_detr", "student", method="adapter_kd")
    out = tmp_path / "kd"
    train(kd_cfg, out, teacher=tmp_path / "teacher" / "model.pth", resume="never", device="cpu",
          show_progress=False, max_steps=1)
    state = ckpt_io.load(out / "checkpoint.pth")
    assert set(state["kd"]) == {"adapter.weight", "adapter.bias"}
    assert state["kd"]["adapter.weight"].shape == (48, 32)
    every_key = list(state["model"]) + list(state["kd"]) + list(ckpt_io.load(out / "model.pth")["model"])
    assert not [k for k in every_key if "teacher" in k]
    # no tensor of the teacher's shape-signature hides under another name
    teacher_shapes = {tuple(v.shape) for k, v in teacher_file["model"].items() if "input_proj.0.0" in k}
    assert not any(tuple(v.shape) in teacher_shapes for k, v in state["model"].items() if "input_proj.0.0" in k)
    # the optimiser holds exactly the student + adapter parameters
    from models.build import build_detector
    n_opt = sum(len(g["params"]) for g in state["optimizer"]["param_groups"])
    n_student = sum(p.requires_grad for p in build_detector(kd_cfg["model"], 2).parameters())
    assert n_opt == n_student + 2
    # resuming restores the adapter (KD heads) too
    second = train(kd_cfg, out, teacher=tmp_path / "teacher" / "model.pth", resume="auto", device="cpu",
                   show_progress=False)
    assert second["steps"] == 2 and second["teacher_checkpoint"].endswith("model.pth")
    with pytest.raises(ValueError, match="needs a teacher"):
        train(kd_cfg, tmp_path / "kd2", resume="never", device="cpu", show_progress=False)


def test_training_state_rejects_teacher_keys():
    lin = nn.Linear(2, 2)
    opt = torch.optim.AdamW(lin.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with pytest.raises(RuntimeError, match="teacher"):
        ckpt_io.training_state(student=lin, kd_state={"teacher.w": torch.zeros(1)}, optimizer=opt,
                               scheduler=sched, step=0, epoch=0, batch_in_epoch=0, rng_states=[])


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGUSR1"])
def test_preemption_signal_checkpoints_and_resumes_bitwise(tmp_path, monkeypatch, capsys, signal_name):
    """A scheduler's SIGTERM / SIGUSR1 mid-run: the run checkpoints at the next step boundary
    and exits with PREEMPTED_EXIT_CODE; rerunning the same command gives the weights of an
    uninterrupted run."""
    import signal

    import yaml

    from reproduce.training import train as train_cli
    from reproduce.training.engine import PREEMPTED_EXIT_CODE
    prepared = make_toy_dataset(tmp_path / "data", n=6)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(toy_params(prepared, steps=6, checkpoint_every=100, log_every=1)))

    def args(out):
        return ["--detector", "dino", "--role", "student", "--out", str(out), "--params", str(params_file),
                "--device", "cpu", "--no-progress"]

    assert train_cli.main(args(tmp_path / "full")) == 0
    from reproduce.training import trainer as trainer_module
    real_step, calls = trainer_module.train_step, []

    def step_then_signal(*a, **k):
        out = real_step(*a, **k)
        calls.append(1)
        if len(calls) == 3:          # the notice arrives during step 3
            os.kill(os.getpid(), getattr(signal, signal_name))
        return out

    monkeypatch.setattr(trainer_module, "train_step", step_then_signal)
    before = signal.getsignal(getattr(signal, signal_name))
    part = tmp_path / "part"
    assert train_cli.main(args(part)) == PREEMPTED_EXIT_CODE
    assert f"stopped by {signal_name} at step 3" in capsys.readouterr().err
    assert ckpt_io.load(part / "checkpoint.pth")["step"] == 3
    assert signal.getsignal(getattr(signal, signal_name)) == before     # the caller's handler is back
    monkeypatch.setattr(trainer_module, "train_step", real_step)
    assert train_cli.main(args(part)) == 0
    a, b = ckpt_io.load(tmp_path / "full" / "model.pth"), ckpt_io.load(part / "model.pth")
    assert a["meta"]["steps"] == b["meta"]["steps"] == 6
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


# ---------------------------------------------------------------------------- fine-tuning across class counts

def _saved_detector(tmp_path, detector, num_classes=2, meta=True):
    """A tiny detector for ``num_classes`` saved as model.pth, every float weight perturbed so
    that none equals a fresh initialisation."""
    from models.build import build_detector, detector_config
    cfg = detector_config(detector, "tiny")
    g = torch.Generator().manual_seed(1)
    model = build_detector(cfg, num_classes)
    with torch.no_grad():         # per tensor, not per key: DINO's decoder layers share their heads
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=g))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"{detector}.pth"
    if meta:
        ckpt_io.save_model(state, path, {"detector": detector, "model_cfg": cfg, "num_classes": num_classes})
    else:
        torch.save(state, path)
    return path, cfg, state


@pytest.mark.parametrize("detector", ["dino", "deformable_detr"])
def test_reinit_classes_loads_all_but_the_class_dependent_weights(tmp_path, capsys, detector):
    path, cfg, saved = _saved_detector(tmp_path, detector, num_classes=2)
    with pytest.raises(ckpt_io.CheckpointError, match="trained for 2 classes, the dataset has 3$"):
        ckpt_io.load_detector(path, detector, num_classes=3)
    assert capsys.readouterr().err == ""

    model, meta = ckpt_io.load_detector(path, detector, num_classes=3, reinit_classes=True)
    state = model.state_dict()
    reinit = set(meta["reinitialised"])
    class_heads = {k for k in saved if "class_head" in k}
    expected = class_heads | ({"label_enc.weight"} if detector == "dino" else set())
    assert reinit == expected and meta["file_num_classes"] == 2
    for key in saved:
        if key in reinit:
            assert state[key].shape[0] == saved[key].shape[0] + 1, key       # the new class count
        else:
            assert torch.equal(state[key], saved[key]), key
    for key in class_heads:
        if key.endswith("bias"):             # freshly initialised: the prior-probability bias
            assert torch.allclose(state[key], torch.full((3,), -4.595)), key
    if detector == "dino":
        assert state["label_enc.weight"].shape == (4, cfg["d_model"]) and model.label_enc.num_embeddings == 4
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    names = "decoder.class_heads.*, query_selection.class_head" + (", label_enc" if detector == "dino" else "")
    assert lines == [f"{path}: trained for 2 classes, the dataset has 3: re-initialised {names} "
                     f"({len(expected)} tensors); every other weight loaded"]
    out = model(torch.randn(1, 3, 64, 96), torch.zeros(1, 64, 96, dtype=torch.bool))
    assert out.logits.shape[-1] == 3


def test_reinit_classes_keeps_every_other_check(tmp_path, capsys):
    path, cfg, saved = _saved_detector(tmp_path, "dino", num_classes=2)
    # the same class count: a plain load, no note
    model, meta = ckpt_io.load_detector(path, "dino", num_classes=2, reinit_classes=True)
    assert "reinitialised" not in meta and capsys.readouterr().err == ""
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    # another architecture is still an error, whatever the class count
    other = {**cfg, "d_model": 48}
    with pytest.raises(ckpt_io.CheckpointError, match="not the profile's checkpoint model"):
        ckpt_io.load_detector(path, "dino", other, num_classes=3, reinit_classes=True)
    # a bare state_dict (no class count recorded): the class dimension is found from the shapes
    bare, _, _ = _saved_detector(tmp_path / "bare", "dino", num_classes=2, meta=False)
    model, meta = ckpt_io.load_detector(bare, "dino", num_classes=5, reinit_classes=True, default_cfg=cfg)
    assert meta["file_num_classes"] == 2 and model.state_dict()["label_enc.weight"].shape[0] == 6
    assert "trained for 2 classes, the dataset has 5" in capsys.readouterr().err
    with pytest.raises(ckpt_io.CheckpointError, match="do not fit"):
        ckpt_io.load_detector(bare, "dino", num_classes=5, default_cfg=cfg)
    with pytest.raises(ckpt_io.CheckpointError, match="do not fit"):      # other shapes than the classes'
        ckpt_io.load_detector(bare, "dino", num_classes=5, reinit_classes=True, default_cfg=other)
