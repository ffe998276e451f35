"""``python -m reproduce.convert``: a random-weight HF model written by ``save_pretrained``,
converted by the CLI's main(), loaded as reproduce.training.train / reproduce.evaluation.evaluate load checkpoints
(reproduce.training.checkpoint.load_detector), computes what HF's model computes."""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch

from reproduce.training.checkpoint import load_detector
from reproduce.convert.cli import main
from tests.hf_reference import padded_batch, randomise

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

NUM_CLASSES = 5
TOL = 1e-4


def _resnet18(out_features):
    return transformers.ResNetConfig(layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512],
                                     embedding_size=64, out_features=out_features)


def _dab_detr():
    return transformers.DabDetrForObjectDetection(transformers.DabDetrConfig(
        use_timm_backbone=False, use_pretrained_backbone=False, backbone=None, backbone_config=_resnet18(["stage4"]),
        hidden_size=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=48, decoder_ffn_dim=48,
        encoder_attention_heads=2, decoder_attention_heads=2, num_queries=6, num_labels=NUM_CLASSES))


def _deformable_detr():
    return transformers.DeformableDetrForObjectDetection(transformers.DeformableDetrConfig(
        use_timm_backbone=False, use_pretrained_backbone=False, backbone=None,
        backbone_config=_resnet18(["stage2", "stage3", "stage4"]), d_model=32, encoder_layers=1, decoder_layers=2,
        encoder_ffn_dim=48, decoder_ffn_dim=48, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_n_points=2, decoder_n_points=2, num_feature_levels=4, num_queries=6, num_labels=NUM_CLASSES))


HF_MODELS = {"dab_detr": _dab_detr, "deformable_detr": _deformable_detr}


def _converter_or_skip(detector: str):
    try:
        importlib.import_module(f"reproduce.convert.{detector}")
    except ModuleNotFoundError:
        pytest.skip(f"reproduce/convert/{detector}.py (the {detector} key mapping) is not written yet")


@pytest.fixture(scope="module", params=sorted(HF_MODELS))
def hf_saved(request, tmp_path_factory):
    """(detector, HF model in eval mode, its save_pretrained folder)."""
    _converter_or_skip(request.param)
    torch.manual_seed(0)
    model = HF_MODELS[request.param]().eval()
    randomise(model, bias_scale=0.3)
    folder = tmp_path_factory.mktemp(request.param) / "hf"
    model.save_pretrained(folder)
    return request.param, model, folder


def test_converted_checkpoint_computes_hf_outputs(hf_saved, tmp_path, capsys):
    detector, hf, folder = hf_saved
    out = tmp_path / "model.pth"
    assert main([str(folder), "--out", str(out)]) == 0, capsys.readouterr().err
    # as reproduce.training.train --teacher loads it: its own config, a finished run, the dataset's classes
    model, meta = load_detector(out, detector, None, NUM_CLASSES, require_completed=True, what="teacher")
    assert meta["converted"] is True and meta["source"] == str(folder.resolve())
    assert meta["hf_config"]["model_type"].replace("-", "_") == detector and meta["num_classes"] == NUM_CLASSES
    assert meta["model_cfg"]["backbone"] == {**meta["model_cfg"]["backbone"], "name": "resnet18",
                                             "weights": "imagenet"}
    images, pixel_mask = padded_batch([(128, 160), (96, 128)])
    model.eval()
    with torch.no_grad():
        expected = hf(pixel_values=images, pixel_mask=pixel_mask)
        got = model(images, pixel_mask == 0)
    assert got.logits.shape == expected.logits.shape
    assert (got.logits - expected.logits).abs().max() <= TOL
    assert (got.layer_boxes[-1] - expected.pred_boxes).abs().max() <= TOL


