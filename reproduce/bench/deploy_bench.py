"""The ``deploy`` benchmark of ``reproduce.bench``: teacher vs student, PyTorch eager vs
onnxruntime, batch-1 inference on this CPU, next to the AP of the same checkpoints.

For the mini profile (128x416 synthetic scenes) and the paper sizes (the ``kitti`` profile:
ResNet-18 student, ResNet-50 teacher, a KITTI frame of 375x1242 resized as the evaluation
transforms do, 402x1333), every detector and role: parameters, GFLOPs, batch-1 latency of the
eager model and of its ONNX export in onnxruntime (``reproduce.deploy.export``), and peak memory.

* **Weights are random** (latency and memory do not depend on them; grade D); the AP columns
  come from the stored metrics of the trained checkpoints of the same configs
  (``results/<profile>/<detector>/{teacher,student,clockdistill}-s*.json``, mean over seeds),
  and say so where there are none (the paper sizes are not trained here: GPU).
* **GFLOPs** are ``torch.utils.flop_counter.FlopCounterMode`` FLOPs (2 per multiply-add) of one
  forward: convolutions and matrix products; grid_sample, softmax, norms and element-wise ops
  are not counted (fvcore, which counts multiply-adds, would give half).
* **Latency**: one warm-up call each, then ``--repeats`` interleaved rounds (eager and
  onnxruntime alternate, the order rotating), the ratio eager / onnxruntime taken within each
  round (``reproduce.bench.interleaved``). torch and onnxruntime both get ``--threads`` intra-op
  threads; the clock is bench's (process CPU time single-threaded). Eager runs the default
  ``impl="auto"`` deformable attention (``gather`` on a CPU for large problems); the export
  runs the ``grid_sample`` path, the only one ONNX has.
* **Peak memory**: the kernel's peak resident-set mark (VmHWM) growth, each runtime in a fresh
  process, from just before the model is loaded to the end of its first batch-1 inference:
  weights + activations + workspaces (+ onnxruntime's arena).
"""
from __future__ import annotations

import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
DETECTORS = ("dab_detr", "deformable_detr", "dino")
ROLES = ("teacher", "student")
NUM_CLASSES = 3
#: size label -> (params.yaml profile, native image size of its dataset (h, w))
PROFILES = {"mini": ("mini", (128, 416)), "paper": ("kitti", (375, 1242))}
CHILD_TIMEOUT_S = 1800


def eval_image_size(native: tuple[int, int], image_cfg: dict) -> tuple[int, int]:
    """The size the evaluation transforms resize ``native`` to: the last short side, capped by
    ``max_size`` on the long side (reproduce/data/transforms.py; torchvision's rounding)."""
    h, w = native
    sides = image_cfg.get("short_sides")
    if not sides:
        return h, w
    short, long_ = min(h, w), max(h, w)
    target = int(sides[-1])
    max_size = image_cfg.get("max_size")
    if max_size is not None and target * long_ / short > max_size:
        new_long, new_short = int(max_size), int(max_size * short / long_)
    else:
        new_short, new_long = target, int(target * long_ / short)
    return (new_short, new_long) if h <= w else (new_long, new_short)


def deploy_specs(params: dict, quick: bool) -> list[dict]:
    """One spec per (size, detector, role): its model config and image size."""
    from models.build import detector_config
    from reproduce.training.runconfig import _profile, model_config
    if quick:
        return [dict(size="tiny", profile="mini", detector="dino", role="student", height=64, width=96,
                     cfg=detector_config("dino", "tiny"))]
    specs = []
    for size, (profile, native) in PROFILES.items():
        height, width = eval_image_size(native, _profile(params, profile).get("image") or {})
        for detector in DETECTORS:
            for role in ROLES:
                cfg = model_config(params, detector, role, profile)
                cfg["backbone"] = {**cfg["backbone"], "weights": "none"}    # random weights (module doc)
                specs.append(dict(size=size, profile=profile, detector=detector, role=role,
                                  height=height, width=width, cfg=cfg))
    return specs


# ---------------------------------------------------------------------------- child processes

def _peak_growth_start():
    from reproduce.bench.suite import _proc_status_kib, _reset_peak_rss
    gc.collect()
    rss = _proc_status_kib("VmRSS")
    return rss, _reset_peak_rss()


def _peak_growth_mib(start) -> float | None:
    from reproduce.bench.suite import _proc_status_kib
    rss, reset = start
    peak = _proc_status_kib("VmHWM")
    return (peak - rss) / 1024 if reset and rss is not None and peak is not None else None


def count_gflops(model, images, pad_mask) -> float:
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    # parameters must not require grad: FlopCounterMode's module tracker hooks tensors that do,
    # which fails under no_grad (bench_deploy's models are built with requires_grad_(False))
    with torch.no_grad(), counter:
        model(images, pad_mask)
    return counter.get_total_flops() / 1e9


