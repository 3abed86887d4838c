"""The distillation benchmark keeps finished runs; a kept run trained under other loss settings
(a default changed since) must be trained again, not reported under today's name."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "benchmarks"))

import bench_distill  # noqa: E402


def test_settings_hold_defaults_and_options():
    got = bench_distill.loss_settings("bckd+cwd", {"bckd": {"boundary_weight": 800}})
    assert set(got) == {"bckd", "cwd"}
    assert got["bckd"]["boundary_weight"] == 800 and got["bckd"]["context_weight"] == 5.0
    assert got["bckd"]["teacher_boundary"] == "auto" and "ctx" not in got["bckd"]


def test_a_record_under_other_settings_is_stale(tmp_path):
    record = tmp_path / "bckd-s0.json"
    settings = bench_distill.loss_settings("bckd", {})
    record.write_text(json.dumps({"miou": 20.0, "settings": settings}))
    assert not bench_distill.stale(record, "bckd", {})
    settings["bckd"]["teacher_boundary"] = "soft"  # as kept before the default changed
    record.write_text(json.dumps({"miou": 20.0, "settings": settings}))
    assert bench_distill.stale(record, "bckd", {})
    assert not bench_distill.stale(record, "bckd", {"bckd": {"teacher_boundary": "soft"}})
    record.write_text(json.dumps({"miou": 20.0}))  # kept before settings were recorded
    assert not bench_distill.stale(record, "bckd", {})
