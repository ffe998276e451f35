"""Backbone ``weights``: ImageNet (torchvision cache), a local state dict, or none; the loaded
BatchNorm statistics end up in the FrozenBatchNorm2d buffers; offline errors are one line."""
from __future__ import annotations

from pathlib import Path
from urllib.error import URLError

import pytest
import torch
import torchvision
import yaml

from models import build_detector, detector_config
from models.backbone import Backbone, BackboneWeightsError, FrozenBatchNorm2d, imagenet_cache_file

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty TORCH_HOME, and no network: a download attempt raises URLError at once."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    calls = []

    def offline(url, *args, **kwargs):
        calls.append(url)
        raise URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return home, calls


@pytest.fixture(scope="module")
def resnet18_state():
    """A torchvision-format resnet18 state dict with non-trivial BatchNorm statistics."""
    g = torch.Generator().manual_seed(1)
    state = torchvision.models.resnet18(weights=None).state_dict()
    for key, value in state.items():
        if key.endswith(("running_mean", "bias")):
            state[key] = torch.randn(value.shape, generator=g)
        elif key.endswith(("running_var", "bn1.weight", "bn2.weight")) or ".downsample.1.weight" in key:
            state[key] = torch.rand(value.shape, generator=g) + 0.5
    return state


def assert_loaded(backbone: Backbone, state: dict) -> None:
    body = backbone.body
    frozen = dict(body.named_modules())
    n_bn = 0
    for name, module in frozen.items():
        if isinstance(module, FrozenBatchNorm2d):
            n_bn += 1
            for buf in ("weight", "bias", "running_mean", "running_var"):
                assert torch.equal(getattr(module, buf), state[f"{name}.{buf}"]), f"{name}.{buf}"
    assert n_bn == 20 and not any(isinstance(m, torch.nn.BatchNorm2d) for m in body.modules())
    for key in ("conv1.weight", "layer1.0.conv1.weight", "layer4.1.conv2.weight", "layer2.0.downsample.0.weight"):
        assert torch.equal(body.state_dict()[key], state[key]), key


def test_local_file(tmp_path, resnet18_state, torch_home):
    path = tmp_path / "r18.pth"
    torch.save(resnet18_state, path)
    backbone = Backbone("resnet18", weights=str(path))
    assert_loaded(backbone, resnet18_state)
    assert_loaded(Backbone("resnet18", weights_path=str(path)), resnet18_state)   # the older name
    assert not torch_home[1]


def test_imagenet_from_the_torch_hub_cache(resnet18_state, torch_home):
    home, calls = torch_home
    cached = home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"   # torchvision's file name
    assert imagenet_cache_file("resnet18") == cached
    assert torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url.endswith(cached.name)
    cached.parent.mkdir(parents=True)
    torch.save(resnet18_state, cached)
    cfg = detector_config("deformable_detr", "paper", backbone={"name": "resnet18"}, d_model=32, n_heads=2,
                          enc_layers=1, dec_layers=1, dim_feedforward=32, num_queries=5, num_feature_levels=3)
    assert cfg["backbone"]["weights"] == "imagenet"
    model = build_detector(cfg, num_classes=2)
    assert_loaded(model.backbone, resnet18_state)
    assert not calls   # read from the cache, no download attempted


def test_random_init_is_the_same_whatever_the_weights(tmp_path, resnet18_state, torch_home):
    """Loading draws no random numbers, and load_weights=False builds the same random model."""
    path = tmp_path / "r18.pth"
    torch.save(resnet18_state, path)
    torch.manual_seed(0)
    Backbone("resnet18", weights=str(path))
    after_loaded = torch.rand(3)
    torch.manual_seed(0)
    plain = Backbone("resnet18", weights="none")
    after_plain = torch.rand(3)
    torch.manual_seed(0)
    skipped = Backbone("resnet18", weights="imagenet", load_weights=False)   # no file, no download
    assert torch.equal(after_loaded, after_plain)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), skipped.state_dict().values()))
    assert not torch_home[1]