def time_child(spec: dict) -> dict:
    """Build (random weights), first-inference memory, FLOPs, export, then interleaved timing."""
    from models.build import build_detector
    from reproduce.bench import suite as bench
    from reproduce.deploy.export import export_onnx, max_differences, onnx_outputs, onnx_session
    bench.set_threads(spec["threads"])
    torch.manual_seed(0)
    images, pad_mask, _ = bench.image_batch(1, spec["height"], spec["width"], seed=3)
    start = _peak_growth_start()
    model = build_detector(spec["cfg"], NUM_CLASSES, load_weights=False).eval().requires_grad_(False)
    with torch.no_grad():
        model(images, pad_mask)
    eager_peak = _peak_growth_mib(start)
    gflops = count_gflops(model, images, pad_mask)
    t0 = time.perf_counter()
    export_onnx(model, spec["onnx"], (spec["height"], spec["width"]))
    export_s = time.perf_counter() - t0
    session = onnx_session(spec["onnx"], threads=spec["threads"])
    diff = max_differences(model, session, [(images, pad_mask)])[0]

    def eager():
        with torch.no_grad():
            model(images, pad_mask)

    times = bench.interleaved({"eager": eager, "onnxruntime": lambda: onnx_outputs(session, images, pad_mask)},
                              spec["repeats"], warmup=1)
    return {"parameters": sum(p.numel() for p in model.parameters()), "gflops": gflops,
            "eager_peak_mib": eager_peak, "export_seconds": export_s,
            "onnx_mib": Path(spec["onnx"]).stat().st_size / 2 ** 20, "max_abs_diff": diff,
            "timings": bench.timing_block(times), "ratio_eager_over_onnxruntime": bench.ratio(times, "eager",
                                                                                              "onnxruntime")}


def ort_memory_child(spec: dict) -> dict:
    """A fresh process: load the ONNX file, run one batch-1 inference, peak memory growth."""
    from reproduce.bench import suite as bench
    from reproduce.deploy.export import onnx_outputs, onnx_session
    bench.set_threads(spec["threads"])
    images, pad_mask, _ = bench.image_batch(1, spec["height"], spec["width"], seed=3)
    start = _peak_growth_start()
    session = onnx_session(spec["onnx"], threads=spec["threads"])
    onnx_outputs(session, images, pad_mask)
    return {"onnxruntime_peak_mib": _peak_growth_mib(start)}


CHILDREN = {"time": time_child, "ort_memory": ort_memory_child}


def run_child(kind: str, spec: dict) -> dict:
    from reproduce.bench.suite import run_json_child
    return run_json_child(["reproduce.bench.deploy_bench", kind, json.dumps(spec)], "DEPLOY_CHILD_RESULT",
                          CHILD_TIMEOUT_S)


# ---------------------------------------------------------------------------- AP of the same configs

