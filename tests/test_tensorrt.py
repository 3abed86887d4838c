"""TensorRT export and runner: version dispatch, build plans, the Python builder and trtexec path
against fake ``tensorrt`` modules for 8.5/8.6/10.x/11.x, engine cards and the runner's checks.

A real engine is built only in ``test_real_engine_matches_onnxruntime``, which skips without
tensorrt and a GPU. Fakes live in ``tests/trt_fakes.py``.
"""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
import types
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

import runtime.cuda
from export.trt import (BuildOptions, ShapeProfile, build_engine, capabilities, parse_version,
                        plan_build, trtexec_command)
from export.trt.onnx_model import OnnxFacts, TensorFacts, read_onnx_facts
from export.trt.trtexec import parse_trtexec_device, parse_trtexec_version, shape_spec
from runtime.backends import open_runner
from runtime.backends.tensorrt import ENGINE_KIND, check_engine_card, check_in_profile
from runtime.card import new_card, read_card, write_card
from runtime.cuda import CudaPython, DeviceInfo, EventTimer, l4t_release
from runtime.errors import BckdError
from runtime.trt_versions import TrtVersion
from trt_fakes import ORIN, Builder, FakeCuda, Runtime, fake_tensorrt

ROOT = Path(__file__).resolve().parents[1]
SIZE = (64, 96)
TrtEnv = Callable[[str], types.ModuleType]  # installs a fake tensorrt of that version


# -- fixtures --------------------------------------------------------------------------------------
def tiny_onnx(path: Path, *, kind: str = "plain", dynamic: bool = True, card: bool = True) -> Path:
    """A one-node NCHW model; kind 'qdq' adds Q/DQ, 'fp16' casts through FP16, 'bad' is unparsable."""
    onnx = pytest.importorskip("onnx")
    h = onnx.helper
    dims = ["batch", 3, "height", "width"] if dynamic else [1, 3, *SIZE]
    inp = h.make_tensor_value_info("input", onnx.TensorProto.FLOAT, dims)
    out = h.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, dims)
    nodes, inits = [h.make_node("Relu", ["input"], ["logits"])], []
    if kind == "qdq":
        inits = [h.make_tensor("s", onnx.TensorProto.FLOAT, [], [0.1]),
                 h.make_tensor("z", onnx.TensorProto.INT8, [], [0])]
        nodes = [h.make_node("QuantizeLinear", ["input", "s", "z"], ["q"]),
                 h.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"]),
                 h.make_node("Relu", ["dq"], ["logits"])]
    elif kind == "fp16":
        nodes = [h.make_node("Cast", ["input"], ["h"], to=onnx.TensorProto.FLOAT16),
                 h.make_node("Relu", ["h"], ["r"]),
                 h.make_node("Cast", ["r"], ["logits"], to=onnx.TensorProto.FLOAT)]
    elif kind == "bad":
        nodes = [h.make_node("Unsupported", ["input"], ["logits"], domain="x")]
    graph = h.make_graph(nodes, "tiny", [inp], [out], initializer=inits)
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), str(path))
    if card:
        write_card(path, new_card("onnx", classes=["bg", "thing"], input_size=list(SIZE),
                                  preprocess={"size": list(SIZE), "mean": [0.5] * 3, "std": [0.2] * 3},
                                  onnx={"opset": 17}, sha256="x", precision="fp32"))
    return path


@pytest.fixture
def trt_env(monkeypatch: pytest.MonkeyPatch) -> TrtEnv:
    """Install a fake tensorrt of a given version plus a fake CUDA device (an Orin)."""
    cuda = FakeCuda()
    monkeypatch.setattr(runtime.cuda, "device_info", lambda device=0: cuda.device)
    monkeypatch.setattr(runtime.cuda, "cuda_api", lambda: cuda)

    def install(version: str) -> types.ModuleType:
        trt = fake_tensorrt(version, cuda)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        return trt

    return install


def facts(kind: str = "plain", *, dynamic: bool = True, card: dict | None = None,
          fp16: bool = False) -> OnnxFacts:
    shape: tuple = ("batch", 3, "height", "width") if dynamic else (1, 3, *SIZE)
    io = TensorFacts("input", shape, "float32")
    return OnnxFacts(Path("m.onnx"), "0" * 64, (io,), (TensorFacts("logits", shape, "float32"),),
                     has_qdq=kind == "qdq", has_fp16=fp16,
                     card=card if card is not None else {"input_size": list(SIZE)})


def plan(version: str, kind: str = "plain", data: bool = False, fp16: bool = False,
         **options: Any) -> Any:
    return plan_build(BuildOptions(**options), capabilities(version), facts(kind, fp16=fp16),
                      has_calib_data=data)


# -- versions and capabilities ---------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("10.3.0.30", TrtVersion(10, 3, 0, 30)), ("8.5.2.2", TrtVersion(8, 5, 2, 2)),
    ("11.1.0", TrtVersion(11, 1, 0)), ("8.6", TrtVersion(8, 6, 0)),
    ("v100300", TrtVersion(10, 3, 0)), ("v101602", TrtVersion(10, 16, 2)),
    ("v8400", TrtVersion(8, 4, 0)), ("8001", TrtVersion(8, 0, 1)), ("v110100", TrtVersion(11, 1, 0)),
])
def test_parse_version(text: str, expected: TrtVersion) -> None:
    assert parse_version(text) == expected


def test_unreadable_version_is_a_user_error() -> None:
    with pytest.raises(BckdError, match="cannot read a TensorRT version from 'ten'"):
        parse_version("ten")


