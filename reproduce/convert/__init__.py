"""Import Hugging Face detection checkpoints (Deformable DETR, DAB-DETR) as model files of this
project: ``python -m reproduce.convert HF_DIR --out model.pth [--num-classes N]`` (cli.py).

resnet.py maps the ResNet backbones (transformers' and timm's layouts) to torchvision's keys;
deformable_detr.py / dab_detr.py map the rest of each detector; hf_files.py reads the folder.
"""
from .cli import SUPPORTED, convert, main
from .resnet import ConvertError, resnet_from_hf, resnet_from_timm

__all__ = ["SUPPORTED", "ConvertError", "convert", "main", "resnet_from_hf", "resnet_from_timm"]
