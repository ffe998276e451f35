"""The analysis notebooks execute headless (they read pipeline outputs, or say they are missing)."""
from __future__ import annotations

from pathlib import Path

import pytest

from reproduce.report.notebooks import NOTEBOOKS, execute


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(notebook: Path, tmp_path):
    execute(notebook, tmp_path / notebook.name, timeout=300)
    assert (tmp_path / notebook.name).stat().st_size > 0


# ------------------------------------------------------------------ committed notebooks are kept

REPO = Path(__file__).resolve().parents[1]


def fresh_clone(tmp_path: Path) -> Path:
    """What a clone has: params.yaml and the committed notebooks, but no runs/ or data/ (DVC)."""
    import shutil
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(REPO / "notebooks", tmp_path / "notebooks")
    return tmp_path


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_without_runs_refuses_in_one_line_and_keeps_the_notebooks(tmp_path):
    """``make notebooks`` on a fresh clone used to overwrite the committed notebooks (10
    figures -> 1, "trained runs not found"); now it refuses and changes nothing."""
    import os
    import subprocess
    import sys
    clone = fresh_clone(tmp_path)
    before = snapshot(clone / "notebooks")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "reproduce.notebooks"], cwd=clone, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        "notebooks: runs/mini/dab_detr/teacher/model.pth not found (and 18 more); run `make repro` first "
        "(the committed notebooks are left as they are)"]
    assert proc.stdout == ""
    assert snapshot(clone / "notebooks") == before          # byte-identical, no temp files left


def with_fake_runs(clone: Path) -> Path:
    from reproduce.core.config import load_params
    from reproduce.report.notebooks import required_inputs
    for path in required_inputs(load_params(clone / "params.yaml")):
        (clone / path).parent.mkdir(parents=True, exist_ok=True)
        (clone / path).write_text("stand-in")
    return clone


def test_failed_execution_leaves_the_committed_notebook(tmp_path, monkeypatch, capsys):
    """The notebook is executed into a temp file; a failure half-way never reaches the committed one."""
    from reproduce.report import notebooks
    clone = with_fake_runs(fresh_clone(tmp_path))
    monkeypatch.chdir(clone)
    before = snapshot(clone / "notebooks")

    def failing(notebook, output, timeout=600):
        Path(output).write_text('{"cells": [], "half": "written"}')
        raise RuntimeError("cell 3 raised\nTraceback ...")

    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))          # where the failed execution is kept
    monkeypatch.setattr(notebooks, "execute", failing)
    assert notebooks.main([]) == 1
    assert snapshot(clone / "notebooks") == before
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == len(before)
    assert errors[0].startswith("notebooks: notebooks/01_results.ipynb failed (RuntimeError: cell 3 raised); "
                                "it is left as it was; the failed execution is in ")
    kept = Path(errors[0].rsplit(" ", 1)[1])
    assert kept.parent.parent == tmp_path and kept.read_text() == '{"cells": [], "half": "written"}'


def test_successful_execution_replaces_the_notebook(tmp_path, monkeypatch):
    from reproduce.report import notebooks
    clone = with_fake_runs(fresh_clone(tmp_path))
    monkeypatch.chdir(clone)
    monkeypatch.setattr(notebooks, "execute", lambda nb, out, timeout=600: Path(out).write_text(f"executed {nb.name}"))
    assert notebooks.main([]) == 0
    after = snapshot(clone / "notebooks")
    assert after == {name: f"executed {name}".encode() for name in after} and len(after) == 3
