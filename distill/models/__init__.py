"""Segmentation and detection models for distillation: backbones, heads and the models joining them.

Backbones: ResNet-18/34/50/101, MobileNetV2, MiT-B0 (SegFormer); heads: PSPNet, DeepLabV3+,
SegFormer; detection heads (on an FPN): GFL, RetinaNet, optionally with a YOLACT mask branch.
Importing this package registers them all.

Backbones and heads are looked up by name in :data:`BACKBONES`, :data:`HEADS` and
:data:`DETECTION_HEADS`; every model exposes the same feature interface (``forward_features`` /
``forward_taps`` / ``feature_info``) for distillation taps.
"""
from distill.models.dense_heads import DETECTION_HEADS
from distill.models.detector import Detector, build_detector, detector_from_arch
from distill.models.fpn import FPN
from distill.models.heads import HEADS
from distill.models.mit import MixTransformer
from distill.models.mobilenetv2 import MobileNetV2
from distill.models.resnet import BACKBONES, ResNet
from distill.models.segmentor import Segmentor, build_segmentor, count_parameters, model_from_arch
from distill.models.weights import load_backbone_weights

__all__ = [
    "BACKBONES",
    "DETECTION_HEADS",
    "Detector",
    "FPN",
    "HEADS",
    "MixTransformer",
    "MobileNetV2",
    "ResNet",
    "Segmentor",
    "build_detector",
    "build_segmentor",
    "count_parameters",
    "detector_from_arch",
    "load_backbone_weights",
    "model_from_arch",
]
