"""Val-split probes and sweeps: ``python -m reproduce.tuning --name NAME ...``.

Every choice of the mini regime (schedules, model sizes, KD weights) is made on the **val**
split from runs this driver trains and evaluates with the pipeline's own two commands. A probe
is a grid of detectors x runs x steps x seeds x sweep values, all under the same ``-S``
overrides; its metrics, the wall time of each run and the command line that made it go to
``results/tuning/<NAME>.json``, so each number in params.yaml's comments can be re-made.
Where a probe trains KD methods beside the student, the record also gives each method's
seed-paired gain over the student (``gains_over_student``), the same statistic as Table 2.
Runs whose metrics exist are skipped, so an interrupted probe continues where it stopped.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from reproduce.core.config import load_params
from reproduce.report.paired import paired_gain


@dataclass
class Probe:
    detector: str
    run: str                       # teacher, student or a distillation method
    steps: int | None              # None: the profile's schedule
    seed: int
    sweep: tuple[str, str] | None  # (dotted key, value) of a sweep point
    overrides: list[str] = field(default_factory=list)

    @property
    def tag(self) -> str:
        parts = [self.detector, self.run, f"{self.steps or 'default'}steps", f"s{self.seed}"]
        if self.sweep:
            parts.append(f"{self.sweep[0].rsplit('.', 1)[-1]}{self.sweep[1]}")
        return "-".join(parts)

    def all_overrides(self) -> list[str]:
        extra = [f"{self.sweep[0]}={self.sweep[1]}"] if self.sweep else []
        role_steps = "teacher_steps" if self.run == "teacher" else "steps"
        steps = [f"train.{role_steps}={self.steps}"] if self.steps else []
        return [*self.overrides, *steps, *extra]


def commands(probe: Probe, profile: str, run_dir: Path, metrics: Path, split: str,
             teacher: Path | None, teacher_cache: Path | None = None) -> list[list[str]]:
    py = sys.executable
    role = ["--role", "teacher"] if probe.run == "teacher" else ["--role", "student", "--method", probe.run]
    train = [py, "-m", "reproduce.train", "--detector", probe.detector, *role, "--profile", profile,
             "--seed", str(probe.seed), "--out", str(run_dir), "--resume", "unfinished", "--no-progress"]
    if teacher is not None:
        train += ["--teacher", str(teacher)]
    if teacher is not None and teacher_cache is not None:
        train += ["--teacher-cache", str(teacher_cache)]
    for item in probe.all_overrides():
        train += ["-S", item]
    evaluate = [py, "-m", "reproduce.evaluate", "--checkpoint", str(run_dir / "model.pth"),
                "--detector", probe.detector, "--profile", profile, "--split", split, "--out", str(metrics)]
    return [train, evaluate]


def execute(cmds: list[list[str]], log_path: Path, threads: int) -> tuple[float, int]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start, rc = time.perf_counter(), 0
    with log_path.open("a") as log:
        for cmd in cmds:
            log.write("$ " + shlex.join(cmd) + "\n")
            log.flush()
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, check=False).returncode
            if rc:
                break
    return time.perf_counter() - start, rc


def summary_row(probe: Probe, metrics: Path, wall_s: float | None) -> dict:
    with metrics.open() as f:
        m = json.load(f)
    bbox = m.get("bbox", m)
    row = {"detector": probe.detector, "run": probe.run, "steps": probe.steps, "seed": probe.seed,
           "overrides": probe.all_overrides(), "AP": bbox.get("AP"), "AP50": bbox.get("AP50")}
    if probe.sweep:
        row["sweep"] = {probe.sweep[0]: probe.sweep[1]}
    if wall_s is not None:
        row["wall_s"] = round(wall_s, 1)
    return row


def gains_over_student(rows: list[dict]) -> list[dict]:
    """Each KD method's val AP gain over the student of the same detector, steps and sweep
    point, paired by seed (mean and 95% t-interval over the shared seeds; None below 2)."""
    groups: dict[tuple, dict[str, dict[int, float]]] = {}
    for r in rows:
        key = (r["detector"], r["steps"], json.dumps(r.get("sweep"), sort_keys=True))
        groups.setdefault(key, {}).setdefault(r["run"], {})[r["seed"]] = r["AP"]
    gains = []
    for (detector, steps, sweep), by_run in groups.items():
        student = by_run.get("student")
        for run, aps in by_run.items():
            if run in ("student", "teacher") or not student or not set(aps) & set(student):
                continue
            gain, ci, seeds = paired_gain(aps, student)
            gains.append({"detector": detector, "run": run, "steps": steps, "sweep": json.loads(sweep),
                          "seeds": seeds, "delta_ap": gain, "ci95": list(ci) if ci else None})
    return gains


def best_sweep_values(rows: list[dict], param: str, default: float, resolution: float = 1e-3) -> dict[str, float]:
    """Per run, the swept value of ``param`` (the last part of the sweep key, e.g. ``kd_weight``)
    with the best mean AP over seeds.

    Means equal at ``resolution`` (0.1 AP x100, the tables' printed precision) are a tie, and a
    tie goes to the value nearest ``default`` on a log scale: a sweep moves a method away from its
    paper default only for a gain the tables can show.
    """
    aps: dict[tuple[str, float], list[float]] = {}
    for r in rows:
        for key, value in (r.get("sweep") or {}).items():
            if key.rsplit(".", 1)[-1] == param:
                aps.setdefault((r["run"], float(value)), []).append(r["AP"])
    best: dict[str, tuple] = {}
    for (run, value), run_aps in aps.items():
        rank = (round(sum(run_aps) / len(run_aps) / resolution), -abs(math.log(value / default)))
        if run not in best or rank > best[run][0]:
            best[run] = (rank, value)
    return {run: value for run, (_, value) in sorted(best.items())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reproduce.tuning", description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="results/tuning/<NAME>.json and runs/tuning/<NAME>/")
    parser.add_argument("--what", default="", help="one sentence saying what the probe asks")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--profile")
    parser.add_argument("--detectors", help="comma-separated (default: params detectors)")
    parser.add_argument("--runs", default="student", help="comma-separated: teacher, student, methods")
    parser.add_argument("--steps", default="", help="comma-separated step counts (default: the profile's)")
    parser.add_argument("--seeds", default="0", help="comma-separated")
    parser.add_argument("--sweep", help="KEY=V1,V2,...: one probe per value, e.g. distill.fgd.kd_weight=0.3,1,3 "
                                        "(a {method} in KEY becomes each run's method)")
    parser.add_argument("--teacher", default="runs/{profile}/{detector}/teacher/model.pth",
                        help="teacher of KD runs ({profile}, {detector} filled in)")
    parser.add_argument("--teacher-cache", default="runs/{profile}/{detector}/teacher_cache.pt",
                        help="its output cache, used when the file exists (python -m reproduce.teacher_cache)")
    parser.add_argument("--split", default="val")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per job (default: cores / jobs)")
    parser.add_argument("--runs-root", type=Path, default=Path("runs/tuning"))
    parser.add_argument("--results-root", type=Path, default=Path("results/tuning"))
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    if args.split == "test":
        parser.error("probes choose the regime: they read val (or train), never test")

    params = load_params(args.params)
    profile = args.profile or params["profile"]
    detectors = args.detectors.split(",") if args.detectors else list(params["detectors"])
    runs = args.runs.split(",")
    steps = [int(s) for s in args.steps.split(",") if s] or [None]
    seeds = [int(s) for s in args.seeds.split(",")]
    sweep_key, sweep_values = None, [None]
    if args.sweep:
        sweep_key, _, values = args.sweep.partition("=")
        sweep_values = values.split(",")
    probes = []
    for detector, run, n, seed, value in itertools.product(detectors, runs, steps, seeds, sweep_values):
        sweep = (sweep_key.replace("{method}", run), value) if sweep_key else None
        probes.append(Probe(detector, run, n, seed, sweep, list(args.overrides)))

    out = args.results_root / f"{args.name}.json"
    root = args.runs_root / args.name
    metrics_of = {p.tag: root / "metrics" / f"{p.tag}.json" for p in probes}
    todo = [p for p in probes if not metrics_of[p.tag].exists()]
    print(f"{len(probes)} probes, {len(todo)} to run")
    threads = args.threads or max(1, (os.cpu_count() or 2) // args.jobs)
    walls: dict[str, float] = {}
    if os.path.exists(out):
        walls = {r["tag"]: r["wall_s"] for r in json.loads(out.read_text())["runs"] if "wall_s" in r}
    lock = threading.Lock()
    failed = []

    def work(probe: Probe) -> None:
        teacher = cache = None
        if probe.run not in ("teacher", "student"):
            teacher = Path(args.teacher.format(profile=profile, detector=probe.detector))
            cache = Path(args.teacher_cache.format(profile=profile, detector=probe.detector))
            cache = cache if cache.is_file() else None
        cmds = commands(probe, profile, root / probe.tag, metrics_of[probe.tag], args.split, teacher, cache)
        if args.dry_run:
            print("\n".join(shlex.join(c) for c in cmds))
            return
        seconds, rc = execute(cmds, root / probe.tag / "driver.log", threads)
        with lock:
            walls[probe.tag] = seconds
            print(f"{probe.tag}: {seconds:.0f} s" + ("" if rc == 0 else f" FAILED rc {rc}"), flush=True)
            if rc:
                failed.append(probe.tag)

    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.jobs} jobs x {threads} threads"
    command = "python -m reproduce.tuning " + shlex.join(argv if argv is not None else sys.argv[1:])

    def write_record() -> dict:
        """The summary of every finished probe, rewritten after each one: an interrupted
        probe keeps what it measured."""
        rows = [{"tag": p.tag, **summary_row(p, metrics_of[p.tag], walls.get(p.tag))}
                for p in probes if metrics_of[p.tag].exists()]
        args.results_root.mkdir(parents=True, exist_ok=True)
        record = {"what": args.what, "split": args.split, "profile": profile, "command": command,
                  "machine": machine, "runs": rows}
        if gains := gains_over_student(rows):
            record["gains_over_student"] = gains
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        tmp.replace(out)
        return record

    def work_and_record(probe: Probe) -> None:
        work(probe)
        if not args.dry_run:
            with lock:
                write_record()

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(work_and_record, todo))
    if args.dry_run:
        return 0
    record = write_record()
    for r in record["runs"]:
        print(f"{r['tag']:60s} AP {r['AP']:.4f} AP50 {r['AP50']:.4f}")
    for g in record.get("gains_over_student", []):
        ci = "n/a" if g["ci95"] is None else "[{:+.4f}, {:+.4f}]".format(*g["ci95"])
        print(f"{g['detector']} {g['run']} ({g['steps'] or 'default'} steps, seeds {g['seeds']}): "
              f"{g['delta_ap']:+.4f} over the student, 95% CI {ci}")
    print(f"wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
