"""reproduce.bench: the --quick smoke run writes valid JSON, the summary and the figure; the
statistics helpers; and the ``gather`` implementation of deformable attention that the msda
benchmark measures (tests/test_models.py covers the ``grid_sample`` one at its tiny shapes).
HF comparisons are skipped when transformers is not installed (see requirements.lock)."""
from __future__ import annotations

import importlib.util
import itertools
import json
import os

import pytest
import torch

from models import deformable_attention as mda
from models.deformable_attention import MultiScaleDeformableAttention, multi_scale_deformable_attention
from reproduce.bench import suite as bench
from tests.test_models import loop_reference  # one float64 reference for MSDA

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None



def test_gather_matches_loop_reference_and_gradcheck():
    g = torch.Generator().manual_seed(0)
    shapes = [(4, 6), (2, 3), (1, 2)]
    value = torch.randn(2, 32, 2, 3, generator=g, dtype=torch.float64)
    # points inside, on the border band (one corner in) and far outside
    locations = torch.rand(2, 5, 2, 3, 3, 2, generator=g, dtype=torch.float64) * 1.6 - 0.3
    weights = torch.rand(2, 5, 2, 3, 3, generator=g, dtype=torch.float64)
    weights = weights / weights.sum((-1, -2), keepdim=True)
    ours = multi_scale_deformable_attention(value, shapes, locations, weights, impl="gather")
    assert torch.allclose(ours, loop_reference(value, shapes, locations, weights), atol=1e-12)
    inputs = (value.requires_grad_(), locations.requires_grad_(), weights.requires_grad_())
    assert torch.autograd.gradcheck(
        lambda v, l, w: multi_scale_deformable_attention(v, shapes, l, w, impl="gather"), inputs)


def test_gather_and_grid_sample_agree_in_float32_and_auto_dispatch():
    case = dict(batch=2, shapes=[(12, 30), (6, 15), (3, 8)], heads=4, head_dim=8, points=3, queries=None)
    value, shapes, locations, weights, grad_out = bench.msda_inputs(case, seed=1)
    results = {}
    for impl in ("grid_sample", "gather"):
        leaves = [t.clone().requires_grad_() for t in (value, locations, weights)]
        out = multi_scale_deformable_attention(leaves[0], shapes, leaves[1], leaves[2], impl=impl)
        out.backward(grad_out)
        results[impl] = (out.detach(), [t.grad for t in leaves])
    (a, ga), (b, gb) = results["grid_sample"], results["gather"]
    assert (a - b).abs().max() <= 1e-5
    for x, y in zip(ga, gb):
        assert (x - y).abs().max() <= 1e-4 * max(1.0, x.abs().max().item())
    with pytest.raises(ValueError, match="impl"):
        multi_scale_deformable_attention(value, shapes, locations, weights, impl="nope")
    # auto: grid_sample below the threshold, gather at or above it (same numbers either way)
    n_points = locations.numel() // 2
    with bench.msda_threshold(n_points):
        assert mda.gather_min_points() == n_points
        assert torch.equal(multi_scale_deformable_attention(value, shapes, locations, weights),
                           multi_scale_deformable_attention(value, shapes, locations, weights, impl="gather"))
    with bench.msda_threshold(n_points + 1):
        assert torch.equal(multi_scale_deformable_attention(value, shapes, locations, weights),
                           multi_scale_deformable_attention(value, shapes, locations, weights, impl="grid_sample"))


def test_module_uses_gather_path_with_padding_mask():
    torch.manual_seed(0)
    attn = MultiScaleDeformableAttention(d_model=16, n_levels=2, n_heads=2, n_points=2)
    shapes = [(4, 6), (2, 3)]
    value, query = torch.randn(2, 30, 16), torch.randn(2, 5, 16)
    refs = torch.rand(2, 5, 2, 4) * 0.5 + 0.25
    mask = torch.zeros(2, 30, dtype=torch.bool)
    mask[:, 24:] = True
    with bench.msda_threshold(0):
        a, _ = attn(query, refs, value, shapes, mask)
        value2 = value.clone()
        value2[:, 24:] = 1e3
        b, _ = attn(query, refs, value2, shapes, mask)
    with bench.msda_threshold(1 << 62):
        c, _ = attn(query, refs, value, shapes, mask)
    assert torch.allclose(a, b) and torch.allclose(a, c, atol=1e-6)


