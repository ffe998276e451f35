"""The seeds/ablations driver plans the right runs, and the claim check computes what it says."""
from __future__ import annotations

from pathlib import Path

import pytest
from scipy import stats

from reproduce.report.claim import BASELINES, evaluate_claim
from reproduce.report.paired import confidence_interval
from reproduce.pipeline.experiments import ABLATIONS, UNTUNED, commands, plan
from reproduce.report.tables import ABLATION_ORDER, build_rows, split_runs

PARAMS = {"profile": "mini", "seed": 0, "seeds": [0, 1, 2], "methods": list(BASELINES) + ["clockdistill"]}


def test_plan_uses_the_pipeline_dirs_for_the_default_seed_and_one_teacher():
    jobs = plan(PARAMS, "runs", ["dino"], ["teacher", "student", "clockdistill"], [0, 1], Path("runs"), Path("results"))
    names = [(j.run, j.seed, str(j.run_dir), str(j.metrics)) for j in jobs]
    assert ("teacher", 0, "runs/mini/dino/teacher", "results/mini/dino/teacher-s0.json") in names
    assert not any(run == "teacher" and seed == 1 for run, seed, *_ in names)
    assert ("student", 0, "runs/mini/dino/student", "results/mini/dino/student-s0.json") in names
    assert ("clockdistill", 1, "runs/mini/dino/clockdistill-s1", "results/mini/dino/clockdistill-s1.json") in names


def test_ablation_jobs_override_clockdistill_and_tag_their_metrics():
    jobs = plan(PARAMS, "ablations", ["dino"], [], [0], Path("runs"), Path("results"))
    assert {j.ablation for j in jobs} == set(ABLATIONS)
    job = next(j for j in jobs if j.ablation == "lcmd_only")
    train, evaluate, *cache = commands(job, "mini", Path("runs"))
    assert train[train.index("--method") + 1] == "clockdistill"
    assert train[train.index("--teacher") + 1] == "runs/mini/dino/teacher/model.pth"
    assert "distill.clockdistill.tcld=false" in train
    assert evaluate[evaluate.index("--ablation") + 1] == "lcmd_only"


def test_tuned_methods_get_an_untuned_ablation_run_at_their_code_default():
    params = {**PARAMS, "profiles": {"mini": {"distill": {"fgd": {"kd_weight": 3.0}, "mgd": {"kd_weight": 1.0}}}}}
    jobs = plan(params, "ablations", ["dino"], [], [0], Path("runs"), Path("results"))
    untuned = [j for j in jobs if j.ablation == UNTUNED]
    assert [j.run for j in untuned] == ["fgd"]          # mgd is still at its default: no extra run
    train, evaluate, *_ = commands(untuned[0], "mini", Path("runs"))
    assert "distill.fgd.kd_weight=1.0" in train and train[train.index("--method") + 1] == "fgd"
    assert str(untuned[0].metrics) == "results/mini/dino/ablation-untuned-fgd-s0.json"
    _, rows = split_runs([{"detector": "dino", "method": "fgd", "ablation": UNTUNED, "seed": 0, "AP": 0.1}])
    assert [r["variant"] for r in rows] == ["fgd: untuned"]


def test_paired_interval_matches_scipy():
    treated, control = {0: 5.0, 1: 6.5, 2: 4.0}, {0: 2.0, 1: 2.5, 2: 2.2}
    (low, high), kind = confidence_interval(treated, control)
    diffs = [3.0, 4.0, 1.8]
    ref = stats.t.interval(0.95, 2, loc=sum(diffs) / 3, scale=stats.sem(diffs))
    assert kind == "paired t" and low == pytest.approx(ref[0]) and high == pytest.approx(ref[1])


def _runs(det, method, aps):
    return [{"detector": det, "method": method, "seed": s, "AP": ap} for s, ap in enumerate(aps)]


