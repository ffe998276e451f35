"""Table 2 and the ablation table from stored metrics: ``python -m reproduce.tables``.

Reads every metrics JSON under ``results/<profile>/<detector>/`` (written by
``reproduce.evaluation.evaluate``), groups runs by (detector, method), and writes mean ± std over seeds
with ΔAP over the no-distillation student and its 95% interval (both paired by seed; the ablation
table adds each variant's change against the Table 2 run it varies), to
``results/tables/{table2,ablation}.{md,csv,tex}``,
and the model zoo (one row per trained checkpoint, where its file lands) to ``model_zoo.*``.
The "paper" column comes only from ``results/paper/reported.yaml`` (transcribed values).
Files are replaced atomically; with no stored metrics at all it refuses in one line and leaves
the committed tables as they are.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import yaml

from reproduce.core.outputs import refuse, write_text_atomic
from reproduce.report.paired import paired_gain

METRICS = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
# KITTI's own AP (R40, Moderate) from reproduce.evaluation.evaluate's "kitti" entry, for KITTI-format data
# (the kitti profile, the synthetic scenes); the columns appear when any run has it
KITTI_COLUMNS = {"KITTI Car (mod)": ("Car", "moderate"), "KITTI Ped (mod)": ("Pedestrian", "moderate"),
                 "KITTI Cyc (mod)": ("Cyclist", "moderate"), "KITTI mAP (mod)": ("mAP_moderate", None)}
MAIN_ORDER = ["teacher", "student", "fitnet", "fgd", "mgd", "kd_detr", "detrdistill", "clockdistill"]
ABLATION_ORDER = ["both", "lcmd_only", "tcld_only", "no_location_mask", "backbone_features", "untuned",
                  *(f"{m}: untuned" for m in MAIN_ORDER[2:] if m != "clockdistill")]   # see ablation_variant
#: the ablation tag of a method run at its code defaults (the value the equal sweep replaced);
#: reproduce.pipeline.experiments writes it, the ablation table and the claim check read it
UNTUNED = "untuned"
DETECTOR_NAMES = {"dab_detr": "DAB-DETR", "deformable_detr": "Deformable DETR", "dino": "DINO"}
DASH = "—"


def load_runs(results_dir: Path) -> list[dict]:
    runs = []
    for path in sorted(results_dir.glob("*/*.json")):
        with path.open() as f:
            data = json.load(f)
        if "AP" not in data:
            continue
        data.setdefault("detector", path.parent.name)
        if data.get("role") == "teacher":
            data["method"] = "teacher"
        data.setdefault("method", path.stem.split("-")[0])
        data["_path"] = str(path)
        runs.append(data)
    return runs


def mean_std(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: list[float], scale: float = 100.0) -> str:
    if not values:
        return DASH
    mean, std = mean_std([v * scale for v in values])
    return f"{mean:.1f} ± {std:.1f}" if len(values) > 1 else f"{mean:.1f}"


def split_runs(runs: list[dict]) -> tuple[list[dict], list[dict]]:
    """(Table 2 runs, ablation-table runs keyed by ``variant``). The ablation table's "both"
    row is Table 2's CLoCKDistill run (same config), not a rerun."""
    main = [r for r in runs if not r.get("ablation")]
    ablation = [dict(r, variant="both") for r in main if r.get("method") == "clockdistill"]
    ablation += [dict(r, variant=ablation_variant(r)) for r in runs if r.get("ablation")]
    return main, ablation


def ablation_variant(run: dict) -> str:
    """The ablation table's row label: CLoCKDistill's variants by name; another method's run
    at its untuned defaults as ``<method>: untuned``."""
    if run.get("method") in (None, "clockdistill"):
        return run["ablation"]
    return f"{run['method']}: {run['ablation']}"


def paper_cell(reported: dict, method: str) -> str:
    for claim in reported.get("claims", []):
        if claim.get("applies_to") == method:
            return f"+{claim['delta_ap_min']} to +{claim['delta_ap_max']} (abstract)"
    return DASH


def kitti_value(run: dict, cls: str, level: str | None) -> float | None:
    """One KITTI AP (fraction) of a run's metrics, None when it has none."""
    entry = (run.get("kitti") or {}).get(cls)
    if level is not None:
        entry = entry.get(level) if isinstance(entry, dict) else None
    return float(entry) if isinstance(entry, (int, float)) else None