CAPS = {  # version -> fields that change across the versions bckd supports
    "8.4.1": dict(build_supported=False, name_based_io=False, builder_optimization_level=False),
    "8.5.2": dict(build_supported=True, name_based_io=True, explicit_batch_flag=True,
                  builder_optimization_level=False, trtexec_build_only_flag="--buildOnly",
                  strongly_typed_flag=False),
    "8.6.2": dict(explicit_batch_flag=True, builder_optimization_level=True,
                  trtexec_build_only_flag="--skipInference", legacy_calibrator_deprecated=False),
    "10.0.1": dict(explicit_batch_flag=False, strongly_typed_flag=True, precision_flags=True,
                   legacy_calibrator=True, legacy_calibrator_deprecated=False,
                   precision_flags_deprecated=False, strongly_typed_always=False),
    "10.3.0": dict(legacy_calibrator_deprecated=True, dla=True),
    "10.12.0": dict(precision_flags=True, precision_flags_deprecated=True),
    "11.0.0": dict(strongly_typed_always=True, precision_flags=False, legacy_calibrator=False,
                   dla=False, explicit_batch_flag=False, precision_flags_deprecated=False),
    "11.4.1": dict(dla=True, name_based_io=True),
}


@pytest.mark.parametrize("version", list(CAPS))
def test_capabilities_per_version(version: str) -> None:
    caps = capabilities(version).to_dict()
    assert {k: caps[k] for k in CAPS[version]} == CAPS[version]


# -- plans -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("version, precision, network, flags", [
    ("8.5.2", "fp16", ("EXPLICIT_BATCH",), ("FP16",)),
    ("8.6.2", "fp32", ("EXPLICIT_BATCH",), ()),
    ("10.3.0", "fp16", (), ("FP16",)),
    ("10.12.0", "fp16", (), ("FP16",)),
    ("11.1.0", "fp16", (), ()),
    ("11.1.0", "fp32", (), ()),
])
def test_plan_flags_per_version(version: str, precision: str, network: tuple, flags: tuple) -> None:
    p = plan(version, precision=precision)
    assert (p.network_flags, p.builder_flags) == (network, flags)
    assert p.strongly_typed == version.startswith("11")
    assert p.fp16_onnx == ("convert" if version.startswith("11") and precision == "fp16" else None)


def test_plan_strongly_typed_on_10x_uses_the_flag_and_no_precision_flags() -> None:
    p = plan("10.3.0", fp16=True, precision="fp16", strongly_typed=True)
    assert p.network_flags == ("STRONGLY_TYPED",) and p.builder_flags == () and p.fp16_onnx == "typed"


def test_plan_int8_sources() -> None:
    assert plan("10.3.0", "qdq", precision="int8").quantization == "qdq"
    assert plan("10.3.0", "qdq", precision="int8").builder_flags == ("INT8",)
    assert plan("11.1.0", "qdq", precision="int8").builder_flags == ()
    assert plan("8.6.2", data=True, precision="int8").quantization == "calibrator"
    assert plan("10.3.0", data=True, precision="best").builder_flags == ("FP16", "INT8")


def test_plan_records_deprecations() -> None:
    notes = plan("10.12.0", data=True, precision="int8").notes
    assert any("precision builder flags are deprecated" in n for n in notes)
    assert any("implicit INT8 calibration is deprecated" in n for n in notes)


@pytest.mark.parametrize("version, kind, data, options, message", [
    ("11.1.0", "plain", True, dict(precision="int8"), "TensorRT 11.1.0 removed implicit INT8 calibration"),
    ("11.1.0", "qdq", False, dict(precision="best"), "precision 'best' needs builder precision flags"),
    ("10.3.0", "plain", False, dict(precision="int8"), "INT8 needs scales and m.onnx has no Q/DQ"),
    ("10.3.0", "qdq", True, dict(precision="int8"), "Q/DQ nodes, which carry their own INT8 scales"),
    ("10.3.0", "qdq", False, dict(precision="fp16"), "has Q/DQ nodes .* precision='int8'"),
    ("10.3.0", "plain", True, dict(precision="fp16"), "calibration data .* for a fp16 build"),
    ("10.3.0", "plain", False, dict(precision="fp32", dla_core=0), "DLA runs FP16 or INT8 only"),
    ("10.3.0", "qdq", False, dict(precision="int8", dla_core=0), "takes INT8 only from implicit"),
    ("11.1.0", "plain", False, dict(precision="fp16", dla_core=0), "no DLA support"),
    ("8.5.2", "plain", False, dict(optimization_level=5), "optimization levels need TensorRT 8.6"),
    ("8.6.2", "plain", False, dict(strongly_typed=True), "strongly typed networks need TensorRT 9.0"),
    ("11.1.0", "plain", False, dict(strongly_typed=False), "always strongly typed"),
    ("10.3.0", "plain", True, dict(precision="int8", strongly_typed=True),
     "strongly typed network takes INT8 only from Q/DQ"),
    ("8.4.1", "plain", False, {}, "TensorRT 8.4.1 is too old"),
    ("10.3.0", "plain", False, dict(precision="fp64"), "unknown TensorRT precision 'fp64'"),
    ("10.3.0", "plain", False, dict(optimization_level=7), "optimization_level must be 0 to 5"),
])
def test_plan_refusals(version: str, kind: str, data: bool, options: dict, message: str) -> None:
    with pytest.raises(BckdError, match=message):
        plan(version, kind, data, **options)


def test_fp32_request_with_fp16_onnx_on_11_is_refused() -> None:
    with pytest.raises(BckdError, match="carries FP16 types"):
        plan("11.1.0", fp16=True, precision="fp32")


# -- profiles --------------------------------------------------------------------------------------
def test_profile_derived_from_the_card() -> None:
    p = plan("10.3.0").profile
    assert p == ShapeProfile((1, 3, 64, 96), (1, 3, 64, 96), (8, 3, 64, 96))
    assert plan("10.3.0", precision="fp16", dla_core=0).profile.is_static


