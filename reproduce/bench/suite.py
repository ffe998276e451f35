"""Speed and memory benchmarks -> ``results/bench/`` (``make bench``).

Usage::

    python -m reproduce.bench [--quick] [--only NAME ...] [--repeats N] [--threads N]
                              [--msda-threads LIST] [--out DIR]

Benchmarks (each writes ``<out>/<name>.json``; the figure and the summary are rebuilt from every
JSON present, so ``--only`` refreshes one part):

``msda``
    Multi-scale deformable attention, forward + backward: ours
    (``models.deformable_attention.multi_scale_deformable_attention``, both implementations,
    ``grid_sample`` and ``gather``, and the one ``impl="auto"`` picks) against HF transformers'
    pure-PyTorch ``MultiScaleDeformableAttention`` on identical inputs; outputs and gradients
    compared. Shapes: ``mini`` (the mini profile's encoder), ``kitti_encoder`` (a 384x1248 image
    at strides 8/16/32/64, Q = S self-attention) and ``kitti_decoder`` (Q = 300). Sampling
    locations are realistic, not uniform: encoder points scatter N(0, 2 cells) around each
    token's own cell, decoder points fall inside random boxes.
``train_step``
    One training step (forward, loss, backward, clip, AdamW) of our Deformable DETR against HF
    ``DeformableDetrForObjectDetection`` at a matched configuration (same parameter count).
``distill_overhead``
    mini profile, batch 8 of 128x416: student step, teacher forward and every registered KD
    method's step (``distill.METHODS`` plus ``distill.registry_baselines.BASELINES`` if that
    module exists), interleaved on one batch, per detector; twice ``--repeats`` rounds.
``models``
    Per detector: training step time and peak memory at mini size and at paper size (ResNet-50,
    batch 1, 384x1248; 256x832 if a step takes longer than ``PAPER_STEP_LIMIT_S``). Each
    configuration runs in a fresh subprocess; memory is the kernel's peak resident-set mark
    (VmHWM, reset through ``/proc/self/clear_refs`` just before the model is built) minus the
    resident memory at that moment: weights, gradients, optimizer state and the step's
    activations and workspaces (no tracemalloc, which would slow the step and does not see
    torch's allocations; not ``ru_maxrss``, which Linux carries over from the parent).
``deploy``
    Batch-1 inference for deployment (``reproduce/bench/deploy_bench.py``): mini and paper sizes,
    teacher vs student, PyTorch eager vs onnxruntime (``reproduce.deploy.export``): parameters, GFLOPs
    (torch's FlopCounterMode), latency, peak memory, next to the stored AP of the same configs.
``eval``
    Evaluation throughput (model forward + post-processing, images/s) at mini size, and the
    time of pycocotools' COCOeval on a synthetic 300-image set built in memory.

Timing: every compared candidate runs once to warm up, then ``--repeats`` rounds in which each
candidate runs once, the order rotating from round to round; ratios are taken *within* a
round and reported as median, IQR and min-max over the rounds, so slow drifts of a shared
machine cancel. ``--threads`` (default 1) fixes ``torch.set_num_threads``: on a small shared
CPU, a co-tenant's load makes multi-threaded parallel regions wait for a descheduled worker,
which costs milliseconds per op and swamps the comparison; ``msda`` also runs at the
machine's full thread count (``--msda-threads 1,all``) to show that effect.

HF transformers (in ``requirements.lock``, as the reference implementation) is needed for the
``msda`` and ``train_step`` comparisons; where it is not importable they are skipped and say so.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import functools
import importlib
import importlib.util
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from reproduce.core.config import write_json

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ("msda", "train_step", "distill_overhead", "models", "eval", "deploy")
DETECTORS = ("dab_detr", "deformable_detr", "dino")
NUM_CLASSES = 3
PAPER_STEP_LIMIT_S = 60.0
CLOCK = {"name": "wall", "choice": "auto"}   # the timer in use; see set_threads and --clock
TARGETS = {   # (benchmark, what, comparison, value)
    "msda": "HF / ours >= 1.3 at KITTI shapes",
    "train_step": "HF / ours >= 1.2",
    "distill_overhead": "clockdistill <= 1.1 x (student step + teacher forward)",
}


# ---------------------------------------------------------------------------- environment

def import_transformers() -> tuple[object | None, str | None]:
    """``(transformers module, None)`` or ``(None, why not)``."""
    try:
        return importlib.import_module("transformers"), None
    except ImportError as exc:
        print(f"transformers is not importable ({exc}): HF comparisons skipped; run `make env`",
              file=sys.stderr)
        return None, "transformers not installed"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=False, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict:
    tf = sys.modules.get("transformers")
    return {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": getattr(tf, "__version__", None),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "git_commit": git_commit(),
    }


def set_threads(n: int) -> int:
    """Fix torch's intra-op threads and pick the clock for them (``--clock auto``: process CPU
    time when single-threaded, wall time otherwise)."""
    if n <= 0:
        n = os.cpu_count() or 1
    torch.set_num_threads(n)
    CLOCK["name"] = CLOCK.get("choice", "auto")
    if CLOCK["name"] == "auto":
        CLOCK["name"] = "cpu" if n == 1 else "wall"
    return n


# ---------------------------------------------------------------------------- timing and stats

def stats(values: Sequence[float]) -> dict:
    v = sorted(float(x) for x in values)
    if not v:
        return {"n": 0}
    if len(v) >= 2:
        q1, _, q3 = statistics.quantiles(v, n=4, method="inclusive")
    else:
        q1 = q3 = v[0]
    return {"n": len(v), "median": statistics.median(v), "q1": q1, "q3": q3, "iqr": q3 - q1,
            "min": v[0], "max": v[-1]}


LAST_OTHER_CLOCK: dict[str, list[float]] = {}


def interleaved(candidates: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each candidate: ``warmup`` untimed calls each, then ``repeats``
    rounds of one call each, the order rotating every round. Both clocks are read; the one
    in ``CLOCK`` is returned, the other is left in ``LAST_OTHER_CLOCK``."""
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    other: dict[str, list[float]] = {name: [] for name in names}
    use_cpu = CLOCK["name"] == "cpu"
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            wall, cpu = time.perf_counter(), time.process_time()
            candidates[name]()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            times[name].append(cpu if use_cpu else wall)
            other[name].append(wall if use_cpu else cpu)
    LAST_OTHER_CLOCK.clear()
    LAST_OTHER_CLOCK.update(other)
    return times


