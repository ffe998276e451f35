"""Nothing committed is destroyed: figures, tables and the claim check, run where their inputs
are missing (a fresh clone has results/ but no runs/), leave the committed files byte-identical
and say so in one line; whatever they do write is replaced atomically."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from reproduce.core.outputs import atomic_path

REPO = Path(__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_atomic_path_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "table2.md"
    target.write_text("committed")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed half-way")
    assert snapshot(tmp_path) == {"table2.md": b"committed"}
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert snapshot(tmp_path) == {"table2.md": b"new"}


def test_figures_without_runs_keep_the_committed_curves(tmp_path, monkeypatch, capsys):
    """Stored metrics are committed, so the gains figure is rendered; the training curves need
    runs/ and stay as they were."""
    from reproduce.report import figures
    shutil.copytree(REPO / "results" / "mini", tmp_path / "results" / "mini")
    shutil.copytree(REPO / "results" / "figures", tmp_path / "results" / "figures")
    curves = {k: v for k, v in snapshot(tmp_path / "results" / "figures").items() if k.startswith("curves_")}
    monkeypatch.chdir(tmp_path)
    assert figures.main(["--profile", "mini"]) == 1
    after = snapshot(tmp_path / "results" / "figures")
    assert {k: v for k, v in after.items() if k.startswith("curves_")} == curves
    # the ablation figure comes with the stored metrics of `make ablations`, when there are any
    rendered = ["gains_mini.png"] + (["ablation_mini.png"] if any((REPO / "results" / "mini").glob("*/ablation-*.json"))
                                     else [])
    assert set(after) == set(curves) | set(rendered)                       # no temp files left
    assert capsys.readouterr().err.splitlines() == [
        "figures: runs/mini/dab_detr/teacher/train_log.csv not found (and 8 more); run `make repro` first "
        f"(wrote {', '.join(rendered)}; the other committed figures in results/figures are left as they are)"]


def test_figures_without_any_inputs_write_nothing(tmp_path, monkeypatch, capsys):
    from reproduce.report import figures
    shutil.copytree(REPO / "results" / "figures", tmp_path / "results" / "figures")
    before = snapshot(tmp_path / "results" / "figures")
    monkeypatch.chdir(tmp_path)
    assert figures.main(["--profile", "mini"]) == 1
    assert snapshot(tmp_path / "results" / "figures") == before
    out = capsys.readouterr()
    assert out.out == "" and out.err.splitlines() == [
        "figures: results/mini/<detector>/<run>-s<seed>.json not found (and 9 more); run `make repro` first "
        "(the committed figures in results/figures are left as they are)"]


def results_without_metrics(tmp_path: Path) -> Path:
    """results/ with the committed tables and the paper's values, but no metrics of the profile."""
    results = tmp_path / "results"
    shutil.copytree(REPO / "results" / "tables", results / "tables")
    shutil.copytree(REPO / "results" / "paper", results / "paper")
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    return results


def test_tables_without_metrics_keep_the_committed_tables(tmp_path, capsys):
    from reproduce.report import tables
    results = results_without_metrics(tmp_path)
    before = snapshot(results / "tables")
    assert tables.main(["--results", str(results), "--params", str(tmp_path / "params.yaml")]) == 1
    assert snapshot(results / "tables") == before
    out = capsys.readouterr()
    assert out.out == "" and out.err.splitlines() == [
        f"tables: no stored metrics in {results}/mini/<detector>/*.json; run `make repro` first "
        f"(the committed tables in {results}/tables are left as they are)"]


def test_claim_without_metrics_keeps_the_committed_verdict(tmp_path, capsys):
    from reproduce.report import claim
    results = results_without_metrics(tmp_path)
    before = snapshot(results / "tables")
    assert claim.main(["--results", str(results), "--params", str(tmp_path / "params.yaml")]) == 1
    assert snapshot(results / "tables") == before
    out = capsys.readouterr()
    assert out.out == "" and out.err.splitlines() == [
        f"claim: no stored CLoCKDistill metrics in {results}/mini/<detector>/clockdistill-s*.json; "
        f"run `make repro` first (the committed {results}/tables/claim.json is left as it is)"]


def test_tables_and_claim_from_committed_metrics_reproduce_the_committed_files(tmp_path):
    """A fresh clone has the metrics, so these keep working there, byte for byte."""
    from reproduce.report import claim
    from reproduce.report import tables
    results = results_without_metrics(tmp_path)
    shutil.copytree(REPO / "results" / "mini", results / "mini")
    args = ["--results", str(results), "--params", str(tmp_path / "params.yaml")]
    assert tables.main(args) == 0 and claim.main(args) == 0
    assert snapshot(results / "tables") == snapshot(REPO / "results" / "tables")
