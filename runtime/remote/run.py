"""``bckd run --target NAME``: distil and export here, measure on the board.

The host trains and exports as always; each exported model then goes to the board (by content
hash, with its card), where ``bckd measure`` -- the same :func:`runtime.pipeline.measure` and
:func:`runtime.pipeline.deploy_rows` that a local run calls -- evaluates, profiles, converts to
OpenVINO IR and calibrates INT8 on the board itself. The rows, the artifacts built there (IR,
INT8 models with their cards) and the example predictions for report.html come back into the
run folder; each row says where it was measured.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable

import numpy as np

from runtime.errors import BckdError
from runtime.files import atomic_write_json

Log = Callable[[str], None]
ROWS = "rows.json"
EXAMPLES = "examples.npz"


def host_measured_on() -> dict[str, Any]:
    """Where a row measured on this machine was measured."""
    from runtime.report import host_info, package_versions

    return {"where": "host", "name": platform.node(), **host_info(),
            "versions": _runtime_versions(package_versions())}


def _runtime_versions(versions: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in versions.items()
            if k in ("onnxruntime", "onnxruntime-gpu", "openvino", "nncf", "tensorrt") and v}


# -- on the board ----------------------------------------------------------------------------
def cmd_measure(args: argparse.Namespace) -> None:
    """``bckd measure``: what ``bckd run`` does with one exported model, on this machine."""
    from runtime.config import RunConfig, from_dict
    from runtime.pipeline import deploy_rows, measure
    from runtime.remote.stages import artifact_files
    from runtime.report import host_info, package_versions
    from runtime.report_html import make_examples

    cfg = from_dict(RunConfig, json.loads(args.config_json))
    run_dir = Path(args.out)
    onnx_dir = run_dir / "onnx"
    onnx_dir.mkdir(parents=True, exist_ok=True)
    data = Path(args.data)
    examples = make_examples(cfg.data.task, args.examples) if args.examples > 0 else None
    rows = []
    for model in args.model:
        src = Path(model)
        for name, path in artifact_files(src).items():
            shutil.copyfile(path, onnx_dir / name)
        onnx = onnx_dir / src.name
        print(f"[measure] {onnx.stem}: evaluating and profiling with onnxruntime", flush=True)
        rows.append(measure(onnx, data, run_dir, cfg, examples=examples))
        if src.name in (args.deploy or []):
            rows += deploy_rows(onnx, data, run_dir, cfg, print, examples)
    if examples is not None:
        arrays: dict[str, np.ndarray] = {}
        for i, (_, maps) in enumerate(examples.entries):
            for j, m in enumerate(maps):
                if isinstance(m, dict):
                    for k, v in m.items():
                        arrays[f"e{i}_m{j}_{k}"] = np.asarray(v)
                    arrays.setdefault(f"e{i}_m{j}_boxes", np.zeros((0, 4), np.float32))
                else:
                    arrays[f"e{i}_m{j}"] = np.asarray(m)
        np.savez_compressed(run_dir / EXAMPLES, **arrays)
    shutil.rmtree(onnx_dir)
    atomic_write_json(run_dir / ROWS, {
        "rows": rows, "hostname": platform.node(), "machine": host_info(),
        "versions": _runtime_versions(package_versions())})


def load_examples(path: Path, n_rows: int, kind: str) -> list[list[Any]]:
    """The example predictions of ``n_rows`` rows from an examples.npz."""
    out: list[list[Any]] = [[] for _ in range(n_rows)]
    if not path.is_file():
        return out
    with np.load(path, allow_pickle=False) as z:
        keys = list(z.keys())
        for i in range(n_rows):
            j = 0
            while True:
                if kind == "maps" and f"e{i}_m{j}" in keys:
                    out[i].append(z[f"e{i}_m{j}"])
                elif kind == "dets" and any(k.startswith(f"e{i}_m{j}_") for k in keys):
                    pre = f"e{i}_m{j}_"
                    out[i].append({k[len(pre):]: z[k] for k in keys if k.startswith(pre)})
                else:
                    break
                j += 1
    return out


# -- on the host -----------------------------------------------------------------------------
class RemoteMeasurer:
    """Measures a run's exported models on a target, one ``bckd measure`` per model."""

    def __init__(self, target_name: str, log: Log, timeout: float = 3600.0) -> None:
        from runtime.remote.ssh import Connection
        from runtime.remote.targets import get_target

        self.target = get_target(target_name)
        self.conn = Connection(self.target)
        self.log = log
        self.timeout = timeout
        self.build: str | None = None
        self.data_tree: str | None = None

    def check(self) -> None:
        """Before any training: the board answers and runs this host's bckd."""
        from runtime.remote.stages import require_build

        self.build = require_build(self.conn)

    def measure(self, models: list[tuple[Path, bool]], data_root: Path, run_dir: Path,
                cfg: Any, examples: Any = None) -> list[dict[str, Any]]:
        """Measure the exported ``models`` ((ONNX path, deploy it too)) in one job on the board;
        returns their rows, and brings what the board built into ``run_dir``."""
        from runtime.card import read_card
        from runtime.config import to_dict
        from runtime.data import open_dataset
        from runtime.data.preprocess import Preprocess
        from runtime.remote.ssh import stream_remote
        from runtime.remote.stages import artifact_files, folder_files
        from runtime.report_html import DetectionExamples

        conn, t = self.conn, self.target
        if self.build is None:
            self.check()
        if self.data_tree is None:
            self.log(f"[target] copying the dataset to '{t.name}' (only what it lacks)")
            self.data_tree = conn.push_tree(folder_files(data_root, "dataset"))
        job = uuid.uuid4().hex[:16]
        jobdir = f"{conn.info()['workdir']}/jobs/{job}"
        argv = ["measure"]
        rewrite = {self.data_tree: str(data_root), f"{jobdir}/out/": ""}
        deploy = []
        for onnx, dep in models:
            tree = conn.push_tree(artifact_files(onnx))
            argv.append(f"{tree}/{onnx.name}")
            rewrite[f"{tree}/{onnx.name}"] = str(onnx.relative_to(run_dir))
            if dep:
                deploy.append(onnx.name)
        settings = to_dict(cfg)
        if settings["profile"].get("telemetry", "none") == "none":
            settings["profile"]["telemetry"] = "auto"  # the board's power, where it has a source
        argv += ["--data", self.data_tree, "--config-json", json.dumps(settings),
                 "--out", "out", "--examples", str(examples.k if examples is not None else 0)]
        if deploy:
            argv += ["--deploy", *deploy]
        ssh_argv = conn.ssh_argv(conn.agent_argv("exec", job, self.build, f"{self.timeout:g}",
                                                 "--", *argv))
        self.log(f"[target] measuring {len(models)} model(s) on '{t.name}'")
        rc, stderr = stream_remote(ssh_argv, timeout=self.timeout + 60, rewrite=rewrite)
        try:
            if rc == 1:
                last = [ln for ln in stderr.splitlines() if ln.startswith("bckd: error: ")]
                said = last[-1][len("bckd: error: "):] if last else "bckd measure failed"
                raise BckdError(f"on target '{t.name}': {said}")
            if rc != 0:
                raise conn.agent_error(stderr, rc)
            stage = Path(tempfile.mkdtemp(prefix=".target-", dir=run_dir))
            try:
                conn.fetch_job(job, stage)
                got = json.loads((stage / ROWS).read_text())
                rows = got["rows"]
                where = {"where": "target", "target": t.name, "url": t.url,
                         "name": got.get("hostname"), **got.get("machine", {}),
                         "versions": got.get("versions", {})}
                for row in rows:
                    row["measured_on"] = where
                if examples is not None:
                    card = read_card(models[0][0])
                    val = open_dataset(data_root, cfg.data.val_split, format=cfg.data.format)
                    examples.load(val, Preprocess.from_dict(card["preprocess"]))
                    kind = "dets" if isinstance(examples, DetectionExamples) else "maps"
                    for row, maps in zip(rows, load_examples(stage / EXAMPLES, len(rows), kind)):
                        examples.add(row, maps)
                for path in sorted(stage.rglob("*")):
                    rel = path.relative_to(stage)
                    if path.is_file() and rel.as_posix() not in (ROWS, EXAMPLES):
                        dest = run_dir / rel
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        os.replace(path, dest)
            finally:
                shutil.rmtree(stage, ignore_errors=True)
        finally:
            try:
                conn.call("clean", job)
            except BckdError:
                pass
        return rows

    def record(self) -> dict[str, Any]:
        """The report's note of the target: who it is and what crossed the wire."""
        info = self.conn.info()
        pk = info.get("packages", {})
        return {"name": self.target.name, "url": self.target.url,
                "hostname": info.get("hostname"), "machine": info.get("machine"),
                "python": info.get("python"),
                "versions": {k: v for k, v in pk.items() if v},
                "bckd_build": self.build, **self.conn.stats.to_dict()}