def test_user_profile_from_strings_and_dicts() -> None:
    p = plan("10.3.0", profile=("1x3x64x64", "2x3x128x128", "4x3x256x256")).profile
    assert p.to_dict() == {"min": [1, 3, 64, 64], "opt": [2, 3, 128, 128], "max": [4, 3, 256, 256]}
    assert ShapeProfile.parse({"min": [1, 3, 8, 8], "opt": [1, 3, 8, 8], "max": [1, 3, 8, 8]}).is_static


@pytest.mark.parametrize("profile, message", [
    (("1x3x64x64", "1x3x32x32", "1x3x128x128"), "0 < min <= opt <= max"),
    (("1x4x64x64",) * 3, "changes dim 1 of input 'input'"),
    (("1x3x64",) * 3, "has rank 3"),
    (("1x3x6ax64",) * 3, "is not like 1x3x512x512"),
    ({"min": "1x3x8x8"}, "exactly the keys min, opt, max"),
])
def test_bad_profiles_are_user_errors(profile: object, message: str) -> None:
    with pytest.raises(BckdError, match=message):
        plan("10.3.0", profile=profile)


def test_dynamic_input_without_card_needs_a_profile() -> None:
    with pytest.raises(BckdError, match="no card input size .* pass a profile"):
        plan_build(BuildOptions(), capabilities("10.3.0"), facts(card={}))


def test_dla_needs_a_static_profile() -> None:
    with pytest.raises(BckdError, match="DLA has no dynamic shapes"):
        plan("10.3.0", dla_core=0, profile=("1x3x64x64", "1x3x64x64", "2x3x64x64"))


# -- ONNX facts ------------------------------------------------------------------------------------
def test_onnx_facts(tmp_path: Path) -> None:
    f = read_onnx_facts(tiny_onnx(tmp_path / "m.onnx"))
    assert f.input == TensorFacts("input", ("batch", 3, "height", "width"), "float32")
    assert f.input.dynamic_axes == (0, 2, 3)
    assert not f.has_qdq and not f.has_fp16 and f.card["classes"] == ["bg", "thing"]
    assert read_onnx_facts(tiny_onnx(tmp_path / "q.onnx", kind="qdq")).has_qdq
    assert read_onnx_facts(tiny_onnx(tmp_path / "h.onnx", kind="fp16", card=False)).has_fp16
    assert read_onnx_facts(tmp_path / "h.onnx").card is None


