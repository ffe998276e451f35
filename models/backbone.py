"""CNN backbones with frozen batch norm and multi-level outputs.

torchvision ResNet-18/34/50/101 at paper scale; a slim BasicBlock ResNet (configurable widths
and depths) for the CPU ``mini`` size.

``weights`` (backbone option) of a ResNet must be chosen explicitly; the paper-scale sizes in
models/build.py choose ``imagenet``:

- ``imagenet``: torchvision's ``IMAGENET1K_V1`` weights (e.g. ``ResNet50_Weights.IMAGENET1K_V1``,
  ``resnet50-0676ba61.pth``). Every detector of the paper starts from them: DETR's
  models/backbone.py builds ``getattr(torchvision.models, name)(pretrained=is_main_process(),
  norm_layer=FrozenBatchNorm2d)``; Deformable DETR, DAB-DETR and DINO keep that code. Their
  ``pretrained=True`` is today's IMAGENET1K_V1 (the 2020 re-upload of the same weights in the
  new serialisation, pytorch/vision#2068, gave the file its current name). Grade A for the
  practice of those repositories; the CLoCKDistill paper itself does not say. Loaded through
  ``torch.hub.load_state_dict_from_url``: the cached file ``torch.hub.get_dir()/checkpoints/<file>``
  (``$TORCH_HOME/hub/checkpoints``) is used without any network access; only an absent file is
  downloaded (its hash prefix, in the name, checked).
  Offline and not cached, building fails at once with one line naming the file and its URL.
- a local file: a torchvision-format ResNet state dict (``torch.load(weights_only=True)``).
- ``none``: random initialisation (training from scratch). The only choice of ``slim`` backbones,
  and their default.

``weights_path`` is the older name of a local file and still works.
"""
from __future__ import annotations

import os
import pickle
import socket
from contextlib import contextmanager
from pathlib import Path
from urllib.error import URLError

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock

DOWNLOAD_TIMEOUT_S = 60.0   # per socket operation: a firewalled network fails instead of hanging


class BackboneWeightsError(ValueError):
    """A backbone's ``weights`` choice is missing, invalid, or its file is unavailable (one line)."""


def imagenet_weights(name: str):
    """torchvision's ImageNet weights entry of a ResNet (IMAGENET1K_V1, the weights DETR used)."""
    return torchvision.models.get_model_weights(name).IMAGENET1K_V1


def imagenet_cache_file(name: str) -> Path:
    """Where torchvision keeps (and looks for) the ImageNet weights file of ``name``."""
    url = imagenet_weights(name).url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def weights_choice(name: str, weights=None, weights_path=None) -> str:
    """``weights`` normalised to ``"imagenet"``, ``"none"`` or a file path; raises
    BackboneWeightsError when a ResNet has none chosen or a slim backbone has one."""
    weights = None if weights in (None, "") else str(weights)
    if weights_path not in (None, ""):
        if weights is not None and weights != str(weights_path):
            raise BackboneWeightsError(f"backbone {name}: both weights={weights!r} and weights_path="
                                       f"{str(weights_path)!r} given; set backbone.weights only")
        weights = str(weights_path)
    if weights is not None and weights.lower() in ("imagenet", "none"):
        weights = weights.lower()
    if name == "slim":
        if weights not in (None, "none"):
            raise BackboneWeightsError(f"backbone slim: weights must be none (it trains from scratch), "
                                       f"got {weights!r}")
        return "none"
    if weights is None:
        raise BackboneWeightsError(f"backbone {name}: choose backbone.weights: imagenet (torchvision "
                                   "IMAGENET1K_V1, as DETR and its successors), a local state-dict file, "
                                   "or none (random initialisation)")
    return weights


