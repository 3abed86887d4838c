"""Tests for distill.models: torchvision key compatibility, strides, widths, heads, export parity.

Backbone and head tests are parametrised over the registries, so a new entry is tested by default.
"""
from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distill.models import (
    BACKBONES, HEADS, build_segmentor, count_parameters, load_backbone_weights, model_from_arch,
)
from distill.models.ops import adaptive_avg_pool2d_exact
from runtime.errors import BckdError

torch.set_num_threads(2)

# torchvision: (block kind, layers, total params incl. fc, fc input features)
TORCHVISION_RESNETS = {
    "resnet18": ("basic", (2, 2, 2, 2), 11_689_512, 512),
    "resnet34": ("basic", (3, 4, 6, 3), 21_797_672, 512),
    "resnet50": ("bottleneck", (3, 4, 6, 3), 25_557_032, 2048),
    "resnet101": ("bottleneck", (3, 4, 23, 3), 44_549_160, 2048),
}
BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
SMALL = 0.25  # backbone width that keeps every test fast
RESNETS = [name for name in BACKBONES.names() if name.startswith("resnet")]
NATIVE_STRIDE = {"mit_b0": 32}  # backbones that build at one output stride only


def torchvision_resnet_keys(kind: str, layers: tuple[int, ...]) -> list[str]:
    """torchvision ResNet state-dict keys minus fc, in module order, from torchvision's rules."""
    convs = 2 if kind == "basic" else 3
    keys = ["conv1.weight", *(f"bn1.{s}" for s in BN)]
    for stage, blocks in enumerate(layers, start=1):
        for i in range(blocks):
            prefix = f"layer{stage}.{i}."
            for c in range(1, convs + 1):
                keys += [f"{prefix}conv{c}.weight", *(f"{prefix}bn{c}.{s}" for s in BN)]
            # torchvision adds a projection where stride or channels change: every stage's first
            # block except layer1 of BasicBlock nets (64 -> 64, stride 1).
            if i == 0 and (stage > 1 or kind == "bottleneck"):
                keys += [f"{prefix}downsample.0.weight", *(f"{prefix}downsample.1.{s}" for s in BN)]
    return keys