def test_claim_holds_only_with_gain_interval_seeds_and_every_baseline():
    runs = _runs("dino", "student", [0.10, 0.11, 0.12]) + _runs("dino", "clockdistill", [0.13, 0.14, 0.145])
    for m in BASELINES:
        runs += _runs("dino", m, [0.11])
    result = evaluate_claim(runs)["detectors"]["dino"]
    assert result["holds"] and result["delta_ap"] == pytest.approx(41.5 / 3 - 11, abs=1e-3)
    # one baseline above CLoCKDistill breaks it
    worse = evaluate_claim(runs + _runs("dino", "fgd", [0.2, 0.2, 0.2])[1:])["detectors"]["dino"]
    assert not worse["holds"] and worse["baselines_above_clockdistill"] == ["fgd"]
    # too small a gain breaks it
    small = [dict(r, AP=r["AP"] - 0.01) if r["method"] == "clockdistill" else r for r in runs]
    assert not evaluate_claim(small)["detectors"]["dino"]["checks"]["gain_at_least_min"]
    # the best baseline's margin is paired on the seeds both have, with its interval
    best = worse["best_baseline"]
    assert best["method"] == "fgd" and best["seeds"] == [0, 1, 2] and best["ci_method"] == "paired t"
    assert best["clockdistill_minus_baseline"] == pytest.approx(100 * (0.13 + 0.14 + 0.145) / 3 - 100 * (0.11 + 0.2 + 0.2) / 3, abs=1e-3)
    (low, high), _ = confidence_interval({0: 13.0, 1: 14.0, 2: 14.5}, {0: 11.0, 1: 20.0, 2: 20.0})
    assert best["ci95"] == [round(low, 3), round(high, 3)]
    # two seeds are not enough
    two = [r for r in runs if r["seed"] < 2]
    assert not evaluate_claim(two)["detectors"]["dino"]["checks"]["enough_seeds"]


def _flags(cmd: list[str]) -> dict:
    """A command line as {module or flag: value}, order-free (`python` vs sys.executable aside)."""
    tokens = cmd[1:]
    out, i = {}, 0
    while i < len(tokens):
        if i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            out[tokens[i]] = tokens[i + 1]
            i += 2
        else:
            out[tokens[i]] = True
            i += 1
    return out


def _dvc_cmd(stage: dict, **values) -> list[str]:
    cmd = stage.get("do", stage)["cmd"]
    for key, value in values.items():
        cmd = cmd.replace("${" + key + "}", str(value))
    assert "${" not in cmd, cmd
    return cmd.split()


@pytest.mark.parametrize("run", ["teacher", "student", "clockdistill"])
def test_default_seed_runs_use_exactly_the_dvc_stage_commands(run):
    """A `runs` job for the pipeline's seed writes into the pipeline's own folders: it must run
    the very commands dvc.yaml declares (the stage adds only `--resume unfinished`)."""
    import yaml
    stages = yaml.safe_load((Path(__file__).parents[1] / "dvc.yaml").read_text())["stages"]
    job = plan(PARAMS, "runs", ["dino"], [run], [0], Path("runs"), Path("results"))[0]
    train, evaluate, *cache = commands(job, "mini", Path("runs"))
    values = {"profile": "mini", "seed": 0}
    if run in ("teacher", "student"):
        expected_train = _dvc_cmd(stages[run], item="dino", **values)
    else:
        expected_train = _dvc_cmd(stages["distill"], **{"item.detector": "dino", "item.method": run}, **values)
    expected_eval = _dvc_cmd(stages["evaluate"], **{"item.detector": "dino", "item.run": run}, **values)
    expected_train = _flags(expected_train)
    assert expected_train.pop("--resume") == "unfinished"
    assert _flags(train) == expected_train
    assert _flags(evaluate) == _flags(expected_eval)
    if run == "teacher":       # then the teacher_cache stage's command
        assert _flags(cache[0]) == _flags(_dvc_cmd(stages["teacher_cache"], item="dino", **values))