def test_corrupt_onnx_is_a_user_error(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    (tmp_path / "x.onnx").write_bytes(b"\x08garbage")
    with pytest.raises(BckdError, match="is not a valid ONNX model"):
        read_onnx_facts(tmp_path / "x.onnx")


# -- the Python builder on fake TensorRT -----------------------------------------------------------
@pytest.mark.parametrize("version, mask, flags", [
    ("8.5.2.2", 1, ["FP16"]), ("8.6.1", 1, ["FP16"]), ("10.3.0.30", 0, ["FP16"]), ("10.12.0", 0, ["FP16"]),
])
def test_python_build_fp16(tmp_path: Path, trt_env: TrtEnv, version: str, mask: int,
                          flags: list) -> None:
    trt_env(version)
    onnx_path = tiny_onnx(tmp_path / "m.onnx")
    card = build_engine(onnx_path, tmp_path / "m.engine", workspace_mib=512, precision="fp16")
    b = Builder.last
    assert b.network.flags == mask and b.config.flags_set == flags
    assert b.config.pools == {"WORKSPACE": 512 << 20}
    assert b.config.profiles[0].shapes == {"input": ((1, 3, 64, 96), (1, 3, 64, 96), (8, 3, 64, 96))}
    assert (tmp_path / "m.engine").read_bytes().startswith(b"fake-engine")
    assert read_card(tmp_path / "m.engine") == card


def test_engine_card_contents(tmp_path: Path, trt_env: TrtEnv) -> None:
    trt_env("10.3.0.30")
    onnx_path = tiny_onnx(tmp_path / "m.onnx")
    card = build_engine(onnx_path, tmp_path / "m.engine", timing_cache=tmp_path / "t.cache",
                        optimization_level=4, tf32=False)
    assert card["kind"] == ENGINE_KIND and card["precision"] == "fp16"
    assert card["tensorrt"]["version"] == "10.3.0" and card["tensorrt"]["version_full"] == "10.3.0.30"
    assert card["tensorrt"]["builder"] == "python" and card["tensorrt"]["network"] == "weakly_typed"
    assert card["device"]["name"] == "Orin" and card["device"]["sm"] == "sm_87"
    assert card["device"]["dla_core"] is None
    assert card["profile"]["input"]["max"] == [8, 3, 64, 96]
    assert card["io"]["inputs"] == [{"name": "input", "shape": [-1, 3, -1, -1], "dtype": "float32"}]
    assert card["classes"] == ["bg", "thing"] and card["preprocess"]["size"] == list(SIZE)
    assert "onnx" not in card and card["source"]["sha256"] == read_onnx_facts(onnx_path).sha256
    assert card["builder_options"]["optimization_level"] == 4 and card["timing_cache"].endswith("t.cache")
    assert Builder.last.config.builder_optimization_level == 4
    assert Builder.last.config.flags_cleared == ["TF32"]
    assert (tmp_path / "t.cache").read_bytes() == b"+timed"  # a new cache, saved after the build


def test_timing_cache_is_loaded_and_mismatch_refused(tmp_path: Path, trt_env: TrtEnv) -> None:
    trt_env("10.3.0")
    onnx_path = tiny_onnx(tmp_path / "m.onnx")
    (tmp_path / "t.cache").write_bytes(b"old")
    build_engine(onnx_path, tmp_path / "a.engine", timing_cache=tmp_path / "t.cache")
    assert (tmp_path / "t.cache").read_bytes() == b"old+timed"
    (tmp_path / "t.cache").write_bytes(b"other-gpu")
    with pytest.raises(BckdError, match="made on another GPU or TensorRT version"):
        build_engine(onnx_path, tmp_path / "b.engine", timing_cache=tmp_path / "t.cache")
    assert not (tmp_path / "b.engine").exists()


def test_existing_engine_needs_force(tmp_path: Path, trt_env: TrtEnv) -> None:
    trt_env("10.3.0")
    onnx_path = tiny_onnx(tmp_path / "m.onnx")
    (tmp_path / "m.engine").write_bytes(b"keep")
    with pytest.raises(BckdError, match="already exists; .* --force"):
        build_engine(onnx_path, tmp_path / "m.engine")
    assert (tmp_path / "m.engine").read_bytes() == b"keep"
    build_engine(onnx_path, tmp_path / "m.engine", force=True)
    assert (tmp_path / "m.engine").read_bytes().startswith(b"fake-engine")


def test_11x_fp16_needs_an_fp16_onnx(tmp_path: Path, trt_env: TrtEnv,
        monkeypatch: pytest.MonkeyPatch) -> None:
    trt_env("11.1.0")
    monkeypatch.setitem(sys.modules, "onnxconverter_common", None)  # as if not installed
    onnx_path = tiny_onnx(tmp_path / "m.onnx")
    with pytest.raises(BckdError,
                       match=r"no FP16 builder flag.*modelopt.onnx.autocast.*onnxconverter-common"):
        build_engine(onnx_path, tmp_path / "m.engine")
    card = build_engine(tiny_onnx(tmp_path / "h.onnx", kind="fp16"), tmp_path / "h.engine")
    assert Builder.last.network.flags == 0 and Builder.last.config.flags_set == []
    assert card["tensorrt"]["network"] == "strongly_typed" and card["tensorrt"]["fp16_onnx"] == "typed"


def test_11x_fp16_conversion_is_recorded(tmp_path: Path, trt_env: TrtEnv,
        monkeypatch: pytest.MonkeyPatch) -> None:
    trt_env("11.1.0")
    seen = {}

    def convert(model: Any, keep_io_types: bool) -> Any:
        seen["keep_io_types"] = keep_io_types
        return model

    package = types.ModuleType("onnxconverter_common")
    package.__version__ = "1.14.0"
    float16 = types.ModuleType("onnxconverter_common.float16")
    float16.convert_float_to_float16 = convert
    monkeypatch.setitem(sys.modules, "onnxconverter_common", package)
    monkeypatch.setitem(sys.modules, "onnxconverter_common.float16", float16)
    card = build_engine(tiny_onnx(tmp_path / "m.onnx"), tmp_path / "m.engine")
    assert seen == {"keep_io_types": True}
    assert card["fp16_onnx"]["version"] == "1.14.0" and card["fp16_onnx"]["keep_io_types"]


def test_11x_int8_from_qdq(tmp_path: Path, trt_env: TrtEnv) -> None:
    trt_env("11.1.0")
    card = build_engine(tiny_onnx(tmp_path / "q.onnx", kind="qdq"), tmp_path / "q.engine",
                        precision="int8")
    assert Builder.last.network.flags == 0 and Builder.last.config.flags_set == []
    assert Builder.last.config.int8_calibrator is None and card["tensorrt"]["quantization"] == "qdq"


def test_10x_strongly_typed_sets_the_flag_by_name(tmp_path: Path, trt_env: TrtEnv) -> None:
    trt_env("10.3.0")
    build_engine(tiny_onnx(tmp_path / "q.onnx", kind="qdq"), tmp_path / "q.engine",
                 precision="int8", strongly_typed=True)
    assert Builder.last.network.flags == 1 << 1 and Builder.last.config.flags_set == []


def batches(n: int, shape: tuple = (2, 3, *SIZE)) -> Any:
    rng = np.random.default_rng(0)
    return (rng.standard_normal(shape, dtype=np.float32) for _ in range(n))


@pytest.mark.parametrize("version", ["8.6.1", "10.3.0"])
def test_legacy_calibration_writes_and_reuses_the_cache(tmp_path: Path, trt_env: TrtEnv,
                                                       version: str) -> None:
    trt_env(version)
    onnx_path, cache = tiny_onnx(tmp_path / "m.onnx"), tmp_path / "calib.cache"
    card = build_engine(onnx_path, tmp_path / "a.engine", precision="int8", calibrator=batches(3),
                        calib_cache=cache, calib_algorithm="minmax")
    b = Builder.last
    assert b.batches_seen == 3 and b.config.flags_set == ["INT8"]
    assert type(b.config.int8_calibrator).__mro__[1].__name__ == "IInt8MinMaxCalibrator"
    assert b.config.calibration_profile.shapes == {"input": ((2, 3, *SIZE),) * 3}
    assert cache.read_bytes().startswith(b"TRT-8600-EntropyCalibration2")
    assert card["calibration"]["batches"] == 3 and card["calibration"]["batch_shape"] == [2, 3, *SIZE]
    assert card["calibration"]["cache"]["reused"] is False
    card = build_engine(onnx_path, tmp_path / "b.engine", precision="int8", calib_cache=cache)
    assert Builder.last.batches_seen == 0 and card["calibration"]["cache"]["reused"] is True
    assert card["calibration"]["source"] == "calib_cache"


def test_a_smaller_last_calibration_batch_is_left_out(tmp_path: Path, trt_env: TrtEnv) -> None:
    trt_env("10.3.0")
    two, one = np.zeros((2, 3, *SIZE), np.float32), np.zeros((1, 3, *SIZE), np.float32)
    card = build_engine(tiny_onnx(tmp_path / "m.onnx"), tmp_path / "m.engine", precision="int8",
                        calibrator=[two, two, one])
    assert card["calibration"]["batches"] == 2 and card["calibration"]["dropped_tail_images"] == 1


class DescribedBatches(list):
    """Batches that describe their images, as calib.reader.CalibrationReader does."""

    def describe(self) -> dict:
        return {"split": "train", "ids": ["a", "b"], "num_images": 2}


def test_the_engine_card_records_which_images_calibrated_it(tmp_path: Path,
                                                            trt_env: TrtEnv) -> None:
    trt_env("10.3.0")
    two = np.zeros((2, 3, *SIZE), np.float32)
    card = build_engine(tiny_onnx(tmp_path / "m.onnx"), tmp_path / "m.engine", precision="int8",
                        calibrator=DescribedBatches([two]))
    assert card["calibration"]["split"] == "train" and card["calibration"]["ids"] == ["a", "b"]
    assert card["calibration"]["batches"] == 1


def test_bad_calibration_batch_fails_the_build(tmp_path: Path, trt_env: TrtEnv) -> None:
    trt_env("10.3.0")
    onnx_path = tiny_onnx(tmp_path / "m.onnx")
    two, one = np.zeros((2, 3, *SIZE), np.float32), np.zeros((1, 3, *SIZE), np.float32)
    with pytest.raises(BckdError, match=r"calibration batch 1 has shape \(1, 3, 64, 96\)"):
        build_engine(onnx_path, tmp_path / "m.engine", precision="int8", calibrator=[two, one, two])
    with pytest.raises(BckdError, match="must be an NCHW float32 numpy array, got float64"):
        build_engine(onnx_path, tmp_path / "m.engine", precision="int8",
                     calibrator=[np.zeros((2, 3, *SIZE))])
    assert not (tmp_path / "m.engine").exists()


def test_parser_errors_are_reported(tmp_path: Path, trt_env: TrtEnv) -> None:
    trt_env("10.3.0")
    with pytest.raises(BckdError, match=r"ONNX parser rejected m.onnx: No importer registered for "
                                        r"op: Unsupported \(node Conv_3\)"):
        build_engine(tiny_onnx(tmp_path / "m.onnx", kind="bad"), tmp_path / "m.engine")


def test_build_failure_names_tensorrts_error(tmp_path: Path, trt_env: TrtEnv,
        monkeypatch: pytest.MonkeyPatch) -> None:
    trt = trt_env("10.3.0")
    monkeypatch.setattr(trt.Builder, "fail", True, raising=False)
    with pytest.raises(BckdError, match="could not build an engine from m.onnx: Internal error"):
        build_engine(tiny_onnx(tmp_path / "m.onnx"), tmp_path / "m.engine")


def test_dla_build(tmp_path: Path, trt_env: TrtEnv) -> None:
    trt = trt_env("10.3.0")
    card = build_engine(tiny_onnx(tmp_path / "m.onnx"), tmp_path / "m.engine", dla_core=1)
    cfg = Builder.last.config
    assert cfg.default_device_type == trt.DeviceType.DLA and cfg.DLA_core == 1
    assert cfg.flags_set == ["FP16", "GPU_FALLBACK"] and card["device"]["dla_core"] == 1
    assert cfg.profiles[0].shapes["input"] == ((1, 3, *SIZE),) * 3
    with pytest.raises(BckdError, match="DLA core 2 does not exist: this device has 2"):
        build_engine(tmp_path / "m.onnx", tmp_path / "n.engine", dla_core=2)


def test_unknown_builder_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(BckdError, match="unknown TensorRT builder 'trtexe'; did you mean 'trtexec'"):
        build_engine(tmp_path / "m.onnx", tmp_path / "m.engine", builder="trtexe")


def test_missing_tensorrt_names_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BckdError, match="tensorrt is needed for building TensorRT engines.*pip install"):
        build_engine(tiny_onnx(tmp_path / "m.onnx"), tmp_path / "m.engine")


