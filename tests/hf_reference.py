"""Shared by the tests that compare our detectors with Hugging Face's on random weights."""
from __future__ import annotations

import torch


@torch.no_grad()
def randomise(model: torch.nn.Module, bias_scale: float = 0.5) -> None:
    """Every float tensor of the state drawn afresh at a fan-in scale (tied tensors once, as they
    are one), so no mapping error hides behind a zero or one initial value and activations stay
    O(1) through the network: BN variances positive, PReLU slopes in [0, 0.5), norm scales near
    1, anchors (``refpoint``) like biases."""
    gen = torch.Generator().manual_seed(1)
    for name, t in model.state_dict(keep_vars=True).items():
        if not t.is_floating_point():
            continue
        if name.endswith("running_var"):
            new = torch.rand(t.shape, generator=gen) + 0.5
        elif t.dim() >= 2 and "refpoint" not in name:
            new = torch.randn(t.shape, generator=gen) / t[0].numel() ** 0.5
        elif name.endswith("activation_fn.weight"):          # PReLU slope
            new = torch.rand(t.shape, generator=gen) * 0.5
        elif name.endswith("weight") and "refpoint" not in name:   # norm scales
            new = 1.0 + 0.3 * torch.randn(t.shape, generator=gen)
        else:                                                 # biases, BN means, anchors
            new = bias_scale * torch.randn(t.shape, generator=gen)
        t.copy_(new)


def padded_batch(sizes: list[tuple[int, int]]):
    """Images of ``sizes`` (h, w) padded to the largest, and HF's pixel mask (1 = image)."""
    gen = torch.Generator().manual_seed(2)
    height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
    images = torch.zeros(len(sizes), 3, height, width)
    pixel_mask = torch.zeros(len(sizes), height, width, dtype=torch.long)
    for i, (h, w) in enumerate(sizes):
        images[i, :, :h, :w] = torch.randn(3, h, w, generator=gen)
        pixel_mask[i, :h, :w] = 1
    return images, pixel_mask
