"""The paper's claim, measured on stored metrics: ``python -m reproduce.claim``.

For each detector (issue 5, "the claim on the default profile"):

* ΔAP = mean AP of CLoCKDistill minus mean AP of the no-KD student, over seeds, in AP points;
  its 95% confidence interval is a t-interval over the per-seed *paired* differences when
  both have the same seeds (same seed = same initialisation and data order), else Welch's;
* the claim holds for a detector when ΔAP ≥ +2.0, the interval's lower end is above 0, at
  least 3 seeds were run, and CLoCKDistill's mean AP is ≥ every baseline KD method's, compared
  on the seeds both have (baselines may have run fewer seeds);
* against the best baseline (highest mean AP), CLoCKDistill's margin gets the same paired
  interval, over the seeds both have;
* with every method at its paper-default weights (``at_paper_defaults``, once ``make
  ablations`` has stored its untuned runs), CLoCKDistill's margin over each baseline, paired
  the same way: the untuned ablation run of a method whose weight was tuned, the Table 2 run
  of one that was not.

Writes ``results/tables/claim.json`` (atomically) beside Table 2 and prints a summary; with no
stored CLoCKDistill metrics it refuses in one line and leaves the committed file as it is. The
verdict is computed, never stored by hand; tests/test_regression.py recomputes it from the
stored metrics.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from reproduce.core.config import load_params, write_json
from reproduce.core.outputs import refuse
from reproduce.report.paired import confidence_interval, delta_ap
from reproduce.report.tables import UNTUNED, load_runs

MIN_GAIN = 2.0        # AP points (issue 5)
MIN_SEEDS = 3
BASELINES = ("fitnet", "fgd", "mgd", "kd_detr", "detrdistill")


def against_baseline(clock: dict[int, float], baseline: dict[int, float], method: str) -> dict:
    """CLoCKDistill minus one baseline, paired on the seeds both have, with its 95% interval."""
    common = sorted(set(clock) & set(baseline))
    ci, kind = confidence_interval({s: clock[s] for s in common}, {s: baseline[s] for s in common})
    return {"method": method, "seeds": common, "baseline_ap": round(statistics.fmean(baseline.values()), 3),
            "clockdistill_minus_baseline": round(delta_ap(clock, baseline), 3),
            "ci95": None if ci is None else [round(ci[0], 3), round(ci[1], 3)], "ci_method": kind}


def ap_by_run(runs: list[dict]) -> dict[tuple[str, str], dict[int, float]]:
    """{(detector, method): {seed: AP x100}} of the Table 2 runs (ablations left out)."""
    by: dict[tuple[str, str], dict[int, float]] = {}
    for r in runs:
        if not r.get("ablation"):
            by.setdefault((r["detector"], r["method"]), {})[int(r["seed"])] = 100.0 * r["AP"]
    return by


def at_paper_defaults(runs: list[dict], table2: dict[tuple[str, str], dict[int, float]], detector: str) -> dict:
    """{baseline: CLoCKDistill minus it, paired} with no method tuned (``table2``: ``ap_by_run(runs)``);
    {} without the untuned CLoCKDistill runs. A method with no untuned run was never tuned: its
    Table 2 run is its default."""
    untuned: dict[str, dict[int, float]] = {}
    for r in runs:
        if r.get("ablation") == UNTUNED and r["detector"] == detector:
            untuned.setdefault(r["method"], {})[int(r["seed"])] = 100.0 * r["AP"]
    clock = untuned.get("clockdistill")
    if not clock:
        return {}
    defaults = {m: untuned.get(m) or table2.get((detector, m)) for m in BASELINES}
    return {m: against_baseline(clock, aps, m) for m, aps in defaults.items() if aps}


def evaluate_claim(runs: list[dict]) -> dict:
    by = ap_by_run(runs)
    detectors = sorted({d for d, m in by if m == "clockdistill"})
    result = {"min_gain_ap": MIN_GAIN, "min_seeds": MIN_SEEDS, "detectors": {}}
    for det in detectors:
        clock, student = by.get((det, "clockdistill"), {}), by.get((det, "student"), {})
        entry: dict = {"seeds_clockdistill": sorted(clock), "seeds_student": sorted(student)}
        if not student:
            entry.update(holds=False, reason="no student run")
            result["detectors"][det] = entry
            continue
        delta = statistics.fmean(clock.values()) - statistics.fmean(student.values())
        ci, kind = confidence_interval(clock, student)
        baselines = {m: statistics.fmean(by[(det, m)].values()) for m in BASELINES if (det, m) in by}
        clock_mean = statistics.fmean(clock.values())
        # each baseline against CLoCKDistill on the seeds both have (baselines may have fewer)
        margins = {m: delta_ap(clock, by[(det, m)]) for m in baselines}
        beaten_by = sorted(m for m, margin in margins.items() if margin < 0)
        best = max(baselines, key=baselines.get) if baselines else None
        checks = {
            "gain_at_least_min": delta >= MIN_GAIN,
            "ci_above_zero": ci is not None and ci[0] > 0,
            "enough_seeds": min(len(clock), len(student)) >= MIN_SEEDS,
            "beats_every_baseline": not beaten_by and len(baselines) == len(BASELINES),
        }
        entry.update({
            "student_ap": round(statistics.fmean(student.values()), 3),
            "clockdistill_ap": round(clock_mean, 3),
            "delta_ap": round(delta, 3),
            "ci95": None if ci is None else [round(ci[0], 3), round(ci[1], 3)],
            "ci_method": kind,
            "baseline_ap": {m: round(v, 3) for m, v in baselines.items()},
            "clockdistill_minus_baseline": {m: round(v, 3) for m, v in margins.items()},
            "baselines_missing": [m for m in BASELINES if m not in baselines],
            "baselines_above_clockdistill": beaten_by,
            "best_baseline": None if best is None else against_baseline(clock, by[(det, best)], best),
            "at_paper_defaults": at_paper_defaults(runs, by, det),
            "checks": checks,
            "holds": all(checks.values()),
        })
        result["detectors"][det] = entry
    result["holds_for_all"] = bool(result["detectors"]) and all(e["holds"] for e in result["detectors"].values())
    return result


def summary(result: dict) -> str:
    lines = []
    for det, e in result["detectors"].items():
        if "delta_ap" not in e:
            lines.append(f"{det}: {e['reason']}")
            continue
        ci = "n/a" if e["ci95"] is None else f"[{e['ci95'][0]:+.1f}, {e['ci95'][1]:+.1f}]"
        failed = [k for k, ok in e["checks"].items() if not ok]
        lines.append(f"{det}: student {e['student_ap']:.1f}, CLoCKDistill {e['clockdistill_ap']:.1f}, "
                     f"ΔAP {e['delta_ap']:+.1f} (95% CI {ci}, seeds {len(e['seeds_clockdistill'])}) -> "
                     + ("holds" if e["holds"] else "does not hold: " + ", ".join(failed)))
        if e.get("best_baseline"):
            b = e["best_baseline"]
            bci = "n/a" if b["ci95"] is None else f"[{b['ci95'][0]:+.1f}, {b['ci95'][1]:+.1f}]"
            lines.append(f"  vs the best baseline, {b['method']} ({b['baseline_ap']:.1f}): "
                         f"{b['clockdistill_minus_baseline']:+.1f} (95% CI {bci}, seeds {len(b['seeds'])})")
        if e.get("at_paper_defaults"):
            lines.append("  at paper defaults, CLoCKDistill minus: " + ", ".join(
                f"{m} {b['clockdistill_minus_baseline']:+.1f}"
                + ("" if b["ci95"] is None else f" [{b['ci95'][0]:+.1f}, {b['ci95'][1]:+.1f}]")
                for m, b in e["at_paper_defaults"].items()))
    return "\n".join(lines) or "(no CLoCKDistill runs stored)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reproduce.claim", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", help="default: params.yaml's profile")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--results", type=Path, default=Path("results"))
    args = parser.parse_args(argv)
    profile = args.profile or load_params(args.params)["profile"]
    result = evaluate_claim(load_runs(args.results / profile))
    out = args.results / "tables" / "claim.json"
    if not result["detectors"]:     # a verdict on nothing would replace the committed one
        return refuse("claim", f"no stored CLoCKDistill metrics in {args.results / profile}/<detector>/"
                      "clockdistill-s*.json", f"the committed {out} is left as it is")
    write_json(out, result)
    print(summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
