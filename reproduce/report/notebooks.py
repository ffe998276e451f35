"""Execute the analysis notebooks headless, in place: ``python -m reproduce.notebooks``.

Uses papermill, which keeps the traceback in the executed notebook if a cell fails. The
notebooks only read pipeline outputs, so this is cheap once ``make repro`` has run.

The committed notebooks carry their outputs (figures from the trained runs). Run in place, this
refuses when the runs they read are missing (``runs/`` is DVC-tracked, so a fresh clone has
none), and each notebook is executed into a temporary file that replaces it only once its
execution succeeded; a failed execution is kept in the temp folder for its traceback.
``--out DIR`` writes executed copies elsewhere and runs without the runs (the notebooks then
say what is missing).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from reproduce.core.config import ConfigError, load_params
from reproduce.core.outputs import atomic_path, describe_missing, missing_paths, refuse

NOTEBOOK_DIR = Path("notebooks")
#: the runs the notebooks plot for every detector (01: training curves; 02, 03: the models)
RUNS = ("teacher", "student", "clockdistill")
TOOL = "notebooks"


def find_notebooks(folder: Path = NOTEBOOK_DIR) -> list[Path]:
    """The numbered notebooks (temp files start with a dot, so they never match)."""
    return sorted(folder.glob("[0-9][0-9]_*.ipynb"))


NOTEBOOKS = find_notebooks()


def required_inputs(params: dict) -> list[Path]:
    """What the notebooks read that ``make repro`` makes and git does not hold: the val split
    (02, 03) and, per detector, each run's weights (02, 03) and training log (01)."""
    profile = params["profile"]
    paths = [Path("runs") / profile / detector / run / name
             for detector in params["detectors"] for run in RUNS for name in ("model.pth", "train_log.csv")]
    return paths + [Path(params["data"]["prepared"]) / profile / "val.json"]


def execute(notebook: Path, output: Path, timeout: int = 600) -> None:
    import papermill
    papermill.execute_notebook(str(notebook), str(output), cwd=str(Path.cwd()), kernel_name="python3",
                               progress_bar=False, execution_timeout=timeout)


def execute_in_place(notebook: Path) -> str | None:
    """Execute ``notebook`` into a temp file that replaces it on success. On failure the
    committed notebook stays as it was; returns the one-line reason, with where the failed
    execution (and its traceback) was kept."""
    kept = None
    try:
        with atomic_path(notebook) as tmp:
            try:
                execute(notebook, tmp)
            except Exception:
                kept = Path(tempfile.mkdtemp(prefix="notebooks-failed-")) / notebook.name
                shutil.copyfile(tmp, kept)
                raise
    except Exception as err:
        reason = (str(err).strip().splitlines() or [""])[0]
        where = f"; the failed execution is in {kept}" if kept else ""
        return f"{TOOL}: {notebook} failed ({type(err).__name__}: {reason}); it is left as it was{where}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reproduce.notebooks", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write executed copies here instead of in place")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    notebooks = find_notebooks()
    if args.out:
        for notebook in notebooks:
            output = Path(args.out) / notebook.name
            output.parent.mkdir(parents=True, exist_ok=True)
            print(f"executing {notebook} -> {output}")
            execute(notebook, output)
        return 0
    try:
        missing = missing_paths(required_inputs(load_params(args.params)))
    except (ConfigError, KeyError) as err:
        print(f"{TOOL}: {args.params}: {err}", file=sys.stderr)
        return 1
    if missing:
        return refuse(TOOL, describe_missing(missing), "the committed notebooks are left as they are")
    failures = []
    for notebook in notebooks:
        print(f"executing {notebook}")
        failure = execute_in_place(notebook)
        if failure:
            print(failure, file=sys.stderr)
            failures.append(notebook)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