def ratio(times: dict[str, list[float]], numerator: str | Sequence[str], denominator: str | Sequence[str]) -> dict:
    """Per-round ratio sum(numerator) / sum(denominator), summarised."""
    num = [numerator] if isinstance(numerator, str) else list(numerator)
    den = [denominator] if isinstance(denominator, str) else list(denominator)
    per_round = [sum(times[n][r] for n in num) / sum(times[d][r] for d in den)
                 for r in range(len(times[num[0]]))]
    return {"numerator": "+".join(num), "denominator": "+".join(den), "per_round": per_round, **stats(per_round)}


def timing_block(times: dict[str, list[float]]) -> dict:
    """Stats of the chosen clock, plus the raw values of the other clock for reference."""
    other_name = "wall_seconds" if CLOCK["name"] == "cpu" else "cpu_seconds"
    return {name: {"clock": CLOCK["name"], "seconds": t, **stats(t),
                   other_name: LAST_OTHER_CLOCK.get(name), f"{other_name[:-8]}_median":
                   statistics.median(LAST_OTHER_CLOCK[name]) if LAST_OTHER_CLOCK.get(name) else None}
            for name, t in times.items()}


def _json_default(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


# ---------------------------------------------------------------------------- shared inputs

def random_targets(batch: int, boxes: int | tuple[int, int], generator: torch.Generator) -> list[dict]:
    """Random GT: normalised cxcywh boxes inside the image, labels in [0, NUM_CLASSES)."""
    targets = []
    for _ in range(batch):
        n = boxes if isinstance(boxes, int) else int(torch.randint(boxes[0], boxes[1] + 1, (1,), generator=generator))
        wh = torch.rand(n, 2, generator=generator) * 0.25 + 0.05
        cxy = wh / 2 + torch.rand(n, 2, generator=generator) * (1 - wh)
        targets.append({"boxes": torch.cat([cxy, wh], 1),
                        "labels": torch.randint(0, NUM_CLASSES, (n,), generator=generator)})
    return targets


def image_batch(batch: int, height: int, width: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, height, width, generator=g)
    pad_mask = torch.zeros(batch, height, width, dtype=torch.bool)
    return images, pad_mask, g


def clip_and_step(params: list, optimizer: torch.optim.Optimizer, clip: float = 0.1) -> None:
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(params, clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------- 1. msda

@contextlib.contextmanager
def msda_threshold(points: int | None):
    """Temporarily set both ``impl="auto"`` thresholds of models.deformable_attention
    (``None``: leave them); ``1 << 62`` forces grid_sample, ``0`` forces gather."""
    from models import deformable_attention as mda
    old = mda.GATHER_MIN_POINTS, mda.GATHER_MIN_POINTS_SINGLE_THREAD
    if points is not None:
        mda.GATHER_MIN_POINTS = mda.GATHER_MIN_POINTS_SINGLE_THREAD = points
    try:
        yield
    finally:
        mda.GATHER_MIN_POINTS, mda.GATHER_MIN_POINTS_SINGLE_THREAD = old


MSDA_CASES = {
    "mini": dict(batch=8, shapes=[(8, 26), (4, 13)], heads=4, head_dim=16, points=2, queries=None),
    "kitti_encoder": dict(batch=1, shapes=[(48, 156), (24, 78), (12, 39), (6, 20)], heads=8, head_dim=32, points=4,
                          queries=None),
    "kitti_decoder": dict(batch=1, shapes=[(48, 156), (24, 78), (12, 39), (6, 20)], heads=8, head_dim=32, points=4,
                          queries=300),
}
MSDA_QUICK = {
    "tiny_encoder": dict(batch=2, shapes=[(4, 6), (2, 3)], heads=2, head_dim=4, points=2, queries=None),
    "tiny_decoder": dict(batch=2, shapes=[(4, 6), (2, 3)], heads=2, head_dim=4, points=2, queries=5),
}
MSDA_TARGET_CASES = ("kitti_encoder", "kitti_decoder")


def msda_inputs(case: dict, seed: int = 0):
    """value [B,S,M,Dh], sampling locations [B,Q,M,L,P,2], attention weights (softmax over
    L*P), output gradient; Q = S (encoder: each token samples around its own cell) unless given."""
    g = torch.Generator().manual_seed(seed)
    b, shapes, m, d, p = case["batch"], case["shapes"], case["heads"], case["head_dim"], case["points"]
    levels, s = len(shapes), sum(h * w for h, w in shapes)
    encoder = case["queries"] is None
    q = s if encoder else case["queries"]
    value = torch.randn(b, s, m, d, generator=g)
    if encoder:
        centres = []
        for h, w in shapes:
            ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
            centres.append(torch.stack([xs.flatten() / w, ys.flatten() / h], -1))
        ref = torch.cat(centres)[None, :, None, None, None, :]                      # [1,S,1,1,1,2]
        cells = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32)[:, None]  # [L,1,2]
        locations = ref + torch.randn(b, q, m, levels, p, 2, generator=g) * 2.0 / cells
    else:
        centre = torch.rand(b, q, 1, 1, 1, 2, generator=g)
        size = torch.rand(b, q, 1, 1, 1, 2, generator=g) * 0.3 + 0.02
        locations = centre + (torch.rand(b, q, m, levels, p, 2, generator=g) - 0.5) * size
    weights = torch.randn(b, q, m, levels * p, generator=g).softmax(-1).view(b, q, m, levels, p)
    grad_out = torch.randn(b, q, m * d, generator=g)
    return value, shapes, locations, weights, grad_out


def hf_msda_callable(transformers_mod):
    """HF's pure-PyTorch core, called on our tensors (same layout as ours)."""
    from transformers.models.deformable_detr import modeling_deformable_detr as hf_mod
    core = hf_mod.MultiScaleDeformableAttention()

    def run(value, shapes, locations, weights):
        shapes_t = torch.tensor(shapes, dtype=torch.long)
        starts = torch.cat([shapes_t.new_zeros(1), (shapes_t[:, 0] * shapes_t[:, 1]).cumsum(0)[:-1]])
        return core(value, shapes_t, list(shapes), starts, locations, weights, 64)
    return run


def bench_msda(args, tf, tf_reason) -> dict:
    from models import deformable_attention as mda
    cases = MSDA_QUICK if args.quick else MSDA_CASES
    thread_counts = [1] if args.quick else args.msda_threads
    hf = hf_msda_callable(tf) if tf is not None else None
    uses_hub_kernel = importlib.util.find_spec("kernels") is not None
    results = []
    for threads in thread_counts:
        n_threads = set_threads(threads)
        for name, case in cases.items():
            value, shapes, locations, weights, grad_out = msda_inputs(case)
            leaves = [t.clone().requires_grad_() for t in (value, locations, weights)]
            impls = {impl: functools.partial(mda.multi_scale_deformable_attention, impl=impl)
                     for impl in ("grid_sample", "gather")}
            if hf is not None:
                impls = {"hf": hf, **impls}

            def make(fn):
                def call():
                    for t in leaves:
                        t.grad = None
                    out = fn(leaves[0], shapes, leaves[1], leaves[2])
                    out.backward(grad_out)
                    return out
                return call
            # correctness on identical inputs
            outs, grads = {}, {}
            for impl, fn in impls.items():
                outs[impl] = make(fn)().detach()
                grads[impl] = [t.grad.clone() for t in leaves]
            reference = "hf" if hf is not None else "grid_sample"
            diffs = {}
            for impl in impls:
                if impl == reference:
                    continue
                diffs[impl] = {
                    "vs": reference,
                    "output_max_abs": float((outs[impl] - outs[reference]).abs().max()),
                    "grad_max_abs": {k: float((a - b).abs().max()) for k, a, b in
                                     zip(("value", "locations", "weights"), grads[impl], grads[reference])},
                    "grad_max_rel": {k: float((a - b).abs().max() / b.abs().max().clamp(min=1e-30)) for k, a, b in
                                     zip(("value", "locations", "weights"), grads[impl], grads[reference])},
                }
            del outs, grads
            # the correctness pass above was the warm-up
            times = interleaved({impl: make(fn) for impl, fn in impls.items()}, args.repeats, warmup=0)
            n_points = locations.numel() // 2
            auto = "gather" if n_points >= mda.gather_min_points() else "grid_sample"
            entry = {
                "case": name, "threads": n_threads,
                "shape": {"batch": case["batch"], "spatial_shapes": shapes, "heads": case["heads"],
                          "head_dim": case["head_dim"], "points": case["points"], "queries": locations.shape[1],
                          "tokens": value.shape[1], "sampling_points": n_points},
                "ours_impl": auto, "timings": timing_block(times), "correctness": diffs,
                "output_ok": all(d["output_max_abs"] <= 1e-5 for d in diffs.values()),
            }
            if hf is not None:
                entry["ratio_hf_over_ours"] = ratio(times, "hf", auto)
                entry["ratio_hf_over_grid_sample"] = ratio(times, "hf", "grid_sample")
                entry["ratio_hf_over_gather"] = ratio(times, "hf", "gather")
            entry["ratio_grid_sample_over_gather"] = ratio(times, "grid_sample", "gather")
            results.append(entry)
            _log(f"msda {name} threads={n_threads}: " + ", ".join(
                f"{k} {v['median'] * 1e3:.1f} ms" for k, v in entry["timings"].items())
                + (f"; HF/ours {entry['ratio_hf_over_ours']['median']:.2f}x" if hf is not None else ""))
    target = None
    if hf is not None and not args.quick:
        kitti = [e for e in results if e["case"] in MSDA_TARGET_CASES]
        target = {"description": TARGETS["msda"], "threshold": 1.3,
                  "met": all(e["ratio_hf_over_ours"]["median"] >= 1.3 for e in kitti if e["case"] == "kitti_encoder")
                  and all(e["output_ok"] for e in kitti),
                  "by_case": {f"{e['case']}@{e['threads']}t": e["ratio_hf_over_ours"]["median"] for e in kitti}}
    return {"hf_available": hf is not None, "hf_skipped_reason": tf_reason,
            "hf_implementation": "transformers.models.deformable_detr.modeling_deformable_detr."
                                 "MultiScaleDeformableAttention (pure PyTorch"
                                 + (", but the `kernels` package is installed: it may use a hub kernel)"
                                    if uses_hub_kernel else "; the `kernels` package is absent)"),
            "gather_min_points": {"multi_thread": mda.GATHER_MIN_POINTS,
                                  "single_thread": mda.GATHER_MIN_POINTS_SINGLE_THREAD},
            "cases": results, "target": target}


# ---------------------------------------------------------------------------- 2. train_step

TRAIN_CFG = dict(batch=2, height=256, width=512, d_model=256, heads=8, enc_layers=2, dec_layers=2, ffn=1024,
                 queries=100, levels=4, points=4)
TRAIN_QUICK = dict(batch=1, height=64, width=128, d_model=32, heads=2, enc_layers=1, dec_layers=1, ffn=64,
                   queries=10, levels=4, points=2)


def build_hf_deformable(c: dict):
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, ResNetConfig
    backbone = ResNetConfig(depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512], layer_type="basic",
                            out_features=["stage2", "stage3", "stage4"])
    config = DeformableDetrConfig(
        use_timm_backbone=False, use_pretrained_backbone=False, backbone=None, backbone_config=backbone,
        num_labels=NUM_CLASSES, d_model=c["d_model"], encoder_attention_heads=c["heads"],
        decoder_attention_heads=c["heads"], encoder_layers=c["enc_layers"], decoder_layers=c["dec_layers"],
        encoder_ffn_dim=c["ffn"], decoder_ffn_dim=c["ffn"], num_queries=c["queries"],
        two_stage_num_proposals=c["queries"], num_feature_levels=c["levels"], encoder_n_points=c["points"],
        decoder_n_points=c["points"], with_box_refine=True, two_stage=True, auxiliary_loss=True,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    model = DeformableDetrForObjectDetection(config).train()
    # HF 4.57 means to train ResNet stages 2-4 (as DETR does) but its name test ("stage.1" in
    # "...stages.1...") matches nothing, which freezes the whole backbone; unfreeze them so both
    # models train the same parameters.
    for name, p in model.model.backbone.conv_encoder.model.named_parameters():
        if any(f"stages.{i}." in name for i in (1, 2, 3)):
            p.requires_grad_(True)
    return model


def bench_train_step(args, tf, tf_reason) -> dict:
    from models import build_criterion, build_detector, detector_config
    from models import deformable_attention as mda
    set_threads(args.threads)
    c = TRAIN_QUICK if args.quick else TRAIN_CFG
    torch.manual_seed(0)
    # weights: none, a timing needs no ImageNet file (paper sizes default to imagenet)
    cfg = detector_config("deformable_detr", "paper", backbone={"name": "resnet18", "weights": "none"},
                          d_model=c["d_model"],
                          n_heads=c["heads"], enc_layers=c["enc_layers"], dec_layers=c["dec_layers"],
                          dim_feedforward=c["ffn"], num_queries=c["queries"], num_feature_levels=c["levels"],
                          enc_points=c["points"], dec_points=c["points"], dropout=0.0, with_box_refine=True,
                          two_stage=True)
    ours = build_detector(cfg, NUM_CLASSES).train()
    ours_gs = copy.deepcopy(ours)
    criterion = build_criterion("deformable_detr", NUM_CLASSES)
    images, pad_mask, g = image_batch(c["batch"], c["height"], c["width"], seed=1)
    targets = random_targets(c["batch"], 4, g)

    def trainable(m):
        return [p for p in m.parameters() if p.requires_grad]

    def ours_step(model, opt, force_grid_sample=False):
        def step():
            with msda_threshold(1 << 62 if force_grid_sample else None):
                loss = criterion.total(criterion(model(images, pad_mask, targets), targets))
                loss.backward()
            clip_and_step(trainable(model), opt)
        return step

    candidates = {
        "ours": ours_step(ours, torch.optim.AdamW(trainable(ours), lr=1e-4, weight_decay=1e-4)),
        "ours_grid_sample": ours_step(ours_gs, torch.optim.AdamW(trainable(ours_gs), lr=1e-4, weight_decay=1e-4),
                                      force_grid_sample=True),
    }
    n_params = {"ours": sum(p.numel() for p in trainable(ours))}
    if tf is not None:
        torch.manual_seed(0)
        hf = build_hf_deformable(c)
        hf_opt = torch.optim.AdamW(trainable(hf), lr=1e-4, weight_decay=1e-4)
        labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
        pixel_mask = torch.ones(c["batch"], c["height"], c["width"], dtype=torch.long)

        def hf_step():
            out = hf(pixel_values=images, pixel_mask=pixel_mask, labels=labels)
            out.loss.backward()
            clip_and_step(trainable(hf), hf_opt)
        candidates = {"hf": hf_step, **candidates}
        n_params["hf"] = sum(p.numel() for p in trainable(hf))
    times = interleaved(candidates, args.repeats)
    out = {"config": c, "ours_config": cfg, "trainable_parameters": n_params, "timings": timing_block(times),
           "hf_available": tf is not None, "hf_skipped_reason": tf_reason,
           "ratio_grid_sample_over_ours": ratio(times, "ours_grid_sample", "ours"),
           "matching": ("Both: ResNet-18 layout (BasicBlock [2,2,2,2], widths 64-512, frozen BN, stem and "
                        "first stage frozen), random init, 4 levels (C3-C5 + one stride-2 conv level), "
                        "iterative box refinement + two-stage, focal-loss classification, Hungarian matching "
                        "with auxiliary losses, dropout 0, AdamW (lr 1e-4, wd 1e-4), gradient clip 0.1. "
                        "Differences: HF 4.57 adds no loss on the two-stage encoder proposals (ours does) and "
                        "its default matcher costs are used.")}
    if tf is not None:
        out["ratio_hf_over_ours"] = ratio(times, "hf", "ours")
        if not args.quick:
            out["target"] = {"description": TARGETS["train_step"], "threshold": 1.2,
                             "met": out["ratio_hf_over_ours"]["median"] >= 1.2}
    _log("train_step: " + ", ".join(f"{k} {v['median']:.3f} s" for k, v in out["timings"].items())
         + (f"; HF/ours {out['ratio_hf_over_ours']['median']:.2f}x" if tf is not None else ""))
    return out


# ---------------------------------------------------------------------------- 3. distill_overhead

def registered_methods() -> dict[str, type]:
    import distill
    methods = dict(distill.METHODS)
    try:
        from distill import registry_baselines
        extra = getattr(registry_baselines, "BASELINES", {}) or {}
        for name, cls in dict(extra).items():
            methods.setdefault(name, cls)
    except ImportError:
        pass
    return methods


def load_params_safe() -> dict:
    try:
        from reproduce.core.config import load_params
        return load_params(ROOT / "params.yaml")
    except Exception:   # noqa: BLE001 - the bench still runs with code defaults
        return {}


def bench_distill_overhead(args, *_):
    from distill import Distiller
    from models import build_criterion, build_detector, detector_config
    set_threads(args.threads)
    params = load_params_safe()
    mini = params.get("profiles", {}).get("mini", {})
    teacher_overrides = mini.get("teacher", {}).get("overrides", {}) or {}
    method_cfgs = params.get("distill", {}) or {}
    methods = registered_methods()
    if args.quick:
        size, batch, height, width, n_boxes = "tiny", 2, 64, 96, (1, 2)
        teacher_overrides = {}
    else:
        size, batch, height, width, n_boxes = "mini", 8, 128, 416, (3, 5)
    per_detector = []
    for det in DETECTORS:
        torch.manual_seed(0)
        student_cfg = detector_config(det, size)
        teacher_cfg = detector_config(det, size, **teacher_overrides)
        student0 = build_detector(student_cfg, NUM_CLASSES).train()
        teacher = build_detector(teacher_cfg, NUM_CLASSES).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        images, pad_mask, g = image_batch(batch, height, width, seed=2)
        targets = random_targets(batch, n_boxes, g)
        candidates, errors = {}, {}

        def make_step(distiller):
            opt = torch.optim.AdamW(distiller.trainable_parameters(), lr=1e-4, weight_decay=1e-4)

            def step():
                losses = distiller(images, pad_mask, targets)
                distiller.total(losses).backward()
                clip_and_step(distiller.trainable_parameters(), opt)
            return step

        plain = Distiller(copy.deepcopy(student0), build_criterion(det, NUM_CLASSES)).train()
        candidates["student"] = make_step(plain)

        def teacher_forward():
            with torch.no_grad():
                teacher(images, pad_mask)
        candidates["teacher_forward"] = teacher_forward
        for name, cls in methods.items():
            if name == "student":
                continue
            def make_distiller(cls=cls, name=name):
                return cls(copy.deepcopy(student0), build_criterion(det, NUM_CLASSES), teacher=teacher,
                           cfg=dict(method_cfgs.get(name) or {})).train()
            try:
                step = make_step(make_distiller())
                step()   # fails here rather than inside the timing loop
                candidates[name] = step
            except Exception as exc:   # noqa: BLE001 - a method that cannot run is reported, not fatal
                errors[name] = f"{type(exc).__name__}: {exc}"
                continue
            cached = cached_distiller(make_distiller(), images, pad_mask, targets)
            if cached is not None:
                candidates[f"{name}+cache"] = make_step(cached)
        # short steps and a 10% target: twice the rounds of the other comparisons
        times = interleaved(candidates, 2 * args.repeats)
        kd = [n for n in candidates if n not in ("student", "teacher_forward")]
        entry = {"detector": det, "student_config": student_cfg, "teacher_config": teacher_cfg,
                 "batch": [batch, 3, height, width], "timings": timing_block(times), "errors": errors,
                 "ratio_to_student": {n: ratio(times, n, "student") for n in kd},
                 "ratio_to_student_plus_teacher": {n: ratio(times, n, ["student", "teacher_forward"]) for n in kd},
                 "teacher_forward_over_student": ratio(times, "teacher_forward", "student")}
        per_detector.append(entry)
        _log(f"distill_overhead {det}: student {entry['timings']['student']['median']:.3f} s, teacher fwd "
             f"{entry['timings']['teacher_forward']['median']:.3f} s; " + ", ".join(
                 f"{n} {entry['ratio_to_student_plus_teacher'][n]['median']:.2f}x(s+t)" for n in kd)
             + (f"; errors: {sorted(errors)}" if errors else ""))
    out = {"size": size, "methods": sorted(methods), "method_cfgs": method_cfgs, "detectors": per_detector,
           # KD step / student step with the teacher read from its output cache (reproduce.teacher_cache)
           "cached_ratio_to_student": {e["detector"]: {n.removesuffix("+cache"): r["median"]
                                                       for n, r in e["ratio_to_student"].items() if n.endswith("+cache")}
                                       for e in per_detector}}
    if not args.quick:
        ratios = {e["detector"]: e["ratio_to_student_plus_teacher"].get("clockdistill", {}).get("median")
                  for e in per_detector}
        out["target"] = {"description": TARGETS["distill_overhead"], "threshold": 1.1,
                         "met": all(r is not None and r <= 1.1 for r in ratios.values()), "by_detector": ratios}
    return out


def cached_distiller(distiller, images, pad_mask, targets):
    """``distiller`` reading its teacher outputs for this batch from a TeacherCache (recorded
    once here, as the cache builder does); None for a method that keeps the live teacher (its
    teacher inputs change from step to step)."""
    from distill import NotCacheable
    from distill.teacher_cache import TeacherCache
    try:
        groups = distiller.teacher_groups(images, targets)
    except NotCacheable:
        return None
    cache = TeacherCache("bench", record=True)
    distiller.use_teacher_cache(cache)
    distiller.teacher_forward(images, pad_mask, groups=groups)
    cache.record = False
    return distiller


# ---------------------------------------------------------------------------- 4. models

def _proc_status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def model_child(spec: dict) -> dict:
    """Runs in a fresh interpreter: build one model, time its training steps, peak memory.

    Peak memory is the kernel's high-water mark of resident memory (VmHWM), reset just before
    the model is built, minus the resident memory at that moment. ``ru_maxrss`` cannot be used
    here: Linux carries it over from the parent across fork + exec."""
    from models import build_criterion, build_detector, detector_config
    set_threads(spec["threads"])
    rss_before = _proc_status_kib("VmRSS")
    reset = _reset_peak_rss()
    if rss_before is None or not reset:     # no procfs: fall back to ru_maxrss (KiB on Linux)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.manual_seed(0)
    cfg = detector_config(spec["detector"], spec["size"], **spec.get("overrides", {}))
    model = build_detector(cfg, NUM_CLASSES).train()
    criterion = build_criterion(spec["detector"], NUM_CLASSES)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4)
    images, pad_mask, g = image_batch(spec["batch"], spec["height"], spec["width"], seed=3)
    targets = random_targets(spec["batch"], (3, 5), g)
    times = []
    for _ in range(spec["warmup"] + spec["steps"]):
        start = time.perf_counter()
        loss = criterion.total(criterion(model(images, pad_mask, targets), targets))
        loss.backward()
        clip_and_step(params, opt)
        times.append(time.perf_counter() - start)
    peak = _proc_status_kib("VmHWM") if reset else None
    if peak is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"step_seconds": times[spec["warmup"]:], "warmup_seconds": times[:spec["warmup"]],
            "peak_rss_mib": peak / 1024, "rss_before_model_mib": rss_before / 1024,
            "peak_growth_mib": (peak - rss_before) / 1024,
            "peak_source": "VmHWM after reset (/proc/self/clear_refs)" if reset else "ru_maxrss",
            "parameters": sum(p.numel() for p in model.parameters()), "trainable": sum(p.numel() for p in params),
            "config": cfg}