def gain_cells(treated: dict[int, float], control: dict[int, float]) -> tuple[str, str]:
    """(mean gain, its 95% interval) in AP x100, paired over the seeds both have; DASH for the
    interval below 2 shared seeds."""
    mean, ci, _ = paired_gain(treated, control)
    return f"{mean * 100:+.1f}", DASH if ci is None else f"[{ci[0] * 100:+.1f}, {ci[1] * 100:+.1f}]"


def table2_aps(main_runs: list[dict], detector: str, variant: str) -> dict[int, float]:
    """{seed: AP} of the Table 2 run an ablation row changes: CLoCKDistill for its own variants,
    the method itself for ``<method>: untuned``."""
    method = variant.split(": ")[0] if ": " in variant else "clockdistill"
    return {r["seed"]: r["AP"] for r in main_runs
            if r["detector"] == detector and r.get("method") == method and not r.get("ablation")}


def build_rows(runs: list[dict], reported: dict, order: list[str], key: str = "method",
               students: list[dict] | None = None) -> list[dict]:
    """One row per (detector, ``key``); ΔAP and its 95% interval are over the no-KD student
    runs, paired by seed (taken from ``students`` when given: Table 2's runs for the ablation
    table, whose rows also get their change against the Table 2 run they vary, paired too)."""
    rows = []
    with_kitti = any(isinstance(r.get("kitti"), dict) for r in runs)
    for detector in [d for d in DETECTOR_NAMES if any(r["detector"] == d for r in runs)]:
        det_runs = [r for r in runs if r["detector"] == detector]
        student = {r["seed"]: r["AP"] for r in (students if students is not None else runs)
                   if r["detector"] == detector and r.get("method") == "student" and not r.get("ablation")}
        names = [m for m in order if any(r[key] == m for r in det_runs)]
        names += sorted({r[key] for r in det_runs} - set(names))
        for name in names:
            group = [r for r in det_runs if r[key] == name]
            row = {"detector": DETECTOR_NAMES[detector], key: name, "seeds": len(group)}
            for m in METRICS:
                row[m] = fmt([r[m] for r in group if r.get(m) is not None and r[m] >= 0])
            if with_kitti:
                for column, (cls, level) in KITTI_COLUMNS.items():
                    values = [kitti_value(r, cls, level) for r in group]
                    row[column] = fmt([v for v in values if v is not None])
            aps = {r["seed"]: r["AP"] for r in group}
            row["ΔAP"], row["ΔAP 95% CI"] = (gain_cells(aps, student) if student and name not in ("student", "teacher")
                                            else (DASH, DASH))
            if key == "variant":
                reference = table2_aps(students or [], detector, name)
                row["vs Table 2 run"], row["vs Table 2 run 95% CI"] = (
                    gain_cells(aps, reference) if reference and name != "both" else (DASH, DASH))
            row["paper ΔAP"] = paper_cell(reported, name) if key == "method" else DASH
            rows.append(row)
    return rows