def test_seeds_runs_the_student_and_every_method_by_default(capsys, tmp_path):
    from reproduce.pipeline.experiments import main
    assert main(["seeds", "--detectors", "dino", "--dry-run", "--results-root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for run in ["student", *BASELINES, "clockdistill"]:
        assert f"dino/{run}-s1" in out, out
    assert "teacher" not in out


def test_ablations_run_params_ablation_seeds_by_default(capsys, tmp_path):
    from reproduce.core.config import load_params
    from reproduce.pipeline.experiments import main
    assert main(["ablations", "--detectors", "dino", "--dry-run", "--results-root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    seeds = load_params("params.yaml")["ablation_seeds"]
    assert len(seeds) >= 3
    for seed in seeds:
        assert f"dino/ablation-lcmd_only-s{seed}" in out, out
    assert f"-s{max(seeds) + 1}" not in out


def test_ablation_rows_pair_each_variant_with_the_table2_run_it_varies():
    runs = (_runs("dino", "student", [0.10, 0.11, 0.12]) + _runs("dino", "clockdistill", [0.13, 0.14, 0.15])
            + _runs("dino", "fgd", [0.20, 0.22, 0.21]))
    runs += [dict(r, ablation="lcmd_only", AP=r["AP"] - 0.02) for r in _runs("dino", "clockdistill", [0.13, 0.14])]
    runs += [dict(r, ablation=UNTUNED, AP=r["AP"] - 0.05) for r in _runs("dino", "fgd", [0.20, 0.22, 0.21])]
    main, ablation = split_runs(runs)
    rows = {r["variant"]: r for r in build_rows(ablation, {}, ABLATION_ORDER, key="variant", students=main)}
    assert rows["both"]["vs Table 2 run"] == "—" and rows["both"]["ΔAP"] == "+3.0"
    # lcmd_only ran seeds 0 and 1 only: paired with CLoCKDistill (and the student) on those two
    assert rows["lcmd_only"]["vs Table 2 run"] == "-2.0" and rows["lcmd_only"]["ΔAP"] == "+1.0"
    # the untuned FGD row is compared with the tuned FGD run, not with CLoCKDistill
    assert rows["fgd: untuned"]["vs Table 2 run"] == "-5.0"
    (low, high), _ = confidence_interval({0: 15.0, 1: 17.0, 2: 16.0}, {0: 10.0, 1: 11.0, 2: 12.0})
    assert rows["fgd: untuned"]["ΔAP 95% CI"] == f"[{low:+.1f}, {high:+.1f}]"


def test_claim_at_paper_defaults_compares_untuned_runs():
    from reproduce.report.claim import ap_by_run, at_paper_defaults
    runs = _runs("dino", "clockdistill", [0.13, 0.14, 0.15]) + _runs("dino", "fgd", [0.20, 0.22, 0.21])
    runs += _runs("dino", "mgd", [0.30, 0.30, 0.30])
    runs += [dict(r, ablation=UNTUNED) for r in _runs("dino", "clockdistill", [0.10, 0.12, 0.11])]
    assert at_paper_defaults(runs, ap_by_run(runs), "dino")["mgd"]["clockdistill_minus_baseline"] == pytest.approx(-19.0)
    runs += [dict(r, ablation=UNTUNED) for r in _runs("dino", "fgd", [0.15, 0.16, 0.17])]
    result = at_paper_defaults(runs, ap_by_run(runs), "dino")
    # FGD at its default (the untuned run), not the tuned Table 2 run; MGD never tuned: its Table 2 run
    assert result["fgd"]["clockdistill_minus_baseline"] == pytest.approx(-5.0)
    assert result["mgd"]["seeds"] == [0, 1, 2] and sorted(result) == ["fgd", "mgd"]
    others = [r for r in runs if r["method"] != "clockdistill"]
    assert at_paper_defaults(others, ap_by_run(others), "dino") == {}