def run_json_child(argv: list[str], marker: str, timeout: float) -> dict:
    """Run ``python -m <argv>`` in a fresh process (its own peak memory, no shared caches) and
    return the JSON it prints after ``marker``, or ``{"error": ...}`` saying why there is none."""
    cmd = [sys.executable, "-m", *argv]
    try:
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(res.stdout.splitlines()):
        if line.startswith(marker + " "):
            return json.loads(line[len(marker) + 1:])
    return {"error": f"exit {res.returncode}: {res.stderr.strip()[-2000:]}"}


def run_child(spec: dict, timeout: float) -> dict:
    return run_json_child(["reproduce.bench", "--child", json.dumps(spec)], "BENCH_CHILD_RESULT", timeout)


def bench_models(args, *_):
    rows = []
    if args.quick:   # one subprocess is enough to exercise the path
        specs = [dict(detector="deformable_detr", size="tiny", batch=2, height=64, width=96, warmup=1, steps=1,
                      label="tiny")]
    else:
        specs = []
        for d in DETECTORS:
            specs.append(dict(detector=d, size="mini", batch=8, height=128, width=416, warmup=1,
                              steps=max(3, args.repeats), label="mini"))
            specs.append(dict(detector=d, size="paper", batch=1, height=384, width=1248, warmup=1, steps=1,
                              label="paper", overrides={"backbone": {"weights": "none"}}))
    for spec in specs:
        spec["threads"] = args.threads
        result = run_child(spec, timeout=900)
        note = None
        if (spec["label"] == "paper" and "error" not in result
                and min(result["step_seconds"] + result["warmup_seconds"]) > PAPER_STEP_LIMIT_S):
            note = (f"one step at 384x1248 took {min(result['step_seconds']):.0f} s > {PAPER_STEP_LIMIT_S:.0f} s: "
                    "measured at 256x832 instead")
            spec = {**spec, "height": 256, "width": 832}
            result = run_child(spec, timeout=900)
        row = {"detector": spec["detector"], "size": spec["label"], "batch": spec["batch"],
               "image": [spec["height"], spec["width"]], "threads": spec["threads"], "note": note, **result}
        if "step_seconds" in result:
            row["step"] = stats(result["step_seconds"])
        rows.append(row)
        _log(f"models {spec['detector']} {spec['label']} {spec['height']}x{spec['width']}: "
             + (f"step {row['step']['median']:.2f} s, peak +{row['peak_growth_mib']:.0f} MiB"
                if "step" in row else row.get("error", "?")))
    return {"memory_method": "fresh subprocess per configuration: kernel peak-RSS mark (VmHWM), reset just "
                             "before the model is built, minus the resident memory at that moment (weights + "
                             "grads + AdamW state + the step's activations and workspace)",
            "rows": rows}


