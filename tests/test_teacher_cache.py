"""Teacher-output cache: a KD run reading the cache trains what the live teacher trains.

Tiny models on the toy dataset of test_engine.py. The cache is not bitwise (the decoder's
query-group padding differs between the builder's batches and the run's, which rounds the
teacher's outputs differently by ~1e-6), so the runs are compared with a tolerance.
"""
from __future__ import annotations

import csv
import json

import pytest
import torch

from distill.teacher_cache import TeacherCache, TeacherCacheError, file_sha256
from reproduce.training.runconfig import resolve_run
from reproduce.training.teacher_cache import build_cache, main as cache_main
from reproduce.training.train import train
from tests.test_engine import make_toy_dataset, toy_params

pytestmark = pytest.mark.usefixtures("one_thread")
DETECTOR = "deformable_detr"


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    prepared = make_toy_dataset(root / "data", n=6)
    params = toy_params(prepared, steps=4, teacher_steps=4)
    params["methods"] = ["fgd", "kd_detr", "clockdistill"]
    params["distill"] = {m: {} for m in params["methods"]}
    with torch.random.fork_rng(devices=[]):
        train(resolve_run(params, DETECTOR, "teacher"), root / "teacher", device="cpu", show_progress=False)
    teacher = root / "teacher" / "model.pth"
    cache, report = build_cache(params, DETECTOR, "toy", teacher, show_progress=False)
    cache.save(root / "teacher_cache.pt")
    return params, teacher, root / "teacher_cache.pt", report, root


def test_builder_serves_the_cacheable_methods(toy):
    params, teacher, path, report, _ = toy
    assert report["served"] == ["clockdistill", "fgd"]
    assert "redraws" in report["live"]["kd_detr"]
    cache = TeacherCache.load(path, teacher)
    # 6 images x 2 flips, less one: the empty (uniform) image is its own mirror image, so both
    # flips are one input; fgd's teacher input (no groups) and clockdistill's (GT queries) each
    assert len(cache.images) == 11 and len(cache.entries) == 22


def _losses(out_dir):
    return [float(r["loss"]) for r in csv.DictReader((out_dir / "train_log.csv").open())]


@pytest.mark.parametrize("method", ["clockdistill", "fgd"])
def test_kd_run_from_cache_equals_live_teacher(toy, method):
    params, teacher, path, _, root = toy
    cfg = resolve_run(params, DETECTOR, "student", method)
    live = train(cfg, root / f"{method}-live", teacher=teacher, device="cpu", show_progress=False)
    cached = train(cfg, root / f"{method}-cached", teacher=teacher, teacher_cache=path, device="cpu",
                   show_progress=False)
    assert live["teacher_cache"] is None
    stats = cached["teacher_cache"]
    assert stats["hits"] == 4 and stats["misses"] == 0
    # the tolerance: teacher outputs differ by ~1e-6 (padding of the query groups). Measured on
    # this run: losses equal to 1e-7 relative; 92% of the weights bitwise equal, 99% within 4e-9,
    # a few AdamW coordinates with a near-zero gradient up to 2e-4 (Adam normalises the gradient,
    # so a rounding-level difference there moves the weight by up to lr per step)
    assert _losses(root / f"{method}-cached") == pytest.approx(_losses(root / f"{method}-live"), rel=1e-5)
    a = torch.load(root / f"{method}-live" / "model.pth", weights_only=True)["model"]
    b = torch.load(root / f"{method}-cached" / "model.pth", weights_only=True)["model"]
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a if a[k].is_floating_point()])
    assert diff.quantile(0.99).item() < 1e-6
    assert diff.max().item() <= sum(float(r["lr"]) for r in csv.DictReader((root / f"{method}-live" /
                                                                           "train_log.csv").open()))


def test_cached_teacher_output_matches_live(toy):
    """One batch as training draws it: every tensor a method reads, cache against live."""
    from distill import build_distiller
    from models.build import build_criterion, build_detector
    from reproduce.training.trainer import build_train_dataset, load_teacher
    from reproduce.data.transforms import collate
    params, teacher_path, path, _, _ = toy
    cfg = resolve_run(params, DETECTOR, "student", "clockdistill")
    dataset = build_train_dataset(cfg)
    teacher = load_teacher(teacher_path, cfg, dataset.num_classes)
    distiller = build_distiller("clockdistill", build_detector(cfg["model"], dataset.num_classes),
                                build_criterion(DETECTOR, dataset.num_classes), teacher=teacher, cfg=cfg["distill"])
    images, pad_mask, targets = collate([dataset[i] for i in (0, 1, 2)])
    groups = distiller.teacher_groups(images, targets)
    live = distiller.teacher_forward(images, pad_mask, groups=groups)
    distiller.use_teacher_cache(TeacherCache.load(path, teacher_path))
    cached = distiller.teacher_forward(images, pad_mask, groups=groups)
    assert distiller.teacher_cache.hits == 1
    valid = groups[0].valid
    for name in ("memory", "memory_pos", "valid_ratios", "layer_logits", "layer_boxes", "layer_states"):
        torch.testing.assert_close(getattr(cached, name), getattr(live, name), rtol=0, atol=1e-5)
    for f_cached, f_live in zip(cached.features, live.features):
        torch.testing.assert_close(f_cached, f_live, rtol=0, atol=1e-5)
    torch.testing.assert_close(cached.groups["target"].layer_logits[:, valid], live.groups["target"].layer_logits[:, valid],
                               rtol=0, atol=1e-5)
    assert torch.equal(cached.memory_padding_mask, live.memory_padding_mask)


def test_kd_detr_keeps_the_live_teacher(toy):
    params, teacher, path, _, root = toy
    cfg = resolve_run(params, DETECTOR, "student", "kd_detr")
    summary = train(cfg, root / "kd_detr", teacher=teacher, teacher_cache=path, max_steps=1, device="cpu",
                    show_progress=False)
    assert summary["teacher_cache"] is None


def test_cache_of_another_teacher_is_refused(toy, tmp_path):
    params, teacher, path, _, _ = toy
    other = tmp_path / "other.pth"
    other.write_bytes(teacher.read_bytes() + b"x")
    with pytest.raises(TeacherCacheError, match="another teacher"):
        TeacherCache.load(path, other)
    assert TeacherCache.load(path).teacher_sha256 == file_sha256(teacher)


def test_random_augmentation_gives_an_empty_cache(toy, tmp_path):
    import yaml
    params, teacher, _, _, _ = toy
    params = json.loads(json.dumps(params))
    params["profiles"]["toy"]["image"] = {"short_sides": [56, 64], "max_size": 128, "hflip": 0.5}
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    out = tmp_path / "cache.pt"
    assert cache_main(["--detector", DETECTOR, "--teacher", str(teacher), "--out", str(out), "--params",
                       str(params_file), "--profile", "toy", "--no-progress"]) == 0
    cache = TeacherCache.load(out, teacher)
    assert not cache.entries and "2 short sides" in cache.note["empty_because"]
