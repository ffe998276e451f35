"""One configuration path: the run config shows every option a run uses, says where each came
from, and evaluate prints the same config train does."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml

from distill import METHODS
from distill.options import resolve_options
from reproduce.core.config import load_params
from reproduce.evaluation import evaluate as evaluate_cli
from reproduce.training import checkpoint as ckpt_io
from reproduce.training import runconfig
from reproduce.training import train as train_cli
from reproduce.training.runconfig import TRAIN_DEFAULTS, method_defaults, resolve_run, run_sources

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def params():
    return load_params("params.yaml")


def _layered(params: dict) -> dict:
    """params.yaml with one value in every layer: a params distill option, a profile distill
    option on top of another, and a per-detector train value."""
    params = copy.deepcopy(params)
    params["distill"]["clockdistill"] = {"alpha": 1e-4, "beta": 2e-7}
    mini = params["profiles"]["mini"]
    mini["distill"] = {"clockdistill": {"beta": 3e-7}}
    mini["train"].setdefault("per_detector", {}).setdefault("dab_detr", {})["warmup_steps"] = 7
    return params


# ---------------------------------------------------------------------------- evaluate --print-config

def _fail(*_, **__):
    raise AssertionError("--print-config must not build a model or read data")


def test_evaluate_print_config_is_the_run_config_without_data(capsys, monkeypatch):
    monkeypatch.setattr("reproduce.data.datasets.DetectionDataset", _fail)
    monkeypatch.setattr("reproduce.training.checkpoint.load_detector", _fail)
    rc = evaluate_cli.main(["--detector", "dino", "--profile", "mini", "--print-config", "--split", "val",
                            "-S", "train.lr=1e-3"])
    cfg = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert set(cfg) == set(resolve_run(load_params(), "dino", "student", profile="mini", resolve_steps=False))
    assert cfg["model"]["d_model"] and cfg["train"]["lr"] == 1e-3 and cfg["train"]["steps"] is None
    assert cfg["eval"]["split"] == "val" and cfg["detector"] == "dino"


def test_evaluate_print_config_takes_the_checkpoints_model(capsys, tmp_path, params, monkeypatch):
    monkeypatch.setattr("reproduce.training.checkpoint.load_detector", _fail)
    teacher_model = resolve_run(params, "dino", "teacher", profile="mini")["model"]
    ckpt_io.save_model({"w": torch.zeros(1)}, tmp_path / "model.pth",
                       {"model_cfg": teacher_model, "role": "teacher", "method": "student"})
    rc = evaluate_cli.main(["--detector", "dino", "--profile", "mini", "--checkpoint", str(tmp_path / "model.pth"),
                            "--print-config", "--batch-size", "3"])
    cfg = json.loads(capsys.readouterr().out)
    assert rc == 0 and cfg["model"] == teacher_model and cfg["role"] == "teacher"
    assert cfg["eval"]["batch_size"] == 3


def test_evaluate_without_checkpoint_is_a_one_line_error(capsys):
    assert evaluate_cli.main(["--detector", "dino", "--profile", "mini"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--checkpoint is required" in err


# ---------------------------------------------------------------------------- distill options

def test_distill_options_are_the_defaults_under_params(params):
    layered = _layered(params)
    options = resolve_run(layered, "dino", "student", "clockdistill", profile="mini")["distill"]
    defaults = method_defaults("clockdistill")
    assert set(options) == set(defaults)
    assert options["alpha"] == 1e-4                        # params.yaml distill.<m> over the default
    assert options["beta"] == 3e-7                         # the profile's over params'
    assert options["tcld_weight"] == defaults["tcld_weight"]
    overridden = resolve_run(layered, "dino", "student", "clockdistill", profile="mini",
                             overrides=["distill.clockdistill.beta=4e-7"])
    assert overridden["distill"]["beta"] == 4e-7
    assert resolve_run(params, "dino", "student", profile="mini")["distill"] == {}


def test_distiller_keeps_the_resolved_options(params):
    """The distiller's own merge of its DEFAULTS is a no-op on resolved options."""
    from distill import build_distiller
    from models.build import build_criterion, build_detector, detector_config
    for method, cls in METHODS.items():
        if method != "student":
            options = resolve_run(params, "dino", "student", method, profile="mini")["distill"]
            assert resolve_options(method, cls.DEFAULTS, options) == options
    options = resolve_run(_layered(params), "dino", "student", "clockdistill", profile="mini")["distill"]
    torch.manual_seed(0)
    student, teacher = (build_detector(detector_config("dino", "tiny"), 2) for _ in range(2))
    distiller = build_distiller("clockdistill", student, build_criterion("dino", 2), teacher=teacher, cfg=options)
    assert distiller.cfg == options


