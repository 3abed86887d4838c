"""Tests for the MobileNetV2 and MiT-B0 backbones and the SegFormer head.

Upstream key layouts are rebuilt here from upstream's rules (torchvision ``mobilenet_v2``, NVlabs
SegFormer ``mix_transformer.py``), not read off the modules under test, and parameter counts are
pinned to the published figures. Parametrised over the new backbones; the registry-wide checks
live in test_models.py.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from distill.models import (
    BACKBONES, build_segmentor, count_parameters, load_backbone_weights, model_from_arch,
)
from distill.models.mobilenetv2 import make_divisible_tv
from runtime.errors import BckdError

torch.set_num_threads(2)

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
WB = ("weight", "bias")  # every non-BN layer here has both
# The output strides each backbone builds at; MiT is a native stride-32 encoder.
OUTPUT_STRIDES = {"mobilenetv2": (8, 16, 32), "mit_b0": (32,)}
NEW_BACKBONES = sorted(OUTPUT_STRIDES)
# Published totals: torchvision mobilenet_v2 (with classifier), its classifier and features.18.
TV_MOBILENETV2, TV_CLASSIFIER, TV_FEATURES_18 = 3_504_872, 1_281_000, 320 * 1280 + 2 * 1280
# NVlabs SegFormer-B0 on ADE20K (150 classes, decoder width 256), as in HF's segformer-b0 cards.
SEGFORMER_B0_ADE = 3_752_694


def _bn(prefix: str) -> list[str]:
    return [f"{prefix}.{s}" for s in BN]


def torchvision_mobilenetv2_keys() -> list[str]:
    """torchvision mobilenet_v2 keys of features.0-17, in module order, from torchvision's rules."""
    keys = ["features.0.0.weight", *_bn("features.0.1")]
    expand_ratios = [1] + [6] * 16  # t of features.1 .. features.17
    for index, t in enumerate(expand_ratios, start=1):
        p = f"features.{index}.conv"
        # Conv2dNormActivation blocks are (conv, bn, act); t == 1 has no 1x1 expansion.
        acts = [f"{p}.0", f"{p}.1"] if t != 1 else [f"{p}.0"]
        for a in acts:
            keys += [f"{a}.0.weight", *_bn(f"{a}.1")]
        keys += [f"{p}.{len(acts)}.weight", *_bn(f"{p}.{len(acts) + 1}")]
    return keys


def nvlabs_mit_b0_keys() -> list[str]:
    """NVlabs mit_b0 keys minus ``head.*``, from mix_transformer.py's module names."""
    keys = []
    for k, sr in zip(range(1, 5), (8, 4, 2, 1)):
        keys += [f"patch_embed{k}.proj.weight", f"patch_embed{k}.proj.bias"]
        keys += [f"patch_embed{k}.norm.{s}" for s in WB]
        for j in range(2):
            b = f"block{k}.{j}"
            attn = ["q", "kv", "proj"] + (["sr", "norm"] if sr > 1 else [])
            keys += [f"{b}.norm1.{s}" for s in WB]
            keys += [f"{b}.attn.{m}.{s}" for m in attn for s in WB]
            keys += [f"{b}.norm2.{s}" for s in WB]
            keys += [f"{b}.mlp.{m}.{s}" for m in ("fc1", "dwconv.dwconv", "fc2") for s in WB]
        keys += [f"norm{k}.{s}" for s in WB]
    return keys