def test_offline_without_cached_file_is_one_line(torch_home):
    home, calls = torch_home
    with pytest.raises(BackboneWeightsError) as info:
        Backbone("resnet18", weights="imagenet")
    message = str(info.value)
    expected = home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert "\n" not in message
    assert f"not found at {expected}" in message
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert "TORCH_HOME" in message and "backbone.weights" in message
    assert calls == ["https://download.pytorch.org/models/resnet18-f37072fd.pth"]
    assert isinstance(info.value, ValueError)


def test_missing_local_file_is_one_line(tmp_path):
    with pytest.raises(BackboneWeightsError, match="not found") as info:
        Backbone("resnet18", weights=str(tmp_path / "absent.pth"))
    assert "\n" not in str(info.value)


def test_weights_must_fit(tmp_path):
    path = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    with pytest.raises(BackboneWeightsError, match="do not fit resnet18"):
        Backbone("resnet18", weights=str(path))


def test_resnet_requires_an_explicit_choice():
    with pytest.raises(BackboneWeightsError, match="choose backbone.weights: imagenet"):
        Backbone("resnet18")
    with pytest.raises(BackboneWeightsError, match="choose backbone.weights"):
        build_detector({**detector_config("dab_detr", "paper"), "backbone": {"name": "resnet18", "levels": [5]}}, 2)
    Backbone("resnet18", weights="none")
    Backbone("resnet18", weights="None")


def test_slim_backbones_take_no_weights(tmp_path):
    assert Backbone("slim").weights_source == "none"
    Backbone("slim", weights="none")
    with pytest.raises(BackboneWeightsError, match="slim: weights must be none"):
        Backbone("slim", weights="imagenet")
    with pytest.raises(BackboneWeightsError, match="slim: weights must be none"):
        Backbone("slim", weights=str(tmp_path / "x.pth"))


def test_profiles_choose_weights():
    """kitti / coco: ImageNet for teacher and student; mini and tiny: slim, no weights key."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for profile in ("kitti", "coco"):
        for role in ("student", "teacher"):
            spec = params["profiles"][profile][role]
            cfg = detector_config("dino", spec["size"], **spec["overrides"])
            assert cfg["backbone"]["weights"] == "imagenet", (profile, role)
    for size in ("mini", "tiny"):
        for detector in ("dab_detr", "deformable_detr", "dino"):
            assert "weights" not in detector_config(detector, size)["backbone"]


def test_group_norm_normalises_a_slim_net_from_scratch(tmp_path, resnet18_state, torch_home):
    """``norm: group_norm`` replaces every BatchNorm by a GroupNorm (no FrozenBatchNorm2d is
    left, whose initial state would be the identity); it is refused with pretrained weights,
    and an unknown norm is a one-line error."""
    torch.manual_seed(0)
    frozen = Backbone("slim", weights="none", widths=(16, 24, 40, 64), stem=16)
    torch.manual_seed(0)
    grouped = Backbone("slim", weights="none", norm="group_norm", widths=(16, 24, 40, 64), stem=16)
    modules = list(grouped.modules())
    assert not any(isinstance(m, (FrozenBatchNorm2d, torch.nn.BatchNorm2d)) for m in modules)
    norms = [m for m in modules if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_channels % m.num_groups == 0 for m in norms)
    assert {m.num_groups for m in norms} == {8}          # 8 divides every width here; 24 -> 8, 40 -> 8
    images = torch.randn(2, 3, 64, 96) * 5 + 3
    pad = torch.zeros(2, 64, 96, dtype=torch.bool)
    # FrozenBN at init passes the scale through; GroupNorm output is normalised per group
    f_out, g_out = frozen(images, pad)[-1][0], grouped(images, pad)[-1][0]
    assert not torch.allclose(f_out, g_out)
    path = tmp_path / "r18.pth"
    torch.save(resnet18_state, path)
    with pytest.raises(ValueError, match="group_norm discards"):
        Backbone("resnet18", weights=str(path), norm="group_norm")
    Backbone("resnet18", weights="none", norm="group_norm")     # from scratch: fine
    with pytest.raises(ValueError, match="backbone norm must be one of"):
        Backbone("slim", weights="none", norm="batch_norm")
