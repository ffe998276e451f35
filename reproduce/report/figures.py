"""Figures from pipeline outputs: ``python -m reproduce.figures [--profile P]``.

Reads trained runs (``runs/<profile>/<detector>/<run>/model.pth``, ``train_log.csv``) and
stored metrics (``results/<profile>/``); never trains. The notebooks call the same functions.
Writes ``results/figures/*.png``, each atomically and only when its inputs are all there: on a
fresh clone (stored metrics, no ``runs/``) the gains figure (and the ablation figure, once
``make ablations`` has stored its metrics) is rendered, the committed training
curves are left as they are, and the command says so in one line and exits 1.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

import matplotlib

if "ipykernel" not in sys.modules:   # scripts render off-screen; notebooks keep their inline backend
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from distill.location_mask import memory_masks  # noqa: E402
from distill.target_queries import TargetQueryGenerator  # noqa: E402
from reproduce.training.checkpoint import load_detector  # noqa: E402
from reproduce.core.outputs import atomic_path, describe_missing, refuse  # noqa: E402
from reproduce.report.paired import paired_gain  # noqa: E402

MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
DETECTORS = ("dab_detr", "deformable_detr", "dino")
#: the runs a training-curve figure compares
CURVE_RUNS = ("teacher", "student", "clockdistill")


def run_dir(profile: str, detector: str, run: str) -> Path:
    return Path("runs") / profile / detector / run


def load_run_model(profile: str, detector: str, run: str, num_classes: int):
    """The trained model of a run (EMA weights if any) in eval mode, or None if not trained."""
    path = run_dir(profile, detector, run) / "model.pth"
    if not path.is_file():
        return None
    model, _ = load_detector(path, detector, num_classes=num_classes)
    return model.eval()


def denormalise(image: torch.Tensor) -> torch.Tensor:
    return (image * STD + MEAN).clamp(0, 1).permute(1, 2, 0)


def level_norms(out, level: int) -> torch.Tensor:
    """Per-cell L2 norm of the memory on one level, [B,H,W]."""
    (h, w), start = out.spatial_shapes[level], out.level_start_index[level]
    return out.memory[:, start:start + h * w].norm(dim=-1).view(-1, h, w)


@torch.no_grad()
def plot_memory_maps(models: dict, images, pad_mask, targets, index: int = 0, path: str | Path | None = None):
    """Rows: memory levels. Columns: image + GT, GT location mask, then each model's memory norm."""
    outs = {name: m(images, pad_mask) for name, m in models.items()}
    first = next(iter(outs.values()))
    masks = memory_masks(targets, first.memory_padding_mask, first.spatial_shapes, first.level_start_index,
                         first.valid_ratios)
    levels = first.num_levels
    cols = 2 + len(outs)
    fig, axes = plt.subplots(levels, cols, figsize=(3.2 * cols, 1.4 * levels + 0.6), squeeze=False)
    img = denormalise(images[index])
    h_img, w_img = img.shape[:2]
    for lvl in range(levels):
        ax = axes[lvl, 0]
        ax.imshow(img)
        for cx, cy, w, h in targets[index]["boxes"].tolist():
            ax.add_patch(plt.Rectangle(((cx - w / 2) * w_img, (cy - h / 2) * h_img), w * w_img, h * h_img,
                                       fill=False, color="lime", lw=1))
        ax.set_title(f"level {lvl} {first.spatial_shapes[lvl]}", fontsize=8)
        axes[lvl, 1].imshow(masks[lvl][0][index], cmap="gray", vmin=0, vmax=1)
        axes[lvl, 1].set_title("GT location mask", fontsize=8)
        for c, (name, out) in enumerate(outs.items(), start=2):
            axes[lvl, c].imshow(level_norms(out, lvl)[index], cmap="magma")
            axes[lvl, c].set_title(f"{name}: |memory|", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=120)
    return fig


