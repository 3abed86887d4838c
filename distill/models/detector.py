"""Detector = ResNet backbone + FPN (P3..P5) + dense head (+ YOLACT mask branch), built by name.

``model(x)`` is the export forward: a tuple in the order of ``model.output_names``:

* ``boxes`` (B, N, 4) float32 xyxy in input pixels, clamped to the image;
* ``scores`` (B, N, C) after sigmoid;
* instance models add ``mask_coeffs`` (B, N, k) (tanh) and ``proto`` (B, k, H/4, W/4); a mask is
  ``sigmoid(coeffs @ proto)``, assembled after NMS on the host or in the NMS graph, then cropped
  to its box and resized.

Priors come from the runtime feature sizes inside forward, so one ``torch.onnx.export`` (legacy
tracer, opset 17, dynamic batch/height/width) runs at any input size divisible by 32.
``Detector.arch`` holds the keyword arguments of :func:`build_detector` that rebuild the model;
:func:`detector_from_arch` rebuilds from it. The backbone's state-dict keys stay torchvision's
under ``backbone.``; the neck is ``neck.``, the head ``head.``, the proto net ``proto.``.

Why no two-stage (Mask R-CNN) option (detection.md §1.3-1.5): its RoI stage needs ONNX
``RoiAlign``, and only two of the three backends run that as a plain operator. ONNX Runtime runs
it natively; OpenVINO imports it as ``ROIAlign-9`` (default ``aligned_mode`` asymmetric, so the
half-pixel mode must survive import); TensorRT has no RoIAlign layer at all: its ONNX parser maps
``RoiAlign`` to the ``ROIAlign_TRT`` plugin, which exists only from TRT 8.5.1 (not on JetPack
4.6 / 5.0.2), and FPN multi-level pooling needs yet another plugin (``PyramidROIAlign_TRT`` or
MMDeploy's ``MMCVMultiLevelRoiAlign``), the kind of piece §1.5 lists as missing, built for the
wrong SM or failing to build. Torchvision's ``aligned=True`` also needs opset >= 16
(``coordinate_transformation_mode='half_pixel'``); older exports do not match PyTorch. Add the
data-dependent proposal shapes, an NMS inside the graph before the RoI stage, and a cascade that
cannot train on a CPU in minutes, and it is not worth offering. The YOLACT-style proto branch is
plain convs plus a matmul and deploys on ORT, OpenVINO and TensorRT alike (§1.4).
"""
from __future__ import annotations

import inspect
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.onnx.operators import shape_as_tensor

from distill.losses.det_task import proto_mask_loss
from distill.models.dense_heads import DETECTION_HEADS, STRIDES, ProtoNet
from distill.models.fpn import FPN
from distill.models.ops import make_divisible
from distill.models.resnet import BACKBONES, load_backbone_weights
from runtime.errors import BckdError
from runtime.registry import check_known

DETECT_OUTPUTS = ("boxes", "scores")
INSTANCE_OUTPUTS = ("boxes", "scores", "mask_coeffs", "proto")
_BACKBONE_REDUCTIONS = (4, 8, 16, 32)  # C2..C5 at output stride 32
DEFAULT_FPN_CHANNELS = 256  # mmdet's; scaled by the backbone width unless given


def clip_boxes(boxes: Tensor, image: Tensor) -> Tensor:
    """Clamp xyxy ``boxes`` (..., 4) to [0, W] x [0, H] of ``image`` (B, 3, H, W).

    The limits come from ``shape_as_tensor`` so the traced graph reads the runtime size.
    """
    hw = shape_as_tensor(image)[2:].to(device=boxes.device, dtype=boxes.dtype)
    return torch.minimum(boxes.clamp(min=0), hw.flip(0).repeat(2))