def backbone(name: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    kw.setdefault("output_stride", OUTPUT_STRIDES[name][0])
    return BACKBONES.get(name)(**kw)


def segmentor(name: str, head: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    kw.setdefault("output_stride", OUTPUT_STRIDES[name][0])
    return build_segmentor(name, head, num_classes=kw.pop("num_classes", 7), **kw)


# --------------------------------------------------------------------------------------------
# Key layout and parameter counts


def test_mobilenetv2_matches_torchvision_keys_and_param_count():
    model = backbone("mobilenetv2")
    assert list(model.state_dict()) == torchvision_mobilenetv2_keys()
    assert count_parameters(model) == TV_MOBILENETV2 - TV_CLASSIFIER - TV_FEATURES_18 == 1_811_712
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["features.0.0.weight"] == (32, 3, 3, 3)
    assert shapes["features.1.conv.0.0.weight"] == (32, 1, 3, 3)  # t=1: depthwise first
    assert shapes["features.2.conv.1.0.weight"] == (96, 1, 3, 3)
    assert shapes["features.17.conv.2.weight"] == (320, 960, 1, 1)


def test_mit_b0_matches_nvlabs_keys_and_param_count():
    model = backbone("mit_b0")
    assert sorted(model.state_dict()) == sorted(nvlabs_mit_b0_keys())
    assert count_parameters(model) == 3_319_392
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["patch_embed1.proj.weight"] == (32, 3, 7, 7)
    assert shapes["patch_embed2.proj.weight"] == (64, 32, 3, 3)
    assert shapes["block1.0.attn.sr.weight"] == (32, 32, 8, 8)
    assert shapes["block3.1.attn.kv.weight"] == (320, 160)
    assert shapes["block4.1.mlp.dwconv.dwconv.weight"] == (1024, 1, 3, 3)
    # NVlabs: eps 1e-6 in blocks and stage norms, torch's default in patch embeds and attn.norm.
    assert model.norm4.eps == model.block2[0].norm1.eps == 1e-6
    assert model.patch_embed1.norm.eps == model.block1[0].attn.norm.eps == 1e-5


def test_segformer_b0_matches_published_size():
    model = segmentor("mit_b0", "segformer", num_classes=150)
    assert model.arch["head_channels"] == 256
    assert count_parameters(model) == SEGFORMER_B0_ADE


def test_mit_b0_stochastic_depth_grows_linearly_to_its_rate():
    model = backbone("mit_b0")
    rates = [b.drop_path.p for k in range(1, 5) for b in getattr(model, f"block{k}")]
    assert rates == pytest.approx(np.linspace(0, 0.1, 8).tolist())
    assert all(b.drop_path.p == 0 for b in backbone("mit_b0", drop_path_rate=0.0).block4)


# --------------------------------------------------------------------------------------------
# Strides, stage taps and widths


@pytest.mark.parametrize("name,output_stride",
                         [(n, s) for n in NEW_BACKBONES for s in OUTPUT_STRIDES[n]])
def test_feature_info_matches_outputs(name, output_stride):
    model = backbone(name, width=0.25, output_stride=output_stride).eval()
    reductions = [min(r, output_stride) for r in (4, 8, 16, 32)]
    assert [i["reduction"] for i in model.feature_info] == reductions
    for info in model.feature_info:
        model.get_submodule(info["module"])  # every named tap is a real module path
    with torch.no_grad():
        feats = model.forward_features(torch.randn(1, 3, 64, 96))
    expected = [(1, c, 64 // r, 96 // r) for c, r in zip(model.out_channels, reductions)]
    assert [tuple(f.shape) for f in feats] == expected


def test_mobilenetv2_stage_cuts_are_the_named_modules():
    assert backbone("mobilenetv2").out_channels == [24, 32, 96, 320]
    model = backbone("mobilenetv2", width=0.25, output_stride=16).eval()
    assert [i["module"] for i in model.feature_info] == [
        "features.3", "features.6", "features.13", "features.17"]
    hooked = []
    handles = [model.get_submodule(i["module"]).register_forward_hook(
        lambda _m, _i, out: hooked.append(out)) for i in model.feature_info]
    with torch.no_grad():
        feats = model.forward_features(torch.randn(1, 3, 32, 32))
    for h in handles:
        h.remove()
    assert len(hooked) == 4 and all(a is b for a, b in zip(hooked, feats))


def _depthwise(model: torch.nn.Module, index: int) -> torch.nn.Conv2d:
    return model.features[index].conv[-3][0]


@pytest.mark.parametrize("output_stride,strided,dilations", [
    # DeepLab's atrous rule: a block that loses its stride keeps its dilation; later ones double.
    (8, {2, 4}, {7: 1, 8: 2, 13: 2, 14: 2, 15: 4, 17: 4}),
    (16, {2, 4, 7}, {13: 1, 14: 1, 15: 2, 17: 2}),
    (32, {2, 4, 7, 14}, {14: 1, 17: 1}),
])
def test_mobilenetv2_trades_stride_for_dilation(output_stride, strided, dilations):
    model = backbone("mobilenetv2", width=0.25, output_stride=output_stride)
    assert {i for i in range(1, 18) if _depthwise(model, i).stride == (2, 2)} == strided
    for index, rate in dilations.items():
        conv = _depthwise(model, index)
        assert conv.dilation == conv.padding == (rate, rate), index


def test_torchvision_rounding_of_widths():
    assert [make_divisible_tv(v) for v in (6.0, 11.2, 33.6, 44.8, 134.4)] == [8, 16, 32, 48, 136]
    assert backbone("mobilenetv2", width=0.25).out_channels == [8, 8, 24, 80]
    assert backbone("mobilenetv2", width=0.5).out_channels == [16, 16, 48, 160]
    assert backbone("mobilenetv2", width=0.5).features[0][0].out_channels == 16


@pytest.mark.parametrize("width,dims", [(0.25, [8, 16, 40, 64]), (0.5, [16, 32, 80, 128]),
                                        (1.5, [48, 96, 240, 384])])
def test_mit_width_scales_channels_per_head(width, dims):
    model = backbone("mit_b0", width=width)
    assert model.out_channels == dims
    assert [model.get_submodule(f"block{k}.0.attn").num_heads for k in range(1, 5)] == [1, 2, 5, 8]


@pytest.mark.parametrize("output_stride", [8, 16])
def test_mit_rejects_output_strides_other_than_32(output_stride):
    with pytest.raises(BckdError, match=f"output_stride {output_stride}; set model.output_stride"):
        BACKBONES.get("mit_b0")(output_stride=output_stride)
    with pytest.raises(BckdError, match="stride-32 encoder"):  # build_segmentor's default is 8
        build_segmentor("mit_b0", "segformer", num_classes=3)


def test_bad_arguments_are_user_errors():
    with pytest.raises(BckdError, match="output_stride 4"):
        BACKBONES.get("mobilenetv2")(output_stride=4)
    for name in NEW_BACKBONES:
        with pytest.raises(BckdError, match="width must be > 0"):
            backbone(name, width=0)


# --------------------------------------------------------------------------------------------
# Loading upstream-format weights

# Keys the upstream ImageNet checkpoints carry that the backbones do not build.
UPSTREAM_EXTRAS = {
    "mobilenetv2": {"features.18.0.weight": (1280, 320, 1, 1), "features.18.1.weight": (1280,),
                    "features.18.1.bias": (1280,), "features.18.1.running_mean": (1280,),
                    "features.18.1.running_var": (1280,), "classifier.1.weight": (1000, 1280),
                    "classifier.1.bias": (1000,)},
    "mit_b0": {"head.weight": (1000, 256), "head.bias": (1000,)},
}


def upstream_state(name: str) -> dict[str, torch.Tensor]:
    """A checkpoint in the upstream layout: the key list checked above plus upstream's extras."""
    generator = torch.Generator().manual_seed(1)
    state = {k: torch.rand(v.shape, generator=generator) if v.is_floating_point() else v
             for k, v in backbone(name).state_dict().items()}
    state.update({k: torch.randn(s, generator=generator)
                  for k, s in UPSTREAM_EXTRAS[name].items()})
    return state


@pytest.mark.parametrize("name", NEW_BACKBONES)
def test_upstream_checkpoint_loads_from_file(tmp_path, name):
    state = upstream_state(name)
    path = tmp_path / f"{name}.pth"
    torch.save({"state_dict": state}, path)
    model = backbone(name)
    load_backbone_weights(model, path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    seg = segmentor(name, "segformer", pretrained_backbone=str(path))
    assert all(torch.equal(v, state[k]) for k, v in seg.backbone.state_dict().items())


@pytest.mark.parametrize("name,renamed,fix", [
    ("mobilenetv2", ("features.5.conv.1.0.weight", "features.5.conv.1.weight"),
     "torchvision mobilenet_v2"),
    ("mit_b0", ("block2.1.mlp.dwconv.dwconv.weight", "layers.1.1.ffn.layers.1.weight"),
     "NVlabs SegFormer mit_b0.pth"),
])
def test_wrong_layout_is_a_one_line_error(name, renamed, fix):
    state = upstream_state(name)
    old, new = renamed
    state[new] = state.pop(old)
    with pytest.raises(BckdError) as err:
        load_backbone_weights(backbone(name), state)
    message = str(err.value)
    assert "\n" not in message
    assert f"1 missing ({old})" in message and f"1 unexpected ({new})" in message
    assert fix in message


@pytest.mark.parametrize("name", NEW_BACKBONES)
def test_width_mismatch_names_width(name):
    with pytest.raises(BckdError, match=r"shape-mismatched .*width=0\.5"):
        load_backbone_weights(backbone(name, width=0.5), upstream_state(name))


def test_resnet_weights_do_not_load_into_mobilenetv2():
    state = BACKBONES.get("resnet18")(width=0.25).state_dict()
    with pytest.raises(BckdError, match=r"missing .*unexpected .*torchvision mobilenet_v2"):
        load_backbone_weights(backbone("mobilenetv2"), state)


# --------------------------------------------------------------------------------------------
# Segmentors: taps, training step, arch round trip

COMBINATIONS = [("mobilenetv2", "pspnet", 8), ("mobilenetv2", "deeplabv3plus", 4),
                ("mobilenetv2", "segformer", 4), ("mit_b0", "segformer", 4)]


@pytest.mark.parametrize("name,head,decoder_stride", COMBINATIONS)
def test_forward_taps(name, head, decoder_stride):
    model = segmentor(name, head, width=0.25).eval()
    with torch.no_grad():
        taps = model.forward_taps(torch.randn(1, 3, 64, 96))
    assert taps["logits"].shape == (1, 7, 64, 96)
    assert [tuple(f.shape[1:]) for f in taps["stages"]] == [
        (i["num_chs"], 64 // i["reduction"], 96 // i["reduction"]) for i in model.feature_info]
    assert taps["decoder"].shape == (1, model.decoder_channels, 64 // decoder_stride,
                                     96 // decoder_stride)


@pytest.mark.parametrize("name", NEW_BACKBONES)
def test_training_step_reaches_first_layer(name):
    model = segmentor(name, "segformer", width=0.25).train()
    logits = model(torch.randn(2, 3, 32, 32))
    logits.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    first = next(model.backbone.parameters())
    assert first.grad.abs().sum() > 0


@pytest.mark.parametrize("name", NEW_BACKBONES)
def test_arch_rebuilds_the_same_model(name):
    model = segmentor(name, "segformer", width=0.25, num_classes=3).eval()
    rebuilt = model_from_arch(model.arch).eval()
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))


# --------------------------------------------------------------------------------------------
# ONNX export: traced at 64x64, run at another size and batch

DYNAMIC_AXES = {"input": {0: "batch", 2: "height", 3: "width"},
                "logits": {0: "batch", 2: "height", 3: "width"}}
# One per new backbone (heads on ResNet are exported in test_models.py); MiT at full width.
EXPORTS = [("mobilenetv2", "deeplabv3plus", 8, 0.5), ("mit_b0", "segformer", 32, 1.0)]


def _trained_looking(model: torch.nn.Module) -> None:
    """Non-trivial BN statistics and O(1) logits, so a 1e-4 tolerance means something."""
    generator = torch.Generator().manual_seed(2)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=generator))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=generator))
    model.head.classifier.weight.data.mul_(10)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("name,head,output_stride,width", EXPORTS)
def test_legacy_onnx_export_is_dynamic(name, head, output_stride, width):
    ort = pytest.importorskip("onnxruntime")
    model = segmentor(name, head, output_stride=output_stride, width=width).eval()
    _trained_looking(model)
    buf = io.BytesIO()
    torch.onnx.export(model, torch.randn(1, 3, 64, 64), buf, dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"], dynamic_axes=DYNAMIC_AXES)
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        expected = model(x).numpy()
    (got,) = session.run(None, {"input": x.numpy()})
    assert got.shape == expected.shape == (2, 7, 96, 128)
    assert np.abs(expected).max() > 0.5
    assert np.abs(got - expected).max() <= 1e-4
