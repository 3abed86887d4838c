"""The engine card: what a TensorRT engine is, what built it and for which GPU.

The engine stays a plain serialized plan (loadable by ``trtexec --loadEngine``); everything else
goes into ``<engine>.card.json`` (architecture.md rule 3): TensorRT version, GPU name, compute
capability and DLA core (what the runner checks before deserializing), precision, profile shapes,
I/O tensors, builder options and flags, timing cache, calibration, the source ONNX's sha256, and
the ONNX card's model fields (classes, preprocess, input size, ...) so later stages need no ONNX.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from export.trt.onnx_model import OnnxFacts
from export.trt.plan import BuildPlan
from runtime.backends.tensorrt import ENGINE_KIND
from runtime.card import new_card
from runtime.cuda import DeviceInfo
from runtime.files import sha256_file
from runtime.trt_versions import TrtVersion

# Fields of the ONNX card that describe the ONNX file itself, not the model.
_NOT_CARRIED = frozenset({
    "card_version", "kind", "created", "host", "onnx", "sha256", "parity", "simplified",
    "simplifier", "simplify_error", "tools", "precision", "source",
})


def engine_card(*, facts: OnnxFacts, plan: BuildPlan, device: DeviceInfo, version: TrtVersion,
                version_text: str, builder: str, engine_file: Path, io: dict[str, Any],
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The card of ``engine_file`` (hashed as written), built from ``facts`` by ``plan``."""
    carried = {k: v for k, v in (facts.card or {}).items() if k not in _NOT_CARRIED}
    card = new_card(ENGINE_KIND, **carried)
    card["precision"] = plan.options.precision
    card["tensorrt"] = {"version": str(version), "version_full": version_text, "builder": builder,
                        **plan.to_card()}
    card["device"] = dict(device.to_dict(), dla_core=plan.options.dla_core)
    card["profile"] = {facts.input.name: plan.profile.to_dict()} if plan.profile else None
    card["io"] = io
    card["builder_options"] = plan.options.to_card()
    card["timing_cache"] = plan.options.to_card()["timing_cache"]
    card["calibration"] = None
    card["fp16_onnx"] = None
    card.update(extra or {})
    card["source"] = {"path": str(facts.path), "sha256": facts.sha256,
                      "had_card": facts.card is not None}
    card["sha256"] = sha256_file(engine_file)
    return card