# ---------------------------------------------------------------------------- 5. eval

def postprocess_fn():
    try:
        from reproduce.evaluation.evaluate import postprocess
        return postprocess, "reproduce.evaluation.evaluate.postprocess"
    except Exception:   # noqa: BLE001 - the evaluation module may be absent or mid-edit
        from models.box_ops import box_cxcywh_to_xyxy

        def postprocess(logits, boxes, orig_sizes, k=100):
            b, q, c = logits.shape
            prob = logits.float().sigmoid().flatten(1)
            scores, idx = prob.topk(min(k, q * c), dim=1)
            xyxy = torch.gather(box_cxcywh_to_xyxy(boxes.float()), 1, (idx // c)[..., None].expand(-1, -1, 4))
            h, w = orig_sizes.float().unbind(-1)
            xyxy = xyxy * torch.stack([w, h, w, h], -1)[:, None]
            return [(scores[i], idx[i] % c, xyxy[i]) for i in range(b)]
        return postprocess, "bench fallback (same top-k rule)"


def synthetic_coco(n_images: int, seed: int = 0, dets_per_image: int = 100):
    """GT and detections as COCO dicts: detections are jittered GT plus random false positives."""
    rng = random.Random(seed)
    images, anns, dets = [], [], []
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(("Car", "Pedestrian", "Cyclist"))]
    width, height = 416, 128
    aid = 0
    for img in range(1, n_images + 1):
        images.append({"id": img, "width": width, "height": height, "file_name": f"{img:06d}.png"})
        gts = []
        for _ in range(rng.randint(1, 8)):
            w, h = rng.uniform(8, 120), rng.uniform(8, 80)
            x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
            aid += 1
            cat = rng.randint(1, 3)
            anns.append({"id": aid, "image_id": img, "category_id": cat, "bbox": [x, y, w, h], "area": w * h,
                         "iscrowd": 0})
            gts.append((cat, x, y, w, h))
        for k in range(dets_per_image):
            if k < len(gts) * 2:
                cat, x, y, w, h = gts[k % len(gts)]
                j = lambda s: rng.gauss(0, 0.1 * s)   # noqa: E731
                box = [x + j(w), y + j(h), w * (1 + rng.gauss(0, 0.1)), h * (1 + rng.gauss(0, 0.1))]
                score = rng.uniform(0.3, 1.0)
            else:
                w, h = rng.uniform(8, 120), rng.uniform(8, 80)
                box, cat, score = [rng.uniform(0, width - w), rng.uniform(0, height - h), w, h], rng.randint(1, 3), \
                    rng.uniform(0.0, 0.5)
            dets.append({"image_id": img, "category_id": cat, "bbox": box, "score": score})
    return {"images": images, "annotations": anns, "categories": cats}, dets


def coco_eval_once(gt: dict, dets: list[dict]) -> float:
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        res = coco.loadRes(copy.deepcopy(dets))
        ev = COCOeval(coco, res, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0])