@torch.no_grad()
def plot_target_query_attention(models: dict, images, pad_mask, targets, index: int = 0, layer: int = -1,
                                path: str | Path | None = None):
    """Where each model's decoder looks for the target-aware queries of one image.

    Deformable detectors: sampling locations (all heads, levels, points) sized by weight;
    DAB-DETR: the dense cross-attention map averaged over heads and queries."""
    generator = TargetQueryGenerator(next(iter(models.values())).num_classes)
    plan = generator.plan(targets, images.device)
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 2.0), squeeze=False)
    img = denormalise(images[index])
    h_img, w_img = img.shape[:2]
    for ax, (name, model) in zip(axes[0], models.items()):
        out = model(images, pad_mask, groups=[generator.group_for(model, plan)], return_attention=True)
        group = out.groups["target"]
        valid = group.group.valid[index]
        attn = group.cross_attention[layer]
        ax.imshow(img)
        if "sampling_locations" in attn:
            loc = attn["sampling_locations"][index][valid]       # [n,H,L,P,2], in each level's valid area
            wgt = attn["attention_weights"][index][valid]
            ax.scatter(loc[..., 0].flatten() * w_img, loc[..., 1].flatten() * h_img, s=60 * wgt.flatten(),
                       c=wgt.flatten(), cmap="autumn", alpha=0.7)
        else:
            weights = attn["attention_weights"][index][valid].mean((0, 1))     # [S]
            h, w = out.spatial_shapes[0]
            ax.imshow(weights.view(h, w), cmap="magma", alpha=0.55, extent=(0, w_img, h_img, 0))
        for cx, cy, w, h in targets[index]["boxes"].tolist():
            ax.add_patch(plt.Rectangle(((cx - w / 2) * w_img, (cy - h / 2) * h_img), w * w_img, h * h_img,
                                       fill=False, color="cyan", lw=1))
        ax.set_title(name, fontsize=9)
        ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=120)
    return fig


def read_train_log(path: Path) -> list[dict]:
    with path.open() as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def plot_training_curves(profile: str, detector: str, runs: list[str], key: str = "loss", path=None):
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for run in runs:
        log = run_dir(profile, detector, run) / "train_log.csv"
        if log.is_file():
            rows = read_train_log(log)
            ax.plot([r["step"] for r in rows], [r.get(key, math.nan) for r in rows], label=run)
    ax.set_xlabel("step"), ax.set_ylabel(key), ax.set_title(f"{detector}: {key}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=120)
    return fig


def gains_with_ci(results_dir: Path) -> list[dict]:
    """ΔAP of every method over the student of the same detector (AP points) and its 95% CI,
    paired by seed as Table 2 and the claim check pair them (reproduce.report.paired)."""
    from reproduce.report.claim import ap_by_run
    from reproduce.report.tables import load_runs
    by = ap_by_run(load_runs(results_dir))
    rows = []
    for (detector, method), aps in sorted(by.items()):
        student = by.get((detector, "student"))
        if method in ("student", "teacher") or not student:
            continue
        rows.append(gain_row(aps, student, detector=detector, method=method))
    return rows


def gain_row(aps: dict[int, float], reference: dict[int, float], **labels) -> dict:
    """``labels`` plus the paired gain of ``aps`` over ``reference``: n (shared seeds), delta, CI."""
    delta, ci, seeds = paired_gain(aps, reference)
    return {**labels, "n": len(seeds), "delta": delta,
            "ci_low": ci[0] if ci else math.nan, "ci_high": ci[1] if ci else math.nan}


def plot_gains(rows: list[dict], path=None):
    fig, ax = plt.subplots(figsize=(7, 0.35 * max(len(rows), 4) + 1))
    labels = [f"{r['detector']} / {r['method']}" for r in rows]
    y = range(len(rows))
    ax.barh(list(y), [r["delta"] for r in rows], color=["C3" if r["method"] == "clockdistill" else "C0" for r in rows])
    for i, r in enumerate(rows):
        if not math.isnan(r["ci_low"]):
            ax.plot([r["ci_low"], r["ci_high"]], [i, i], color="k", lw=1)
    ax.axvline(0, color="gray", lw=0.8)
    ax.set_yticks(list(y), labels, fontsize=7)
    ax.set_xlabel("ΔAP over the no-KD student (points, mean and 95% CI over seeds)")
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=120)
    return fig


