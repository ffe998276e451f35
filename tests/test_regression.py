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


# --- stored pipeline results: tables and claim agree with the stored metrics -----------------
from pathlib import Path  # noqa: E402

from reproduce.claim import evaluate_claim  # noqa: E402
from reproduce.tables import ABLATION_ORDER, MAIN_ORDER, build_rows, load_runs, split_runs, to_csv  # noqa: E402

RESULTS = Path("results")
PROFILE = "mini"
STORED_METRICS = load_runs(RESULTS / PROFILE)
needs_results = pytest.mark.skipif(not STORED_METRICS, reason=f"no stored metrics under results/{PROFILE}")


@needs_results
def test_table2_agrees_with_stored_metrics():
    import yaml
    reported = yaml.safe_load((RESULTS / "paper" / "reported.yaml").read_text())
    main, ablation = split_runs(STORED_METRICS)
    expected = to_csv(build_rows(main, reported, MAIN_ORDER))
    assert (RESULTS / "tables" / "table2.csv").read_text() == expected, "run `make table2`"
    expected = to_csv(build_rows(ablation, reported, ABLATION_ORDER, key="variant", students=main))
    assert (RESULTS / "tables" / "ablation.csv").read_text() == expected, "run `make table2`"


@needs_results
def test_stored_claim_agrees_with_stored_metrics():
    stored = json.loads((RESULTS / "tables" / "claim.json").read_text())
    assert stored == json.loads(json.dumps(evaluate_claim(STORED_METRICS))), "run `make table2`"


@needs_results
def test_every_stored_metric_is_from_the_profile_and_test_split():
    for run in STORED_METRICS:
        assert run["profile"] == PROFILE, run["_path"]
        assert run["split"] == "test", f"{run['_path']}: Table 2 reports the test split (tuning used val)"


# The claim, as measured on the stored default-profile results (README, "Reproduction"). What
# holds: CLoCKDistill beats the no-KD student with a 95% CI above 0 over >= 3 seeds, for all
# three detectors, and is >= every (untuned) baseline on DAB-DETR. What does not: the +2.0 bar for
# DAB-DETR (+0.5 on a 0.2-AP student) and DINO, and CLoCKDistill >= every baseline on Deformable
# DETR and DINO. A change either way must be a deliberate update.
MEASURED_FAILING_CHECKS = {
    "dab_detr": ["gain_at_least_min"],
    "deformable_detr": ["beats_every_baseline"],
    "dino": ["beats_every_baseline", "gain_at_least_min"],
}


@needs_results
@pytest.mark.parametrize("detector", sorted(MEASURED_FAILING_CHECKS))
def test_claim_on_the_default_profile_is_as_reported(detector):
    entry = evaluate_claim(STORED_METRICS)["detectors"][detector]
    assert entry["delta_ap"] > 0 and entry["ci95"][0] > 0, entry
    assert entry["checks"]["enough_seeds"] and entry["checks"]["ci_above_zero"]
    assert sorted(k for k, ok in entry["checks"].items() if not ok) == MEASURED_FAILING_CHECKS[detector]