def bench_eval(args, *_):
    from models import build_detector, detector_config
    set_threads(args.threads)
    postprocess, pp_source = postprocess_fn()
    if args.quick:
        size, batch, height, width, n_images = "tiny", 2, 64, 96, 10
    else:
        size, batch, height, width, n_images = "mini", 16, 128, 416, 300
    images, pad_mask, _ = image_batch(batch, height, width, seed=4)
    orig = torch.tensor([[375, 1242]] * batch)
    candidates = {}
    for det in DETECTORS:
        torch.manual_seed(0)
        model = build_detector(detector_config(det, size), NUM_CLASSES).eval()

        def run(model=model):
            with torch.no_grad():
                out = model(images, pad_mask)
                postprocess(out.logits, out.boxes, orig)
        candidates[det] = run
    times = interleaved(candidates, args.repeats)
    throughput = {det: {"images_per_s": stats([batch / t for t in ts]), "seconds_per_batch": stats(ts)}
                  for det, ts in times.items()}
    gt, dets = synthetic_coco(n_images)
    ap = coco_eval_once(gt, dets)
    coco_times = interleaved({"cocoeval": lambda: coco_eval_once(gt, dets)}, max(2, min(args.repeats, 5)), warmup=0)
    out = {"size": size, "batch": [batch, 3, height, width], "postprocess": pp_source, "throughput": throughput,
           "cocoeval": {"images": n_images, "ground_truth": len(gt["annotations"]), "detections": len(dets),
                        "AP": ap, "includes": "COCO index, loadRes, evaluate, accumulate, summarize",
                        **timing_block(coco_times)["cocoeval"]}}
    _log("eval: " + ", ".join(f"{d} {v['images_per_s']['median']:.1f} img/s" for d, v in throughput.items())
         + f"; COCOeval({n_images} images) {out['cocoeval']['median']:.2f} s")
    return out


