"""Export a trained detector (any of the three, student or teacher) to ONNX, and check it in
onnxruntime against PyTorch.

Usage::

    python -m reproduce.export --checkpoint runs/mini/dino/student/model.pth --format onnx
        [--out model.onnx] [--opset 17] [--example-size 320 320] [--no-check]

The graph has two inputs and two outputs, with dynamic batch and image size:

* ``images``: float32 ``[B, 3, H, W]``, normalised as the evaluation transforms do
  (``reproduce.data.transforms.build_transforms(False, ...)``);
* ``pad_mask``: bool ``[B, H, W]``, True on padding (all False for one unpadded image);
* ``logits``: ``[B, Q, K]`` class logits of the last decoder layer (sigmoid, focal-loss style);
* ``boxes``: ``[B, Q, 4]`` normalised ``(cx, cy, w, h)``; ``reproduce.evaluation.evaluate.postprocess``
  turns both into top-k detections in pixels.

Exporter: the TorchScript-based ``torch.onnx.export(dynamo=False)`` (grade D: it traces the
Python level loops once and records the shape arithmetic, which is what the models' Python-int
spatial shapes need; the dynamo exporter specialises on them). Opset 17 by default: GridSample
needs >= 16. The deformable attention runs its pure-PyTorch ``grid_sample`` path during the
export (the ``gather`` path is an autograd.Function with no ONNX form). Two small model
changes made the traced graph generalise across image sizes: the encoder's reference grid uses
``arange + 0.5`` (the exported ``linspace`` divides by ``steps - 1``, NaN on a level of size 1)
and the deformable attention's per-level normaliser is stacked from the traced sizes instead of
``torch.tensor`` (which bakes in the example's sizes).

Limits of the traced graph: the two-stage / query-selection top-k keeps ``min(num_queries, S)``
of the example image's S memory tokens as a constant, so every image must give at least
``num_queries`` tokens (at 320 x 320 even the paper DINO's 900 do); training-only paths
(denoising queries, attention outputs, distillation groups) are not exported.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from reproduce.core.config import OneLineParser

FORMATS = ("onnx",)
DEFAULT_OPSET = 17            # GridSample needs opset >= 16
DEFAULT_EXAMPLE_SIZE = (320, 320)
INPUT_NAMES = ["images", "pad_mask"]
OUTPUT_NAMES = ["logits", "boxes"]
DYNAMIC_AXES = {"images": {0: "batch", 2: "height", 3: "width"}, "pad_mask": {0: "batch", 1: "height", 2: "width"},
                "logits": {0: "batch"}, "boxes": {0: "batch"}}


class ExportError(ValueError):
    """A usage mistake or a failed check; one line for the user."""


class InferenceGraph(nn.Module):
    """The detector's inference path with plain tensor outputs: ``(logits, boxes)`` of the
    last decoder layer (what ``reproduce.evaluation.evaluate.postprocess`` reads)."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector

    def forward(self, images: Tensor, pad_mask: Tensor) -> tuple[Tensor, Tensor]:
        out = self.detector(images, pad_mask)
        return out.logits, out.boxes


@contextlib.contextmanager
def grid_sample_attention():
    """Make ``impl="auto"`` of models.deformable_attention pick ``grid_sample`` at every size,
    restoring the thresholds afterwards."""
    from models import deformable_attention as mda
    old = mda.GATHER_MIN_POINTS, mda.GATHER_MIN_POINTS_SINGLE_THREAD
    mda.GATHER_MIN_POINTS = mda.GATHER_MIN_POINTS_SINGLE_THREAD = 1 << 62
    try:
        yield
    finally:
        mda.GATHER_MIN_POINTS, mda.GATHER_MIN_POINTS_SINGLE_THREAD = old


