"""The documentation lives in the repository and covers every reconstructed choice."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

from distill.clockdistill import DEFAULTS

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE = re.compile(r"\.\./shared/reference|\b(DESIGN|PAPER|ANCHORS|FEASIBILITY)\.md\b")


def tracked_text_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split()
    return [ROOT / p for p in out if p.endswith((".py", ".md", ".yaml", ".ipynb")) and (ROOT / p).is_file()]


def test_no_file_points_at_documents_outside_the_repository():
    offenders = [str(p.relative_to(ROOT)) for p in tracked_text_files()
                 if p.name != "test_docs.py" and OUTSIDE.search(p.read_text(errors="replace"))]
    assert not offenders, f"these files cite documents users do not have: {offenders}"


def test_every_clockdistill_option_has_a_graded_row():
    table = (ROOT / "docs" / "trust-grades.md").read_text()
    missing = [key for key in DEFAULTS if key != "seed" and f"`{key}`" not in table]
    assert not missing, f"docs/trust-grades.md lacks rows for {missing}"
