"""``reproduce.deploy.export``: every detector exports to ONNX with dynamic batch and image size, and
onnxruntime reproduces PyTorch within 1e-4 on images of other sizes than the traced one."""
from __future__ import annotations

import pytest
import torch

from models.build import build_detector, detector_config
from reproduce.deploy import export
from reproduce.training.checkpoint import save_model

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLE = (64, 96)
# other sizes than the traced one, a batch of 2 with padding; every level keeps >= 12 tokens
CASES = [export.example_inputs(1, 96, 64, seed=1), export.example_inputs(2, 80, 128, seed=2, pad_right=32)]


def tiny(detector: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_detector(detector_config(detector, "tiny"), 3, load_weights=False).eval()


@pytest.mark.parametrize("detector", ["dab_detr", "deformable_detr", "dino"])
def test_onnx_matches_pytorch_on_other_sizes(detector, tmp_path):
    model = tiny(detector)
    path = export.export_onnx(model, tmp_path / f"{detector}.onnx", EXAMPLE)
    diffs = export.max_differences(model, export.onnx_session(path, threads=1), CASES)
    assert max(diffs) < 1e-4, diffs
    logits, boxes = export.onnx_outputs(export.onnx_session(path, threads=1), *CASES[1])
    assert logits.shape == (2, 12, 3) and boxes.shape == (2, 12, 4)


def test_cli_exports_a_checkpoint_with_metadata(tmp_path, capsys):
    import onnx
    model = tiny("deformable_detr", seed=1)
    cfg = detector_config("deformable_detr", "tiny")
    ckpt = save_model(model.state_dict(), tmp_path / "model.pth",
                      {"detector": "deformable_detr", "model_cfg": cfg, "num_classes": 3, "role": "teacher"})
    rc = export.main(["--checkpoint", str(ckpt), "--format", "onnx", "--example-size", "64", "96"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "max |difference|" in out.out
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "model.onnx")).metadata_props}
    assert meta["detector"] == "deformable_detr" and meta["num_classes"] == "3" and meta["role"] == "teacher"


def test_cli_rejects_an_old_opset(tmp_path, capsys):
    rc = export.main(["--checkpoint", str(tmp_path / "missing.pth"), "--opset", "13"])
    err = capsys.readouterr().err
    assert rc == 1 and "GridSample needs opset 16" in err and "Traceback" not in err
