"""Writing committed outputs (tables, figures, notebooks) without ever destroying them.

Two rules, shared by the tools that render them:

* write atomically: into a temporary file beside the target, which replaces the target only
  once it is complete, so a failure, an exception or a kill leaves the committed file as it was;
* refuse, in one line on stderr, when the inputs are missing (``runs/`` is DVC-tracked, so a
  fresh clone has none) rather than overwrite a committed output with an empty one.
"""
from __future__ import annotations

import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """``with atomic_path(p) as tmp: write(tmp)``: ``tmp`` replaces ``p`` only if the block
    succeeds. ``tmp`` keeps ``p``'s suffix (matplotlib and papermill go by it) and starts with a
    dot, so globs such as ``notebooks/[0-9][0-9]_*.ipynb`` never pick it up."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, path.stat().st_mode if path.exists() else 0o644)   # mkstemp's is 0600
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def missing_paths(paths: Iterable[Path]) -> list[Path]:
    return [p for p in paths if not Path(p).exists()]


def describe_missing(missing: list[Path]) -> str:
    """``runs/x not found (and 5 more)``: the first missing input, and how many others."""
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    return f"{missing[0]} not found{more}"


def refuse(tool: str, problem: str, kept: str) -> int:
    """Print the one-line refusal and return the exit status 1. ``kept``: what was left as it was."""
    print(f"{tool}: {problem}; run `make repro` first ({kept})", file=sys.stderr)
    return 1