def test_stats_and_ratios():
    s = bench.stats([3.0, 1.0, 2.0, 4.0])
    assert s["median"] == 2.5 and s["min"] == 1.0 and s["max"] == 4.0 and s["q1"] <= s["median"] <= s["q3"]
    r = bench.ratio({"a": [2.0, 4.0], "b": [1.0, 1.0], "c": [1.0, 3.0]}, "a", ["b", "c"])
    assert r["per_round"] == [1.0, 1.0] and r["median"] == 1.0
    calls = []
    times = bench.interleaved({"x": lambda: calls.append("x"), "y": lambda: calls.append("y")}, repeats=3)
    assert len(times["x"]) == 3 and calls[:2] == ["x", "y"] and calls[2:] == ["x", "y", "y", "x", "x", "y"]


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers not installed (see requirements.lock)")
def test_hf_core_matches_ours_on_identical_inputs():
    import transformers
    case = dict(batch=2, shapes=[(6, 10), (3, 5)], heads=2, head_dim=4, points=2, queries=7)
    value, shapes, locations, weights, _ = bench.msda_inputs(case)
    hf = bench.hf_msda_callable(transformers)(value, shapes, locations, weights)
    for impl in ("grid_sample", "gather"):
        ours = multi_scale_deformable_attention(value, shapes, locations, weights, impl=impl)
        assert (hf - ours).abs().max() <= 1e-5


@pytest.mark.timeout(600)
def test_quick_run_writes_valid_json(tmp_path):
    threads, cwd = torch.get_num_threads(), os.getcwd()
    try:
        assert bench.main(["--quick", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
        os.chdir(cwd)
    for name in bench.BENCHMARKS:
        data = json.loads((tmp_path / f"{name}.json").read_text())
        assert data["benchmark"] == name and data["quick"] is True
        machine = data["machine"]
        for key in ("cpu_model", "logical_cpus", "torch_threads", "torch", "date"):
            assert machine[key] not in (None, "")
        assert data["result"]
    msda = json.loads((tmp_path / "msda.json").read_text())["result"]
    assert msda["hf_available"] == HAS_TRANSFORMERS
    for case in msda["cases"]:
        assert case["output_ok"], case["correctness"]
        for impl in ("grid_sample", "gather"):
            t = case["timings"][impl]
            assert len(t["seconds"]) == 2 and t["min"] <= t["median"] <= t["max"]
        if HAS_TRANSFORMERS:
            assert case["ratio_hf_over_ours"]["median"] > 0
    train = json.loads((tmp_path / "train_step.json").read_text())["result"]
    if HAS_TRANSFORMERS:
        assert train["trainable_parameters"]["hf"] == train["trainable_parameters"]["ours"]
    else:
        assert "hf" not in train["timings"] and train["hf_skipped_reason"]
    distill = json.loads((tmp_path / "distill_overhead.json").read_text())["result"]
    for entry in distill["detectors"]:
        assert "clockdistill" in entry["ratio_to_student_plus_teacher"], entry["errors"]
        # KD step / student step with the teacher output cache; KD-DETR keeps the live teacher
        assert "clockdistill+cache" in entry["ratio_to_student"] and "kd_detr+cache" not in entry["ratio_to_student"]
    assert distill["cached_ratio_to_student"]["dino"]["clockdistill"] > 0
    models = json.loads((tmp_path / "models.json").read_text())["result"]
    assert all("step" in row and row["peak_rss_mib"] > 0 for row in models["rows"]), models["rows"]
    evaluation = json.loads((tmp_path / "eval.json").read_text())["result"]
    assert evaluation["cocoeval"]["median"] > 0 and 0 <= evaluation["cocoeval"]["AP"] <= 1
    assert (tmp_path / "summary.md").read_text().startswith("# Benchmarks")
    deploy = json.loads((tmp_path / "deploy.json").read_text())["result"]
    for row in deploy["rows"]:
        assert row["gflops"] > 0 and row["max_abs_diff"] < 1e-4, row
        assert row["timings"]["onnxruntime"]["median"] > 0 and row["ratio_eager_over_onnxruntime"]["median"] > 0
    assert "## deploy" in (tmp_path / "summary.md").read_text()
    assert (tmp_path / "bench.png").stat().st_size > 0


def test_deploy_image_sizes_follow_the_eval_transforms():
    from reproduce.bench.deploy_bench import eval_image_size
    assert eval_image_size((128, 416), {"short_sides": [128], "max_size": 416}) == (128, 416)
    # KITTI at 800 short side, capped at 1333 on the long side
    assert eval_image_size((375, 1242), {"short_sides": [480, 800], "max_size": 1333}) == (402, 1333)
    assert eval_image_size((640, 480), {"short_sides": [800], "max_size": 1333}) == (1066, 800)