def segmentor(backbone: str, head: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_segmentor(backbone, head, num_classes=kw.pop("num_classes", 5), **kw)


# --------------------------------------------------------------------------------------------
# Backbones


@pytest.mark.parametrize("name", sorted(TORCHVISION_RESNETS))
def test_resnet_matches_torchvision_keys_and_param_count(name):
    kind, layers, total, fc_in = TORCHVISION_RESNETS[name]
    model = BACKBONES.get(name)()
    assert list(model.state_dict()) == torchvision_resnet_keys(kind, layers)
    assert count_parameters(model) == total - (fc_in * 1000 + 1000)
    assert model.conv1.weight.shape == (64, 3, 7, 7)


@pytest.mark.parametrize("output_stride,reductions", [(8, [4, 8, 8, 8]), (16, [4, 8, 16, 16]),
                                                      (32, [4, 8, 16, 32])])
@pytest.mark.parametrize("name", BACKBONES.names())
def test_output_stride_feature_shapes(name, output_stride, reductions):
    if NATIVE_STRIDE.get(name, output_stride) != output_stride:
        with pytest.raises(BckdError, match=f"output_stride {output_stride}"):
            BACKBONES.get(name)(width=SMALL, output_stride=output_stride)
        return
    model = BACKBONES.get(name)(width=SMALL, output_stride=output_stride).eval()
    assert [i["reduction"] for i in model.feature_info] == reductions
    for info in model.feature_info:
        model.get_submodule(info["module"])  # a real module path, for hooks
    if name in RESNETS:
        assert [i["module"] for i in model.feature_info] == ["layer1", "layer2", "layer3", "layer4"]
    with torch.no_grad():
        feats = model.forward_features(torch.randn(2, 3, 32, 64))
    expected = [(2, c, 32 // r, 64 // r) for c, r in zip(model.out_channels, reductions)]
    assert [tuple(f.shape) for f in feats] == expected


def test_dilation_follows_torchvision_for_bottleneck_and_dilates_basic_blocks():
    r50 = BACKBONES.get("resnet50")(output_stride=8)
    # torchvision: a dilated stage's first block keeps the previous stage's dilation.
    assert [r50.layer3[0].conv2.dilation[0], r50.layer3[1].conv2.dilation[0]] == [1, 2]
    assert [r50.layer4[0].conv2.dilation[0], r50.layer4[1].conv2.dilation[0]] == [2, 4]
    assert r50.layer3[0].conv2.stride == (1, 1) and r50.layer3[0].downsample[0].stride == (1, 1)
    r18 = BACKBONES.get("resnet18")(output_stride=16)
    block = r18.layer4[1]
    assert block.conv1.dilation == block.conv2.dilation == block.conv2.padding == (2, 2)
    assert r18.layer4[0].conv1.stride == (1, 1) and r18.layer4[0].conv1.dilation == (1, 1)


@pytest.mark.parametrize("width", [0.25, 0.5])
@pytest.mark.parametrize("name", RESNETS)  # MobileNetV2 / MiT widths: test_models_extra.py
def test_width_multiplier_scales_stem_and_stages(name, width):
    full = BACKBONES.get(name)().out_channels
    slim = BACKBONES.get(name)(width=width)
    assert slim.out_channels == [int(c * width) for c in full]
    assert slim.conv1.out_channels == int(64 * width)


def test_width_rounds_to_multiple_of_eight_with_minimum():
    model = BACKBONES.get("resnet18")(width=0.1)  # 6.4 -> 8, 12.8 -> 16, 25.6 -> 24, 51.2 -> 48
    assert model.conv1.out_channels == 8
    assert model.out_channels == [8, 16, 24, 48]


def test_bad_output_stride_is_a_user_error():
    with pytest.raises(BckdError, match="output_stride 4"):
        BACKBONES.get("resnet18")(output_stride=4)


def test_zero_init_residual_is_opt_in():
    assert BACKBONES.get("resnet18")().layer1[0].bn2.weight.eq(1).all()
    assert BACKBONES.get("resnet18")(zero_init_residual=True).layer1[0].bn2.weight.eq(0).all()
    assert BACKBONES.get("resnet50")(zero_init_residual=True).layer1[0].bn3.weight.eq(0).all()


# --------------------------------------------------------------------------------------------
# Loading torchvision-format weights


def _source_state(width: float = SMALL) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    src = BACKBONES.get("resnet18")(width=width)
    for p in src.state_dict().values():  # non-default values so the round trip proves a copy
        if p.is_floating_point():
            p.uniform_()
    state = dict(src.state_dict())
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, 128), torch.randn(1000)
    return state


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model"])
def test_load_backbone_weights_round_trip_from_file(tmp_path, wrapper):
    state = _source_state()
    path = tmp_path / "weights.pth"
    torch.save(state if wrapper is None else {wrapper: state}, path)
    model = BACKBONES.get("resnet18")(width=SMALL)
    load_backbone_weights(model, path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_load_tolerates_missing_bn_counters_only():
    state = {k: v for k, v in _source_state().items() if not k.endswith("num_batches_tracked")}
    model = BACKBONES.get("resnet18")(width=SMALL)
    load_backbone_weights(model, state)
    assert torch.equal(model.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])


def test_load_error_missing_key():
    state = _source_state()
    del state["layer2.0.conv1.weight"]
    with pytest.raises(BckdError, match=r"1 missing \(layer2\.0\.conv1\.weight\)"):
        load_backbone_weights(BACKBONES.get("resnet18")(width=SMALL), state)


def test_load_error_unexpected_key():
    state = _source_state()
    state["layer5.0.conv1.weight"] = torch.zeros(1)
    with pytest.raises(BckdError, match=r"1 unexpected \(layer5\.0\.conv1\.weight\)"):
        load_backbone_weights(BACKBONES.get("resnet18")(width=SMALL), state)


def test_load_error_shape_mismatch_names_width():
    model = BACKBONES.get("resnet18")(width=0.5)
    with pytest.raises(BckdError, match=r"shape-mismatched \(conv1\.weight.*width=0\.5") as err:
        load_backbone_weights(model, _source_state(width=SMALL))
    assert ", ..." in str(err.value)  # many keys mismatch: the first few are listed, then a count


def test_load_error_bad_path(tmp_path):
    with pytest.raises(BckdError, match="does not exist"):
        load_backbone_weights(BACKBONES.get("resnet18")(width=SMALL), tmp_path / "nope.pth")


# --------------------------------------------------------------------------------------------
# Export-safe pooling


@pytest.mark.parametrize("bins", [1, 2, 3, 6])
def test_exact_adaptive_pool_matches_torch(bins):
    torch.manual_seed(0)
    sizes = [1, 2, 3, 5, 6, 7, 11, 13, 17, 25, 31, 33, 64, 97]
    for h, w in itertools.product(sizes, sizes[::3]):
        x = torch.randn(2, 3, h, w)
        got = adaptive_avg_pool2d_exact(x, bins)
        assert (got - F.adaptive_avg_pool2d(x, bins)).abs().max() <= 1e-6, (h, w)


# --------------------------------------------------------------------------------------------
# Segmentors


@pytest.mark.parametrize("head", HEADS.names())
@pytest.mark.parametrize("backbone", BACKBONES.names())
def test_every_combination_gives_input_sized_logits(backbone, head):
    model = segmentor(backbone, head, width=SMALL, num_classes=7,
                      output_stride=NATIVE_STRIDE.get(backbone, 8)).eval()
    with torch.no_grad():
        logits, feats = model.forward_with_features(torch.randn(2, 3, 97, 131))
    assert logits.shape == (2, 7, 97, 131)
    assert [f.shape[1] for f in feats] == [i["num_chs"] for i in model.feature_info]


@pytest.mark.parametrize("head", HEADS.names())
def test_training_step_reaches_backbone_and_head(head):
    model = segmentor("resnet18", head, width=SMALL, output_stride=16).train()
    x = torch.randn(2, 3, 67, 45)
    logits, feats = model.forward_with_features(x)
    assert len(feats) == 4
    (logits.square().mean() + feats[0].mean()).backward()
    assert model.backbone.conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.head.parameters())


def test_forward_equals_forward_with_features():
    model = segmentor("resnet18", "deeplabv3plus", width=SMALL).eval()
    x = torch.randn(1, 3, 50, 70)
    with torch.no_grad():
        logits, feats = model.forward_with_features(x)
        assert torch.equal(model(x), logits)
        assert all(torch.equal(a, b) for a, b in zip(model.backbone.forward_features(x), feats))


@pytest.mark.parametrize("head,width,channels", [("pspnet", 1.0, 512), ("pspnet", 0.25, 128),
                                                 ("deeplabv3plus", 0.5, 128),
                                                 ("deeplabv3plus", 0.05, 16)])
def test_head_channels_default_scales_with_width(head, width, channels):
    assert segmentor("resnet18", head, width=width).arch["head_channels"] == channels


def test_aspp_rates_follow_output_stride():
    rates = {os: [b[0].dilation[0] for b in segmentor("resnet18", "deeplabv3plus", width=SMALL,
                                                      output_stride=os).head.aspp.branches[1:]]
             for os in (8, 16)}
    assert rates == {8: [12, 24, 36], 16: [6, 12, 18]}


@pytest.mark.parametrize("head", HEADS.names())
def test_arch_rebuilds_the_same_model(head):
    model = segmentor("resnet34", head, width=SMALL, output_stride=16, num_classes=3).eval()
    rebuilt = model_from_arch(model.arch).eval()
    rebuilt.load_state_dict(model.state_dict())
    assert rebuilt.arch == model.arch
    x = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))


