"""Paper-scale smoke run on the real data samples, on the CPU, the way a new user runs the tools.

For each dataset (the ``kitti`` profile on ../shared/data/kitti_sample, the ``coco`` profile on
../shared/data/coco_sample) and each detector: prepare the data (once), train the R50 teacher
for a few steps, train an R18 CLoCKDistill student against it for as many steps, and evaluate
the student. Every step is the project's own command line (``python -m reproduce.prepare`` /
``reproduce.training.train`` / ``reproduce.evaluation.evaluate``), run as a subprocess; this script only adds ``-S``
overrides and measures each command's wall time, seconds per training step (from the run's
train_summary.json) and peak RSS (``os.wait4``'s ru_maxrss of the command and its workers).

Deliberate departures from the profiles (all printed in the JSON with the commands):

* ``backbone.weights=none`` for teacher and student: the machine is offline and has no
  torchvision ImageNet file, so the ResNets start random (timing and memory do not depend on it).
* ``train.steps`` / ``train.teacher_steps`` = ``--steps`` (default 3) instead of 50 / 12 epochs.
* evaluation on the first ``--eval-images`` images of the val split (a ``smoke_val`` split written
  next to the prepared JSONs), because a CPU forward pass at 800x1333 takes seconds per image.

Data is read in place: KITTI's sample is already in the raw layout (``--raw`` of prepare); the
COCO sample's images/ and annotations/ are linked into the raw layout under ``--work`` (the
README's "extracted tree, subfolders may be symlinks"). Nothing is written inside the
repository except ``--record`` (default results/bench/paper_scale_cpu.json), which is rewritten
after every command, so an interrupted run keeps what it measured.

    python -m reproduce.paper_smoke [--datasets kitti coco] [--detectors ...] [--steps 3] [--work DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = ROOT.parent / "shared" / "data"
SAMPLES = {"kitti": SHARED_DATA / "kitti_sample", "coco": SHARED_DATA / "coco_sample"}
DETECTORS = ("deformable_detr", "dab_detr", "dino")
RECORD = ROOT / "results" / "bench" / "paper_scale_cpu.json"


def run_measured(cmd: list[str], log: Path) -> dict:
    """Run ``cmd`` in the repository root; wall time, peak RSS (MiB) and exit code."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    # ru_maxrss is KiB on Linux; for the command and every descendant it waited for
    return {"command": shlex.join(cmd), "rc": proc.returncode, "wall_s": round(time.perf_counter() - start, 1),
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "log": str(log)}


def coco_raw(work: Path) -> Path:
    """The COCO sample in the raw layout (symlinks into ../shared/data, nothing copied)."""
    raw = work / "raw" / "coco"
    raw.mkdir(parents=True, exist_ok=True)
    sample = SAMPLES["coco"]
    for name, target in (("train2017", sample / "images" / "train2017"), ("val2017", sample / "images" / "val2017"),
                         ("annotations", sample / "annotations")):
        link = raw / name
        if not link.exists():
            link.symlink_to(target, target_is_directory=True)
    return raw


def write_smoke_val(prepared: Path, n: int) -> Path:
    """``smoke_val.json``: the first ``n`` val images and their annotations."""
    val = json.loads((prepared / "val.json").read_text())
    images = val["images"][:n]
    keep = {im["id"] for im in images}
    smoke = {**val, "images": images, "annotations": [a for a in val["annotations"] if a["image_id"] in keep]}
    path = prepared / "smoke_val.json"
    path.write_text(json.dumps(smoke))
    return path


