"""Train a detector (teacher or student) with or without distillation; step-based, resumable.

Usage::

    python -m reproduce.train --detector dino --role student [--method student|<kd method>]
        [--teacher runs/mini/dino/teacher/model.pth] --out runs/mini/dino/student
        [--seed N] [--profile P] [-S train.lr=2e-4 ...] [--max-steps N] [--resume auto|never|PATH]
    torchrun --nproc_per_node=8 -m reproduce.train ...        # data parallel

``-S key=value`` overrides params.yaml (dotted keys; ``train.*``, ``image.*``, ``student.*``
... are relative to the profile). ``--max-steps N`` stops after global step N *without*
changing the schedule (LR drop etc. still refer to ``train.steps``); a later call continues
from the checkpoint. Change the schedule itself with ``-S train.steps=N``.

``--init-from CKPT`` (fine-tuning): start the student from a trained model.pth / checkpoint.pth
of the same detector and config, trained on any dataset; when its class count differs from
this dataset's, the class-dependent weights (class heads, DINO's denoising label embedding)
are re-initialised with a note on stderr (``reproduce.training.checkpoint.load_detector(reinit_classes=
True)``, as DINO's ``--finetune_ignore``). A run that resumes from its own checkpoint ignores it.

Outputs in ``--out``: ``checkpoint.pth`` (resume state, every ``checkpoint_every`` steps and at
the end), ``model.pth`` (student weights, EMA when enabled), ``train_log.csv`` (one row per
``log_every`` steps: step, epoch, lr, loss, each loss term, grad norm, seconds/step, skipped),
``train_summary.json`` and ``config.json``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm import tqdm

from distill import METHODS, build_distiller
from models.backbone import BackboneWeightsError
from models.build import build_criterion, build_detector
from reproduce.training import checkpoint as ckpt_io
from reproduce.training import distributed as du
from reproduce.core.config import ConfigError, OneLineParser, load_params, write_json
from reproduce.training.engine import (PREEMPTED_EXIT_CODE, CSVLog, MetricWindow, ModelEMA, PreemptionNotice,
                              ResumableBatchSampler, SeededSamples, amp_settings,
                              build_optimizer, build_scheduler, capped_workers, seed_everything, targets_to,
                              train_step, worker_init_fn)
from reproduce.training.runconfig import resolve_run

log = logging.getLogger("reproduce.training.train")

LOG_NAME = "train_log.csv"
SUMMARY_NAME = "train_summary.json"


def build_train_dataset(cfg: dict):
    from reproduce.data.datasets import DetectionDataset
    from reproduce.data.transforms import build_transforms
    return DetectionDataset(cfg["data"]["train"], transforms=build_transforms(True, cfg["image"]))


def load_teacher(path: str | Path, cfg: dict, num_classes: int, allow_unfinished: bool = False) -> torch.nn.Module:
    """The profile's teacher with its trained weights (EMA if any). The file must hold a model
    of the run's detector with the profile's teacher config and class count, from a finished
    run unless ``allow_unfinished`` (then a warning says how far it got)."""
    if not cfg.get("teacher_model"):
        raise ConfigError("the profile has no teacher section to build the teacher from")
    teacher, meta = ckpt_io.load_detector(path, cfg["detector"], cfg["teacher_model"], num_classes,
                                          require_completed=not allow_unfinished, what="teacher")
    if meta.get("completed") is False:
        log.warning("teacher %s stopped at step %s of %s (--allow-unfinished-teacher)", path, meta.get("steps"),
                    meta.get("total_steps"))
    return teacher


def build_loader(dataset, cfg: dict, info: du.DistInfo) -> tuple[DataLoader, ResumableBatchSampler, torch.Generator]:
    train = cfg["train"]
    seed = int(cfg["seed"])
    batch_sampler = ResumableBatchSampler(len(dataset), int(train["batch_size"]), seed, info.rank, info.world_size)
    generator = torch.Generator()
    generator.manual_seed(seed + 1000 * info.rank)
    from reproduce.data.transforms import collate
    workers = capped_workers(int(train.get("num_workers", 0)))
    loader = DataLoader(SeededSamples(dataset, seed), batch_sampler=batch_sampler, collate_fn=collate,
                        num_workers=workers, worker_init_fn=worker_init_fn, generator=generator,
                        pin_memory=info.device.type == "cuda", persistent_workers=workers > 0)
    return loader, batch_sampler, generator


def _check_resume_config(saved: dict, cfg: dict) -> None:
    for key in ("detector", "method", "model"):
        if saved.get(key) != cfg.get(key):
            raise ConfigError(f"checkpoint was written by a run with a different {key!r} "
                              f"({saved.get(key)!r} vs {cfg.get(key)!r}); use another --out or --resume never")
    for key in ("train", "seed", "image", "distill"):
        if saved.get(key) != cfg.get(key):
            log.warning("resuming with a different %r config than the checkpoint's", key)


def train(cfg: dict, out_dir: str | Path, *, teacher: str | Path | None = None, max_steps: int | None = None,
          resume: str = "auto", device: str | None = None, dataset=None, show_progress: bool = True,
          return_distiller: bool = False, allow_unfinished_teacher: bool = False,
          init_from: str | Path | None = None):
    """Run (or continue) one training run described by ``cfg`` (from :func:`resolve_run`).

    ``dataset``: a ready training dataset (tests); default: the prepared train split with the
    profile's training transforms. Returns the summary dict (rank 0 writes it to disk), and the
    trained distiller too with ``return_distiller``. ``init_from``: the fine-tuning start
    (module docstring). On SIGTERM or SIGUSR1 (a scheduler's
    notice) the run checkpoints at the next step boundary and returns with ``preempted`` set.
    """
    out_dir = Path(out_dir)
    info = du.init_distributed(device)
    dev = info.device
    train_cfg = cfg["train"]
    seed = int(cfg["seed"])

    # ---- data, model, teacher: identical initialisation on every rank ----------------------
    # (all of it before --out exists: a run that cannot start leaves nothing behind)
    seed_everything(seed)
    dataset = dataset if dataset is not None else build_train_dataset(cfg)
    num_classes = int(dataset.num_classes)
    student = build_detector(cfg["model"], num_classes)
    if init_from is not None:
        start, _ = ckpt_io.load_detector(init_from, cfg["detector"], cfg["model"], num_classes,
                                         what="--init-from model", reinit_classes=True)
        student.load_state_dict(start.state_dict())
        del start
    criterion = build_criterion(cfg["detector"], num_classes)
    # after the student: building the teacher draws from the RNG the student's init used
    teacher_model = load_teacher(teacher, cfg, num_classes, allow_unfinished_teacher) if teacher is not None else None
    distiller = build_distiller(cfg["method"], student, criterion, teacher=teacher_model, cfg=cfg.get("distill"))
    distiller.to(dev)
    distiller.train()

    optimizer = build_optimizer(distiller, train_cfg)
    scheduler = build_scheduler(optimizer, train_cfg)
    amp_dtype, needs_scaler = amp_settings(train_cfg, dev)
    scaler = torch.amp.GradScaler("cuda", enabled=True) if needs_scaler else None
    ema = ModelEMA(distiller.student, float(train_cfg.get("ema_decay", 0.9997))) if train_cfg.get("ema") else None
    loader, batch_sampler, loader_gen = build_loader(dataset, cfg, info)

    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    du.barrier()

    # ---- resume ------------------------------------------------------------------------------
    step, epoch, batch_in_epoch = 0, 0, 0
    counters = {"skipped_nonfinite": 0, "train_time_s": 0.0, "sessions": 0}
    rng = None
    resume_path = ckpt_io.find_resume(out_dir, resume)
    state = ckpt_io.load(resume_path) if resume_path is not None else None
    if state is not None and resume == "unfinished" and int(state["step"]) >= int(train_cfg["steps"]):
        # a DVC stage reruns because a dependency changed: a finished run is stale, start over
        if info.is_main:
            log.info("%s holds a finished run: starting over (--resume unfinished)", resume_path)
        resume_path = state = None
    if state is not None:
        _check_resume_config(state.get("config") or {}, cfg)
        distiller.student.load_state_dict(state["model"])
        missing, unexpected = distiller.load_state_dict(state["kd"], strict=False)
        kd_missing = [k for k in missing if k in distiller.kd_state_dict()]
        if unexpected or kd_missing:
            raise RuntimeError(f"{resume_path}: KD state does not fit (unexpected {unexpected[:3]}, "
                               f"missing {kd_missing[:3]})")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema"):
            ema.load_state_dict(state["ema"])
        step, epoch, batch_in_epoch = int(state["step"]), int(state["epoch"]), int(state["batch_in_epoch"])
        counters.update(state.get("counters") or {})
        if state.get("loader_generator") is not None:
            loader_gen.set_state(state["loader_generator"])
        rngs = state.get("rng") or []
        rng = rngs[info.rank] if len(rngs) == info.world_size else None
        if rng is None:
            log.warning("checkpoint RNG states are for %d ranks, this run has %d: reseeding", len(rngs),
                        info.world_size)
        if info.is_main:
            log.info("resumed from %s at step %d (epoch %d)", resume_path, step, epoch)
    counters["sessions"] = int(counters.get("sessions", 0)) + 1
    resumed_from = step

    model = distiller
    if info.distributed:
        model = DDP(distiller, device_ids=[dev.index] if dev.type == "cuda" else None,
                    find_unused_parameters=bool(train_cfg.get("find_unused_parameters", False)))
    if ema is not None and resume_path is None:
        ema = ModelEMA(distiller.student, ema.decay)   # after DDP's broadcast of rank 0's weights

    # training randomness (dropout, denoising noise) differs per rank; restored on resume
    if rng is not None:
        ckpt_io.set_rng_state(rng)
    else:
        seed_everything(seed + info.rank + 7919 * step)

    total_steps = int(train_cfg["steps"])
    stop_at = min(total_steps, int(max_steps)) if max_steps else total_steps
    log_every = max(1, int(train_cfg.get("log_every", 25)))
    ckpt_every = int(train_cfg.get("checkpoint_every", 0) or 0)
    clip = float(train_cfg.get("clip_max_norm", 0.0) or 0.0)
    csv_log = CSVLog(out_dir / LOG_NAME, resume_step=step) if info.is_main else None
    if info.is_main:
        write_json(out_dir / "config.json", cfg)

    def save(at_step: int) -> None:
        rng_states = du.all_gather_object(ckpt_io.rng_state())
        if info.is_main:
            state = ckpt_io.training_state(
                student=distiller.student, kd_state=distiller.kd_state_dict(), optimizer=optimizer,
                scheduler=scheduler, scaler=scaler, ema=ema, step=at_step, epoch=epoch,
                batch_in_epoch=batch_in_epoch, rng_states=rng_states, loader_generator=loader_gen,
                counters={**counters, "train_time_s": counters["train_time_s"] + (time.perf_counter() - t0)},
                config=cfg)
            ckpt_io.save_checkpoint(state, out_dir)

    pbar = tqdm(total=stop_at, initial=step, disable=not (info.is_main and show_progress), dynamic_ncols=True,
                desc=f"{cfg['detector']}/{cfg['role']}/{cfg['method']}")
    window = MetricWindow()
    last_row: dict = {}
    session_steps = 0
    preempted: str | None = None
    t0 = time.perf_counter()
    with PreemptionNotice() as notice:
        while step < stop_at and preempted is None:
            if batch_in_epoch >= batch_sampler.batches_per_epoch():
                epoch, batch_in_epoch = epoch + 1, 0
            batch_sampler.set_epoch(epoch, batch_in_epoch)
            for images, pad_mask, targets in loader:
                images = images.to(dev, non_blocking=True)
                pad_mask = pad_mask.to(dev, non_blocking=True)
                targets = targets_to(targets, dev)
                out = train_step(model, distiller, images, pad_mask, targets, optimizer, clip_max_norm=clip,
                                 scaler=scaler, amp_dtype=amp_dtype)
                lr = optimizer.param_groups[0]["lr"]
                scheduler.step()
                step += 1
                batch_in_epoch += 1
                session_steps += 1
                if out["skipped"]:
                    counters["skipped_nonfinite"] += 1
                    window.skipped += 1
                    if info.is_main:
                        pbar.write(f"step {step}: non-finite loss ({out['loss']}) or gradient norm "
                                   f"({out['grad_norm']}) on some rank; step skipped "
                                   f"({counters['skipped_nonfinite']} so far)")
                else:
                    if ema is not None:
                        ema.update(distiller.student)
                    window.add({**out["losses"], "loss": out["loss"], "grad_norm": out["grad_norm"]})
                if step % log_every == 0 or step == stop_at:
                    last_row = _log_row(window, step, epoch, lr)
                    if info.is_main:
                        csv_log.append(last_row)
                        pbar.set_postfix(loss=f"{last_row.get('loss', float('nan')):.4f}", lr=f"{lr:.2e}")
                    window.reset()
                if info.is_main:
                    pbar.update(1)
                saved = (ckpt_every and step % ckpt_every == 0) or step == stop_at
                if saved:
                    save(step)
                if notice.requested():
                    preempted = notice.signal_name or "a signal on another rank"
                    if not saved:
                        save(step)
                    break
                if step >= stop_at:
                    break
            else:
                epoch, batch_in_epoch = epoch + 1, 0
    pbar.close()
    session_time = time.perf_counter() - t0
    counters["train_time_s"] = counters["train_time_s"] + session_time
    if session_steps == 0 and info.is_main:
        log.info("nothing to train: already at step %d of %d", step, stop_at)
    if preempted is not None and info.is_main:
        log.warning("%s: checkpointed at step %d of %d in %s; rerun the same command to resume", preempted, step,
                    total_steps, out_dir / ckpt_io.CHECKPOINT_NAME)

    completed = step >= total_steps
    summary = {
        "steps": step,
        "total_steps": total_steps,
        "completed": completed,
        "preempted": preempted,
        "resumed_from_step": resumed_from,
        "session_steps": session_steps,
        "session_time_s": session_time,
        "wall_time_s": counters["train_time_s"],
        "mean_s_per_step": counters["train_time_s"] / step if step else None,
        "session_s_per_step": session_time / session_steps if session_steps else None,
        "skipped_nonfinite_steps": int(counters["skipped_nonfinite"]),
        "sessions": counters["sessions"],
        "world_size": info.world_size,
        "device": str(dev),
        "num_classes": num_classes,
        "teacher_checkpoint": str(teacher) if teacher is not None else None,
        "init_from": str(init_from) if init_from is not None else None,
        "final_log_row": last_row,
        "config": cfg,
    }
    if info.is_main:
        weights = ema.module.state_dict() if ema is not None else distiller.student.state_dict()
        meta = {"detector": cfg["detector"], "role": cfg["role"], "method": cfg["method"], "seed": seed,
                "profile": cfg.get("profile"), "steps": step, "total_steps": total_steps, "completed": completed,
                "ema": ema is not None, "num_classes": num_classes, "model_cfg": cfg["model"],
                "dataset": cfg.get("dataset")}
        ckpt_io.save_model(weights, out_dir / ckpt_io.MODEL_NAME, meta)
        write_json(out_dir / SUMMARY_NAME, summary)
    du.barrier()
    return (summary, distiller) if return_distiller else summary


def _log_row(window: MetricWindow, step: int, epoch: int, lr: float) -> dict:
    """Window means reduced over ranks (every rank calls this at the same steps)."""
    keys = du.union_keys(window.sums)
    means = {k: v / window.counts[k] for k, v in window.sums.items()}
    reduced = du.reduce_dict(means, keys)
    elapsed = time.perf_counter() - window.started
    n = window.steps + window.skipped
    row = {"step": step, "epoch": epoch, "lr": lr}
    if "loss" in reduced:
        row["loss"] = reduced.pop("loss")
    row.update(dict(sorted(reduced.items())))
    row["s_per_step"] = elapsed / n if n else float("nan")
    row["skipped"] = window.skipped       # skips are agreed by all ranks: the same everywhere
    return row


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m reproduce.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--detector", required=True, choices=("dab_detr", "deformable_detr", "dino"))
    p.add_argument("--role", required=True, choices=("teacher", "student"))
    p.add_argument("--method", default="student", choices=sorted(METHODS),
                   help="student (no KD) or a distillation method")
    p.add_argument("--teacher", type=Path, help="teacher model.pth / checkpoint.pth (KD methods)")
    p.add_argument("--allow-unfinished-teacher", action="store_true",
                   help="accept a teacher whose run stopped before the end of its schedule")
    p.add_argument("--out", type=Path, help="run directory, e.g. runs/mini/dino/student (required to train)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved run config (what config.json will hold) and exit; trains nothing")
    p.add_argument("--init-from", type=Path, metavar="CKPT",
                   help="fine-tune: start from this model.pth / checkpoint.pth (same detector and config; "
                        "another class count re-initialises the class heads)")
    p.add_argument("--seed", type=int, help="overrides params seed")
    p.add_argument("--profile", help="overrides params profile")
    p.add_argument("--params", type=Path, default=Path("params.yaml"))
    p.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a params value (repeatable)")
    p.add_argument("--max-steps", type=int, help="stop after this global step (schedule unchanged)")
    p.add_argument("--resume", default="auto", help="auto (continue <out>/checkpoint.pth if present), unfinished (continue it "
                   "unless it is finished, else start over: what DVC stages use), never, or a path")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        params = load_params(args.params)
        overrides = list(args.overrides)
        if args.seed is not None:
            overrides.append(f"seed={args.seed}")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        cfg = resolve_run(params, args.detector, args.role, args.method, overrides=overrides, profile=args.profile,
                          world_size=world)
        if args.print_config:
            print(json.dumps(cfg, indent=2, sort_keys=True, default=str))
            return 0
        if args.out is None:
            raise ConfigError("--out is required (the run directory)")
        if args.method != "student" and args.teacher is None:
            raise ConfigError(f"method {args.method!r} needs --teacher")
        if args.method == "student" and args.teacher is not None:
            raise ConfigError("--teacher is for distillation methods; --method student trains without one")
        summary = train(cfg, args.out, teacher=args.teacher, max_steps=args.max_steps, resume=args.resume,
                        device=args.device, show_progress=not args.no_progress,
                        allow_unfinished_teacher=args.allow_unfinished_teacher, init_from=args.init_from)
    except (ConfigError, ckpt_io.CheckpointError, BackboneWeightsError, FileNotFoundError) as err:
        print(f"train: error: {err}", file=sys.stderr)
        return 1
    finally:
        du.cleanup()
    if int(os.environ.get("RANK", "0")) == 0:
        s_per_step = summary["mean_s_per_step"]
        print(f"trained {summary['steps']}/{summary['total_steps']} steps "
              f"({summary['skipped_nonfinite_steps']} skipped), "
              f"{s_per_step if s_per_step is None else round(s_per_step, 4)} s/step -> {args.out}")
    if summary.get("preempted"):
        print(f"train: stopped by {summary['preempted']} at step {summary['steps']}; rerun the same command to "
              f"resume (exit code {PREEMPTED_EXIT_CODE})", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    return 0


if __name__ == "__main__":
    sys.exit(main())
