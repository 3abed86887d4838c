"""Segmentation models for distillation: ResNet backbones, PSP / DeepLabV3+ heads, Segmentor.

Backbones and heads are looked up by name in :data:`BACKBONES` and :data:`HEADS`; every model
exposes the same feature interface (``forward_features`` / ``feature_info``) for distillation taps.
"""
from distill.models.heads import HEADS
from distill.models.resnet import BACKBONES, ResNet, load_backbone_weights
from distill.models.segmentor import Segmentor, build_segmentor, count_parameters, model_from_arch

__all__ = [
    "BACKBONES",
    "HEADS",
    "ResNet",
    "Segmentor",
    "build_segmentor",
    "count_parameters",
    "load_backbone_weights",
    "model_from_arch",
]