def to_markdown(rows: list[dict], title: str) -> str:
    if not rows:
        return f"## {title}\n\n(no stored metrics yet: run `make repro`)\n"
    cols = list(rows[0])
    lines = [f"## {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    quote = lambda s: f'"{s}"' if "," in str(s) else str(s)  # noqa: E731
    return "\n".join([",".join(cols)] + [",".join(quote(r[c]) for c in cols) for r in rows]) + "\n"


def to_latex(rows: list[dict]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    esc = lambda s: str(s).replace("±", r"$\pm$").replace("Δ", r"$\Delta$").replace("_", r"\_").replace("—", "--")  # noqa: E731
    lines = [r"\begin{tabular}{" + "l" * 2 + "r" * (len(cols) - 2) + "}", r"\toprule",
             " & ".join(esc(c) for c in cols) + r" \\", r"\midrule"]
    lines += [" & ".join(esc(r[c]) for c in cols) + r" \\" for r in rows]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def write_table(rows: list[dict], out_dir: Path, name: str, title: str, note: str = "") -> str:
    md = to_markdown(rows, title) + (f"\n{note}\n" if note and rows else "")
    for suffix, text in (("md", md), ("csv", to_csv(rows)), ("tex", to_latex(rows))):
        write_text_atomic(out_dir / f"{name}.{suffix}", text)
    return md


# ---------------------------------------------------------------------------- model zoo

#: marks on an AP whose checkpoint may not be the config params.yaml builds today
UNRECORDED, OTHER_CONFIG = "†", "‡"
CONFIG_MARKS_NOTE = (f"{UNRECORDED}: the metrics do not record their model config (stored before "
                     "reproduce.evaluation.evaluate recorded it), so the AP may belong to an earlier config than "
                     f"params.yaml's; {OTHER_CONFIG}: recorded, and not params.yaml's config.")


def config_mark(runs: list[dict], cfg: dict | None) -> str:
    """'' when every run records ``cfg`` as its model config, else UNRECORDED or OTHER_CONFIG."""
    recorded = [r.get("model_cfg") for r in runs]
    if any(c is None for c in recorded):
        return UNRECORDED
    return "" if cfg is not None and all(c == cfg for c in recorded) else OTHER_CONFIG


def describe_model(cfg: dict) -> str:
    """A short config string: backbone, width, layers, queries."""
    b = cfg.get("backbone") or {}
    backbone = b.get("name", "?") + (f" {b['widths'][0]}-{b['widths'][-1]}" if b.get("widths") else "")
    return (f"{backbone}, d {cfg.get('d_model')}, {cfg.get('enc_layers')}+{cfg.get('dec_layers')} layers, "
            f"{cfg.get('num_queries')} queries")


def model_zoo_rows(runs: list[dict], params: dict, profile: str) -> list[dict]:
    """One row per trained checkpoint the pipeline produced (Table 2's runs and the ablation
    variants), with where its file lands (``reproduce.pipeline.experiments.run_dir``: the default seed
    in ``runs/<profile>/<detector>/<run>/``, other seeds in ``<run>-s<seed>/``)."""
    from reproduce.training.runconfig import model_config
    default_seed = int(params.get("seed", 0))
    rows = []
    for detector in DETECTOR_NAMES:
        det_runs = [r for r in runs if r["detector"] == detector]
        names = [m for m in MAIN_ORDER if any(not r.get("ablation") and r["method"] == m for r in det_runs)]
        names += sorted({f"ablation-{r['ablation']}" for r in det_runs if r.get("ablation")})
        for name in names:
            group = [r for r in det_runs if (f"ablation-{r['ablation']}" if r.get("ablation") else r["method"]) == name]
            role = "teacher" if name == "teacher" else "student"
            try:
                model = model_config(params, detector, role, profile)
            except (KeyError, ValueError):
                model = None
            cfg = describe_model(model) if model else DASH
            steps = sorted({r.get("steps") for r in group if r.get("steps") is not None})
            seeds = sorted(r["seed"] for r in group)
            # shell brace form: runs/mini/dino/student{,-s1,-s2}/model.pth
            suffixes = ["" if s == default_seed else f"-s{s}" for s in seeds]
            where = suffixes[0] if len(suffixes) == 1 else "{" + ",".join(suffixes) + "}"
            rows.append({"profile": profile, "detector": DETECTOR_NAMES[detector],
                         "role / method": role if name in ("teacher", "student") else f"student / {name}",
                         "config": cfg + (f"; {'/'.join(map(str, steps))} steps" if steps else ""),
                         "AP x100": fmt([r["AP"] for r in group]) + config_mark(group, model),
                         "seeds": len(group),
                         "file": f"runs/{profile}/{detector}/{name}{where}/model.pth"})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reproduce.tables", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default=None)
    parser.add_argument("--results", default="results")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    with open(args.params) as f:
        params = yaml.safe_load(f)
    profile = args.profile or params["profile"]
    results = Path(args.results)
    with (results / "paper" / "reported.yaml").open() as f:
        reported = yaml.safe_load(f) or {}
    runs = load_runs(results / profile)
    out = results / "tables"
    if not runs:     # tables of nothing would replace the committed ones
        return refuse("tables", f"no stored metrics in {results / profile}/<detector>/*.json",
                      f"the committed tables in {out} are left as they are")
    main_runs, ablation_runs = split_runs(runs)
    print(write_table(build_rows(main_runs, reported, MAIN_ORDER), out, "table2",
                      f"Table 2 ({profile} profile): COCO AP x100"
                      + (" (KITTI columns: KITTI's R40 AP x100 at Moderate, where evaluated)"
                         if any(isinstance(r.get("kitti"), dict) for r in main_runs) else "")
                      + ", mean ± std over seeds"))
    print(write_table(build_rows(ablation_runs, reported, ABLATION_ORDER, key="variant", students=main_runs),
                      out, "ablation",
                      f"Ablations ({profile} profile): COCO AP x100"))
    print(write_table(model_zoo_rows(runs, params, profile), out, "model_zoo",
                      f"Model zoo ({profile} profile): trained checkpoints, config as params.yaml builds "
                      f"it, COCO AP x100 on the {runs[0].get('split', 'eval')} split", note=CONFIG_MARKS_NOTE))
    return 0


if __name__ == "__main__":
    sys.exit(main())