# ---------------------------------------------------------------------------- provenance

def test_sources_name_every_layer(params):
    layered = _layered(params)
    overrides = ["train.lr=1e-3", "distill.clockdistill.kd_weight=2.0"]
    cfg = resolve_run(layered, "dab_detr", "student", "clockdistill", profile="mini", overrides=overrides)
    sources = run_sources(layered, "dab_detr", "student", "clockdistill", profile="mini", overrides=overrides)
    assert set(sources) == {f"{section}.{key}" for section in ("train", "distill", "image", "eval")
                            for key in cfg[section]}
    unset = next(key for key in TRAIN_DEFAULTS if key not in layered["profiles"]["mini"]["train"])
    assert sources[f"train.{unset}"] == "code default (TRAIN_DEFAULTS)"
    assert sources["distill.tcld_weight"] == "code default (CLoCKDistill.DEFAULTS)"
    assert sources["distill.alpha"] == "params.yaml distill.clockdistill"
    assert sources["distill.beta"] == "params.yaml profiles.mini.distill.clockdistill"
    assert sources["train.batch_size"] == "params.yaml profiles.mini.train"
    assert sources["image.max_size"] == "params.yaml profiles.mini.image"
    assert sources["train.lr"] == "override -S train.lr=1e-3"
    assert sources["distill.kd_weight"] == "override -S distill.clockdistill.kd_weight=2.0"
    assert "per_detector" in sources["train.warmup_steps"]


def test_train_explain_prints_value_and_source(capsys, tmp_path, params):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(_layered(params)))
    rc = train_cli.main(["--detector", "dab_detr", "--role", "teacher", "--profile", "mini", "--explain",
                         "--params", str(tmp_path / "params.yaml"), "-S", "image.hflip=0.25"])
    lines = dict(line.split(" = ", 1) for line in capsys.readouterr().out.splitlines())
    assert rc == 0
    assert lines["image.hflip"] == "0.25  # override -S image.hflip=0.25"
    assert lines["train.steps"].startswith("2000  # params.yaml profiles.mini.train.per_detector.dab_detr")


def test_evaluate_explain_names_command_line_flags(capsys):
    assert evaluate_cli.main(["--detector", "dino", "--profile", "mini", "--explain", "--split", "val"]) == 0
    lines = dict(line.split(" = ", 1) for line in capsys.readouterr().out.splitlines())
    assert lines["eval.split"] == '"val"  # command line --split'
    assert lines["train.steps"] == "null  # not resolved (evaluation)"


# ---------------------------------------------------------------------------- reroute note

def test_reroute_note_once_per_key(capsys, monkeypatch):
    monkeypatch.setattr(runconfig, "_NOTED", set())
    args = ["--detector", "dino", "--role", "student", "--profile", "mini", "--print-config",
            "-S", "train.lr=1e-3", "-S", "train.lr=2e-3", "-S", "profiles.mini.train.steps=7"]
    assert train_cli.main(args) == 0 and train_cli.main(args) == 0
    err = capsys.readouterr().err
    assert err.count("note: -S train.lr -> profiles.mini.train.lr") == 1
    assert err.count("note:") == 1                         # a full key is not rerouted


def test_no_note_before_a_one_line_error(capsys, monkeypatch):
    monkeypatch.setattr(runconfig, "_NOTED", set())
    rc = train_cli.main(["--detector", "dino", "--role", "student", "--profile", "mini", "--print-config",
                         "-S", "train.lr=1e-3", "-S", "train.stepz=3"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and "unknown key 'stepz'" in lines[0]