# -- trtexec ---------------------------------------------------------------------------------------
def command(version: str, kind: str = "plain", **options: Any) -> list[str]:
    p = plan(version, kind, **options)
    return trtexec_command("trtexec", p, Path("m.onnx"), Path("m.engine"), "input")[3:]


SHAPES = ["--minShapes=input:1x3x64x96", "--optShapes=input:1x3x64x96", "--maxShapes=input:8x3x64x96"]


@pytest.mark.parametrize("version, kind, options, expected", [
    ("8.5.2", "plain", {}, SHAPES + ["--fp16", "--buildOnly"]),
    ("8.6.2", "plain", dict(workspace_mib=2048, optimization_level=5),
     SHAPES + ["--fp16", "--memPoolSize=workspace:2048", "--builderOptimizationLevel=5",
               "--skipInference"]),
    ("10.3.0", "qdq", dict(precision="int8", timing_cache="t.cache", tf32=False),
     SHAPES + ["--int8", "--noTF32", "--timingCacheFile=t.cache", "--skipInference"]),
    ("10.3.0", "plain", dict(dla_core=0),
     ["--minShapes=input:1x3x64x96", "--optShapes=input:1x3x64x96", "--maxShapes=input:1x3x64x96",
      "--fp16", "--useDLACore=0", "--allowGPUFallback", "--skipInference"]),
    ("10.16.2", "qdq", dict(precision="int8", strongly_typed=True),
     SHAPES + ["--stronglyTyped", "--skipInference"]),
    ("11.1.0", "qdq", dict(precision="int8"), SHAPES + ["--skipInference"]),
    ("11.1.0", "plain", dict(precision="fp32", workspace_mib=1024),
     SHAPES + ["--memPoolSize=workspace:1024", "--skipInference"]),
])
def test_trtexec_command_per_version(version: str, kind: str, options: dict, expected: list) -> None:
    assert command(version, kind, **options) == expected