def test_arch_errors_name_the_fix():
    arch = dict(backbone="resnet18", head="pspnet", num_classes=3)
    with pytest.raises(BckdError, match="did you mean 'width'"):
        model_from_arch({**arch, "widht": 0.5})
    with pytest.raises(BckdError, match="num_classes"):
        model_from_arch({"backbone": "resnet18"})
    with pytest.raises(BckdError, match="did you mean 'resnet18'"):
        model_from_arch({**arch, "backbone": "resnet19"})
    with pytest.raises(BckdError, match="head"):
        model_from_arch({**arch, "head": "pspnett"})


def test_pretrained_backbone_is_loaded(tmp_path):
    path = tmp_path / "r18.pth"
    state = _source_state()
    torch.save(state, path)
    model = build_segmentor("resnet18", "pspnet", num_classes=2, width=SMALL,
                            pretrained_backbone=str(path))
    assert torch.equal(model.backbone.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])
    assert "pretrained_backbone" not in model.arch


# --------------------------------------------------------------------------------------------
# ONNX export with dynamic batch / height / width

DYNAMIC_AXES = {"input": {0: "batch", 2: "height", 3: "width"},
                "logits": {0: "batch", 2: "height", 3: "width"}}
RUN_SHAPES = [(1, 3, 96, 80), (2, 3, 72, 120)]


def _onnx_matches_torch(model: torch.nn.Module, onnx_bytes: bytes) -> None:
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    for shape in RUN_SHAPES:
        x = torch.randn(*shape)
        with torch.no_grad():
            expected = model(x).numpy()
        (got,) = session.run(None, {"input": x.numpy()})
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= 1e-4, shape


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("head", HEADS.names())
def test_legacy_onnx_export_is_dynamic(head):
    model = segmentor("resnet18", head, width=SMALL).eval()
    buf = io.BytesIO()
    torch.onnx.export(model, torch.randn(1, 3, 64, 64), buf, dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"], dynamic_axes=DYNAMIC_AXES)
    _onnx_matches_torch(model, buf.getvalue())


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("head", HEADS.names())
def test_dynamo_onnx_export_is_dynamic(head):
    pytest.importorskip("onnxscript")
    model = segmentor("resnet18", head, width=SMALL).eval()
    dims = {0: torch.export.Dim("batch", max=64), 2: torch.export.Dim("height", min=32, max=4096),
            3: torch.export.Dim("width", min=32, max=4096)}
    program = torch.onnx.export(model, (torch.randn(1, 3, 64, 64),), dynamo=True,
                                input_names=["input"], output_names=["logits"],
                                dynamic_shapes={"x": dims})
    _onnx_matches_torch(model, program.model_proto.SerializeToString())
