"""reproduce/convert: ResNet key mappings (transformers' and timm's layouts -> torchvision's)."""
from __future__ import annotations

import pytest
import torch
import torchvision

from models.backbone import Backbone
from reproduce.convert.resnet import (HF_DETR_BACKBONE_PREFIX, ConvertError, check_hf_resnet_config,
                                      resnet_from_hf, resnet_from_timm)

pytestmark = pytest.mark.usefixtures("one_thread")

# torchvision's ResNets as transformers ResNetConfig options (modeling_resnet.py)
HF_RESNETS = {
    "resnet18": dict(layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512]),
    "resnet50": dict(layer_type="bottleneck", depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048]),
}


def randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter and buffer random (variances positive), so no mapping error hides behind
    an initial value that happens to be the same on both sides (ones, zeros)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            if not tensor.is_floating_point():
                continue
            values = torch.rand(tensor.shape, generator=g)
            tensor.copy_(values + 0.5 if name.endswith("running_var") else (values - 0.5) * 0.4)


def hf_resnet(name: str):
    from transformers import ResNetBackbone, ResNetConfig
    config = ResNetConfig(embedding_size=64, out_features=["stage1", "stage2", "stage3", "stage4"], **HF_RESNETS[name])
    model = ResNetBackbone(config).eval()
    randomise(model)
    return model


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_hf_resnet_maps_onto_torchvision(name):
    hf = hf_resnet(name)
    hf_state = {f"{HF_DETR_BACKBONE_PREFIX}{k}": v for k, v in hf.state_dict().items()}
    assert any(k.endswith("num_batches_tracked") for k in hf_state)    # dropped on purpose
    mapped = resnet_from_hf(hf_state, HF_DETR_BACKBONE_PREFIX)
    ours = Backbone(name, levels=(2, 3, 4, 5), weights="none")
    missing, unexpected = ours.body.load_state_dict(mapped, strict=False)
    assert not unexpected and all(k.startswith("fc.") for k in missing), (missing, unexpected)

    images = torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(images).feature_maps
        got = [x for x, _ in ours(images, torch.zeros(1, 96, 128, dtype=torch.bool))]
    assert len(got) == len(expected) == 4
    for stage, (a, b) in enumerate(zip(got, expected), start=2):
        assert a.shape == b.shape, stage
        assert torch.allclose(a, b, atol=1e-4, rtol=0), (stage, (a - b).abs().max())


def test_hf_prefix_inside_detr_models():
    """The backbone of DeformableDetrForObjectDetection / DabDetrForObjectDetection (use_timm_backbone
    False) sits under model.backbone.conv_encoder.model. and maps onto a torchvision ResNet."""
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, ResNetConfig
    backbone = ResNetConfig(embedding_size=64, out_features=["stage2", "stage3", "stage4"], **HF_RESNETS["resnet18"])
    config = DeformableDetrConfig(use_timm_backbone=False, backbone=None, backbone_config=backbone,
                                  use_pretrained_backbone=False, d_model=32, encoder_layers=1, decoder_layers=1,
                                  encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=5,
                                  encoder_attention_heads=2, decoder_attention_heads=2)
    state = DeformableDetrForObjectDetection(config).state_dict()
    mapped = resnet_from_hf(state, HF_DETR_BACKBONE_PREFIX)
    reference = torchvision.models.resnet18(weights=None).state_dict()
    expected = {k for k in reference if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    assert set(mapped) == expected
    assert all(mapped[k].shape == reference[k].shape for k in mapped)
    assert check_hf_resnet_config(backbone.to_dict()) == "resnet18"


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_timm_layout_maps_back_exactly(name):
    """timm keeps torchvision's module names (pytorch-image-models timm/models/resnet.py), so a
    timm-layout state dict is torchvision's under the HF prefix, plus the keys we drop."""
    reference = getattr(torchvision.models, name)(weights=None)
    randomise(reference)
    tv_state = reference.state_dict()
    timm_state = {f"{HF_DETR_BACKBONE_PREFIX}{k}": v for k, v in tv_state.items() if not k.startswith("fc.")}
    timm_state["model.input_projection.0.0.weight"] = torch.zeros(1)      # not the backbone's: ignored
    mapped = resnet_from_timm(timm_state, HF_DETR_BACKBONE_PREFIX)
    expected = {k: v for k, v in tv_state.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    assert set(mapped) == set(expected)
    assert all(torch.equal(mapped[k], expected[k]) for k in expected)


def test_source_only_keys_are_handled_deliberately():
    prefix = HF_DETR_BACKBONE_PREFIX
    conv = torch.zeros(8, 3, 7, 7)
    # num_batches_tracked and a classifier are dropped ...
    assert set(resnet_from_timm({prefix + "conv1.weight": conv, prefix + "bn1.num_batches_tracked": torch.tensor(3),
                                 prefix + "fc.weight": torch.zeros(2, 2)}, prefix)) == {"conv1.weight"}
    # ... anything else unknown is an error, never silently lost
    with pytest.raises(ConvertError, match="deep-stem"):
        resnet_from_timm({prefix + "conv1.0.weight": conv}, prefix)
    with pytest.raises(ConvertError, match="not part of a plain timm ResNet"):
        resnet_from_timm({prefix + "layer1.0.se.fc1.weight": conv}, prefix)
    with pytest.raises(ConvertError, match="not part of a transformers ResNet"):
        resnet_from_hf({prefix + "encoder.stages.0.layers.0.attention.weight": conv}, prefix)
    with pytest.raises(ConvertError, match="have no bias"):
        resnet_from_hf({prefix + "embedder.embedder.convolution.bias": conv}, prefix)
    with pytest.raises(ConvertError, match="no backbone weights"):
        resnet_from_hf({"model.query_position_embeddings.weight": conv}, prefix)


def test_hf_resnet_options_torchvision_lacks_are_refused():
    with pytest.raises(ConvertError, match="downsample_in_bottleneck"):
        check_hf_resnet_config({**HF_RESNETS["resnet50"], "downsample_in_bottleneck": True})
    with pytest.raises(ConvertError, match="no torchvision equivalent"):
        check_hf_resnet_config({"layer_type": "basic", "depths": [1, 1, 1, 1]})