def test_trtexec_command_head_and_calib_cache(tmp_path: Path) -> None:
    cache = tmp_path / "c.cache"
    cache.write_text("TRT-8600-EntropyCalibration2\n")
    p = plan("8.6.2", precision="best", calib_cache=cache)
    cmd = trtexec_command("/x/trtexec", p, Path("m.onnx"), Path("o.engine"), "input")
    assert cmd[:3] == ["/x/trtexec", "--onnx=m.onnx", "--saveEngine=o.engine"]
    assert ["--fp16", "--int8", f"--calib={cache}"] == cmd[6:9]
    with pytest.raises(BckdError, match="trtexec cannot run bckd's calibrator"):
        trtexec_command("trtexec", plan("8.6.2", data=True, precision="int8"), Path("m"), Path("e"), "i")


def test_shape_spec_quotes_awkward_names() -> None:
    assert shape_spec("input:0", (1, 3, 8, 8)) == "'input:0':1x3x8x8"
    assert shape_spec("images", (1, 3)) == "images:1x3"


BANNER_10 = """&&&& RUNNING TensorRT.trtexec [TensorRT v100300] # {cmd}
[01/10/2025-21:52:50] [I] === Device Information ===
[01/10/2025-21:52:50] [I] Selected Device: Orin
[01/10/2025-21:52:50] [I] Compute Capability: 8.7
[01/10/2025-21:52:50] [I] SMs: 16
[01/10/2025-21:52:50] [I] Device Global Memory: 28826 MiB
[01/10/2025-21:52:50] [I]
[01/10/2025-21:52:50] [I] TensorRT version: 10.3.0
"""


def test_parse_trtexec_banner_and_device() -> None:
    assert parse_trtexec_version(BANNER_10) == TrtVersion(10, 3, 0)
    banner_85 = "&&&& RUNNING TensorRT.trtexec [TensorRT v8502] # x"
    assert parse_trtexec_version(banner_85) == TrtVersion(8, 5, 2)
    assert parse_trtexec_version("[I] TensorRT version: 8001") == TrtVersion(8, 0, 1)
    assert parse_trtexec_version("nothing") is None
    dev = parse_trtexec_device(BANNER_10)
    assert (dev.name, dev.compute_capability, dev.total_memory_mib) == ("Orin", "8.7", 28826)


