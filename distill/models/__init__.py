"""Segmentation models for distillation: backbones, decode heads and the Segmentor joining them.

Backbones: ResNet-18/34/50/101, MobileNetV2, MiT-B0 (SegFormer); heads: PSPNet, DeepLabV3+,
SegFormer. Importing this package registers them all.

Backbones and heads are looked up by name in :data:`BACKBONES` and :data:`HEADS`; every model
exposes the same feature interface (``forward_features`` / ``feature_info``) for distillation taps.
"""
from distill.models.heads import HEADS
from distill.models.mit import MixTransformer
from distill.models.mobilenetv2 import MobileNetV2
from distill.models.resnet import BACKBONES, ResNet
from distill.models.segmentor import Segmentor, build_segmentor, count_parameters, model_from_arch
from distill.models.weights import load_backbone_weights

__all__ = [
    "BACKBONES",
    "HEADS",
    "MixTransformer",
    "MobileNetV2",
    "ResNet",
    "Segmentor",
    "build_segmentor",
    "count_parameters",
    "load_backbone_weights",
    "model_from_arch",
]
