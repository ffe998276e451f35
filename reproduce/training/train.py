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

``--print-config`` prints the resolved run config (JSON: what ``config.json`` will hold) and
trains nothing; ``--explain`` prints one line per train / distill / image / eval
option instead, with the layer its value comes from (code default, params.yaml, ``-S``).

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
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from distill import METHODS
from distill.teacher_cache import TeacherCacheError
from models.backbone import BackboneWeightsError
from reproduce.training import checkpoint as ckpt_io
from reproduce.training import distributed as du
from reproduce.core.config import (ConfigError, OneLineParser, add_print_config_arguments, load_params,
                                   print_run_config)
from reproduce.training.engine import PREEMPTED_EXIT_CODE
from reproduce.training.runconfig import note_reroutes, resolve_run, run_sources
from reproduce.training.trainer import Trainer

def train(cfg: dict, out_dir: str | Path, *, return_distiller: bool = False, **options):
    """Run (or continue) one training run described by ``cfg`` (from :func:`resolve_run`);
    ``options`` are :class:`reproduce.training.trainer.Trainer`'s. Returns the summary dict
    (rank 0 writes it to disk), and the trained distiller too with ``return_distiller``. On
    SIGTERM or SIGUSR1 (a scheduler's notice) the run checkpoints at the next step boundary and
    returns with ``preempted`` set."""
    trainer = Trainer(cfg, out_dir, **options)
    summary = trainer.run()
    return (summary, trainer.distiller) if return_distiller else summary


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m reproduce.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--detector", required=True, choices=("dab_detr", "deformable_detr", "dino"))
    p.add_argument("--role", required=True, choices=("teacher", "student"))
    p.add_argument("--method", default="student", choices=sorted(METHODS),
                   help="student (no KD) or a distillation method")
    p.add_argument("--teacher", type=Path, help="teacher model.pth / checkpoint.pth (KD methods)")
    p.add_argument("--teacher-cache", type=Path, metavar="FILE",
                   help="read the teacher's outputs from this cache (python -m reproduce.teacher_cache), built "
                        "from the --teacher file; inputs it does not hold run the live teacher")
    p.add_argument("--allow-unfinished-teacher", action="store_true",
                   help="accept a teacher whose run stopped before the end of its schedule")
    p.add_argument("--out", type=Path, help="run directory, e.g. runs/mini/dino/student (required to train)")
    add_print_config_arguments(p, "trains nothing (the JSON is what config.json will hold)")
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
        note_reroutes(args.overrides, cfg["profile"])
        if args.print_config or args.explain:
            sources = run_sources(params, args.detector, args.role, args.method, overrides=overrides,
                                  profile=args.profile) if args.explain else None
            print_run_config(cfg, sources)
            return 0
        if args.out is None:
            raise ConfigError("--out is required (the run directory)")
        if args.method != "student" and args.teacher is None:
            raise ConfigError(f"method {args.method!r} needs --teacher")
        if args.method == "student" and args.teacher is not None:
            raise ConfigError("--teacher is for distillation methods; --method student trains without one")
        summary = train(cfg, args.out, teacher=args.teacher, max_steps=args.max_steps, resume=args.resume,
                        device=args.device, show_progress=not args.no_progress,
                        allow_unfinished_teacher=args.allow_unfinished_teacher, init_from=args.init_from,
                        teacher_cache=args.teacher_cache)
    except (ConfigError, ckpt_io.CheckpointError, BackboneWeightsError, FileNotFoundError,
            TeacherCacheError) as err:
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
