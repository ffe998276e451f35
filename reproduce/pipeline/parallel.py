"""Run dvc.yaml's out-of-date stages N at a time, then record them with ``dvc commit``.

``python -m reproduce.pipeline.parallel [--jobs N] [--dry-run]`` (what ``make repro`` runs).

Why DVC alone does not serve: ``dvc repro`` runs one stage at a time and holds the repository
lock while it does, so a second ``dvc repro`` in the same workspace waits; ``dvc exp run
--queue`` runs each queued experiment as a whole pipeline in its own temporary copy, which
would train every shared teacher once per copy. On a 2-core machine two one-thread trainings
give about 1.4x the throughput of one two-thread training, and the mini pipeline only fits its
time budget that way. So this module adds scheduling and nothing else: the stages, their
resolved commands, their order and what is out of date all come from DVC (its index, its
dependency graph and ``dvc status``); a stage's non-persistent outputs are removed before it
runs, as ``dvc repro`` does; and ``dvc commit`` records exactly the stages that ran, so a
``dvc repro`` afterwards has nothing left to do.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

LOG_DIR = Path("logs") / "pipeline"


@dataclass
class Plan:
    """The stages to run (topological order) and, for each, the planned stages it waits for."""

    order: list[str]
    upstream: dict[str, set[str]] = field(default_factory=dict)
    commands: dict[str, list[str]] = field(default_factory=dict)


def dvc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], capture_output=True, text=True, check=False)


def out_of_date() -> set[str]:
    """Stage names ``dvc status`` reports as changed."""
    result = dvc("status", "--json")
    if result.returncode != 0:
        raise RuntimeError(f"dvc status failed: {result.stderr.strip()}")
    return set(json.loads(result.stdout or "{}"))


def stage_graph(repo) -> tuple[dict[str, list[str]], dict[str, set[str]]]:
    """Each stage's resolved commands and the stages it depends on, from DVC's own index."""
    graph = repo.index.graph          # edges point from a stage to the stages it depends on
    commands, depends_on = {}, {}
    for stage in graph.nodes:
        if not getattr(stage, "cmd", None):
            continue                  # a .dvc file (data under DVC), not a pipeline stage
        cmd = stage.cmd
        commands[stage.addressing] = list(cmd) if isinstance(cmd, list) else [cmd]
        depends_on[stage.addressing] = {s.addressing for s in graph.successors(stage) if getattr(s, "cmd", None)}
    return commands, depends_on


def make_plan(stale: set[str], commands: dict[str, list[str]], depends_on: dict[str, set[str]]) -> Plan:
    """``stale`` and every stage downstream of it (a re-run stage changes its outputs, which
    ``dvc status`` can only see after the fact), in an order where each stage follows its deps."""
    unknown = stale - set(commands)
    if unknown:
        raise ValueError(f"dvc status names stages not in the index: {sorted(unknown)}")
    dependants: dict[str, set[str]] = {name: set() for name in commands}
    for name, deps in depends_on.items():
        for dep in deps:
            dependants[dep].add(name)
    todo, selected = list(stale), set(stale)
    while todo:
        for child in dependants[todo.pop()]:
            if child not in selected:
                selected.add(child)
                todo.append(child)
    def downstream(name: str) -> int:          # stages waiting on this one, transitively
        seen, todo = set(), [name]
        while todo:
            for child in dependants[todo.pop()] & selected:
                if child not in seen:
                    seen.add(child)
                    todo.append(child)
        return len(seen)

    # layer by layer; within a layer, the stage most others wait for first (the teachers)
    order, placed = [], set()
    while len(order) < len(selected):
        ready = sorted((n for n in selected - placed if depends_on[n] & selected <= placed),
                       key=lambda n: (-downstream(n), n))
        if not ready:
            raise ValueError("dvc.yaml has a dependency cycle among " + ", ".join(sorted(selected - placed)))
        order += ready
        placed |= set(ready)
    return Plan(order, {n: depends_on[n] & selected for n in order}, {n: commands[n] for n in order})


def run_stage(name: str, commands: list[str], threads: int, log_dir: Path) -> tuple[int, float]:
    """A stage's commands one after another (argument lists, no shell), output to its log."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    log_dir.mkdir(parents=True, exist_ok=True)
    start, rc = time.perf_counter(), 0
    with (log_dir / f"{name.replace('/', '_')}.log").open("a") as log:
        for cmd in commands:
            log.write("$ " + cmd + "\n")
            log.flush()
            argv = shlex.split(cmd)
            if argv and argv[0] == "python":
                argv[0] = sys.executable      # the locked environment, as make's PATH gives
            rc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env, check=False).returncode
            if rc != 0:
                break
    return rc, time.perf_counter() - start


def execute(plan: Plan, jobs: int, threads: int, prepare_stage, log_dir: Path = LOG_DIR,
            runner=run_stage) -> dict[str, int | None]:
    """Run the plan, ``jobs`` stages at once; a stage starts when its planned deps succeeded
    and is skipped (rc None) when one failed. Returns each stage's exit code.
    ``runner(name, commands, threads, log_dir) -> (rc, seconds)`` runs one stage."""
    results: dict[str, int | None] = {}
    running: set[str] = set()
    cond = threading.Condition()

    def worker(name: str) -> None:
        prepare_stage(name)
        rc, seconds = runner(name, plan.commands[name], threads, log_dir)
        with cond:
            results[name] = rc
            running.discard(name)
            status = "ok" if rc == 0 else f"FAILED (rc {rc}, log {log_dir / name}.log)"
            print(f"{name}: {seconds:.0f} s {status}", flush=True)
            cond.notify_all()

    with cond:
        while len(results) < len(plan.order):
            for name in plan.order:
                if name in results or name in running:
                    continue
                deps = plan.upstream[name]
                if any(d in results and results[d] != 0 for d in deps):
                    results[name] = None          # an upstream stage failed or was skipped
                    print(f"{name}: skipped (an upstream stage failed)", flush=True)
                    continue
                if len(running) < jobs and all(results.get(d) == 0 for d in deps):
                    running.add(name)
                    threading.Thread(target=worker, args=(name,), daemon=True).start()
            if len(results) < len(plan.order):
                cond.wait()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reproduce.pipeline.parallel",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="stages at once (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per stage (default: cores / jobs)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan only")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    from dvc.repo import Repo

    repo = Repo(".")
    commands, depends_on = stage_graph(repo)
    plan = make_plan(out_of_date(), commands, depends_on)
    print(f"{len(plan.order)} stages out of date (dvc status, and what depends on them)")
    for name in plan.order:
        print("  " + name)
    if args.dry_run or not plan.order:
        return 0
    stages = {s.addressing: s for s in repo.index.stages}

    one_at_a_time = threading.Lock()          # DVC's repository lock is per process, not per thread

    def prepare_stage(name: str) -> None:
        # as `dvc repro` does: non-persistent outputs go before the command recreates them
        with one_at_a_time, repo.lock:
            stages[name].remove_outs(ignore_remove=False, force=False)

    threads = args.threads or max(1, (os.cpu_count() or 2) // args.jobs)
    results = execute(plan, args.jobs, threads, prepare_stage)
    done = [name for name in plan.order if results.get(name) == 0]
    if done:
        commit = dvc("commit", "--force", *done)
        if commit.returncode != 0:
            print(f"dvc commit failed: {commit.stderr.strip()}", file=sys.stderr)
            return 1
        print(f"dvc commit: {len(done)} stages recorded")
    return 0 if len(done) == len(plan.order) else 1


if __name__ == "__main__":
    sys.exit(main())
