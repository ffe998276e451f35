"""Shared fixtures: tiny inputs in the manner of HF transformers' model testers."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
torch.set_num_threads(2)


@pytest.fixture
def tiny_batch():
    """Two 64x96 images (the second padded on the right) with 2 and 1 objects."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 64, 96, generator=g)
    pad_mask = torch.zeros(2, 64, 96, dtype=torch.bool)
    pad_mask[1, :, 80:] = True
    targets = [
        {"boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.3, 0.1, 0.1]]), "labels": torch.tensor([0, 2])},
        {"boxes": torch.tensor([[0.6, 0.4, 0.02, 0.03]]), "labels": torch.tensor([1])},
    ]
    return images, pad_mask, targets


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared 2-core machine two OpenMP threads can be far slower."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