class Detector(nn.Module):
    """Backbone + FPN + dense head (+ proto net); see the module docstring for the outputs."""

    def __init__(self, *, backbone: nn.Module, neck: FPN, head: nn.Module,
                 proto: ProtoNet | None, arch: dict[str, Any]) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.head = head
        self.proto = proto
        self.arch = dict(arch)

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """The backbone's stage description (num_chs, reduction, module), C2..C5."""
        return self.backbone.feature_info

    @property
    def fpn_channels(self) -> int:
        return self.neck.out_channels

    @property
    def fpn_strides(self) -> tuple[int, ...]:
        return tuple(self.head.strides)

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    @property
    def reg_max(self) -> int:
        """GFL: bins - 1 of the distribution head; 0 for heads without one (RetinaNet)."""
        return int(getattr(self.head, "reg_max", 0))

    @property
    def masks(self) -> bool:
        return self.proto is not None

    @property
    def num_protos(self) -> int:
        return self.proto.num_protos if self.proto is not None else 0

    @property
    def task(self) -> str:
        return "instance" if self.masks else "detect"

    @property
    def output_names(self) -> tuple[str, ...]:
        return INSTANCE_OUTPUTS if self.masks else DETECT_OUTPUTS

    def forward_taps(self, x: Tensor) -> dict[str, Any]:
        """Everything distillation and the losses read, from one pass.

        ``stages`` (C2..C5), ``fpn`` (P3..P5), ``cls_feats`` / ``reg_feats`` (head tower outputs
        per level), ``cls_logits`` (B, N, C) pre-sigmoid, ``reg`` (GFL: (B, N, 4, reg_max + 1)
        logits; RetinaNet: (B, N, 4) deltas), ``priors`` (N, 4) xyxy, ``strides`` (N,),
        ``boxes`` (B, N, 4) clamped, ``scores`` (B, N, C), ``input_size`` (H, W); instance
        models add ``mask_coeffs`` (B, N, k) and ``proto`` (B, k, H/4, W/4).
        """
        stages = self.backbone.forward_features(x)
        fpn = self.neck(stages[1:])
        taps: dict[str, Any] = {"stages": stages, "fpn": fpn, **self.head(fpn)}
        priors, strides = self.head.priors(fpn)
        boxes = self.head.decode(taps["reg"], priors, strides)
        taps.update(priors=priors, strides=strides, boxes=clip_boxes(boxes, x),
                    scores=taps["cls_logits"].sigmoid(), input_size=tuple(x.shape[-2:]))
        if self.proto is not None:
            taps["proto"] = self.proto(fpn[0]).float()
        return taps

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        taps = self.forward_taps(x)
        return tuple(taps[name] for name in self.output_names)

    def forward_with_features(self, x: Tensor) -> tuple[tuple[Tensor, ...], list[Tensor]]:
        """The outputs and the backbone stages C2..C5 (what MFS and BCKD read)."""
        taps = self.forward_taps(x)
        return tuple(taps[name] for name in self.output_names), list(taps["stages"])

    def loss(self, taps: Mapping[str, Any], targets: Sequence[Mapping[str, Any]]
             ) -> dict[str, Tensor]:
        """Named task-loss terms (weights applied; the trainer sums them).

        ``targets``: one dict per image with ``boxes`` (M, 4) xyxy input pixels, ``labels`` (M,)
        and, for instance models, ``masks`` (M, H, W) at the input size. GFL gives qfl, dfl,
        giou; RetinaNet focal, l1; instance models add mask. Normalisations:
        :mod:`distill.losses.det_task`.
        """
        if len(targets) != taps["cls_logits"].shape[0]:
            raise ValueError(f"{len(targets)} targets for a batch of {taps['cls_logits'].shape[0]}")
        targets = [_target_on(t, taps["priors"].device) for t in targets]
        counts = self.head.num_level_priors(taps["fpn"])
        assigned = [self.head.assign(taps["priors"], counts, t["boxes"]) for t in targets]
        terms = self.head.loss(dict(taps), targets, assigned)
        if self.proto is not None:
            terms["mask"] = proto_mask_loss(taps["mask_coeffs"], taps["proto"], assigned, targets,
                                            taps["input_size"])
        return terms


def _target_on(target: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """A target with float boxes (M, 4) and long labels on ``device`` (masks left as given)."""
    out = dict(target)
    boxes = torch.as_tensor(target["boxes"], dtype=torch.float32, device=device)
    out["boxes"] = boxes.reshape(-1, 4)
    out["labels"] = torch.as_tensor(target["labels"], dtype=torch.long, device=device).reshape(-1)
    masks = target.get("masks")
    out["masks"] = None if masks is None else torch.as_tensor(masks, device=device)
    return out


def _check_backbone(name: str, net: nn.Module) -> None:
    reductions = tuple(info["reduction"] for info in net.feature_info)
    if reductions != _BACKBONE_REDUCTIONS:
        raise BckdError(f"backbone '{name}' gives stage strides {reductions} at output stride 32; "
                        f"the detector's FPN needs {_BACKBONE_REDUCTIONS}")


def _check_positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= minimum):
        raise BckdError(f"{name} must be an integer >= {minimum}, got {value!r}")


def build_detector(
    backbone: str = "resnet18", head: str = "gfl", *, num_classes: int, width: float = 1.0,
    fpn_channels: int | None = None, num_convs: int = 4, masks: bool = False,
    num_protos: int = 32, pretrained_backbone: str | None = None,
) -> Detector:
    """Build a detector by registry names; ``pretrained_backbone`` is a torchvision-format .pth.

    ``fpn_channels=None`` means mmdet's 256 scaled by ``width`` (multiple of 8, >= 16); the head
    towers and the proto net use the same width. ``masks`` adds the YOLACT branch with
    ``num_protos`` prototypes. ``arch`` records the resolved values and no weight path.
    """
    _check_positive_int("num_classes", num_classes)
    _check_positive_int("num_convs", num_convs, minimum=0)
    head_cls = DETECTION_HEADS.get(head)
    net = BACKBONES.get(backbone)(width=width, output_stride=32)
    _check_backbone(backbone, net)
    channels = (make_divisible(DEFAULT_FPN_CHANNELS * width, 8, minimum=16)
                if fpn_channels is None else fpn_channels)
    _check_positive_int("fpn_channels", channels)
    if masks:
        _check_positive_int("num_protos", num_protos)
    neck = FPN([info["num_chs"] for info in net.feature_info[1:]], channels)
    dense = head_cls(in_channels=channels, num_classes=num_classes, channels=channels,
                     num_convs=num_convs, num_protos=num_protos if masks else 0, strides=STRIDES)
    proto = ProtoNet(channels, channels, num_protos) if masks else None
    if pretrained_backbone is not None:
        load_backbone_weights(net, pretrained_backbone)
    arch = dict(backbone=backbone, head=head, num_classes=num_classes, width=width,
                fpn_channels=channels, num_convs=num_convs, masks=bool(masks),
                num_protos=num_protos)
    return Detector(backbone=net, neck=neck, head=dense, proto=proto, arch=arch)


def _arch_keys() -> list[str]:
    return [k for k in inspect.signature(build_detector).parameters if k != "pretrained_backbone"]


def detector_from_arch(arch: Mapping[str, Any]) -> Detector:
    """Rebuild a detector from its ``arch`` dict; unknown or missing keys are user errors."""
    check_known(arch, _arch_keys(), "detector arch key")
    if "num_classes" not in arch:
        raise BckdError("detector arch has no 'num_classes'; add it (the number of classes)")
    return build_detector(**arch)
