"""CNN backbones with frozen batch norm and multi-level outputs.

torchvision ResNet-18/34/50/101 at paper scale; a slim BasicBlock ResNet (configurable widths
and depths) for the CPU ``mini`` size. Weights are never downloaded: pass a local file to
load (``torch.load(weights_only=True)``) or train from scratch.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters (DETR): batch sizes of 1-2
    per GPU make batch statistics useless, so ImageNet statistics are kept frozen."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        bias = self.bias - self.running_mean * scale
        # one fused pass over the activation instead of a multiply and an add
        return torch.addcmul(bias[None, :, None, None], x, scale[None, :, None, None])


def freeze_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d in ``module`` by a FrozenBatchNorm2d with the same state."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, child.eps)
            frozen.weight.copy_(child.weight.detach())
            frozen.bias.copy_(child.bias.detach())
            frozen.running_mean.copy_(child.running_mean)
            frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            freeze_batch_norm(child)
    return module


class SlimResNet(nn.Module):
    """A BasicBlock ResNet with configurable widths/depths, for CPU-sized models.

    The stem is two stride-2 3x3 convolutions (stride 4, like ResNet's conv+maxpool);
    stage i has stride 2**(i+2). Uses GroupNorm-free BatchNorm so it can be frozen or trained.
    """

    def __init__(self, widths=(16, 32, 64, 128), depths=(1, 1, 1, 1), stem: int = 16):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, stem, 3, 2, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU(inplace=True),
            nn.Conv2d(stem, stem, 3, 2, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU(inplace=True),
        )
        stages, in_ch = [], stem
        for i, (width, depth) in enumerate(zip(widths, depths)):
            blocks = []
            for j in range(depth):
                stride = 2 if (j == 0 and i > 0) else 1
                down = None
                if stride != 1 or in_ch != width:
                    down = nn.Sequential(nn.Conv2d(in_ch, width, 1, stride, bias=False), nn.BatchNorm2d(width))
                blocks.append(BasicBlock(in_ch, width, stride, down))
                in_ch = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.channels = list(widths)


class Backbone(nn.Module):
    """Returns the feature maps of the requested ResNet stages with their padding masks.

    ``levels`` are stage indices 2..5 (C2..C5, strides 4..32). ``train_backbone=False`` freezes
    all weights; otherwise the stem and first stage stay frozen as in DETR.
    """

    RESNETS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048}

    def __init__(
        self,
        name: str = "resnet50",
        levels: tuple[int, ...] = (3, 4, 5),
        weights_path: str | None = None,
        train_backbone: bool = True,
        frozen_bn: bool = True,
        widths: tuple[int, ...] = (16, 32, 64, 128),
        depths: tuple[int, ...] = (1, 1, 1, 1),
        stem: int = 16,
    ):
        super().__init__()
        if name in self.RESNETS:
            body = getattr(torchvision.models, name)(weights=None)
            last = self.RESNETS[name]
            stage_channels = [last // 8, last // 4, last // 2, last]
        elif name == "slim":
            body = SlimResNet(widths, depths, stem)
            stage_channels = list(body.channels)
        else:
            raise ValueError(f"unknown backbone {name!r}; choose from {sorted(self.RESNETS) + ['slim']}")
        if weights_path:
            state = torch.load(Path(weights_path), map_location="cpu", weights_only=True)
            missing, unexpected = body.load_state_dict(state, strict=False)
            unexpected = [k for k in unexpected if not k.startswith("fc.")]
            if unexpected or [k for k in missing if not k.startswith("fc.")]:
                raise ValueError(f"{weights_path}: weights do not fit {name} (missing {missing[:3]}, "
                                 f"unexpected {unexpected[:3]})")
        if frozen_bn:
            freeze_batch_norm(body)
        if any(l not in (2, 3, 4, 5) for l in levels):
            raise ValueError(f"backbone levels must be in 2..5, got {levels}")
        # stages after the last level read are never run (forward stops there): freeze them, or
        # the optimiser would decay them and DDP would fail on parameters without gradients
        unused = tuple(f"layer{level - 1}." for level in range(max(levels) + 1, 6))
        for pname, param in body.named_parameters():
            keep = train_backbone and any(s in pname for s in ("layer2", "layer3", "layer4"))
            if name == "slim":   # a from-scratch slim net must train everything
                keep = train_backbone
            param.requires_grad_(keep and not pname.startswith(unused))
        self.body = body
        self.is_slim = name == "slim"
        self.levels = tuple(levels)
        self.channels = [stage_channels[l - 2] for l in self.levels]
        self.strides = [2 ** l for l in self.levels]

    def forward(self, images: Tensor, pad_mask: Tensor) -> list[tuple[Tensor, Tensor]]:
        body = self.body
        if self.is_slim:
            x = body.stem(images)
        else:
            x = body.maxpool(body.relu(body.bn1(body.conv1(images))))
        outs = []
        for level, stage in zip((2, 3, 4, 5), (body.layer1, body.layer2, body.layer3, body.layer4)):
            x = stage(x)
            if level in self.levels:
                mask = nn.functional.interpolate(pad_mask[None].float(), size=x.shape[-2:])[0].bool()
                outs.append((x, mask))
            if level == max(self.levels):
                break
        return outs