def ablation_changes(results_dir: Path) -> list[dict]:
    """Each ablation variant's AP change (points) against the Table 2 run it varies, with its 95%
    CI, paired by seed as the ablation table pairs it (reproduce.report.tables.table2_aps)."""
    from reproduce.report.tables import ABLATION_ORDER, load_runs, split_runs, table2_aps
    main, ablation = split_runs(load_runs(results_dir))
    groups: dict[tuple[str, str], dict[int, float]] = {}
    for r in ablation:
        if r["variant"] != "both":
            groups.setdefault((r["detector"], r["variant"]), {})[int(r["seed"])] = 100.0 * r["AP"]
    order = {v: i for i, v in enumerate(ABLATION_ORDER)}
    rows = []
    for (detector, variant), aps in sorted(groups.items(), key=lambda kv: (kv[0][0], order.get(kv[0][1], 99))):
        reference = {seed: 100.0 * ap for seed, ap in table2_aps(main, detector, variant).items()}
        if not reference:
            continue
        rows.append(gain_row(aps, reference, detector=detector, variant=variant))
    return rows


def plot_ablation(rows: list[dict], path=None):
    """One panel per detector: each variant's change against its Table 2 run, with its CI;
    CLoCKDistill's own variants in red, the other methods at their untuned defaults in blue."""
    detectors = list(dict.fromkeys(r["detector"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig, axes = plt.subplots(1, len(detectors), figsize=(3.6 * len(detectors), 0.32 * len(variants) + 1.4),
                             sharey=True, squeeze=False)
    for ax, detector in zip(axes[0], detectors):
        by_variant = {r["variant"]: r for r in rows if r["detector"] == detector}
        for i, variant in enumerate(variants):
            r = by_variant.get(variant)
            if r is None:
                continue
            ax.barh(i, r["delta"], color="C0" if ": untuned" in variant else "C3")
            if not math.isnan(r["ci_low"]):
                ax.plot([r["ci_low"], r["ci_high"]], [i, i], color="k", lw=1)
        ax.axvline(0, color="gray", lw=0.8)
        ax.set_title(detector, fontsize=9)
        ax.set_xlabel("AP change vs the Table 2 run\n(points, paired mean and 95% CI)", fontsize=8)
    axes[0][0].set_yticks(range(len(variants)), variants, fontsize=7)
    axes[0][0].invert_yaxis()
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=120)
    return fig


def curve_logs(profile: str, detector: str) -> list[Path]:
    return [run_dir(profile, detector, run) / "train_log.csv" for run in CURVE_RUNS]


def render(profile: str, out: Path) -> tuple[list[Path], list[Path]]:
    """Write each figure whose inputs are all there, atomically; (written, missing inputs).
    A figure with a missing input is not written, so its committed file stays as it was
    instead of becoming an empty plot (a fresh clone has the stored metrics, not the runs)."""
    written, missing = [], []
    rows = gains_with_ci(Path("results") / profile)
    if rows:
        written.append(out / f"gains_{profile}.png")
        with atomic_path(written[-1]) as tmp:
            plot_gains(rows, tmp)
    else:
        missing.append(Path("results") / profile / "<detector>" / "<run>-s<seed>.json")
    ablation = ablation_changes(Path("results") / profile)
    if ablation:     # only after `make ablations`: not a pipeline output, so never reported missing
        written.append(out / f"ablation_{profile}.png")
        with atomic_path(written[-1]) as tmp:
            plot_ablation(ablation, tmp)
    for detector in DETECTORS:
        absent = [log for log in curve_logs(profile, detector) if not log.is_file()]
        if absent:       # a curve without one of its runs would replace a complete one
            missing += absent
            continue
        written.append(out / f"curves_{profile}_{detector}.png")
        with atomic_path(written[-1]) as tmp:
            plot_training_curves(profile, detector, list(CURVE_RUNS), path=tmp)
    plt.close("all")
    return written, missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reproduce.figures", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="mini")
    parser.add_argument("--out", default="results/figures")
    args = parser.parse_args(argv)
    out = Path(args.out)
    written, missing = render(args.profile, out)
    if written:
        print(f"figures written to {out}: " + ", ".join(p.name for p in written))
    if missing:
        kept = f"the committed figures in {out} are left as they are"
        if written:
            kept = f"wrote {', '.join(p.name for p in written)}; the other {kept.removeprefix('the ')}"
        return refuse("figures", describe_missing(missing), kept)
    return 0


if __name__ == "__main__":
    sys.exit(main())
