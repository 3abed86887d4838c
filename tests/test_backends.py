"""Backend runners: ONNX Runtime vs torch, input checks, load errors, registry, torch-free import."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from runtime.backends import BACKENDS, InputSpec, Runner, open_runner
from runtime.errors import BckdError

ROOT = Path(__file__).resolve().parents[1]
SIZE = (32, 32)


def tiny_torch_model():  # type: ignore[no-untyped-def]
    torch = pytest.importorskip("torch")
    nn, F = torch.nn, torch.nn.functional

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 6, 3, stride=2, padding=1)
            self.head = nn.Conv2d(6, 5, 1)

        def forward(self, x):  # type: ignore[no-untyped-def]
            y = self.head(F.relu(self.stem(x)))
            return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)

    torch.manual_seed(0)
    return Tiny().eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One tiny model exported dynamic and static, plus the torch original."""
    pytest.importorskip("onnxruntime")
    from export import export_onnx

    folder = tmp_path_factory.mktemp("backends")
    model = tiny_torch_model()
    export_onnx(model, folder / "dyn.onnx", SIZE, card={"input_size": list(SIZE)}, simplify=False)
    export_onnx(model, folder / "static.onnx", SIZE, card={"input_size": list(SIZE)}, dynamic=False,
                simplify=False)
    return {"torch": model, "dynamic": folder / "dyn.onnx", "static": folder / "static.onnx"}


def images(batch: int, h: int, w: int, channels: int = 3) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((batch, channels, h, w), dtype=np.float32)


def test_onnxruntime_matches_torch(models: dict) -> None:
    import torch

    x = images(2, 40, 56)
    with open_runner("onnxruntime", models["dynamic"]) as runner:
        y = runner.infer(x)
        assert runner.input_spec == InputSpec("input", (None, 3, None, None), np.dtype(np.float32))
    with torch.no_grad():
        expected = models["torch"](torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(y, expected, atol=1e-4)


def test_runner_records_what_it_measures(models: dict) -> None:
    runner = open_runner("onnxruntime", models["static"], threads=1, graph_optimization="basic")
    assert isinstance(runner, Runner) and not runner.active
    with runner:
        assert runner.active
        info = runner.describe()
    assert not runner.active
    assert info == {"backend": "onnxruntime", "device": "cpu", "precision": "fp32", "threads": 1,
                    "artifact": str(models["static"])}


def test_default_threads_recorded_as_cpu_count(models: dict) -> None:
    import os

    assert open_runner("onnxruntime", models["dynamic"]).threads == os.cpu_count()


@pytest.mark.parametrize(
    "x, message",
    [
        (images(1, 32, 32, channels=1), r"has 1 channels but the model input \(1, 3, 32, 32\)"),
        (images(1, 100, 100), r"input shape \(1, 3, 100, 100\) does not match the model input "
                              r"\(1, 3, 32, 32\) from static.onnx; "
                              r"resize to 32x32 \(the card's input size\)"),
        (images(1, 32, 32).astype(np.float64), r"input dtype float64 .* x.astype\(np.float32\)"),
        (images(1, 32, 32)[0], r"input has 3 dimensions"),
        (images(1, 32, 32).transpose(0, 2, 3, 1), r"looks like NHWC"),
        (images(2, 32, 32), r"fixed batch size of 1"),
    ],
    ids=["channels", "size", "float64", "ndim", "nhwc", "batch"],
)
def test_bad_input_is_a_user_error(models: dict, x: np.ndarray, message: str) -> None:
    with open_runner("onnxruntime", models["static"]) as runner:
        with pytest.raises(BckdError, match=message):
            runner.infer(x)


def test_dynamic_model_still_checks_channels(models: dict) -> None:
    with open_runner("onnxruntime", models["dynamic"]) as runner:
        assert runner.infer(images(1, 17, 23)).shape == (1, 5, 17, 23)
        with pytest.raises(BckdError, match=r"model input \(N, 3, H, W\) from dyn.onnx expects 3"):
            runner.infer(images(1, 17, 23, channels=4))


@pytest.mark.parametrize("content", [b"\x00\x01garbage\xff" * 40, b"", b"not an onnx model\n"])
def test_corrupt_file_is_a_user_error(tmp_path: Path, content: bytes) -> None:
    pytest.importorskip("onnxruntime")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(content)
    with pytest.raises(BckdError, match=r"onnxruntime could not load .*bad.onnx .*re-export it"):
        with open_runner("onnxruntime", bad):
            pass


def test_missing_file_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(BckdError, match="not found"):
        with open_runner("onnxruntime", tmp_path / "nope.onnx"):
            pass


def test_infer_needs_an_active_runner(models: dict) -> None:
    with pytest.raises(RuntimeError, match="not active"):
        open_runner("onnxruntime", models["dynamic"]).infer(images(1, 32, 32))


def test_misspelt_backend_suggests_the_right_one() -> None:
    with pytest.raises(BckdError, match=r"unknown backend 'onnxruntme'; did you mean 'onnxruntime'\?"):
        open_runner("onnxruntme", "model.onnx")


def test_bad_options_are_user_errors(models: dict) -> None:
    with pytest.raises(BckdError, match=r"option for backend onnxruntime 'thread'; did you mean 'threads'"):
        open_runner("onnxruntime", models["dynamic"], thread=2)
    with pytest.raises(BckdError, match=r"unknown graph optimization level 'full'"):
        open_runner("onnxruntime", models["dynamic"], graph_optimization="full")
    with pytest.raises(BckdError, match=r"'CUDAExecutionProvidr'; did you mean 'CUDAExecutionProvider'"):
        with open_runner("onnxruntime", models["dynamic"], providers=["CUDAExecutionProvidr"]):
            pass


def test_provider_missing_from_this_build_is_named(models: dict) -> None:
    import onnxruntime as ort

    absent = [p for p in ort.get_all_providers() if p not in ort.get_available_providers()]
    if not absent:
        pytest.skip("this onnxruntime build offers every provider")
    with pytest.raises(BckdError, match=f"{absent[0]} is not in this onnxruntime build"):
        with open_runner("onnxruntime", models["dynamic"], providers=[absent[0]]):
            pass


@pytest.mark.parametrize("name", BACKENDS.names())
def test_every_backend_is_a_runner(name: str) -> None:
    assert issubclass(BACKENDS.get(name), Runner)


def test_device_side_imports_are_torch_free() -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import runtime.backends, runtime.backends.onnxrt, runtime.profile, export, export.parity\n"
        "heavy = sorted(m for m in sys.modules\n"
        "               if m.split('.')[0] in ('onnxruntime', 'onnx', 'onnxsim'))\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
