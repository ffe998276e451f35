"""Every user mistake at the train / evaluate command line is one line on stderr, a non-zero
exit code, and nothing created in ``--out``. Each case runs the real ``main`` of the CLI."""
from __future__ import annotations

import pytest
import torch
import yaml

from reproduce.evaluation import evaluate as evaluate_cli
from reproduce.training import train as train_cli
from reproduce.training.runconfig import resolve_run
from reproduce.training.train import train
from tests.test_engine import make_toy_dataset, toy_params

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A toy params file and teachers: finished DINO and Deformable DETR teachers, an unfinished
    DINO teacher, a DINO student (another size), a corrupt and a foreign file."""
    root = tmp_path_factory.mktemp("cli")
    prepared = make_toy_dataset(root / "data", n=4)
    params = toy_params(prepared, steps=2, teacher_steps=2, checkpoint_every=1)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for detector in ("dino", "deformable_detr"):
            train(resolve_run(params, detector, "teacher"), root / f"{detector}_teacher", device="cpu",
                  show_progress=False)
        train(resolve_run(params, "dino", "teacher"), root / "unfinished_teacher", device="cpu", show_progress=False,
              max_steps=1)
        train(resolve_run(params, "dino", "student"), root / "dino_student", device="cpu", show_progress=False)
    finally:
        torch.set_num_threads(old)
    (root / "corrupt.pth").write_bytes(torch.Generator().manual_seed(0).seed().to_bytes(8, "little") * 512)
    torch.save({"optimizer": {"lr": 0.1}, "epoch": 3}, root / "foreign.pth")
    return root


def _train_args(root, *extra, method="clockdistill", teacher="dino_teacher/model.pth"):
    args = ["--detector", "dino", "--role", "student", "--method", method, "--out", str(root / "out"),
            "--params", str(root / "params.yaml"), "--device", "cpu", "--no-progress"]
    if teacher:
        args += ["--teacher", str(root / teacher)]
    return args + list(extra)


# (case id, CLI arguments after the workspace root, text the one line must contain)
TRAIN_CASES = [
    ("corrupt_teacher", dict(teacher="corrupt.pth"), "corrupt.pth: not a readable checkpoint"),
    ("foreign_teacher", dict(teacher="foreign.pth"), "foreign.pth: not a checkpoint of this project"),
    ("missing_teacher", dict(teacher="nowhere.pth"), "nowhere.pth: no such checkpoint file"),
    ("teacher_of_another_detector", dict(teacher="deformable_detr_teacher/model.pth"),
     "holds a deformable_detr model, but the teacher must be a dino"),
    ("teacher_of_another_size", dict(teacher="dino_student/model.pth"), "is not the profile's teacher model (d_model"),
    ("unfinished_teacher", dict(teacher="unfinished_teacher/model.pth"),
     "stopped at step 1 of 2; finish it first (rerun its train command) or pass --allow-unfinished-teacher"),
    ("wrong_type", dict(extra=["-S", "train.steps=abc"]), "-S train.steps='abc': expected int like 2, got str"),
    ("unknown_key", dict(extra=["-S", "train.stepz=3"]), "unknown key 'stepz' in profiles.toy.train; did you mean 'steps'?"),
    ("model_key_at_top_level", dict(extra=["-S", "backbone.weights_path=w.pth"]),
     "model options go under student.overrides.backbone.weights_path"),
    ("unknown_model_override", dict(extra=["-S", "student.overrides.num_querys=5"]), "did you mean 'num_queries'?"),
    ("unknown_method_option", dict(extra=["-S", "distill.clockdistill.lcmd_weigth=1"]),
     "clockdistill has no option 'lcmd_weigth'; did you mean 'lcmd_weight'?"),
    ("unknown_method", dict(method="clockdistil"), "argument --method: invalid choice: 'clockdistil'"),
    ("kd_without_teacher", dict(teacher=None), "method 'clockdistill' needs --teacher"),
]


@pytest.mark.parametrize("case", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_train_mistake_is_one_line(workspace, capsys, case):
    _, kwargs, expected = case
    kwargs = dict(kwargs)
    extra = kwargs.pop("extra", [])
    try:
        rc = train_cli.main(_train_args(workspace, *extra, **kwargs))
    except SystemExit as exit_:          # argparse
        rc = exit_.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc not in (0, None), err
    assert len(lines) == 1 and expected in lines[0], err
    assert "weights_only=False" not in err and "Traceback" not in err
    assert not (workspace / "out").exists(), "a failed start must not create --out"


def test_unknown_detector_is_one_line(workspace, capsys):
    args = _train_args(workspace)
    args[args.index("dino")] = "dinoo"
    with pytest.raises(SystemExit) as exit_:
        train_cli.main(args)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1 and "invalid choice: 'dinoo'" in lines[0]


def test_unfinished_teacher_allowed_on_request(workspace, tmp_path):
    out = tmp_path / "kd"
    args = _train_args(workspace, "--allow-unfinished-teacher", "--max-steps", "1", teacher="unfinished_teacher/model.pth")
    args[args.index("--out") + 1] = str(out)
    assert train_cli.main(args) == 0 and (out / "checkpoint.pth").is_file()


EVALUATE_CASES = [
    ("corrupt_checkpoint", "corrupt.pth", "dino", "corrupt.pth: not a readable checkpoint"),
    ("foreign_checkpoint", "foreign.pth", "dino", "foreign.pth: not a checkpoint of this project"),
    ("checkpoint_of_another_detector", "deformable_detr_teacher/model.pth", "dino",
     "holds a deformable_detr model, but the checkpoint must be a dino"),
]


@pytest.mark.parametrize("case", EVALUATE_CASES, ids=[c[0] for c in EVALUATE_CASES])
def test_evaluate_mistake_is_one_line(workspace, capsys, case):
    _, checkpoint, detector, expected = case
    out = workspace / "eval_out" / "metrics.json"
    rc = evaluate_cli.main(["--checkpoint", str(workspace / checkpoint), "--detector", detector,
                            "--params", str(workspace / "params.yaml"), "--out", str(out), "--device", "cpu"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc != 0 and len(lines) == 1 and expected in lines[0], lines
    assert not out.parent.exists()
