"""Experiments beyond the one-seed pipeline: ``python -m reproduce.experiments seeds|ablations|runs``.

``dvc repro`` trains every run once, with ``params.yaml``'s ``seed``. This driver runs the
rest of what Table 2 and the ablation table need, each run as the same two commands a DVC
stage runs (``reproduce.training.train``, then ``reproduce.evaluation.evaluate``), and writes its metrics next to
the pipeline's, under ``results/<profile>/<detector>/``:

* ``seeds``: the student and every method of ``params.yaml``'s ``methods`` (``--runs`` for
  fewer) for every seed in ``params.yaml``'s ``seeds`` other than the pipeline's, so that every
  row of Table 2 shows mean ± std over the same seeds;
* ``ablations``: CLoCKDistill variants (L_lcmd only, L_tcld only, location mask off,
  backbone-feature distillation) and, for every method whose tuned ``kd_weight`` differs from
  its code default, that method at its untuned default, for ``--seeds`` (default:
  ``params.yaml``'s ``ablation_seeds``), tagged ``ablation`` in their metrics so ``reproduce.report.tables`` puts
  them in the ablation table;
* ``runs``: any list of runs and seeds, e.g. the pipeline's own runs two at a time;
A run whose metrics file exists is skipped, and an interrupted training resumes from its
checkpoint, so the driver can be stopped and started again. ``--jobs N`` runs N trainings at
once with one torch thread each (on 2 cores, 2 jobs give about 1.4x the throughput of one
2-thread job). Wall time of every job goes to ``results/<profile>/timings.csv``.
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from reproduce.core.config import load_params
from reproduce.report.tables import UNTUNED
from reproduce.training.runconfig import distill_options, method_defaults

#: CLoCKDistill variants of the ablation table (distill.clockdistill overrides)
#: ("both" is Table 2's CLoCKDistill run itself: reproduce.report.tables reuses it, nothing is rerun)
ABLATIONS: dict[str, dict[str, str]] = {
    "lcmd_only": {"tcld": "false"},
    "tcld_only": {"lcmd": "false"},
    "no_location_mask": {"location_mask": "false"},
    "backbone_features": {"feature_source": "backbone"},
}


def untuned_overrides(params: dict, profile: str) -> dict[str, list[str]]:
    """{method: overrides restoring its code-default ``kd_weight``} for every method whose
    resolved ``kd_weight`` (params + profile) was tuned away from it. A method still at its
    default has no untuned run: its Table 2 run is already the untuned one."""
    prof = (params.get("profiles") or {}).get(profile) or {}
    out = {}
    for method in params["methods"]:
        default = method_defaults(method).get("kd_weight", 1.0)
        if float(distill_options(params, prof, method).get("kd_weight", default)) != float(default):
            out[method] = [f"distill.{method}.kd_weight={default}"]
    return out


@dataclass
class Job:
    detector: str
    run: str                      # teacher, student or a distillation method
    seed: int
    run_dir: Path
    metrics: Path
    overrides: list[str] = field(default_factory=list)
    ablation: str | None = None

    @property
    def name(self) -> str:
        return f"{self.detector}/{self.metrics.stem}"


def run_dir(runs: Path, profile: str, detector: str, run: str, seed: int, default_seed: int) -> Path:
    """The pipeline's own directory for the default seed (so a DVC stage finds it), else -s<seed>."""
    base = runs / profile / detector
    return base / run if seed == default_seed else base / f"{run}-s{seed}"


def plan(params: dict, command: str, detectors: list[str], runs: list[str], seeds: list[int],
         runs_root: Path, results_root: Path) -> list[Job]:
    profile, default_seed = params["profile"], int(params["seed"])
    jobs = []
    if command == "ablations":
        # (file stem, method, overrides, tag): CLoCKDistill's variants, then the untuned methods
        variants = [(f"ablation-{tag}", "clockdistill", [f"distill.clockdistill.{k}={v}" for k, v in options.items()], tag)
                    for tag, options in ABLATIONS.items()]
        variants += [(f"ablation-{UNTUNED}-{method}", method, overrides, UNTUNED)
                     for method, overrides in untuned_overrides(params, profile).items()]
        for detector in detectors:
            for seed in seeds:
                for stem, method, overrides, tag in variants:
                    jobs.append(Job(detector, method, seed, runs_root / profile / detector / f"{stem}-s{seed}",
                                    results_root / profile / detector / f"{stem}-s{seed}.json", overrides, tag))
        return jobs
    for detector in detectors:
        for seed in seeds:
            for run in runs:
                if run == "teacher" and seed != default_seed:
                    continue          # one teacher per detector, shared by every seed's KD runs
                jobs.append(Job(detector, run, seed,
                                run_dir(runs_root, profile, detector, run, seed, default_seed),
                                results_root / profile / detector / f"{run}-s{seed}.json"))
    return jobs


def commands(job: Job, profile: str, runs_root: Path) -> list[list[str]]:
    """``reproduce.training.train`` then ``reproduce.evaluation.evaluate``: for the default seed, dvc.yaml's own
    stage commands (tests/test_experiments.py checks that they agree)."""
    py = sys.executable
    train = [py, "-m", "reproduce.train", "--detector", job.detector, "--profile", profile,
             "--seed", str(job.seed), "--out", str(job.run_dir)]
    train += ["--no-progress"]
    if job.run == "teacher":
        train += ["--role", "teacher"]
    else:
        train += ["--role", "student", "--method", job.run]
    teacher = runs_root / profile / job.detector / "teacher" / "model.pth"
    cache = runs_root / profile / job.detector / "teacher_cache.pt"
    if job.run not in ("teacher", "student"):
        train += ["--teacher", str(teacher), "--teacher-cache", str(cache)]
    for item in job.overrides:
        train += ["-S", item]
    evaluate = [py, "-m", "reproduce.evaluate", "--checkpoint", str(job.run_dir / "model.pth"),
                "--detector", job.detector, "--profile", profile, "--out", str(job.metrics)]
    if job.ablation:
        evaluate += ["--ablation", job.ablation]
    if job.run == "teacher":
        # what the teacher_cache stage does: the KD runs that follow read it
        return [train, evaluate, [py, "-m", "reproduce.teacher_cache", "--detector", job.detector, "--profile",
                                  profile, "--teacher", str(teacher), "--out", str(cache), "--no-progress"]]
    return [train, evaluate]