def test_class_count_mismatch_reinitialises_the_class_heads(hf_saved, tmp_path, capsys):
    detector, _, folder = hf_saved
    same, other = tmp_path / "same.pth", tmp_path / "kitti.pth"
    assert main([str(folder), "--out", str(same)]) == 0
    capsys.readouterr()
    assert main([str(folder), "--out", str(other), "--num-classes", "3"]) == 0
    err = capsys.readouterr().err
    assert f"trained for {NUM_CLASSES} classes, --num-classes is 3: re-initialised" in err, err
    model, meta = load_detector(other, detector, None, 3, what="teacher")
    full, _ = load_detector(same, detector, None, NUM_CLASSES)
    assert meta["num_classes"] == 3 and meta["file_num_classes"] == NUM_CLASSES and meta["reinitialised"]
    ours, theirs = model.state_dict(), full.state_dict()
    reinit = set(meta["reinitialised"])
    assert all(torch.equal(ours[k], theirs[k]) for k in ours if k not in reinit)
    assert all(ours[k].shape != theirs[k].shape for k in reinit)
    assert "class_names" not in meta     # the HF names describe the old classes


def _hf_dir(tmp_path, config: dict | None, weights: bool = True):
    folder = tmp_path / "hf"
    folder.mkdir()
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    if weights:
        from safetensors.torch import save_file
        save_file({"x": torch.zeros(1)}, folder / "model.safetensors")
    return folder


ERROR_CASES = [
    ("missing_dir", None, "no such directory"),
    ("missing_config", dict(config=None), "config.json: no such file"),
    ("dino", dict(config={"model_type": "dino"}), "DINO has no Hugging Face transformers implementation"),
    ("unsupported", dict(config={"model_type": "detr"}), "unsupported model_type 'detr'; supported: dab_detr, "
                                                         "deformable_detr"),
    ("missing_weights", dict(config={"model_type": "dab_detr"}, weights=False), "no weights file"),
]


@pytest.mark.parametrize("case", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_mistakes_are_one_line(tmp_path, capsys, case):
    _, kwargs, expected = case
    folder = tmp_path / "nowhere" if kwargs is None else _hf_dir(tmp_path, **kwargs)
    out = tmp_path / "out" / "model.pth"
    rc = main([str(folder), "--out", str(out)])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 1 and len(lines) == 1 and expected in lines[0], lines
    assert lines[0].startswith("convert: error: ") and "Traceback" not in lines[0]
    assert not out.parent.exists(), "a failed conversion must not create --out"


def test_weights_files_are_read_safely(tmp_path):
    """model.safetensors (preferred), else pytorch_model.bin with weights_only=True: a file
    holding pickled code is refused, not run."""
    from safetensors.torch import save_file

    from reproduce.convert.hf_files import read_state
    from reproduce.convert.resnet import ConvertError

    tensors = {"a": torch.arange(3.0), "b": torch.ones(2, 2)}
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    got = read_state(tmp_path)
    assert set(got) == set(tensors) and all(torch.equal(got[k], tensors[k]) for k in tensors)
    save_file({"a": torch.zeros(1)}, tmp_path / "model.safetensors")
    assert set(read_state(tmp_path)) == {"a"}                       # safetensors wins
    (tmp_path / "model.safetensors").unlink()
    torch.save({"a": torch.zeros(1), "code": ConvertError("x")}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ConvertError, match="not readable with weights_only=True"):
        read_state(tmp_path)


# the HF configs that are the paper profiles' teachers (R50; Deformable DETR two-stage with box
# refinement, as hub SenseTime/deformable-detr-with-box-refine-two-stage; DAB-DETR without dropout)
PROFILE_TEACHER_HF = {"deformable_detr": ("DeformableDetrConfig", dict(two_stage=True, with_box_refine=True)),
                      "dab_detr": ("DabDetrConfig", dict(dropout=0.0))}


@pytest.mark.parametrize("detector", sorted(PROFILE_TEACHER_HF))
def test_converted_config_is_the_profile_teacher(detector):
    """What `--teacher` demands: the converted config equals the kitti / coco teacher config key
    for key (config only, no weights built)."""
    _converter_or_skip(detector)
    from reproduce.core.config import load_params
    from reproduce.convert.cli import canonical_config, converter
    from reproduce.training.runconfig import resolve_run

    config_class, options = PROFILE_TEACHER_HF[detector]
    hf_config = getattr(transformers, config_class)(**options).to_dict()
    cfg = dict(converter(hf_config["model_type"]).model_config(hf_config))
    cfg = canonical_config({**cfg, "backbone": {**cfg["backbone"], "weights": "imagenet"}})
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    for profile in ("kitti", "coco"):
        assert cfg == resolve_run(params, detector, "teacher", profile=profile, resolve_steps=False)["model"]
