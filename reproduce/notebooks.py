"""Execute the analysis notebooks headless, in place: ``python -m reproduce.notebooks``.

Uses papermill, which keeps the traceback in the executed notebook if a cell fails. The
notebooks only read pipeline outputs, so this is cheap once ``make repro`` has run.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

NOTEBOOKS = sorted(Path("notebooks").glob("[0-9][0-9]_*.ipynb"))


def execute(notebook: Path, output: Path, timeout: int = 600) -> None:
    import papermill
    papermill.execute_notebook(str(notebook), str(output), cwd=str(Path.cwd()), kernel_name="python3",
                               progress_bar=False, execution_timeout=timeout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reproduce.notebooks", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write executed copies here instead of in place")
    args = parser.parse_args(argv)
    for notebook in NOTEBOOKS:
        output = Path(args.out) / notebook.name if args.out else notebook
        output.parent.mkdir(parents=True, exist_ok=True)
        print(f"executing {notebook} -> {output}")
        execute(notebook, output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
