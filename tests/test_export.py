"""Torch -> ONNX export: parity at a size other than the traced one, card (sidecar and ONNX
metadata), simplifier fallback, checks and safe writing."""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
nn = torch.nn
F = torch.nn.functional

from export import ExportWarning, check_onnx_file, export_onnx, read_onnx_card  # noqa: E402
from export import onnx_export  # noqa: E402
from export.parity import combine_parity, compare_output, skipped_parity  # noqa: E402
from runtime.card import card_path, read_card  # noqa: E402
from runtime.errors import BckdError  # noqa: E402
from runtime.files import sha256_file  # noqa: E402

TRACE_SIZE = (32, 32)
NUM_CLASSES = 4


class TinySegNet(nn.Module):
    """Stride-2 conv stem, BN, 1x1 classifier, bilinear upsampling back to the input size."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, NUM_CLASSES, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.head(F.relu(self.bn(self.stem(x))))
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


def tiny_model() -> TinySegNet:
    torch.manual_seed(0)
    model = TinySegNet()
    with torch.no_grad():  # non-trivial BN statistics, so folding them is actually tested
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model


TRAIN_CARD = {
    "kind": "checkpoint",
    "arch": "tiny",
    "classes": ["a", "b", "c", "d"],
    "preprocess": {"mean": [0.5] * 3, "std": [0.25] * 3},
}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or p.suffix == ".tmp")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("export") / "tiny.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean export warns about nothing
        card = export_onnx(tiny_model(), out, TRACE_SIZE, card=TRAIN_CARD)
    return out, card


SUMMARY = ("max_abs_diff", "mean_abs_diff", "argmax_agreement")


def test_parity_at_another_size_is_recorded(exported: tuple[Path, dict]) -> None:
    _, card = exported
    parity = card["parity"]
    assert parity["ok"] is True and parity["reference"] == "torch"
    assert parity["size"] != list(TRACE_SIZE) and parity["batch"] == 2
    assert parity["tol"] == 1e-4 and parity["min_argmax_agreement"] == 0.9999
    ort = parity["backends"]["onnxruntime"]
    logits = ort["outputs"]["logits"]
    assert logits["max_abs_diff"] <= 1e-4
    assert logits["argmax_agreement"] >= 0.9999
    assert {"mean_abs_diff", "tol", "ok"} <= logits.keys()
    # single output: the backend's summary is that output's numbers
    assert {k: ort[k] for k in SUMMARY} == {k: logits[k] for k in SUMMARY}


def test_parity_covers_openvino_at_f32(exported: tuple[Path, dict]) -> None:
    pytest.importorskip("openvino", reason="openvino is not installed; its parity is skipped")
    parity = exported[1]["parity"]
    ov = parity["backends"]["openvino"]
    assert ov["ok"] is True and ov["max_abs_diff"] <= 1e-4 and ov["argmax_agreement"] >= 0.9999
    assert ov["runner"]["inference_precision"] == "f32"  # read back, not just requested
    # the top-level numbers are the worst case over backends
    ran = parity["backends"].values()
    assert parity["max_abs_diff"] == max(b["max_abs_diff"] for b in ran)
    assert parity["argmax_agreement"] == min(b["argmax_agreement"] for b in ran)


def test_missing_openvino_is_skipped_not_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # makes `import openvino` fail
    card = export_onnx(tiny_model(), tmp_path / "m.onnx", TRACE_SIZE, simplify=False)
    ov = card["parity"]["backends"]["openvino"]
    assert ov["skipped"] is True and "openvino is needed" in ov["reason"]
    assert "pip install" in ov["reason"]
    assert card["parity"]["ok"] is True


def test_argmax_agreement_is_part_of_the_tolerance() -> None:
    ref = np.zeros((1, 2, 100, 100), dtype=np.float32)
    ref[:, 0] = 1e-5  # class 0 wins everywhere by 1e-5
    cand = ref.copy()
    cand[0, 1, 0, 0] = 2e-5  # one pixel of 10^4 flips, well inside the logit tolerance
    assert compare_output(ref, cand, 1e-4)["ok"] is True
    assert compare_output(ref, cand, 1e-4, 0.9999)["ok"] is True  # exactly 99.99 %
    cand[0, 1, 0, 1] = 2e-5
    result = compare_output(ref, cand, 1e-4, 0.9999)
    assert result["ok"] is False and result["argmax_agreement"] == pytest.approx(0.9998)


def test_unknown_parity_backend_is_refused_before_tracing(tmp_path: Path) -> None:
    with pytest.raises(BckdError, match="unknown backend 'onxruntime'; did you mean 'onnxruntime'"):
        export_onnx(tiny_model(), tmp_path / "m.onnx", TRACE_SIZE, parity_backends=["onxruntime"])
    assert list(tmp_path.iterdir()) == []


def test_combined_parity_needs_a_backend_that_ran() -> None:
    section = combine_parity({"openvino": skipped_parity("openvino", "not installed")})
    assert section["ok"] is False and "openvino: not installed" in section["error"]


def test_card_fields(exported: tuple[Path, dict]) -> None:
    out, card = exported
    assert read_card(out) == json.loads(json.dumps(card))
    assert card["kind"] == "onnx" and card["arch"] == "tiny" and card["precision"] == "fp32"
    assert card["preprocess"] == TRAIN_CARD["preprocess"]
    info = card["onnx"]
    assert info["opset"] == 17
    assert info["input_shape"] == ["batch", 3, "height", "width"]
    assert info["output_shape"] == ["batch", NUM_CLASSES, "height", "width"]  # K pinned, not symbolic
    assert info["dynamic_axes"]["input"] == {"0": "batch", "2": "height", "3": "width"}
    assert card["simplified"] is True and card["simplifier"] == "onnxsim"
    assert card["simplify_error"] is None and card["simplify_skipped"] is None
    assert {"torch", "onnx", "onnxruntime", "onnxsim", "onnxslim"} <= card["tools"].keys()
    assert card["sha256"] == sha256_file(out)


def test_card_is_embedded_in_onnx_metadata(exported: tuple[Path, dict]) -> None:
    out, card = exported
    embedded = read_onnx_card(out)
    # the copy is the sidecar card minus the file's own hash, which the file cannot contain
    assert "sha256" not in embedded
    assert embedded == {k: v for k, v in read_card(out).items() if k != "sha256"}
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(props["bckd.classes"]) == TRAIN_CARD["classes"]
    assert json.loads(props["bckd.preprocess"]) == TRAIN_CARD["preprocess"]
    assert json.loads(props["bckd.kind"]) == "onnx"


def test_embedding_replaces_old_card_and_keeps_other_metadata() -> None:
    proto = onnx.ModelProto()
    proto.metadata_props.add(key="author", value="me")
    onnx_export.embed_card(proto, {"kind": "onnx", "classes": ["x"], "sha256": "ab"})
    onnx_export.embed_card(proto, {"kind": "onnx", "classes": ["y"]})
    keys = [p.key for p in proto.metadata_props]
    assert keys.count("bckd.card") == 1 and "author" in keys
    assert read_onnx_card(proto) == {"kind": "onnx", "classes": ["y"]}
    assert read_onnx_card(onnx.ModelProto()) is None


def test_corrupt_embedded_card_is_a_user_error() -> None:
    proto = onnx.ModelProto()
    proto.metadata_props.add(key="bckd.card", value="{not json")
    with pytest.raises(BckdError, match="bckd.card.*not valid JSON"):
        read_onnx_card(proto)


def test_onnx_passes_full_check_and_runs_at_other_batch(exported: tuple[Path, dict]) -> None:
    import onnxruntime as ort

    proto = check_onnx_file(exported[0])
    onnx.checker.check_model(onnx.load(str(exported[0])), full_check=True)
    assert [i.name for i in proto.graph.input] == ["input"]
    session = ort.InferenceSession(str(exported[0]), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((3, 3, 48, 40), dtype=np.float32)
    (y,) = session.run(None, {"input": x})
    assert y.shape == (3, NUM_CLASSES, 48, 40)


def test_existing_output_is_refused_and_untouched(exported: tuple[Path, dict]) -> None:
    out, _ = exported
    before = out.read_bytes(), card_path(out).read_bytes()
    with pytest.raises(BckdError, match="already exists"):
        export_onnx(tiny_model(), out, TRACE_SIZE)
    assert (out.read_bytes(), card_path(out).read_bytes()) == before
    assert leftovers(out.parent) == []


def test_force_overwrites(tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    out.write_bytes(b"old")
    card = export_onnx(tiny_model(), out, TRACE_SIZE, force=True)
    assert card["sha256"] == sha256_file(out)
    assert leftovers(tmp_path) == []


def test_static_export(tmp_path: Path) -> None:
    card = export_onnx(tiny_model(), tmp_path / "s.onnx", TRACE_SIZE, dynamic=False)
    assert card["onnx"]["input_shape"] == [1, 3, *TRACE_SIZE]
    assert card["onnx"]["dynamic_axes"] == {}
    assert card["parity"]["size"] == list(TRACE_SIZE) and card["parity"]["batch"] == 1
    with pytest.raises(BckdError, match="static input size"):
        export_onnx(tiny_model(), tmp_path / "s2.onnx", TRACE_SIZE, dynamic=False, parity_size=(64, 64))


def test_model_mode_and_warning_filters_are_restored(tmp_path: Path) -> None:
    model = tiny_model().train()
    filters = list(warnings.filters)
    export_onnx(model, tmp_path / "m.onnx", TRACE_SIZE, simplify=False)
    assert model.training
    assert warnings.filters == filters


def test_source_checkpoint_is_hashed(tmp_path: Path) -> None:
    ckpt = tmp_path / "student.pt"
    ckpt.write_bytes(b"weights")
    card = export_onnx(tiny_model(), tmp_path / "m.onnx", TRACE_SIZE, card={"source": str(ckpt)},
                       simplify=False)
    assert card["source"] == {"path": str(ckpt), "sha256": sha256_file(ckpt)}


@pytest.mark.parametrize("corrupt", ["garbage", "truncated", "empty"])
def test_corrupt_onnx_is_a_user_error(exported: tuple[Path, dict], tmp_path: Path, corrupt: str) -> None:
    good = exported[0].read_bytes()
    data = {"garbage": np.random.default_rng(0).bytes(512), "truncated": good[: len(good) // 2],
            "empty": b""}[corrupt]
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(data)
    with pytest.raises(BckdError, match="is not a valid ONNX model .*re-export it"):
        check_onnx_file(bad)


def test_missing_onnx_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(BckdError, match="not found"):
        check_onnx_file(tmp_path / "nope.onnx")


@pytest.mark.parametrize("opset", [13, 99])
def test_unsupported_opset_is_refused(tmp_path: Path, opset: int) -> None:
    with pytest.raises(BckdError, match=f"opset {opset} is not supported"):
        export_onnx(tiny_model(), tmp_path / "m.onnx", TRACE_SIZE, opset=opset)
    assert list(tmp_path.iterdir()) == []


def broken(*args: object, **kwargs: object) -> None:
    raise RuntimeError("boom\nsecond line")


def test_onnxslim_runs_when_onnxsim_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxsim

    monkeypatch.setattr(onnxsim, "simplify", broken)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExportWarning)  # a working fallback is recorded, not warned
        card = export_onnx(tiny_model(), tmp_path / "m.onnx", TRACE_SIZE)
    assert card["simplified"] is True and card["simplifier"] == "onnxslim"
    assert card["simplify_error"] == "onnxsim: boom"
    assert card["onnx"]["input_shape"] == ["batch", 3, "height", "width"]  # still dynamic
    assert card["parity"]["ok"] is True
    check_onnx_file(tmp_path / "m.onnx")


def test_onnxslim_runs_when_onnxsim_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxsim", None)
    card = export_onnx(tiny_model(), tmp_path / "m.onnx", TRACE_SIZE)
    assert card["simplifier"] == "onnxslim"
    assert card["simplify_error"].startswith("onnxsim: onnxsim is needed")
    assert "pip install onnxsim" in card["simplify_error"]


def test_simplifier_failure_keeps_unsimplified_graph(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnxsim
    import onnxslim

    monkeypatch.setattr(onnxsim, "simplify", broken)
    monkeypatch.setattr(onnxslim, "slim", broken)
    with pytest.warns(ExportWarning, match="could not simplify.*onnxsim: boom; onnxslim: boom"):
        card = export_onnx(tiny_model(), tmp_path / "m.onnx", TRACE_SIZE)
    assert card["simplified"] is False and card["simplifier"] is None
    assert card["simplify_error"] == "onnxsim: boom; onnxslim: boom"
    assert card["parity"]["ok"] is True
    check_onnx_file(tmp_path / "m.onnx")
    assert leftovers(tmp_path) == []


def test_turned_off_simplification_says_so(tmp_path: Path) -> None:
    card = export_onnx(tiny_model(), tmp_path / "m.onnx", TRACE_SIZE, simplify=False)
    assert card["simplified"] is False and card["simplifier"] is None
    assert card["simplify_error"] is None and "simplify=False" in card["simplify_skipped"]


def test_parity_failure_warns_but_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Perturb the ONNX side by shifting every candidate output.
    real = onnx_export.check_parity

    def shifted(reference, candidate, **kw):  # type: ignore[no-untyped-def]
        return real(reference, lambda x: {k: v + 1e-2 for k, v in candidate(x).items()}, **kw)

    monkeypatch.setattr(onnx_export, "check_parity", shifted)
    out = tmp_path / "m.onnx"
    with pytest.warns(ExportWarning, match="parity check failed"):
        card = export_onnx(tiny_model(), out, TRACE_SIZE, simplify=False)
    assert out.is_file() and read_card(out)["parity"]["ok"] is False
    logits = card["parity"]["backends"]["onnxruntime"]["outputs"]["logits"]
    assert logits["max_abs_diff"] == pytest.approx(1e-2, rel=1e-3)


def test_failed_export_leaves_nothing(tmp_path: Path) -> None:
    class NotLogits(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(2, 3))

    with pytest.raises(BckdError, match=r"must return one \(B, K, H, W\) logits tensor"):
        export_onnx(NotLogits(), tmp_path / "m.onnx", TRACE_SIZE)
    assert list(tmp_path.iterdir()) == []


def test_non_dynamic_model_fails_parity_not_crash(tmp_path: Path) -> None:
    class FixedReshape(TinySegNet):
        # Bakes the traced size into the graph, so the dynamic export cannot run at another size.
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = super().forward(x)
            if torch.jit.is_tracing():
                return y.reshape(1, NUM_CLASSES, *TRACE_SIZE)
            return y

    out = tmp_path / "m.onnx"
    with pytest.warns(ExportWarning, match="parity check failed.*failed to run"):
        card = export_onnx(FixedReshape(), out, TRACE_SIZE, simplify=False)
    assert card["parity"]["ok"] is False and out.is_file()
    assert "max_abs_diff" not in card["parity"]  # nothing was compared