def stored_ap(results: Path, profile: str, detector: str, method: str, cfg: dict | None = None) -> dict | None:
    """Mean COCO AP (and KITTI mAP at Moderate when present) over the seeds of a stored run
    (``results/<profile>/<detector>/<method>-s*.json``, ablations excluded); ``mark``:
    ``reproduce.report.tables.config_mark`` of the runs against ``cfg`` (params.yaml's model config)."""
    from reproduce.report.tables import config_mark
    runs = []
    for path in sorted((results / profile / detector).glob(f"{method}-s*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if data.get("AP") is not None and not data.get("ablation"):
            runs.append(data)
    if not runs:
        return None
    kitti = [r["kitti"]["mAP_moderate"] for r in runs if isinstance(r.get("kitti"), dict)
             and r["kitti"].get("mAP_moderate") is not None]
    return {"AP": statistics.fmean(r["AP"] for r in runs), "seeds": len(runs), "mark": config_mark(runs, cfg),
            "kitti_mAP_moderate": statistics.fmean(kitti) if kitti else None,
            "files": f"results/{profile}/{detector}/{method}-s*.json"}


def bench_deploy(args, *_) -> dict:
    from reproduce.bench import suite as bench
    from reproduce.core.config import load_params
    from reproduce.training.runconfig import model_config
    from reproduce.report.tables import describe_model
    params = load_params(ROOT / "params.yaml")
    rows = []
    with tempfile.TemporaryDirectory(prefix="deploy_bench_") as tmp:
        for i, spec in enumerate(deploy_specs(params, args.quick)):
            spec = {**spec, "threads": args.threads, "repeats": args.repeats, "onnx": str(Path(tmp) / f"{i}.onnx")}
            result = run_child("time", spec)
            if "error" not in result:
                result.update(run_child("ort_memory", spec))
            Path(spec["onnx"]).unlink(missing_ok=True)
            methods = ["teacher"] if spec["role"] == "teacher" else ["student", "clockdistill"]
            # the quick run's tiny model is no trained config: no AP next to it
            ap = {m: None if spec["size"] == "tiny" else stored_ap(
                ROOT / "results", spec["profile"], spec["detector"], m,
                model_config(params, spec["detector"], spec["role"], spec["profile"])) for m in methods}
            row = {k: spec[k] for k in ("size", "profile", "detector", "role", "height", "width")}
            row["config"] = describe_model(spec["cfg"])
            row.update(threads=args.threads, ap=ap, **result)
            rows.append(row)
            t = result.get("timings")
            bench._log(f"deploy {spec['size']} {spec['detector']} {spec['role']} {spec['height']}x{spec['width']}: "
                       + (f"eager {t['eager']['median'] * 1e3:.0f} ms, onnxruntime {t['onnxruntime']['median'] * 1e3:.0f}"
                          f" ms" if t else result.get("error", "?")[:200]))
    return {"weights": "random (latency and memory do not depend on them); AP from stored metrics",
            "flops": "torch.utils.flop_counter.FlopCounterMode, 2 FLOPs per multiply-add; conv + matmul only",
            "memory": "VmHWM growth in a fresh process, model load to the end of the first batch-1 inference",
            "rows": rows}


# ---------------------------------------------------------------------------- table

def _ms(r: dict | None) -> str:
    if not r or not r.get("n"):
        return "n/a"
    return f"{r['median'] * 1e3:.0f} [{r['q1'] * 1e3:.0f}-{r['q3'] * 1e3:.0f}]"


def _ap(entry: dict | None, size: str) -> str:
    if entry is None:
        return {"paper": "not trained here (GPU)", "tiny": "—"}.get(size, "no stored run")
    from reproduce.report.tables import UNRECORDED
    text = f"{entry['AP'] * 100:.1f}" + entry.get("mark", UNRECORDED)
    if entry.get("kitti_mAP_moderate") is not None:
        text += f" (KITTI {entry['kitti_mAP_moderate'] * 100:.1f})"
    return text + (f", {entry['seeds']} seeds" if entry["seeds"] > 1 else "")


def deploy_table(result: dict) -> list[str]:
    """Markdown lines: one row per (size, detector, role)."""
    names = {"dab_detr": "DAB-DETR", "deformable_detr": "Deformable DETR", "dino": "DINO"}
    lines = ["| size | detector | role | image | params | GFLOPs | eager, ms | onnxruntime, ms | eager / ORT "
             "| peak MiB eager / ORT | AP x100 (no KD) | AP x100 (CLoCKDistill) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result.get("rows", []):
        head = f"| {r['size']} | {names.get(r['detector'], r['detector'])} | {r['role']} | {r['height']}x{r['width']} "
        if "timings" not in r:
            lines.append(head + f"| error: {r.get('error', '?')[:60]} | | | | | | | |")
            continue
        t, ratio = r["timings"], r["ratio_eager_over_onnxruntime"]
        mem = " / ".join("n/a" if v is None else f"{v:.0f}"
                         for v in (r.get("eager_peak_mib"), r.get("onnxruntime_peak_mib")))
        ap = r["ap"]
        first = _ap(ap.get("teacher") if r["role"] == "teacher" else ap.get("student"), r["size"])
        second = "—" if r["role"] == "teacher" else _ap(ap.get("clockdistill"), r["size"])
        lines.append(head + f"| {r['parameters'] / 1e6:.2f} M | {r['gflops']:.1f} | {_ms(t['eager'])} | "
                     f"{_ms(t['onnxruntime'])} | {ratio['median']:.2f} | {mem} | {first} | {second} |")
    diffs = [(r["max_abs_diff"], r) for r in result.get("rows", []) if r.get("max_abs_diff") is not None]
    if diffs:
        within = [d for d, _ in diffs if d <= 1e-4]
        text = f"onnxruntime vs PyTorch on the timed input: max |difference| {max(within):.1e}" if within else ""
        over = [f"{r['size']} {r['detector']} {r['role']} {d:.2f}" for d, r in diffs if d > 1e-4]
        if over:
            # random weights give exactly tied query-selection scores; the two top-k break ties
            # differently, so a query gets another anchor (not an export error)
            text += ("; " if text else "") + "over 1e-4: " + ", ".join(over) + " (tied top-k scores of the " \
                "random-weight query selection, broken differently by the two runtimes)"
        lines += ["", text + "."]
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in CHILDREN:
        print("usage: python -m reproduce.bench.deploy_bench {time,ort_memory} SPEC_JSON (run by reproduce.bench)",
              file=sys.stderr)
        return 2
    result = CHILDREN[argv[0]](json.loads(argv[1]))
    print("DEPLOY_CHILD_RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
