"""The val-split probe driver: the grid it trains, the commands it runs, and what it refuses."""
from __future__ import annotations

import shlex

import pytest

from reproduce.pipeline import tuning


def _dry_run(capsys, tmp_path, *args):
    rc = tuning.main(["--name", "t", "--dry-run", "--runs-root", str(tmp_path / "runs"),
                      "--results-root", str(tmp_path / "results"), *args])
    assert rc == 0
    return [shlex.split(line) for line in capsys.readouterr().out.splitlines()[1:]]


def test_sweep_grid_fills_in_each_method_and_evaluates_val(capsys, tmp_path):
    cmds = _dry_run(capsys, tmp_path, "--detectors", "dino", "--runs", "fgd,mgd", "--steps", "50",
                    "--sweep", "distill.{method}.kd_weight=0.3,3", "--jobs", "1")
    trains = [c for c in cmds if "reproduce.train" in c]
    evals = [c for c in cmds if "reproduce.evaluate" in c]
    assert len(trains) == len(evals) == 4
    sets = sorted(" ".join(c[i + 1] for i, t in enumerate(c) if t == "-S") for c in trains)
    assert sets == ["train.steps=50 distill.fgd.kd_weight=0.3", "train.steps=50 distill.fgd.kd_weight=3",
                    "train.steps=50 distill.mgd.kd_weight=0.3", "train.steps=50 distill.mgd.kd_weight=3"]
    # KD runs get the pipeline's teacher; no cache file exists here, so none is passed
    assert all("--teacher" in c and "--teacher-cache" not in c for c in trains)
    assert all(c[c.index("--split") + 1] == "val" for c in evals)


def test_teacher_steps_for_teachers(capsys, tmp_path):
    cmds = _dry_run(capsys, tmp_path, "--detectors", "dab_detr", "--runs", "teacher", "--steps", "7")
    assert "train.teacher_steps=7" in cmds[0] and "--teacher" not in cmds[0]


def test_test_split_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        tuning.main(["--name", "t", "--split", "test", "--runs-root", str(tmp_path)])


def test_summary_is_written_after_each_probe(tmp_path, monkeypatch):
    """A probe killed half-way keeps the summary of what finished (here: a fake training that
    writes metrics for the first probe and fails the second)."""
    import json
    calls = []

    def fake_execute(cmds, log_path, threads):
        metrics = cmds[-1][cmds[-1].index("--out") + 1]
        calls.append(metrics)
        if len(calls) == 1:
            from pathlib import Path
            Path(metrics).parent.mkdir(parents=True, exist_ok=True)
            Path(metrics).write_text(json.dumps({"bbox": {"AP": 0.25, "AP50": 0.5}}))
            return 1.0, 0
        return 1.0, 1

    monkeypatch.setattr(tuning, "execute", fake_execute)
    rc = tuning.main(["--name", "t", "--detectors", "dino", "--steps", "10,20", "--jobs", "1",
                      "--runs-root", str(tmp_path / "runs"), "--results-root", str(tmp_path / "results")])
    assert rc == 1 and len(calls) == 2
    record = json.loads((tmp_path / "results" / "t.json").read_text())
    assert [r["AP"] for r in record["runs"]] == [0.25] and record["split"] == "val"
    assert record["command"].startswith("python -m reproduce.tuning --name t")


def test_gains_over_the_student_are_paired_by_seed():
    """The record's gains pair each method with the student of its seed: a method that beats the
    student by exactly 0.01 on every seed has gain 0.01 and a zero-width interval, although the
    students' APs vary far more than that; a lone seed gives no interval; other groups stay apart."""
    rows = [{"detector": "dino", "run": "student", "steps": 10, "seed": s, "AP": ap}
            for s, ap in [(0, 0.1), (1, 0.3), (2, 0.2)]]
    rows += [{"detector": "dino", "run": "mgd", "steps": 10, "seed": s, "AP": ap + 0.01}
             for s, ap in [(0, 0.1), (1, 0.3), (2, 0.2)]]
    rows += [{"detector": "dino", "run": "fgd", "steps": 10, "seed": 1, "AP": 0.25},
             {"detector": "dino", "run": "fgd", "steps": 20, "seed": 0, "AP": 0.9}]
    gains = {(g["run"], g["steps"]): g for g in tuning.gains_over_student(rows)}
    assert set(gains) == {("mgd", 10), ("fgd", 10)}   # fgd at 20 steps has no student to pair with
    mgd = gains[("mgd", 10)]
    assert mgd["seeds"] == [0, 1, 2] and abs(mgd["delta_ap"] - 0.01) < 1e-12
    assert abs(mgd["ci95"][0] - 0.01) < 1e-9 and abs(mgd["ci95"][1] - 0.01) < 1e-9
    fgd = gains[("fgd", 10)]
    assert fgd["seeds"] == [1] and abs(fgd["delta_ap"] + 0.05) < 1e-12 and fgd["ci95"] is None


def _row(run, value, ap, seed=0):
    return {"run": run, "seed": seed, "AP": ap, "sweep": {f"distill.{run}.kd_weight": str(value)}}


def test_best_sweep_value_is_the_best_mean_and_a_tie_goes_to_the_paper_default():
    rows = [_row("fgd", 0.3, 0.10), _row("fgd", 1, 0.12), _row("fgd", 3, 0.13), _row("fgd", 3, 0.15, seed=1),
            _row("fgd", 1, 0.12, seed=1),
            # 0.1 beats 0.3 by 0.01 AP x100, below the tables' precision: a tie, and 0.3 is nearer 1
            _row("mgd", 0.1, 0.10824), _row("mgd", 0.3, 0.10813), _row("mgd", 1, 0.104),
            _row("fitnet", 0.3, 0.1104), _row("fitnet", 1, 0.1101), _row("fitnet", 3, 0.1102)]
    assert tuning.best_sweep_values(rows, "kd_weight", default=1.0) == {"fgd": 3.0, "mgd": 0.3, "fitnet": 1.0}
    # a clear gain does move it, and other sweep keys are ignored
    rows += [_row("mgd", 0.1, 0.1200, seed=1), {"run": "mgd", "seed": 0, "AP": 0.9, "sweep": {"train.lr": "1e-3"}}]
    assert tuning.best_sweep_values(rows, "kd_weight", default=1.0)["mgd"] == 0.1
