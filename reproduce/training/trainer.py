"""One training run in named phases: build, restore, distribute, fit, save, finish.

``Trainer(cfg, out_dir, ...).run()`` is what ``reproduce.training.train.train`` calls. The order
of the phases is part of the result: the models are built from one seed before anything else
draws from the RNG, the output folder is created only once everything could be built, a resumed
run restores every state before DDP wraps the model, and EMA is rebuilt *after* DDP's broadcast
of rank 0's weights so that every rank averages the same model.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm import tqdm

from distill import build_distiller
from distill.teacher_cache import TeacherCache
from models.build import build_criterion, build_detector
from reproduce.core.config import ConfigError, write_json
from reproduce.training import checkpoint as ckpt_io
from reproduce.training import distributed as du
from reproduce.training.engine import (CSVLog, MetricWindow, ModelEMA, PreemptionNotice, ResumableBatchSampler,
                                       SeededSamples, amp_settings, build_optimizer, build_scheduler,
                                       capped_workers, seed_everything, targets_to, train_step, worker_init_fn)

log = logging.getLogger("reproduce.training.trainer")

LOG_NAME = "train_log.csv"
SUMMARY_NAME = "train_summary.json"


class Trainer:
    """``dataset``: a ready training dataset (tests); default: the prepared train split with
    the profile's training transforms. ``init_from``: a model to start the student from
    (fine-tuning; class heads re-initialised when the class count differs)."""

    def __init__(self, cfg: dict, out_dir: str | Path, *, teacher: str | Path | None = None,
                 max_steps: int | None = None, resume: str = "auto", device: str | None = None, dataset=None,
                 show_progress: bool = True, allow_unfinished_teacher: bool = False,
                 init_from: str | Path | None = None, teacher_cache: str | Path | None = None):
        self.cfg, self.out_dir = cfg, Path(out_dir)
        self.teacher_cache_path, self.teacher_cache = teacher_cache, None
        self.teacher_path, self.max_steps, self.resume_mode = teacher, max_steps, resume
        self.device_choice, self.dataset, self.show_progress = device, dataset, show_progress
        self.allow_unfinished_teacher, self.init_from = allow_unfinished_teacher, init_from
        self.train_cfg, self.seed = cfg["train"], int(cfg["seed"])
        self.step = self.epoch = self.batch_in_epoch = 0
        self.counters = {"skipped_nonfinite": 0, "train_time_s": 0.0, "sessions": 0}
        self.resume_path = None
        self.preempted: str | None = None
        self.last_row: dict = {}
        self.session_steps, self.session_time = 0, 0.0
        self._fit_started = time.perf_counter()

    def run(self) -> dict:
        self.build()
        rng = self.restore()
        self.distribute(rng)
        self.fit()
        return self.finish()

    # ---- build: data, model, teacher, optimisation; identical on every rank ------------------
    def build(self) -> None:
        cfg = self.cfg
        self.info = du.init_distributed(self.device_choice)
        seed_everything(self.seed)
        self.dataset = self.dataset if self.dataset is not None else build_train_dataset(cfg)
        self.num_classes = int(self.dataset.num_classes)
        student = build_detector(cfg["model"], self.num_classes)
        if self.init_from is not None:
            start, _ = ckpt_io.load_detector(self.init_from, cfg["detector"], cfg["model"], self.num_classes,
                                             what="--init-from model", reinit_classes=True)
            student.load_state_dict(start.state_dict())
            del start
        criterion = build_criterion(cfg["detector"], self.num_classes)
        # after the student: building the teacher draws from the RNG the student's init used
        teacher = (load_teacher(self.teacher_path, cfg, self.num_classes, self.allow_unfinished_teacher)
                   if self.teacher_path is not None else None)
        self.distiller = build_distiller(cfg["method"], student, criterion, teacher=teacher, cfg=cfg.get("distill"))
        if self.teacher_cache_path is not None:
            self.attach_teacher_cache()
        self.distiller.to(self.info.device)
        self.distiller.train()
        self.optimizer = build_optimizer(self.distiller, self.train_cfg)
        self.scheduler = build_scheduler(self.optimizer, self.train_cfg)
        self.amp_dtype, needs_scaler = amp_settings(self.train_cfg, self.info.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=True) if needs_scaler else None
        self.ema = (ModelEMA(self.distiller.student, float(self.train_cfg.get("ema_decay", 0.9997)))
                    if self.train_cfg.get("ema") else None)
        self.loader, self.batch_sampler, self.loader_gen = build_loader(self.dataset, cfg, self.info)
        # only now: a run that cannot start leaves nothing behind
        if self.info.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        du.barrier()

    def attach_teacher_cache(self) -> None:
        """Read the frozen teacher's outputs from a cache built for this very teacher file
        (reproduce.training.teacher_cache); an empty cache, or one that does not serve this
        method, leaves the live teacher."""
        if self.teacher_path is None:
            raise ConfigError("--teacher-cache needs --teacher (the cache is checked against it)")
        cache = TeacherCache.load(self.teacher_cache_path, self.teacher_path)
        served = cache.note.get("served", [])
        if self.cfg["method"] in served:
            self.distiller.use_teacher_cache(cache)
            self.teacher_cache = cache
        else:
            why = cache.note.get("empty_because") or cache.note.get("live", {}).get(self.cfg["method"]) or \
                "not built for this method"
            log.info("teacher cache %s not used (%s): live teacher", self.teacher_cache_path, why)

    # ---- restore: continue from <out>/checkpoint.pth when asked ------------------------------
    def restore(self):
        """Load every state of a checkpoint; returns this rank's RNG state, or None."""
        path = ckpt_io.find_resume(self.out_dir, self.resume_mode)
        state = ckpt_io.load(path) if path is not None else None
        if state is not None and self.resume_mode == "unfinished" and int(state["step"]) >= int(self.train_cfg["steps"]):
            # a DVC stage reruns because a dependency changed: a finished run is stale, start over
            if self.info.is_main:
                log.info("%s holds a finished run: starting over (--resume unfinished)", path)
            path = state = None
        rng = None
        if state is not None:
            check_resume_config(state.get("config") or {}, self.cfg)
            self.distiller.student.load_state_dict(state["model"])
            missing, unexpected = self.distiller.load_state_dict(state["kd"], strict=False)
            kd_missing = [k for k in missing if k in self.distiller.kd_state_dict()]
            if unexpected or kd_missing:
                raise RuntimeError(f"{path}: KD state does not fit (unexpected {unexpected[:3]}, "
                                   f"missing {kd_missing[:3]})")
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if self.scaler is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            if self.ema is not None and state.get("ema"):
                self.ema.load_state_dict(state["ema"])
            self.step, self.epoch = int(state["step"]), int(state["epoch"])
            self.batch_in_epoch = int(state["batch_in_epoch"])
            self.counters.update(state.get("counters") or {})
            if state.get("loader_generator") is not None:
                self.loader_gen.set_state(state["loader_generator"])
            rngs = state.get("rng") or []
            rng = rngs[self.info.rank] if len(rngs) == self.info.world_size else None
            if rng is None:
                log.warning("checkpoint RNG states are for %d ranks, this run has %d: reseeding", len(rngs),
                            self.info.world_size)
            if self.info.is_main:
                log.info("resumed from %s at step %d (epoch %d)", path, self.step, self.epoch)
        self.resume_path = path
        self.counters["sessions"] = int(self.counters.get("sessions", 0)) + 1
        self.resumed_from = self.step
        return rng

    # ---- distribute: DDP, EMA after its broadcast, per-rank training randomness ---------------
    def distribute(self, rng) -> None:
        self.model = self.distiller
        if self.info.distributed:
            dev = self.info.device
            self.model = DDP(self.distiller, device_ids=[dev.index] if dev.type == "cuda" else None,
                             find_unused_parameters=bool(self.train_cfg.get("find_unused_parameters", False)))
        if self.ema is not None and self.resume_path is None:
            self.ema = ModelEMA(self.distiller.student, self.ema.decay)   # after DDP's broadcast
        # training randomness (dropout, denoising noise) differs per rank; restored on resume
        if rng is not None:
            ckpt_io.set_rng_state(rng)
        else:
            seed_everything(self.seed + self.info.rank + 7919 * self.step)

    # ---- fit: the step loop, logging, checkpoints, preemption ------------------------------
    def fit(self) -> None:
        cfg, info, dev = self.cfg, self.info, self.info.device
        self.total_steps = int(self.train_cfg["steps"])
        stop_at = min(self.total_steps, int(self.max_steps)) if self.max_steps else self.total_steps
        log_every = max(1, int(self.train_cfg.get("log_every", 25)))
        ckpt_every = int(self.train_cfg.get("checkpoint_every", 0) or 0)
        clip = float(self.train_cfg.get("clip_max_norm", 0.0) or 0.0)
        csv_log = CSVLog(self.out_dir / LOG_NAME, resume_step=self.step) if info.is_main else None
        if info.is_main:
            write_json(self.out_dir / "config.json", cfg)
        pbar = tqdm(total=stop_at, initial=self.step, disable=not (info.is_main and self.show_progress),
                    dynamic_ncols=True, desc=f"{cfg['detector']}/{cfg['role']}/{cfg['method']}")
        window = MetricWindow()
        self._fit_started = time.perf_counter()
        with PreemptionNotice() as notice:
            while self.step < stop_at and self.preempted is None:
                if self.batch_in_epoch >= self.batch_sampler.batches_per_epoch():
                    self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                self.batch_sampler.set_epoch(self.epoch, self.batch_in_epoch)
                for images, pad_mask, targets in self.loader:
                    out = train_step(self.model, self.distiller, images.to(dev, non_blocking=True),
                                     pad_mask.to(dev, non_blocking=True), targets_to(targets, dev), self.optimizer,
                                     clip_max_norm=clip, scaler=self.scaler, amp_dtype=self.amp_dtype)
                    lr = self.optimizer.param_groups[0]["lr"]
                    self.scheduler.step()
                    self.step += 1
                    self.batch_in_epoch += 1
                    self.session_steps += 1
                    if out["skipped"]:
                        self.counters["skipped_nonfinite"] += 1
                        window.skipped += 1
                        if info.is_main:
                            pbar.write(f"step {self.step}: non-finite loss ({out['loss']}) or gradient norm "
                                       f"({out['grad_norm']}) on some rank; step skipped "
                                       f"({self.counters['skipped_nonfinite']} so far)")
                    else:
                        if self.ema is not None:
                            self.ema.update(self.distiller.student)
                        window.add({**out["losses"], "loss": out["loss"], "grad_norm": out["grad_norm"]})
                    if self.step % log_every == 0 or self.step == stop_at:
                        self.last_row = log_row(window, self.step, self.epoch, lr)
                        if info.is_main:
                            csv_log.append(self.last_row)
                            pbar.set_postfix(loss=f"{self.last_row.get('loss', float('nan')):.4f}", lr=f"{lr:.2e}")
                        window.reset()
                    if info.is_main:
                        pbar.update(1)
                    saved = (ckpt_every and self.step % ckpt_every == 0) or self.step == stop_at
                    if saved:
                        self.save()
                    if notice.requested():
                        self.preempted = notice.signal_name or "a signal on another rank"
                        if not saved:
                            self.save()
                        break
                    if self.step >= stop_at:
                        break
                else:
                    self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        pbar.close()
        self.session_time = time.perf_counter() - self._fit_started
        self.counters["train_time_s"] = self.counters["train_time_s"] + self.session_time
        if self.session_steps == 0 and info.is_main:
            log.info("nothing to train: already at step %d of %d", self.step, stop_at)
        if self.preempted is not None and info.is_main:
            log.warning("%s: checkpointed at step %d of %d in %s; rerun the same command to resume", self.preempted,
                        self.step, self.total_steps, self.out_dir / ckpt_io.CHECKPOINT_NAME)

    # ---- save: the resume state, atomically ------------------------------------------------
    def save(self) -> None:
        rng_states = du.all_gather_object(ckpt_io.rng_state())
        if self.info.is_main:
            elapsed = time.perf_counter() - self._fit_started
            state = ckpt_io.training_state(
                student=self.distiller.student, kd_state=self.distiller.kd_state_dict(), optimizer=self.optimizer,
                scheduler=self.scheduler, scaler=self.scaler, ema=self.ema, step=self.step, epoch=self.epoch,
                batch_in_epoch=self.batch_in_epoch, rng_states=rng_states, loader_generator=self.loader_gen,
                counters={**self.counters, "train_time_s": self.counters["train_time_s"] + elapsed},
                config=self.cfg)
            ckpt_io.save_checkpoint(state, self.out_dir)

    # ---- finish: model.pth (EMA weights if any) and the run summary -------------------------
    def finish(self) -> dict:
        cfg, step, info = self.cfg, self.step, self.info
        completed = step >= self.total_steps
        train_time = self.counters["train_time_s"]
        summary = {
            "steps": step, "total_steps": self.total_steps, "completed": completed, "preempted": self.preempted,
            "resumed_from_step": self.resumed_from, "session_steps": self.session_steps,
            "session_time_s": self.session_time, "wall_time_s": train_time,
            "mean_s_per_step": train_time / step if step else None,
            "session_s_per_step": self.session_time / self.session_steps if self.session_steps else None,
            "skipped_nonfinite_steps": int(self.counters["skipped_nonfinite"]),
            "sessions": self.counters["sessions"], "world_size": info.world_size, "device": str(info.device),
            "num_classes": self.num_classes,
            "teacher_checkpoint": str(self.teacher_path) if self.teacher_path is not None else None,
            "init_from": str(self.init_from) if self.init_from is not None else None,
            "teacher_cache": ({"path": str(self.teacher_cache_path), **self.teacher_cache.stats()}
                              if self.teacher_cache is not None else None),
            "final_log_row": self.last_row, "config": cfg,
        }
        if info.is_main:
            ema = self.ema
            weights = ema.module.state_dict() if ema is not None else self.distiller.student.state_dict()
            meta = {"detector": cfg["detector"], "role": cfg["role"], "method": cfg["method"], "seed": self.seed,
                    "profile": cfg.get("profile"), "steps": step, "total_steps": self.total_steps,
                    "completed": completed, "ema": ema is not None, "num_classes": self.num_classes,
                    "model_cfg": cfg["model"], "dataset": cfg.get("dataset")}
            ckpt_io.save_model(weights, self.out_dir / ckpt_io.MODEL_NAME, meta)
            write_json(self.out_dir / SUMMARY_NAME, summary)
        du.barrier()
        return summary


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


def check_resume_config(saved: dict, cfg: dict) -> None:
    for key in ("detector", "method", "model"):
        if saved.get(key) != cfg.get(key):
            raise ConfigError(f"checkpoint was written by a run with a different {key!r} "
                              f"({saved.get(key)!r} vs {cfg.get(key)!r}); use another --out or --resume never")
    for key in ("train", "seed", "image", "distill"):
        if saved.get(key) != cfg.get(key):
            log.warning("resuming with a different %r config than the checkpoint's", key)


def log_row(window: MetricWindow, step: int, epoch: int, lr: float) -> dict:
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
