"""Seed-paired comparisons of two methods' APs.

Two runs with the same seed share their initialisation and data order, so most of the
seed-to-seed noise cancels in their difference: every gain we report (Table 2's ΔAP, the
ablation table's change against the Table 2 run, the claim check) is a mean of per-seed
differences, with a t-interval over them. Inputs are ``{seed: AP}`` dicts in one unit.
"""
from __future__ import annotations

import statistics

from scipy import stats


def delta_ap(treated: dict[int, float], control: dict[int, float]) -> float:
    """Mean gain of ``treated`` over ``control``, paired over the seeds both have (a one-seed
    run is compared with the control of that seed, not with the mean of all its seeds); the
    difference of means when they share none."""
    common = sorted(set(treated) & set(control))
    if common:
        return statistics.fmean(treated[s] - control[s] for s in common)
    return statistics.fmean(treated.values()) - statistics.fmean(control.values())


def confidence_interval(treated: dict[int, float], control: dict[int, float], level: float = 0.95):
    """((low, high), kind) of mean(treated) - mean(control): a paired t-interval when both have the
    same seeds, Welch's otherwise; (None, reason) below 2 seeds."""
    common = sorted(set(treated) & set(control))
    if len(common) == len(treated) == len(control) and len(common) >= 2:
        diffs = [treated[s] - control[s] for s in common]
        mean, sem, dof = statistics.fmean(diffs), statistics.stdev(diffs) / len(diffs) ** 0.5, len(diffs) - 1
        kind = "paired t"
    elif len(treated) >= 2 and len(control) >= 2:
        a, b = list(treated.values()), list(control.values())
        va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
        mean, sem = statistics.fmean(a) - statistics.fmean(b), (va + vb) ** 0.5
        dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1)) if va + vb > 0 else 1
        kind = "Welch t"
    else:
        return None, "fewer than 2 seeds"
    half = float(stats.t.ppf(0.5 + level / 2, dof)) * sem
    return (mean - half, mean + half), kind


def paired_gain(treated: dict[int, float], control: dict[int, float]):
    """(mean gain, 95% interval or None, shared seeds), both restricted to the seeds both have."""
    common = sorted(set(treated) & set(control))
    ci, _ = confidence_interval({s: treated[s] for s in common}, {s: control[s] for s in common})
    return delta_ap(treated, control), ci, common
