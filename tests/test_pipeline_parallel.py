"""reproduce.pipeline.parallel: DVC's stages, order and staleness, run N at a time."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from reproduce.pipeline.parallel import execute, make_plan

# a pipeline shaped like ours: data -> teacher/student -> KD -> evaluations -> tables
COMMANDS = {name: [f"echo {name}"] for name in
            ("prepare", "teacher", "student", "kd", "eval_teacher", "eval_student", "eval_kd", "tables")}
DEPENDS_ON = {"prepare": set(), "teacher": {"prepare"}, "student": {"prepare"}, "kd": {"teacher", "prepare"},
              "eval_teacher": {"teacher"}, "eval_student": {"student"}, "eval_kd": {"kd"},
              "tables": {"eval_teacher", "eval_student", "eval_kd"}}


def test_a_stale_stage_carries_to_everything_downstream_and_nothing_else():
    plan = make_plan({"teacher"}, COMMANDS, DEPENDS_ON)
    assert set(plan.order) == {"teacher", "kd", "eval_teacher", "eval_kd", "tables"}
    assert plan.upstream["kd"] == {"teacher"}          # prepare is up to date: nothing to wait for


def test_order_puts_deps_first_and_the_most_awaited_stage_first_in_a_layer():
    plan = make_plan({"prepare"}, COMMANDS, DEPENDS_ON)
    position = {name: i for i, name in enumerate(plan.order)}
    for name, deps in DEPENDS_ON.items():
        assert all(position[d] < position[name] for d in deps)
    assert position["teacher"] < position["student"]   # 4 stages wait on the teacher, 2 on the student


def test_unknown_stage_and_cycles_are_errors():
    with pytest.raises(ValueError, match="not in the index"):
        make_plan({"nope"}, COMMANDS, DEPENDS_ON)
    with pytest.raises(ValueError, match="cycle"):
        make_plan({"a"}, {"a": ["x"], "b": ["y"]}, {"a": {"b"}, "b": {"a"}})


def test_execute_respects_jobs_and_skips_what_a_failure_blocks(tmp_path):
    plan = make_plan({"prepare"}, COMMANDS, DEPENDS_ON)
    running, peak, lock, started = set(), [0], threading.Lock(), []

    def runner(name, commands, threads, log_dir):
        with lock:
            running.add(name)
            started.append(name)
            peak[0] = max(peak[0], len(running))
        time.sleep(0.05)
        with lock:
            running.discard(name)
        return (3 if name == "student" else 0), 0.05

    prepared = []
    results = execute(plan, jobs=2, threads=1, prepare_stage=prepared.append, log_dir=tmp_path, runner=runner)
    assert peak[0] == 2
    assert results["student"] == 3
    assert results["eval_student"] is None and results["tables"] is None   # blocked by the failure
    assert results["kd"] == 0 and results["eval_kd"] == 0                  # independent of it
    assert set(prepared) == set(started)
    assert started.index("teacher") < started.index("kd")


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_a_real_dvc_pipeline_runs_in_parallel_and_is_up_to_date_afterwards(tmp_path):
    """Three stages in a scratch DVC repository: after the runner, `dvc status` is clean."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}

    def sh(*argv):
        return subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, check=False)

    write = "import sys, pathlib; pathlib.Path(sys.argv[2]).write_text(pathlib.Path(sys.argv[1]).read_text() + sys.argv[3])"
    (tmp_path / "make.py").write_text(write)
    (tmp_path / "seed.txt").write_text("0")
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n"
        "  a:\n    cmd: python make.py seed.txt a.txt A\n    deps: [seed.txt, make.py]\n    outs: [a.txt]\n"
        "  b:\n    cmd: python make.py a.txt b.txt B\n    deps: [a.txt]\n    outs: [b.txt]\n"
        "  c:\n    cmd: python make.py a.txt c.txt C\n    deps: [a.txt]\n    outs: [c.txt]\n")
    assert sh("git", "init", "-q").returncode == 0
    assert sh(sys.executable, "-m", "dvc", "init", "-q").returncode == 0
    runner = [sys.executable, "-m", "reproduce.pipeline.parallel", "--jobs", "2"]
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    result = sh(*runner)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "b.txt").read_text() == "0AB" and (tmp_path / "c.txt").read_text() == "0AC"
    status = sh(sys.executable, "-m", "dvc", "status")
    assert "up to date" in status.stdout, status.stdout
    # a changed input re-runs a and everything after it; nothing is left stale
    (tmp_path / "seed.txt").write_text("1")
    assert "3 stages out of date" in sh(*runner, "--dry-run").stdout
    assert sh(*runner).returncode == 0
    assert (tmp_path / "c.txt").read_text() == "1AC"
    assert "up to date" in sh(sys.executable, "-m", "dvc", "status").stdout