# ---------------------------------------------------------------------------- figure and summary

def _fmt(r: dict | None, digits: int = 2) -> str:
    if not r or r.get("n", 0) == 0:
        return "n/a"
    return f"{r['median']:.{digits}f} [{r['q1']:.{digits}f}-{r['q3']:.{digits}f}]"


def summary_rows(out_dir: Path) -> list[dict]:
    """Ratios worth plotting: label, stats, target threshold and direction."""
    rows = []
    msda = _read(out_dir / "msda.json")
    if msda:
        for e in msda.get("cases", []):
            if "ratio_hf_over_ours" in e:
                rows.append({"bench": "msda", "label": f"{e['case']} ({e['threads']}t): HF / ours [{e['ours_impl']}]",
                             "ratio": e["ratio_hf_over_ours"],
                             "target": 1.3 if e["case"] == "kitti_encoder" else None, "higher_better": True})
            rows.append({"bench": "msda", "label": f"{e['case']} ({e['threads']}t): grid_sample / gather",
                         "ratio": e["ratio_grid_sample_over_gather"], "target": None, "higher_better": True})
    ts = _read(out_dir / "train_step.json")
    if ts:
        if "ratio_hf_over_ours" in ts:
            rows.append({"bench": "train_step", "label": "HF / ours", "ratio": ts["ratio_hf_over_ours"],
                         "target": 1.2, "higher_better": True})
        rows.append({"bench": "train_step", "label": "ours (grid_sample msda) / ours",
                     "ratio": ts["ratio_grid_sample_over_ours"], "target": None, "higher_better": True})
    do = _read(out_dir / "distill_overhead.json")
    if do:
        for e in do.get("detectors", []):
            for name, r in e["ratio_to_student_plus_teacher"].items():
                rows.append({"bench": "distill_overhead", "label": f"{e['detector']}: {name} / (student + teacher)",
                             "ratio": r, "target": 1.1 if name == "clockdistill" else None, "higher_better": False})
    return rows


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text()).get("result")
    except (OSError, ValueError):
        return None


