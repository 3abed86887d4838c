"""OpenVINO: ONNX -> IR conversion (card, FP16 weights, safe writing) and the openvino backend
(explicit precision read back, dynamic shapes, async queue, INT8), plus benchmark_app on the IR."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

ov = pytest.importorskip("openvino", reason="openvino is not installed (pip install 'bckd[openvino]')")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("torch")

from export import ExportWarning, convert_to_openvino, export_onnx  # noqa: E402
from runtime.backends import open_runner  # noqa: E402
from runtime.card import card_path, read_card, write_card  # noqa: E402
from runtime.errors import BckdError  # noqa: E402
from runtime.files import sha256_file  # noqa: E402
from test_export import NUM_CLASSES, TRACE_SIZE, TRAIN_CARD, leftovers, tiny_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RUN_SIZE = (48, 80)  # not the traced 32x32
# FP16-stored weights are rounded to 11 significant bits, so their logits move by ~1e-3.
TOLERANCE = {"ir": 1e-4, "ir_fp16": 5e-3, "onnx": 1e-4}


def cpu_capabilities() -> list[str]:
    return list(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("openvino")
    onnx_path = folder / "tiny.onnx"
    export_onnx(tiny_model(), onnx_path, TRACE_SIZE, card=TRAIN_CARD)
    return {
        "onnx": onnx_path, "ir": folder / "tiny.xml", "ir_fp16": folder / "tiny16.xml",
        "card": convert_to_openvino(onnx_path, folder / "tiny.xml"),
        "card_fp16": convert_to_openvino(onnx_path, folder / "tiny16.xml", compress_fp16=True),
    }


def images(batch: int = 2, size: tuple[int, int] = RUN_SIZE) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((batch, 3, *size), dtype=np.float32)


def ort_logits(onnx_path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


# -- conversion --------------------------------------------------------------------------------------
def test_ir_card(artifacts: dict) -> None:
    card, xml = artifacts["card"], artifacts["ir"]
    assert read_card(xml) == json.loads(json.dumps(card))
    assert card["kind"] == "openvino-ir" and card["arch"] == "tiny"
    assert card["classes"] == TRAIN_CARD["classes"] and card["preprocess"] == TRAIN_CARD["preprocess"]
    assert card["input_size"] == list(TRACE_SIZE)
    assert card["precision"] == "fp32" and card["weights_precision"] == "fp32"
    assert card["source"] == {"path": str(artifacts["onnx"]), "sha256": sha256_file(artifacts["onnx"]),
                              "kind": "onnx"}
    assert card["sha256"] == sha256_file(xml)
    assert card["bin_sha256"] == sha256_file(xml.with_suffix(".bin"))
    assert card["openvino"]["input_shape"] == [None, 3, None, None]
    assert card["openvino"]["output_shape"] == [None, NUM_CLASSES, None, None]
    assert card["openvino"]["compress_to_fp16"] is False
    assert "openvino" in card["tools"] and card["notes"] == []
    assert "parity" not in card and "onnx" not in card  # the ONNX step's own fields stay behind


def test_fp16_weights_are_recorded_and_stored(artifacts: dict) -> None:
    card = artifacts["card_fp16"]
    assert card["weights_precision"] == "fp16" and card["openvino"]["compress_to_fp16"] is True
    assert card["precision"] == "fp32"  # compute precision is chosen at run time
    fp32_bin = artifacts["ir"].with_suffix(".bin").stat().st_size
    assert artifacts["ir_fp16"].with_suffix(".bin").stat().st_size < 0.6 * fp32_bin


def test_ir_passes_onnx_checker_first(artifacts: dict) -> None:
    onnx.checker.check_model(onnx.load(str(artifacts["onnx"])), full_check=True)


def test_existing_ir_is_refused_and_untouched(artifacts: dict) -> None:
    xml = artifacts["ir"]
    files = (xml, xml.with_suffix(".bin"), card_path(xml))
    before = [f.read_bytes() for f in files]
    with pytest.raises(BckdError, match="already exists"):
        convert_to_openvino(artifacts["onnx"], xml)
    assert [f.read_bytes() for f in files] == before
    assert leftovers(xml.parent) == []


def test_a_lone_bin_is_refused_too(artifacts: dict, tmp_path: Path) -> None:
    (tmp_path / "m.bin").write_bytes(b"old weights")
    with pytest.raises(BckdError, match="m.bin already exists"):
        convert_to_openvino(artifacts["onnx"], tmp_path / "m.xml")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bin"]


def test_force_overwrites_every_file(artifacts: dict, tmp_path: Path) -> None:
    xml = tmp_path / "m.xml"
    for path in (xml, xml.with_suffix(".bin"), card_path(xml)):
        path.write_text("old")
    card = convert_to_openvino(artifacts["onnx"], xml, force=True)
    assert card["sha256"] == sha256_file(xml) and card["bin_sha256"] == sha256_file(xml.with_suffix(".bin"))
    assert read_card(xml)["sha256"] == card["sha256"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bin", "m.xml", "m.xml.card.json"]


@pytest.mark.parametrize("corrupt", ["garbage", "truncated"])
def test_corrupt_onnx_is_a_user_error(artifacts: dict, tmp_path: Path, corrupt: str) -> None:
    good = artifacts["onnx"].read_bytes()
    bad = tmp_path / "bad.onnx"
    bad.write_bytes({"garbage": b"\x08\x07not onnx" * 64, "truncated": good[: len(good) // 2]}[corrupt])
    with pytest.raises(BckdError, match="is not a valid ONNX model"):
        convert_to_openvino(bad, tmp_path / "bad.xml")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx"]


def test_ir_path_must_end_in_xml(artifacts: dict, tmp_path: Path) -> None:
    with pytest.raises(BckdError, match=r"must end in \.xml"):
        convert_to_openvino(artifacts["onnx"], tmp_path / "m.bin")


def test_bare_onnx_converts_with_a_note(artifacts: dict, tmp_path: Path) -> None:
    proto = onnx.load(str(artifacts["onnx"]))
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "bare.onnx"))
    with pytest.warns(ExportWarning, match="bare ONNX file"):
        card = convert_to_openvino(tmp_path / "bare.onnx", tmp_path / "bare.xml")
    assert "bare ONNX file" in card["notes"][0] and "classes" not in card
    assert card["source"]["kind"] is None and card["precision"] == "fp32"
    with open_runner("openvino", tmp_path / "bare.xml") as runner:
        assert runner.infer(images()).shape == (2, NUM_CLASSES, *RUN_SIZE)


def test_onnx_without_sidecar_uses_its_embedded_card(artifacts: dict, tmp_path: Path) -> None:
    shutil.copy(artifacts["onnx"], tmp_path / "m.onnx")  # no sidecar
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExportWarning)
        card = convert_to_openvino(tmp_path / "m.onnx", tmp_path / "m.xml")
    assert card["classes"] == TRAIN_CARD["classes"] and "bckd.card" in card["notes"][0]


def test_stale_sidecar_is_refused(artifacts: dict, tmp_path: Path) -> None:
    onnx_path = tmp_path / "m.onnx"
    shutil.copy(artifacts["onnx"], onnx_path)
    write_card(onnx_path, dict(read_card(artifacts["onnx"]), sha256="0" * 64))
    with pytest.raises(BckdError, match="the file changed after its card was written"):
        convert_to_openvino(onnx_path, tmp_path / "m.xml")


def test_static_input_shape(artifacts: dict, tmp_path: Path) -> None:
    card = convert_to_openvino(artifacts["onnx"], tmp_path / "s.xml", input_shape=(1, 3, *RUN_SIZE))
    assert card["openvino"]["input_shape"] == [1, 3, *RUN_SIZE]
    with open_runner("openvino", tmp_path / "s.xml") as runner:
        assert runner.infer(images(1)).shape == (1, NUM_CLASSES, *RUN_SIZE)
        with pytest.raises(BckdError, match="does not match the model input"):
            runner.infer(images(1, (64, 64)))


# -- backend -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["ir", "ir_fp16", "onnx"])
def test_backend_matches_onnxruntime_at_f32(artifacts: dict, which: str) -> None:
    x = images()
    with open_runner("openvino", artifacts[which]) as runner:
        y = runner.infer(x)
        info = runner.describe()
    expected = ort_logits(artifacts["onnx"], x)
    assert y.shape == expected.shape == (2, NUM_CLASSES, *RUN_SIZE)
    assert np.abs(y - expected).max() <= TOLERANCE[which]
    assert (y.argmax(1) == expected.argmax(1)).mean() >= 0.9999
    assert info["inference_precision"] == "f32" and info["precision"] == "fp32"
    assert info["device"] == "CPU" and info["hint"] == "latency" and info["threads"] >= 1


def test_f32_is_set_even_where_openvino_defaults_to_bf16(artifacts: dict) -> None:
    if "BF16" not in cpu_capabilities():
        pytest.skip("this CPU has no bf16 units, so OpenVINO's default is already f32")
    core = ov.Core()
    default = core.compile_model(core.read_model(str(artifacts["ir"])), "CPU")
    assert default.get_property("INFERENCE_PRECISION_HINT").get_type_name() == "bf16"
    with open_runner("openvino", artifacts["ir"]) as runner:
        assert runner.inference_precision == "f32"


def test_bf16_when_asked(artifacts: dict) -> None:
    if "BF16" not in cpu_capabilities():
        pytest.skip("this CPU has no bf16 units")
    x = images()
    with open_runner("openvino", artifacts["ir"], precision="bf16") as runner:
        y = runner.infer(x)
        info = runner.describe()
    assert info["inference_precision"] == "bf16" and info["precision"] == "bf16"
    expected = ort_logits(artifacts["onnx"], x)
    assert 1e-4 < np.abs(y - expected).max() < 0.1  # really bf16, and still the same model
    assert (y.argmax(1) == expected.argmax(1)).mean() > 0.95


def test_f16_runs_in_f16_or_is_refused(artifacts: dict) -> None:
    runner = open_runner("openvino", artifacts["ir"], precision="fp16")  # alias of f16
    try:
        with runner:
            assert runner.inference_precision == "f16" and runner.precision == "fp16"
    except BckdError as exc:  # e.g. x86 CPUs, which run an f16 request in bf16 or f32
        assert "when asked for f16" in str(exc)


def test_threads_hint_and_async_queue(artifacts: dict) -> None:
    batches = [images(1), images(2, (64, 64)), images(1, (40, 56))]
    with open_runner("openvino", artifacts["ir"], hint="throughput", threads=1,
                     num_requests=2) as runner:
        outputs = runner.infer_async(batches)
        sync = [runner.infer(x) for x in batches]
        info = runner.describe()
    assert info["threads"] == 1 and info["hint"] == "throughput" and info["num_requests"] == 2
    for got, want in zip(outputs, sync):
        np.testing.assert_array_equal(got, want)


def test_dynamic_batch_and_size(artifacts: dict) -> None:
    with open_runner("openvino", artifacts["ir"]) as runner:
        assert runner.input_spec.shape == (None, 3, None, None)
        for batch, size in [(1, (40, 56)), (3, (64, 64)), (2, TRACE_SIZE)]:
            assert runner.infer(images(batch, size)).shape == (batch, NUM_CLASSES, *size)
        with pytest.raises(BckdError, match="channels"):
            runner.infer(np.zeros((1, 4, 32, 32), np.float32))


@pytest.mark.parametrize("option, value, message", [
    ("precision", "fp8", r"unknown OpenVINO precision 'fp8'.*valid: bf16, f16, f32"),
    ("hint", "fast", r"unknown OpenVINO performance hint 'fast'.*valid: latency, throughput"),
    ("device", "TPU", r"unknown OpenVINO device 'TPU'.*valid: CPU, GPU, NPU"),
    ("threads", 0, "threads must be a positive integer"),
    ("num_requests", -1, "num_requests must be a positive integer"),
    ("streams", 2, r"unknown option for backend openvino 'streams'"),
])
def test_bad_options_are_refused(artifacts: dict, option: str, value: object, message: str) -> None:
    with pytest.raises(BckdError, match=message):
        open_runner("openvino", artifacts["ir"], **{option: value})


def test_unavailable_device_is_a_user_error(artifacts: dict) -> None:
    if "NPU" in ov.Core().available_devices:
        pytest.skip("this machine has an NPU")
    with pytest.raises(BckdError, match="device NPU is not available here"):
        with open_runner("openvino", artifacts["ir"], device="npu"):
            pass


def test_ir_without_bin_and_corrupt_ir_are_user_errors(artifacts: dict, tmp_path: Path) -> None:
    shutil.copy(artifacts["ir"], tmp_path / "m.xml")
    with pytest.raises(BckdError, match="has no weights file m.bin"):
        with open_runner("openvino", tmp_path / "m.xml", card={}):
            pass
    (tmp_path / "m.xml").write_text("<net broken")
    (tmp_path / "m.bin").write_bytes(b"")
    with pytest.raises(BckdError, match="openvino could not read"):
        with open_runner("openvino", tmp_path / "m.xml", card={}):
            pass


def test_int8_card_is_reported(artifacts: dict, tmp_path: Path) -> None:
    xml = tmp_path / "q.xml"
    shutil.copy(artifacts["ir"], xml)
    shutil.copy(artifacts["ir"].with_suffix(".bin"), xml.with_suffix(".bin"))
    write_card(xml, dict(artifacts["card"], precision="int8"))
    with open_runner("openvino", xml) as runner:
        assert runner.precision == "int8" and runner.inference_precision == "f32"


def test_qdq_onnx_becomes_an_int8_ir(artifacts: dict, tmp_path: Path) -> None:
    quant = pytest.importorskip("onnxruntime.quantization")

    class Reader(quant.CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": images(1, TRACE_SIZE)}] * 2)

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    qdq = tmp_path / "q.onnx"
    quant.quantize_static(str(artifacts["onnx"]), str(qdq), Reader(), quant_format=quant.QuantFormat.QDQ)
    # onnxruntime keeps the float model's embedded card; the FakeQuantize ops still say int8
    card = convert_to_openvino(qdq, tmp_path / "q.xml")
    assert card["openvino"]["fake_quantize_ops"] > 0 and card["precision"] == "int8"
    with open_runner("openvino", tmp_path / "q.xml") as runner:
        y = runner.infer(images())
        assert runner.precision == "int8" and runner.quantized and runner.inference_precision == "f32"
    assert (y.argmax(1) == ort_logits(artifacts["onnx"], images()).argmax(1)).mean() > 0.8


# -- outside tools and import hygiene -----------------------------------------------------------------
def benchmark_app() -> str | None:
    local = Path(sys.executable).parent / "benchmark_app"
    return str(local) if local.is_file() else shutil.which("benchmark_app")


@pytest.mark.skipif(benchmark_app() is None, reason="OpenVINO's benchmark_app is not installed")
def test_benchmark_app_loads_the_ir(artifacts: dict) -> None:
    shape = "[1,3,{},{}]".format(*RUN_SIZE)  # the IR is dynamic: benchmark_app needs a shape
    cmd = [benchmark_app(), "-m", str(artifacts["ir"]), "-d", "CPU", "-niter", "5", "-hint",
           "latency", "-infer_precision", "f32", "-shape", shape]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "INFERENCE_PRECISION_HINT: <Type: 'float32'>" in result.stdout
    assert "Throughput" in result.stdout


def test_conversion_and_backend_run_without_torch(artifacts: dict, tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import runtime.backends\n"
        "assert 'openvino' not in sys.modules, 'importing the backends loaded openvino'\n"
        "import numpy as np\n"
        "from export.openvino_export import convert_to_openvino\n"
        "from runtime.backends import open_runner\n"
        f"convert_to_openvino({str(artifacts['onnx'])!r}, {str(tmp_path / 'm.xml')!r})\n"
        f"with open_runner('openvino', {str(tmp_path / 'm.xml')!r}) as r:\n"
        "    r.infer(np.zeros((1, 3, 40, 40), np.float32))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