@contextmanager
def _socket_timeout(seconds: float):
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds if old is None else old)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def load_backbone_weights(name: str, weights: str) -> dict | None:
    """The state dict of a (normalised, see ``weights_choice``) choice; None for ``none``."""
    if weights == "none":
        return None
    if weights == "imagenet":
        entry, cached = imagenet_weights(name), imagenet_cache_file(name)
        was_cached = cached.is_file()
        try:
            with _socket_timeout(DOWNLOAD_TIMEOUT_S):
                # torchvision's loader: reads the cached file if present, downloads it otherwise
                return torch.hub.load_state_dict_from_url(entry.url, model_dir=str(cached.parent), progress=False,
                                                          check_hash=True, map_location="cpu", weights_only=True)
        # URLError and socket timeouts are OSErrors; a wrong hash is a RuntimeError
        except (URLError, OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
            if was_cached:
                raise BackboneWeightsError(f"{name} ImageNet weights at {cached} cannot be read "
                                           f"({_one_line(err)}): delete the file to download it again, or "
                                           f"download {entry.url} there") from err
            raise BackboneWeightsError(
                f"{name} ImageNet weights not found at {cached} and cannot be downloaded ({_one_line(err)}): "
                f"download {entry.url} there (or set TORCH_HOME), or set backbone.weights to a local file "
                "or none") from err
    path = Path(weights).expanduser()
    if not path.is_file():
        raise BackboneWeightsError(f"backbone {name}: weights file {path} not found (backbone.weights is "
                                   "imagenet, none, or a torchvision-format state-dict file)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:   # unpickling errors have no common base class
        raise BackboneWeightsError(f"{path}: cannot be read as a state dict ({_one_line(err)})") from err
    if not isinstance(state, dict):
        raise BackboneWeightsError(f"{path}: holds a {type(state).__name__}, not a torchvision-format state dict")
    return state


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


def group_norm_for_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d in ``module`` by a GroupNorm over the same channels.

    A slim net trained from scratch has no ImageNet statistics to freeze: FrozenBatchNorm2d at
    its initial state (mean 0, var 1, weight 1, bias 0) is the identity, i.e. no normalisation at
    all. GroupNorm normalises without batch statistics, so train and eval (the frozen teacher)
    compute the same function and the batch of 8 does not matter (grade D: our CPU choice).
    """
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            channels = child.num_features
            groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
            setattr(module, name, nn.GroupNorm(groups, channels, eps=child.eps))
        else:
            group_norm_for_batch_norm(child)
    return module


NORMS = ("frozen_bn", "group_norm")


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
    stage i has stride 2**(i+2). Built with BatchNorm2d, which the Backbone then freezes or
    replaces by GroupNorm (``norm``).
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
        weights: str | None = None,
        train_backbone: bool = True,
        norm: str = "frozen_bn",
        widths: tuple[int, ...] = (16, 32, 64, 128),
        depths: tuple[int, ...] = (1, 1, 1, 1),
        stem: int = 16,
        weights_path: str | None = None,
        load_weights: bool = True,
    ):
        """``weights``: ``imagenet`` | a state-dict file | ``none`` (module docstring); required
        for ResNets. ``load_weights=False`` checks the choice but skips loading (for callers that
        load a whole trained model over it); the initialisation is the same either way.
        ``norm``: ``frozen_bn`` (DETR's FrozenBatchNorm2d, for pretrained weights) or
        ``group_norm`` (slim nets from scratch; :func:`group_norm_for_batch_norm`)."""
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"backbone norm must be one of {NORMS}, got {norm!r}")
        if name not in self.RESNETS and name != "slim":
            raise ValueError(f"unknown backbone {name!r}; choose from {sorted(self.RESNETS) + ['slim']}")
        weights = weights_choice(name, weights, weights_path)
        # the file is loaded before any module is built, so a missing file fails at once; the
        # random initialisation below draws the same numbers whatever ``weights`` is
        state = load_backbone_weights(name, weights) if load_weights else None
        if name in self.RESNETS:
            body = getattr(torchvision.models, name)(weights=None)
            last = self.RESNETS[name]
            stage_channels = [last // 8, last // 4, last // 2, last]
        else:
            body = SlimResNet(widths, depths, stem)
            stage_channels = list(body.channels)
        if state is not None:
            missing, unexpected = body.load_state_dict(state, strict=False)
            unexpected = [k for k in unexpected if not k.startswith("fc.")]
            if unexpected or [k for k in missing if not k.startswith("fc.")]:
                raise BackboneWeightsError(f"{weights}: weights do not fit {name} (missing {missing[:3]}, "
                                           f"unexpected {unexpected[:3]})")
            # BatchNorm statistics now hold the file's; freeze_batch_norm copies them into the
            # FrozenBatchNorm2d buffers
        self.weights_source = weights   # imagenet | none | the file loaded
        if norm == "group_norm":
            if state is not None:
                raise ValueError("backbone norm group_norm discards the weights' BatchNorm statistics; "
                                 "use norm: frozen_bn with pretrained weights")
            group_norm_for_batch_norm(body)
        else:
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