def fake_trtexec(tmp_path: Path, banner: str = BANNER_10, fail: bool = False) -> Path:
    """An executable stand-in: prints trtexec's banner, writes --saveEngine, records its argv."""
    script = tmp_path / "trtexec"
    script.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import sys, json
        args = sys.argv[1:]
        print({banner!r}.format(cmd=" ".join(sys.argv)))
        if args == ["--version"]:
            print("[E] Model missing or format not recognized")
            print("&&&& FAILED TensorRT.trtexec [TensorRT v100300]")
            sys.exit(1)
        open({str(tmp_path / 'argv.json')!r}, "w").write(json.dumps(args))
        if {fail!r}:
            print("[E] [TRT] ModelImporter.cpp:771: ERROR: input: unsupported op")
            print("&&&& FAILED TensorRT.trtexec [TensorRT v100300]")
            sys.exit(1)
        engine = next(a.split("=", 1)[1] for a in args if a.startswith("--saveEngine="))
        open(engine, "wb").write(b"fake plan")
        print("[I] Engine built in 1.2 sec.")
        print("&&&& PASSED TensorRT.trtexec [TensorRT v100300]")
        """))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def test_trtexec_build_writes_engine_and_card(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_cuda(device: int = 0) -> DeviceInfo:
        raise AssertionError("the trtexec path reads the GPU from trtexec's output")

    monkeypatch.setattr(runtime.cuda, "device_info", no_cuda)
    exe = fake_trtexec(tmp_path)
    engine = tmp_path / "out" / "m.engine"
    card = build_engine(tiny_onnx(tmp_path / "m.onnx"), engine, builder="trtexec", trtexec=exe,
                        timing_cache=tmp_path / "t.cache")
    assert engine.read_bytes() == b"fake plan" and read_card(engine) == card
    argv = json.loads((tmp_path / "argv.json").read_text())
    assert argv[0] == f"--onnx={tmp_path / 'm.onnx'}" and "--fp16" in argv
    assert argv[-1] == "--skipInference" and f"--timingCacheFile={tmp_path / 't.cache'}" in argv
    assert card["trtexec"]["command"][2] == f"--saveEngine={engine}"
    assert card["tensorrt"]["version"] == "10.3.0" and card["tensorrt"]["builder"] == "trtexec"
    assert card["device"]["name"] == "Orin" and card["device"]["compute_capability"] == "8.7"
    assert card["io"]["outputs"] == [{"name": "logits", "shape": ["batch", 3, "height", "width"],
                                      "dtype": "float32"}]
    assert "PASSED" in Path(card["trtexec"]["log"]).read_text()
    assert sorted(p.name for p in engine.parent.iterdir()) == [
        "m.engine", "m.engine.card.json", "m.engine.trtexec.log"]


def test_trtexec_failure_is_one_line_naming_the_log(tmp_path: Path) -> None:
    exe = fake_trtexec(tmp_path, fail=True)
    with pytest.raises(BckdError, match=r"trtexec failed \(exit 1\): .*unsupported op; full log in "):
        build_engine(tiny_onnx(tmp_path / "m.onnx"), tmp_path / "m.engine", builder="trtexec",
                     trtexec=exe)
    assert not (tmp_path / "m.engine").exists() and (tmp_path / "m.engine.trtexec.log").exists()


def test_trtexec_version_picks_the_command_line(tmp_path: Path) -> None:
    exe = fake_trtexec(tmp_path, banner=BANNER_10.replace("v100300", "v110100").replace(
        "version: 10.3.0", "version: 11.1.0"))
    with pytest.raises(BckdError, match="TensorRT 11.1.0 removed implicit INT8 calibration"):
        build_engine(tiny_onnx(tmp_path / "m.onnx"), tmp_path / "m.engine", builder="trtexec",
                     trtexec=exe, precision="int8", calib_cache=tmp_path / "c.cache")


def test_missing_trtexec_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(BckdError, match="trtexec .*nope is not an executable file"):
        build_engine(tiny_onnx(tmp_path / "m.onnx"), tmp_path / "m.engine", builder="trtexec",
                     trtexec=tmp_path / "nope")


# -- engine card checks and the runner -------------------------------------------------------------
def engine_card_for(version: str, device: DeviceInfo = ORIN, dla_core: int | None = None) -> dict:
    return new_card(ENGINE_KIND, tensorrt={"version": version},
                    device=dict(device.to_dict(), dla_core=dla_core), source={"path": "seg.onnx"})


def test_card_check_passes_on_the_building_device() -> None:
    check_engine_card(engine_card_for("10.3.0"), TrtVersion(10, 3, 0, 30), ORIN)


@pytest.mark.parametrize("version, device, message", [
    (TrtVersion(10, 7, 0), ORIN, r"engine e.engine was built with TensorRT 10.3.0 on Orin \(sm_87\); "
                                 r"this device has TensorRT 10.7.0 on Orin \(sm_87\): rebuild it here "
                                 r"with `bckd export seg.onnx --format tensorrt`$"),
    (TrtVersion(10, 3, 0), DeviceInfo("Xavier", "7.2"),
     r"this device has TensorRT 10.3.0 on Xavier \(sm_72\)"),
    (TrtVersion(10, 3, 0), DeviceInfo("Orin NX", "8.7"), r"or pass allow_other_gpu=True"),
])
def test_card_mismatch_says_how_to_rebuild(version: TrtVersion, device: DeviceInfo, message: str) -> None:
    with pytest.raises(BckdError, match=message):
        check_engine_card(engine_card_for("10.3.0"), version, device, artifact="e.engine")


def test_card_checks_kind_and_fields() -> None:
    check_engine_card(engine_card_for("10.3.0"), TrtVersion(10, 3, 0), DeviceInfo("Orin NX", "8.7"),
                      allow_other_gpu=True)
    with pytest.raises(BckdError, match="is a 'onnx' card, not a TensorRT engine card"):
        check_engine_card(new_card("onnx"), TrtVersion(10, 3, 0), ORIN)
    with pytest.raises(BckdError, match="lacks the TensorRT version or GPU"):
        check_engine_card(new_card(ENGINE_KIND), TrtVersion(10, 3, 0), ORIN)


def test_profile_range_check() -> None:
    check_in_profile((2, 3, 64, 96), [[1, 3, 64, 96], [1, 3, 64, 96], [8, 3, 64, 96]], "e")
    check_in_profile((2, 3, 64, 96), None, "e")
    with pytest.raises(BckdError, match="input shape 9x3x64x96 is outside the profile of e "
                                        r"\(min 1x3x64x96, max 8x3x64x96\)"):
        check_in_profile((9, 3, 64, 96), [[1, 3, 64, 96], [1, 3, 64, 96], [8, 3, 64, 96]], "e")


@pytest.fixture
def engine(tmp_path: Path, trt_env: TrtEnv) -> Path:
    trt_env("10.3.0.30")
    build_engine(tiny_onnx(tmp_path / "m.onnx"), tmp_path / "m.engine")
    return tmp_path / "m.engine"


def test_runner_runs_through_the_name_based_api(engine: Path) -> None:
    x = np.random.default_rng(0).standard_normal((2, 3, *SIZE), dtype=np.float32)
    with open_runner("tensorrt", engine, cuda_events=True) as runner:
        y = runner.infer(x)
        assert runner.input_spec.shape == (None, 3, None, None) and runner.device == "cuda:0"
        assert runner.last_gpu_ms == 1.25 and runner.describe()["precision"] == "fp16"
        context = runner._state["context"]
        with pytest.raises(BckdError, match="outside the profile of m.engine"):
            runner.infer(np.zeros((9, 3, *SIZE), np.float32))
    np.testing.assert_allclose(y, np.concatenate([2 * x[:, :1]] * 2, axis=1))
    assert context.calls == [("execute_async_v3", 7)]


def test_runner_checks_the_card_before_deserializing(engine: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime.cuda, "device_info", lambda device=0: DeviceInfo("Xavier", "7.2"))
    before = Runtime.deserialized
    with pytest.raises(BckdError, match=r"built with TensorRT 10.3.0 on Orin \(sm_87\); this device "
                                        r"has TensorRT 10.3.0 on Xavier \(sm_72\): rebuild it here"):
        with open_runner("tensorrt", engine):
            pass
    assert Runtime.deserialized == before


def test_runner_uses_the_binding_api_before_8_5(engine: Path, trt_env: TrtEnv) -> None:
    trt_env("8.4.1")
    card = read_card(engine)
    card["tensorrt"]["version"] = "8.4.1"
    with open_runner("tensorrt", engine, card=card) as runner:
        y = runner.infer(np.ones((1, 3, *SIZE), np.float32))
        assert runner._state["context"].calls == [("execute_async_v2", 7)]
    assert y.shape == (1, 2, *SIZE) and float(y.max()) == 2.0


@pytest.mark.parametrize("version", ["10.3.0", "8.4.1"])
def test_runner_returns_every_output_by_name(tmp_path: Path, trt_env: TrtEnv, version: str) -> None:
    trt_env(version)
    io = {"inputs": [["input", [-1, 3, -1, -1], 0]],
          "outputs": [["boxes", [-1, 2, -1, -1], 0], ["scores", [-1, 2, -1, -1], 0]],
          "profile": [{"input": [[1, 3, *SIZE], [1, 3, *SIZE], [4, 3, *SIZE]]}]}
    path = tmp_path / "det.engine"
    path.write_bytes(b"fake-engine" + json.dumps(io).encode())
    x = np.random.default_rng(1).standard_normal((2, 3, *SIZE), dtype=np.float32)
    with open_runner("tensorrt", path, card={}) as runner:
        out = runner.run(x)
        assert runner.output_names == ["boxes", "scores"]
        np.testing.assert_allclose(runner.infer(x), out["boxes"])
    assert list(out) == ["boxes", "scores"]
    np.testing.assert_allclose(out["boxes"], np.concatenate([2 * x[:, :1]] * 2, axis=1))
    np.testing.assert_allclose(out["scores"], np.concatenate([3 * x[:, :1]] * 2, axis=1))


def test_runner_on_a_foreign_engine_file(engine: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine.write_bytes(b"plan from another TensorRT")
    with pytest.raises(BckdError, match=r"could not load engine .*magicTagRead.*rebuild it here"):
        with open_runner("tensorrt", engine, card={}):
            pass


def test_runner_on_dla_sets_the_core_before_deserializing(tmp_path: Path, trt_env: TrtEnv) -> None:
    trt_env("10.3.0")
    build_engine(tiny_onnx(tmp_path / "m.onnx"), tmp_path / "m.engine", dla_core=1)
    runner = open_runner("tensorrt", tmp_path / "m.engine")
    assert runner.device == "dla:1"
    with runner:
        assert runner._state["runtime"].DLA_core == 1


# -- CUDA helpers ----------------------------------------------------------------------------------
def test_cuda_python_call_convention() -> None:
    props = types.SimpleNamespace(name=b"Orin\0\0\0", major=8, minor=7, totalGlobalMem=30 << 30)
    cudart = types.SimpleNamespace(cudaGetDeviceProperties=lambda d: (0, props),
                                   cudaMalloc=lambda n: (types.SimpleNamespace(value=2), None))
    api = CudaPython(cudart)
    info = api.device_info()
    assert (info.name, info.compute_capability, info.sm) == ("Orin", "8.7", "sm_87")
    assert info.total_memory_mib == 30 << 10
    with pytest.raises(RuntimeError, match="CUDA runtime error"):
        api.malloc(16)


def test_event_timer_and_l4t(tmp_path: Path) -> None:
    timer = EventTimer(FakeCuda())
    timer.start("s")
    timer.stop("s")
    assert timer.elapsed_ms() == 1.25
    release = tmp_path / "nv_tegra_release"
    release.write_text("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64\n")
    assert l4t_release(release) == "36.4.3" and l4t_release(tmp_path / "none") is None


def test_tensorrt_modules_import_without_torch_tensorrt_or_cuda() -> None:
    code = (
        "import sys\n"
        "for m in ('torch', 'tensorrt', 'pycuda', 'cuda'): sys.modules[m] = None\n"
        "import export.trt, export.trt.builder, runtime.backends.tensorrt, runtime.cuda\n"
        "from runtime.backends import BACKENDS; assert 'tensorrt' in BACKENDS\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('onnx', 'onnxruntime'))\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr


# -- a real engine (needs tensorrt and a GPU) ------------------------------------------------------
def test_real_engine_matches_onnxruntime(tmp_path: Path) -> None:
    trt = pytest.importorskip("tensorrt", reason="tensorrt is not installed: no real engine is built")
    try:
        runtime.cuda.device_info()
    except Exception as exc:  # no CUDA binding or no GPU
        pytest.skip(f"no usable CUDA device for TensorRT {trt.__version__}: {exc}")
    ort = pytest.importorskip("onnxruntime")
    onnx_path = tiny_onnx(tmp_path / "m.onnx")
    precision = "fp32"
    card = build_engine(onnx_path, tmp_path / "m.engine", precision=precision, workspace_mib=256)
    x = np.random.default_rng(0).standard_normal((2, 3, *SIZE), dtype=np.float32)
    with open_runner("tensorrt", tmp_path / "m.engine") as runner:
        y = runner.infer(x)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ref = session.run(None, {"input": x})[0]
    np.testing.assert_allclose(y, ref, atol=1e-5)
    assert card["device"]["name"] == runtime.cuda.device_info().name
    assert os.path.getsize(tmp_path / "m.engine") > 0


def test_static_model_calibration_needs_its_shape(tmp_path: Path, trt_env: TrtEnv) -> None:
    trt_env("10.3.0")
    onnx_path = tiny_onnx(tmp_path / "s.onnx", dynamic=False)
    with pytest.raises(BckdError, match=r"calibration batches of shape \(2, 3, 64, 96\) do not match "
                                        r"the static input 'input' \(1, 3, 64, 96\)"):
        build_engine(onnx_path, tmp_path / "s.engine", precision="int8", calibrator=batches(2))
    card = build_engine(onnx_path, tmp_path / "s.engine", precision="int8",
                        calibrator=batches(2, (1, 3, *SIZE)))
    assert card["profile"] is None and Builder.last.config.profiles == []
    assert Builder.last.config.calibration_profile is None and card["calibration"]["batches"] == 2


def test_a_missing_flag_is_loud_not_a_silent_fp32_build() -> None:
    from export.trt.builder import configure, network_flag_mask
    from trt_fakes import FakeConfig

    trt11 = fake_tensorrt("11.1.0")
    with pytest.raises(RuntimeError, match="no builder flag FP16"):
        configure(trt11, trt11.Builder(None), FakeConfig(), plan("10.3.0"), "input")
    with pytest.raises(RuntimeError, match="no network creation flag EXPLICIT_BATCH"):
        network_flag_mask(trt11, plan("8.6.2").network_flags)
    assert network_flag_mask(trt11, ["STRONGLY_TYPED"]) == 1  # renumbered to 0 in 11.x
