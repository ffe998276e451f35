"""Regression checks against stored results produced by the code itself."""
from __future__ import annotations

import json

import pytest

from reproduce.regression import STORED, short_run

STORED_RUNS = json.loads(STORED.read_text())


@pytest.mark.parametrize("detector", sorted(STORED_RUNS["results"]))
def test_short_run_reproduces_stored_ap(detector):
    stored = STORED_RUNS["results"][detector]
    now = short_run(detector, seed=stored["seed"])
    tol = STORED_RUNS["tolerance_AP"]
    assert abs(now["AP"] - stored["AP"]) <= tol, f"{detector}: AP {now['AP']} vs stored {stored['AP']} (tol {tol})"
    assert abs(now["AP50"] - stored["AP50"]) <= 2 * tol
