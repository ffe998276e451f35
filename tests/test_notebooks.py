"""The analysis notebooks execute headless (they read pipeline outputs, or say they are missing)."""
from __future__ import annotations

from pathlib import Path

import pytest

from reproduce.notebooks import NOTEBOOKS, execute


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(notebook: Path, tmp_path):
    execute(notebook, tmp_path / notebook.name, timeout=300)
    assert (tmp_path / notebook.name).stat().st_size > 0