def example_inputs(batch: int, height: int, width: int, seed: int = 0, pad_right: int = 0) -> tuple[Tensor, Tensor]:
    """Random normalised images and their padding mask; ``pad_right`` columns of the last image
    are padding (zeroed, masked) when ``batch > 1``."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, height, width, generator=g)
    pad_mask = torch.zeros(batch, height, width, dtype=torch.bool)
    if pad_right and batch > 1:
        pad_mask[-1, :, width - pad_right:] = True
        images[-1, :, :, width - pad_right:] = 0
    return images, pad_mask


def export_onnx(model: nn.Module, path: str | Path, example_size: tuple[int, int] = DEFAULT_EXAMPLE_SIZE,
                opset: int = DEFAULT_OPSET, metadata: dict | None = None) -> Path:
    """Trace ``model`` (in eval mode) on a random image of ``example_size`` and write the ONNX
    graph with dynamic batch / height / width; ``metadata`` goes into the model's
    ``metadata_props`` (strings)."""
    import onnx
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    graph = InferenceGraph(model).eval()
    inputs = example_inputs(1, *example_size)
    with torch.no_grad(), grid_sample_attention(), warnings.catch_warnings():
        # the tracer warns about every Python-level shape use; the check below is the real test
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, inputs, str(path), input_names=INPUT_NAMES, output_names=OUTPUT_NAMES,
                          dynamic_axes=DYNAMIC_AXES, opset_version=opset, dynamo=False)
    if metadata:
        proto = onnx.load(str(path))
        for key, value in metadata.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = str(key), str(value)
        onnx.save(proto, str(path))
    return path


def onnx_session(path: str | Path, threads: int | None = None):
    """An onnxruntime CPU session (``threads``: intra-op threads; None: onnxruntime's default)."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_outputs(session, images: Tensor, pad_mask: Tensor) -> tuple[Tensor, Tensor]:
    logits, boxes = session.run(OUTPUT_NAMES, {"images": images.numpy(), "pad_mask": pad_mask.numpy()})
    return torch.from_numpy(logits), torch.from_numpy(boxes)


@torch.no_grad()
def max_differences(model: nn.Module, session, cases: Sequence[tuple[Tensor, Tensor]]) -> list[float]:
    """Largest absolute difference of logits and boxes between PyTorch (grid_sample path) and
    onnxruntime, one per input case."""
    graph = InferenceGraph(model).eval()
    out = []
    with grid_sample_attention():
        for images, pad_mask in cases:
            expected = graph(images, pad_mask)
            got = onnx_outputs(session, images, pad_mask)
            out.append(max(float((g - e).abs().max()) for g, e in zip(got, expected)))
    return out


def check_cases(example_size: tuple[int, int]) -> list[tuple[Tensor, Tensor]]:
    """The sizes the CLI checks: the example's, a wider one, and a padded batch of 2."""
    h, w = example_size
    return [example_inputs(1, h, w, seed=1), example_inputs(1, h + 32, w + 64, seed=2),
            example_inputs(2, h, w + 32, seed=3, pad_right=32)]


def default_out(checkpoint: Path) -> Path:
    return checkpoint.with_suffix(".onnx")


# ---------------------------------------------------------------------------- CLI

def _size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 32:
        raise argparse.ArgumentTypeError(f"expected at least 32 pixels, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m reproduce.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="model.pth or checkpoint.pth of a run")
    p.add_argument("--format", choices=FORMATS, default="onnx", help="export format (default onnx)")
    p.add_argument("--out", type=Path, help="output file (default: the checkpoint's path with .onnx)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset, >= 16 (default {DEFAULT_OPSET})")
    p.add_argument("--example-size", type=_size, nargs=2, metavar=("H", "W"), default=list(DEFAULT_EXAMPLE_SIZE),
                   help="image size the graph is traced at (default 320 320); other sizes run too")
    p.add_argument("--detector", choices=("dab_detr", "deformable_detr", "dino"),
                   help="the detector the checkpoint must hold (default: whatever it holds)")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime-vs-PyTorch check")
    p.add_argument("--atol", type=float, default=1e-4, help="largest difference the check accepts (default 1e-4)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from reproduce.training.checkpoint import CheckpointError, load_detector
    try:
        if args.opset < 16:
            raise ExportError(f"--opset {args.opset}: GridSample needs opset 16 or later")
        model, meta = load_detector(args.checkpoint, args.detector)
        model.eval()
        out = args.out or default_out(args.checkpoint)
        size = tuple(args.example_size)
        metadata = {"detector": meta.get("detector", ""), "num_classes": int(model.num_classes),
                    "role": meta.get("role", ""), "method": meta.get("method", ""),
                    "source_checkpoint": str(args.checkpoint), "inputs": "images float32 [B,3,H,W] normalised; "
                    "pad_mask bool [B,H,W] True on padding", "outputs": "logits [B,Q,K]; boxes [B,Q,4] cxcywh in [0,1]"}
        export_onnx(model, out, size, args.opset, metadata)
        if not args.no_check:
            diffs = max_differences(model, onnx_session(out), check_cases(size))
            worst = max(diffs)
            print(f"onnxruntime vs PyTorch: max |difference| {worst:.2e} over 3 inputs "
                  f"({size[0]}x{size[1]}, {size[0] + 32}x{size[1] + 64}, batch 2 padded)")
            if not worst <= args.atol:
                raise ExportError(f"{out}: onnxruntime differs from PyTorch by {worst:.2e} > --atol {args.atol:g}")
    except (ExportError, CheckpointError) as err:
        print(f"export: error: {err}", file=sys.stderr)
        return 1
    print(f"{meta.get('detector', 'detector')} ({int(model.num_classes)} classes) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