def write_summary(out_dir: Path) -> Path:
    lines = ["# Benchmarks", ""]
    machine, loads = None, []
    for name in BENCHMARKS:
        data = None
        try:
            data = json.loads((out_dir / f"{name}.json").read_text())
        except (OSError, ValueError):
            pass
        if data:
            machine = machine or data.get("machine")
            m = data.get("machine", {})
            loads += [m.get("load_average", [None])[0], m.get("load_average_end", [None])[0]]
    if machine:
        loads = [x for x in loads if x is not None]
        load = f"; 1-min load average {min(loads):.1f}-{max(loads):.1f} during the run" if loads else ""
        lines += [f"Machine: {machine['cpu_model']}, {machine['logical_cpus']} logical CPUs, torch "
                  f"{machine['torch']}, transformers {machine.get('transformers') or 'not installed'}; "
                  f"{machine['date']}{load}. Medians over interleaved rounds, [IQR] in brackets; ratios are "
                  "taken within a round. Single-threaded rows (1t, and every benchmark but the msda 2t rows) "
                  "time process CPU time; multi-threaded rows time wall-clock, which on a shared CPU includes "
                  "waiting for descheduled worker threads.", ""]
    rows = summary_rows(out_dir)
    if rows:
        lines += ["| benchmark | comparison | ratio, median [IQR] | target | met |", "|---|---|---|---|---|"]
        for r in rows:
            target, met = "", ""
            if r["target"] is not None:
                target = (">= " if r["higher_better"] else "<= ") + f"{r['target']:g}"
                ok = r["ratio"]["median"] >= r["target"] if r["higher_better"] else r["ratio"]["median"] <= r["target"]
                met = "yes" if ok else "**no**"
            lines.append(f"| {r['bench']} | {r['label']} | {_fmt(r['ratio'])} | {target} | {met} |")
        lines.append("")
    msda = _read(out_dir / "msda.json")
    if msda:
        lines += ["## msda: forward + backward, ms", "",
                  "| case | threads | sampling points | HF | ours grid_sample | ours gather | auto picks "
                  "| max abs diff (output) |",
                  "|---|---|---|---|---|---|---|---|"]
        for e in msda["cases"]:
            t = e["timings"]
            diff = max((d["output_max_abs"] for d in e["correctness"].values()), default=float("nan"))
            lines.append(f"| {e['case']} | {e['threads']} | {e['shape']['sampling_points']:,} | "
                         f"{_fmt(_scaled(t.get('hf'), 1e3), 1)} | {_fmt(_scaled(t['grid_sample'], 1e3), 1)} | "
                         f"{_fmt(_scaled(t['gather'], 1e3), 1)} | {e['ours_impl']} | {diff:.1e} |")
        lines.append("")
    ts = _read(out_dir / "train_step.json")
    if ts:
        c = ts["config"]
        lines += ["## train_step, s", "",
                  f"{c['batch']} images {c['height']}x{c['width']}, d={c['d_model']}, {c['enc_layers']}+"
                  f"{c['dec_layers']} layers, {c['queries']} queries, {c['levels']} levels, {c['points']} points, "
                  f"ResNet-18 layout; trainable parameters {ts['trainable_parameters']}.", "",
                  "| candidate | step, s |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v, 3)} |" for k, v in ts["timings"].items()]
        lines.append("")
    do = _read(out_dir / "distill_overhead.json")
    if do:
        b = do["detectors"][0]["batch"] if do["detectors"] else ["?", 3, "?", "?"]
        lines += [f"## distill_overhead ({do['size']} sizes, batch {b[0]} of {b[2]}x{b[3]}), s", ""]
        for e in do["detectors"]:
            t = e["timings"]
            lines += [f"**{e['detector']}**: student step {_fmt(t['student'], 3)}, teacher forward "
                      f"{_fmt(t['teacher_forward'], 3)}" + (f"; failed: {', '.join(sorted(e['errors']))}"
                                                           if e["errors"] else ""), "",
                      "| method | step, s | / student | / (student + teacher fwd) |", "|---|---|---|---|"]
            for n, r in e["ratio_to_student_plus_teacher"].items():
                lines.append(f"| {n} | {_fmt(t[n], 3)} | {_fmt(e['ratio_to_student'][n])} | {_fmt(r)} |")
            lines.append("")
    mo = _read(out_dir / "models.json")
    if mo:
        lines += ["## models: one training step", "",
                  "| detector | size | batch x image | step, s | peak memory growth, MiB | parameters |",
                  "|---|---|---|---|---|---|"]
        for r in mo["rows"]:
            if "step" in r:
                lines.append(f"| {r['detector']} | {r['size']} | {r['batch']} x {r['image'][0]}x{r['image'][1]} | "
                             f"{_fmt(r['step'], 2)} | {r['peak_growth_mib']:.0f} | {r['parameters'] / 1e6:.1f} M |")
            else:
                lines.append(f"| {r['detector']} | {r['size']} | | error: {r.get('error', '?')[:80]} | | |")
        lines.append("")
    ev = _read(out_dir / "eval.json")
    if ev:
        lines += ["## eval", "", "| detector | images/s (forward + post-processing) |", "|---|---|"]
        lines += [f"| {d} | {_fmt(v['images_per_s'], 1)} |" for d, v in ev["throughput"].items()]
        ce = ev["cocoeval"]
        lines += ["", f"COCOeval on {ce['images']} synthetic images ({ce['ground_truth']} GT boxes, "
                      f"{ce['detections']} detections): {_fmt(ce, 2)} s.", ""]
    de = _read(out_dir / "deploy.json")
    if de:
        from reproduce.bench.deploy_bench import deploy_table
        lines += ["## deploy: batch-1 inference, PyTorch eager vs onnxruntime", "",
                  "Random weights; latency median [IQR] over interleaved rounds; GFLOPs: conv + matmul "
                  "(FlopCounterMode); peak memory: resident growth from loading the model to the end of "
                  "its first inference, fresh process per runtime; AP: stored metrics of the trained "
                  "checkpoints of the same configs (reproduce/bench/deploy_bench.py).", ""]
        from reproduce.report.tables import CONFIG_MARKS_NOTE
        lines += deploy_table(de) + ["", CONFIG_MARKS_NOTE, ""]
    path = out_dir / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _scaled(r: dict | None, k: float) -> dict | None:
    if not r:
        return None
    return {key: (v * k if key in ("median", "q1", "q3", "min", "max") else v) for key, v in r.items()}