def execute(job: Job, profile: str, runs_root: Path, threads: int) -> tuple[Job, float, int]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    job.run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rc = 0
    with (job.run_dir / "driver.log").open("a") as log:
        for cmd in commands(job, profile, runs_root):
            log.write("$ " + " ".join(cmd) + "\n")
            log.flush()
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, check=False).returncode
            if rc != 0:
                break
    return job, time.perf_counter() - start, rc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reproduce.experiments", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("seeds", "ablations", "runs"))
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--profile")
    parser.add_argument("--detectors", help="comma-separated (default: params detectors)")
    parser.add_argument("--runs", help="comma-separated runs (seeds default: student and every method; ablations: all variants)")
    parser.add_argument("--seeds", help="comma-separated (seeds: params seeds except seed; ablations: params "
                        "ablation_seeds; runs: params seed)")
    parser.add_argument("--jobs", type=int, default=2, help="trainings at once (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per job (default: cores / jobs)")
    parser.add_argument("--runs-root", type=Path, default=Path("runs"))
    parser.add_argument("--results-root", type=Path, default=Path("results"))
    parser.add_argument("--dry-run", action="store_true", help="print the plan only")
    args = parser.parse_args(argv)

    params = load_params(args.params)
    if args.profile:
        params["profile"] = args.profile
    profile = params["profile"]
    detectors = args.detectors.split(",") if args.detectors else list(params["detectors"])
    default_seed = int(params["seed"])
    if args.seeds:
        seeds = [int(s) for s in args.seeds.split(",")]
    elif args.command == "seeds":
        seeds = [int(s) for s in params["seeds"] if int(s) != default_seed]
    elif args.command == "ablations":
        seeds = [int(s) for s in params["ablation_seeds"]]
    else:          # runs: the pipeline's seed unless --seeds says otherwise
        seeds = [default_seed]
    # seeds: every method, so each Table 2 row has the same seeds as the student it is paired with
    runs = args.runs.split(",") if args.runs else (["teacher", "student", *params["methods"]] if args.command == "runs"
                                                   else ["student", *params["methods"]])
    unknown = set(runs) - {"teacher", "student", *params["methods"]}
    if unknown:
        parser.error(f"unknown runs {sorted(unknown)}; choose from teacher, student, {', '.join(params['methods'])}")
    jobs = plan(params, args.command, detectors, runs, seeds, args.runs_root, args.results_root)
    todo = [j for j in jobs if not j.metrics.exists()]
    print(f"{len(jobs)} runs, {len(jobs) - len(todo)} already have metrics, {len(todo)} to run")
    for job in todo:
        print("  " + job.name)
    if args.dry_run or not todo:
        return 0
    # teachers first: every KD run of a detector needs its teacher's model.pth
    missing = [j for j in todo if j.run not in ("teacher", "student")
               and not (args.runs_root / profile / j.detector / "teacher" / "model.pth").exists()
               and not any(t.run == "teacher" and t.detector == j.detector for t in todo)]
    if missing:
        parser.error(f"no teacher for {sorted({j.detector for j in missing})}: run `dvc repro teacher@<detector>` "
                     "or `python -m reproduce.experiments runs --runs teacher` first")
    threads = args.threads or max(1, (os.cpu_count() or 2) // args.jobs)
    timings = args.results_root / profile / "timings.csv"
    timings.parent.mkdir(parents=True, exist_ok=True)
    # a KD run waits for its own detector's teacher only, so the other job slots stay busy:
    # teachers first, then students, then KD runs whose teacher is ready, then the rest
    teacher_ready = {d: threading.Event() for d in detectors}
    pending = {j.detector for j in todo if j.run == "teacher"}
    for d in set(detectors) - pending:
        teacher_ready[d].set()
    rank = {"teacher": 0, "student": 1}
    todo.sort(key=lambda j: (rank.get(j.run, 2), j.detector in pending))
    lock = threading.Lock()
    failed = 0

    def work(job: Job) -> None:
        nonlocal failed
        if job.run not in ("teacher", "student"):
            teacher_ready[job.detector].wait()
        job, seconds, rc = execute(job, profile, args.runs_root, threads)
        if job.run == "teacher":
            teacher_ready[job.detector].set()
        status = "ok" if rc == 0 else f"FAILED (rc {rc}, see {job.run_dir / 'driver.log'})"
        with lock:
            print(f"{job.name}: {seconds:.0f} s {status}", flush=True)
            failed += rc != 0
            new = not timings.exists()
            with timings.open("a", newline="") as f:
                writer = csv.writer(f)
                if new:
                    writer.writerow(["detector", "run", "seed", "ablation", "jobs", "threads", "wall_s", "rc"])
                writer.writerow([job.detector, job.run, job.seed, job.ablation or "", args.jobs, threads,
                                 f"{seconds:.1f}", rc])

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(work, todo))
    if failed:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
