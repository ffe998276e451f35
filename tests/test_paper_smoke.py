"""reproduce/bench/paper_smoke.py end to end on one detector and one dataset: the paper-scale kitti
profile on the real KITTI sample, 1 step each of teacher and CLoCKDistill student, then
evaluation. Minutes of CPU at 800x1333, so ``slow`` (make test-all)."""
from __future__ import annotations

import json

import pytest

from reproduce.bench import paper_smoke

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not paper_smoke.SAMPLES["kitti"].is_dir(), reason="../shared/data/kitti_sample absent")]


def test_paper_smoke_kitti_one_detector(tmp_path):
    record = tmp_path / "paper_scale_cpu.json"
    rc = paper_smoke.main(["--datasets", "kitti", "--detectors", "deformable_detr", "--steps", "1",
                           "--eval-images", "1", "--work", str(tmp_path / "work"), "--record", str(record)])
    runs = json.loads(record.read_text())["runs"]
    assert rc == 0, runs
    assert [r["stage"] for r in runs] == ["prepare", "teacher", "clockdistill", "evaluate"]
    assert all(r["rc"] == 0 and r["peak_rss_mib"] > 0 for r in runs)
    assert runs[1]["steps"] == runs[2]["steps"] == 1 and runs[2]["mean_s_per_step"] > 0
    assert runs[3]["n_images"] == 1