def write_figure(out_dir: Path) -> Path | None:
    rows = summary_rows(out_dir)
    if not rows:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    benches = [b for b in ("msda", "train_step", "distill_overhead") if any(r["bench"] == b for r in rows)]
    heights = [max(1.2, 0.32 * sum(r["bench"] == b for r in rows) + 0.8) for b in benches]
    fig, axes = plt.subplots(len(benches), 1, figsize=(8.5, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, bench in zip(axes[:, 0], benches):
        sel = [r for r in rows if r["bench"] == bench]
        y = list(range(len(sel)))[::-1]
        med = [r["ratio"]["median"] for r in sel]
        lo = [r["ratio"]["median"] - r["ratio"]["q1"] for r in sel]
        hi = [r["ratio"]["q3"] - r["ratio"]["median"] for r in sel]
        colors = []
        for r in sel:
            if r["target"] is None:
                colors.append("0.6")
            else:
                ok = r["ratio"]["median"] >= r["target"] if r["higher_better"] else r["ratio"]["median"] <= r["target"]
                colors.append("tab:green" if ok else "tab:red")
        ax.barh(y, med, xerr=[lo, hi], color=colors, capsize=3)
        ax.scatter([r["ratio"]["min"] for r in sel], y, marker="|", color="k", s=40, zorder=3)
        ax.scatter([r["ratio"]["max"] for r in sel], y, marker="|", color="k", s=40, zorder=3)
        ax.set_yticks(y, [r["label"] for r in sel], fontsize=7)
        ax.axvline(1.0, color="k", lw=0.8)
        for t in sorted({r["target"] for r in sel if r["target"] is not None}):
            ax.axvline(t, color="tab:blue", ls="--", lw=0.8)
        ax.set_title({"msda": "deformable attention fwd+bwd: speed-up (higher is better)",
                      "train_step": "Deformable DETR training step: speed-up (higher is better)",
                      "distill_overhead": "KD step / (student step + teacher forward) (lower is better)"}[bench],
                     fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
    axes[-1, 0].set_xlabel("ratio (bar: median, error bar: IQR, ticks: min/max; dashed: target)", fontsize=8)
    fig.tight_layout()
    path = out_dir / "bench.png"
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------- CLI

def bench_deploy(args, *_):
    from reproduce.bench.deploy_bench import bench_deploy as run
    return run(args)


RUNNERS = {"msda": bench_msda, "train_step": bench_train_step, "distill_overhead": bench_distill_overhead,
           "models": bench_models, "eval": bench_eval, "deploy": bench_deploy}


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _thread_list(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip()
        out.append(0 if part == "all" else int(part))
    return list(dict.fromkeys(os.cpu_count() if n == 0 else n for n in out))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m reproduce.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes, 2 repeats (the smoke test)")
    p.add_argument("--only", nargs="+", choices=BENCHMARKS, metavar="NAME", help=f"subset of {BENCHMARKS}")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per comparison (default 5; quick: 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: all cores); default 1")
    p.add_argument("--clock", choices=("auto", "cpu", "wall"), default="auto",
                   help="timer: process CPU time or wall time (auto: CPU time when single-threaded, which "
                        "a co-tenant's load disturbs far less; both are recorded)")
    p.add_argument("--msda-threads", type=_thread_list, default=None,
                   help="thread counts for msda, e.g. '1,all' (default: --threads and all cores)")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "bench", help="output folder")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        result = model_child(json.loads(args.child))
        print("BENCH_CHILD_RESULT " + json.dumps(result, default=_json_default), flush=True)
        return 0
    os.chdir(ROOT)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    args.repeats = args.repeats or (2 if args.quick else 5)
    CLOCK["choice"] = args.clock
    args.threads = set_threads(args.threads)
    if args.msda_threads is None:
        args.msda_threads = list(dict.fromkeys([args.threads, os.cpu_count() or 1]))
    selected = args.only or list(BENCHMARKS)
    tf, tf_reason = None, None
    if {"msda", "train_step"} & set(selected):
        tf, tf_reason = import_transformers()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for name in selected:
        set_threads(args.threads)
        machine = machine_info()
        t0 = time.perf_counter()
        result = RUNNERS[name](args, tf, tf_reason)
        machine["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        write_json(args.out / f"{name}.json", {
            "benchmark": name, "machine": machine, "quick": args.quick, "repeats": args.repeats,
            "threads": args.threads, "clock_choice": args.clock, "wall_seconds": time.perf_counter() - t0,
            "result": result}, default=_json_default, sort_keys=False)
    summary = write_summary(args.out)
    figure = write_figure(args.out)
    _log(f"done in {time.perf_counter() - started:.0f} s: {summary}" + (f", {figure}" if figure else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