def steps_summary(run_dir: Path) -> dict:
    path = run_dir / "train_summary.json"
    if not path.is_file():
        return {}
    summary = json.loads(path.read_text())
    return {k: summary.get(k) for k in ("steps", "mean_s_per_step", "wall_time_s")}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m reproduce.paper_smoke", description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=["kitti", "coco"], choices=sorted(SAMPLES))
    p.add_argument("--detectors", nargs="+", default=list(DETECTORS), choices=DETECTORS)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--eval-images", type=int, default=4)
    p.add_argument("--work", type=Path, default=Path("/tmp/paper_smoke"), help="runs and prepared data (outside the repo)")
    p.add_argument("--record", type=Path, default=RECORD)
    p.add_argument("--append", action="store_true",
                   help="add to the runs already in --record (a later session, other detectors or steps)")
    args = p.parse_args(argv)

    py = sys.executable
    work = args.work.resolve()
    record = {"what": "paper-scale profiles on the real data samples, CPU, a few steps per run (reproduce/bench/paper_smoke.py)",
              "command": shlex.join(["python", "-m", "reproduce.paper_smoke", *(argv if argv is not None else sys.argv[1:])]),
              "machine": {"cpus": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
                          "torch": torch.__version__, "python": platform.python_version()},
              "notes": ["backbone.weights=none for teacher and student: offline, no torchvision ImageNet file; "
                        "timing and memory are the same as with ImageNet weights",
                        f"train.steps / teacher_steps = {args.steps}; evaluation on the first {args.eval_images} val "
                        "images (smoke_val split); s/step is the mean over the run's steps, the first included",
                        "the machine's 2 cores were shared with other jobs: treat times as upper bounds"],
              "runs": []}
    if args.append and args.record.is_file():
        earlier = json.loads(args.record.read_text())
        record["command"] = earlier.get("command", "") + " ; then " + record["command"]
        record["notes"] = earlier.get("notes", []) + [n for n in record["notes"] if n not in earlier.get("notes", [])]
        record["runs"] = earlier.get("runs", [])

    def save() -> None:
        args.record.parent.mkdir(parents=True, exist_ok=True)
        args.record.write_text(json.dumps(record, indent=2) + "\n")

    failed = 0
    for dataset in args.datasets:
        prepared = work / "prepared" / dataset
        raw = SAMPLES[dataset] if dataset == "kitti" else coco_raw(work)
        result = run_measured([py, "-m", "reproduce.prepare", "--dataset", dataset, "--raw", str(raw),
                               "--out", str(prepared)], work / "logs" / f"{dataset}_prepare.log")
        if not any(r.get("profile") == dataset and r.get("stage") == "prepare" for r in record["runs"]):
            record["runs"].append({"profile": dataset, "stage": "prepare", **result})
        save()
        if result["rc"] != 0:
            failed += 1
            continue
        write_smoke_val(prepared, args.eval_images)
        overrides = ["-S", f"data.prepared={work / 'prepared'}", "-S", "teacher.overrides.backbone.weights=none",
                     "-S", "student.overrides.backbone.weights=none"]
        common = ["--profile", dataset, "--device", "cpu", *overrides]
        for detector in args.detectors:
            base = work / "runs" / dataset / detector
            teacher, student = base / "teacher", base / "clockdistill"
            stages = [
                ("teacher", teacher, [py, "-m", "reproduce.train", "--detector", detector, "--role", "teacher",
                                      "--out", str(teacher), *common, "--no-progress", "-S", f"train.teacher_steps={args.steps}"]),
                ("clockdistill", student, [py, "-m", "reproduce.train", "--detector", detector, "--role", "student",
                                           "--method", "clockdistill", "--teacher", str(teacher / "model.pth"),
                                           "--out", str(student), *common, "--no-progress", "-S", f"train.steps={args.steps}"]),
                ("evaluate", student, [py, "-m", "reproduce.evaluate", "--checkpoint", str(student / "model.pth"),
                                       "--detector", detector, "--split", "smoke_val",
                                       "--out", str(base / "metrics.json"), *common]),
            ]
            for stage, run_dir, cmd in stages:
                result = run_measured(cmd, work / "logs" / f"{dataset}_{detector}_{stage}.log")
                entry = {"profile": dataset, "detector": detector, "stage": stage, "steps_requested": args.steps,
                         **result}
                if stage != "evaluate":
                    entry.update(steps_summary(run_dir))
                elif result["rc"] == 0:
                    metrics = json.loads((base / "metrics.json").read_text())
                    entry["n_images"] = metrics.get("n_images")
                    entry["eval_s_per_image"] = round(result["wall_s"] / max(1, metrics.get("n_images") or 1), 2)
                record["runs"].append(entry)
                save()
                print(f"{dataset} {detector} {stage}: rc {result['rc']}, {result['wall_s']} s, "
                      f"{entry.get('mean_s_per_step') or '-'} s/step, {result['peak_rss_mib']} MiB", flush=True)
                if result["rc"] != 0:
                    failed += 1
                    break
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
