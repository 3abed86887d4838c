"""``bckd run``: sequence the stages on the built-in default (or a config) and write the report.

It only calls the stage functions — synth, distill, export (ONNX, OpenVINO IR), calib (INT8
Q/DQ), eval, profile — that the stage commands call too. The run is built in a staging folder
and moved onto ``--out`` when complete, so an interrupted run leaves nothing half-written there. The teacher is cached by the hash of
everything it depends on (data, config, code), so a second run reuses it.
"""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any, Callable

from runtime.config import KDConfig, RunConfig, to_dict
from runtime.errors import BckdError
from runtime.data import open_dataset
from runtime.files import sha256_file, sha256_json, staged_dir
from runtime.progress import Progress
from runtime.report import new_report, render_text, write_report
from runtime.report_html import EXAMPLE_IMAGES, MaskExamples, make_examples

Log = Callable[[str], None]


def method_kd(method: str, options: dict) -> KDConfig:
    """The KD config of one of the run's methods: the run's options for the losses it contains."""
    names = set(method.split("+"))
    return KDConfig(method=method, options={k: v for k, v in options.items() if k in names})


def check_kd_options(methods, options: dict) -> None:
    """Every loss named in ``kd_options`` must appear in some method of the run."""
    used = {name for m in methods for name in m.split("+")}
    for key in options:
        if key not in used:
            raise BckdError(f"kd_options has settings for '{key}', which no method of the run "
                            f"uses (methods: {', '.join(methods)}); fix the name or add the method")


def cache_root(cfg: RunConfig) -> Path:
    """Where trained teachers are cached: config, $BCKD_CACHE, or ~/.cache/bckd."""
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    return Path(os.environ.get("BCKD_CACHE") or Path.home() / ".cache" / "bckd")


def dataset_fingerprint(root: Path, splits: tuple[str, ...], format: str = "folder") -> str:
    """sha256 over the dataset's metadata, the split lists and every image and mask (or
    annotation file) they name."""
    h = hashlib.sha256()
    for split in splits:
        ds = open_dataset(root, split, format=format)
        h.update(sha256_json(ds.meta).encode())
        if hasattr(ds, "ann_file"):
            h.update(sha256_file(ds.ann_file).encode())
        for i in range(len(ds)):
            h.update(sha256_file(ds.image_path(i)).encode())
            if hasattr(ds, "mask_path"):
                h.update(sha256_file(ds.mask_path(i)).encode())
    return h.hexdigest()


def code_fingerprint(package: str = "distill") -> str:
    """sha256 of a package's code (default: the training code), so a code change invalidates
    what the cache holds for it."""
    import importlib

    h = hashlib.sha256()
    for path in sorted(Path(importlib.import_module(package).__file__).parent.rglob("*.py")):
        h.update(path.read_bytes())
    return h.hexdigest()


def teacher_checkpoint(cfg: RunConfig, data_root: Path, fingerprint: str, log: Log) -> Path:
    """The cached teacher for this data and config, training it on a miss."""
    from distill.run import distill_stage

    key = sha256_json({"teacher": to_dict(cfg.teacher), "train": to_dict(cfg.teacher_train),
                       "data": fingerprint, "input_size": list(cfg.data.input_size),
                       "code": code_fingerprint()})[:16]
    entry = cache_root(cfg) / "teachers" / key
    ckpt = entry / "teacher.pt"
    if ckpt.is_file():
        log(f"[teacher] reusing cached teacher {ckpt}")
        return ckpt
    log(f"[teacher] training {cfg.teacher.backbone}-{cfg.teacher.head} (cache miss, key {key})")
    with staged_dir(entry, force=True) as tmp:
        # The cached teacher outlives this run's folder: record the data by its fingerprint.
        distill_stage(data=cfg.data, data_root=data_root, model=cfg.teacher,
                      train_cfg=cfg.teacher_train, out=tmp / "teacher.pt",
                      root_label=cfg.data.root or f"built-in synthetic data {fingerprint[:16]}",
                      log=log)
    return ckpt


def cached_copy(cfg: RunConfig, kind: str, key: dict[str, Any], dest: Path,
                make: Callable[[Path], None], log: Log, reused: str, name: str = "") -> None:
    """Put at ``dest`` (with its card) the cache's ``kind`` entry for ``key``, made by
    ``make(path)`` on a miss; without ``cfg.reuse_students`` only ``make(dest)``."""
    import shutil

    from runtime.card import card_path

    if not cfg.reuse_students:
        make(dest)
        return
    entry = cache_root(cfg) / kind / sha256_json(key)[:16]
    cached = entry / (name or dest.name)
    if cached.is_file():
        log(reused)
    else:
        with staged_dir(entry, force=True) as tmp:
            make(tmp / cached.name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(cached, dest)
    shutil.copyfile(card_path(cached), card_path(dest))


def cached_student(cfg: RunConfig, method: str, teacher: Path, fingerprint: str,
                   ckpt: Path, train: Callable[[Path], None], log: Log) -> None:
    """Put the student of ``method`` at ``ckpt``: copied from the cache when its inputs are
    unchanged (``cfg.reuse_students``), else trained by ``train(path)`` and cached."""
    key = {"student": to_dict(cfg.student), "train": to_dict(cfg.student_train),
           "method": method, "kd": method_kd(method, cfg.kd_options).options,
           "teacher": sha256_file(teacher), "data": fingerprint,
           "input_size": list(cfg.data.input_size), "task": cfg.data.task,
           "code": code_fingerprint()}
    cached_copy(cfg, "students", key, ckpt, train, log, name="student.pt",
                reused=f"[student] reusing cached student '{method}' (inputs unchanged)")


def cached_export(cfg: RunConfig, ckpt: Path, onnx_path: Path, export: Callable[[Path], None],
                  log: Log) -> None:
    """Export ``ckpt`` to ``onnx_path``, or copy the export of the same checkpoint (by hash)
    with the same settings and code from the cache."""
    key = {"checkpoint": sha256_file(ckpt), "export": to_dict(cfg.export),
           "name": onnx_path.name, "export_code": code_fingerprint("export"),
           "code": code_fingerprint()}
    cached_copy(cfg, "exports", key, onnx_path, export, log,
                reused=f"[export] reusing the cached export of {ckpt.name} (same checkpoint "
                       "and settings)")


# Validation images cycled through by the per-stage timing of each artifact.
STAGE_IMAGES = 8


FPS_METHOD = "batch x 1000 / mean single-stream latency of the network alone"


def measure(artifact: Path, data_root: Path, run_dir: Path, cfg: RunConfig,
            backend: str = "onnxruntime", examples: MaskExamples | None = None) -> dict[str, Any]:
    """Evaluate and profile one artifact on one backend; returns a report row.

    With ``examples``, the predictions of its first images are kept there for report.html.
    """
    from runtime.backends import open_runner
    from runtime.card import read_card
    from runtime.data.preprocess import Preprocess
    from runtime.evaluate import evaluate_runner
    from runtime.profile import profile_pipeline, profile_runner

    from runtime.tasks import get_task

    card = read_card(artifact)
    task = get_task(card)
    pre = Preprocess.from_dict(card["preprocess"])
    val = open_dataset(data_root, cfg.data.val_split, format=cfg.data.format)
    threads = cfg.profile.threads or os.cpu_count() or 1
    options = {"precision": "f32"} if backend == "openvino" else {}  # never the device default
    keep = examples.writer() if examples is not None else None
    with open_runner(backend, artifact, threads=threads, **options) as runner:
        with Progress(f"[eval] {artifact.name} ({backend})", len(val)) as bar:
            acc = evaluate_runner(runner, val, pre, card["classes"], batch_size=8,
                                  progress=bar, writer=keep)
        x = pre.batch([val.load(0)[0]] * cfg.profile.batch)
        telemetry = None
        if cfg.profile.telemetry != "none":
            from runtime.telemetry import open_telemetry

            telemetry = open_telemetry(cfg.profile.telemetry)
        lat = profile_runner(runner, x, warmup=cfg.profile.warmup, iters=cfg.profile.iters,
                             min_seconds=cfg.profile.min_seconds, batch=cfg.profile.batch,
                             telemetry=telemetry)
        # Decoded images -> preprocess -> inference -> label map, on real validation images.
        images = [val.load(i)[0] for i in range(min(len(val), STAGE_IMAGES))]
        pipe = profile_pipeline(runner, images, pre, task.stage_postprocess(card),
                                batch=cfg.profile.batch, named=task.name != "semantic",
                                warmup=cfg.profile.warmup, iters=cfg.profile.iters,
                                min_seconds=cfg.profile.min_seconds / 2)
        backend, precision, device = runner.backend, runner.precision, runner.device
    stats = lat.to_dict()
    a = card["arch"]
    size = sum(p.stat().st_size for p in (artifact, artifact.with_suffix(".bin")) if p.is_file())
    row = {
        "model": card.get("role", "student"), "method": card.get("method", "none"),
        "arch": f"{a['backbone']}-{a['head']}-w{a['width']:g}", "backend": backend,
        "precision": precision, "device": device, "threads": threads,
        "input_size": list(pre.size), "task": task.name, **task.row(acc),
        "latency_ms": {k: round(stats[k], 3) for k in ("p50", "p90", "p95", "p99", "mean",
                                                       "std", "min", "max")},
        "latency_cv": None if stats.get("cv") is None else round(stats["cv"], 4),
        "latency_stable": bool(stats.get("stable", True)),
        "latency_histogram": stats["histogram"],
        "fps": round(stats["fps"], 1), "fps_method": FPS_METHOD,
        "batch": cfg.profile.batch, "iterations": stats["n"],
        "stages_ms": {name: {"p50": round(st.p50_ms, 3), "p90": round(st.p90_ms, 3),
                             "mean": round(st.mean_ms, 3)} for name, st in pipe.stages.items()},
        "size_mb": round(size / 2**20, 3), "params": card.get("params"),
        "artifact": str(artifact.relative_to(run_dir)),
        "parity": card.get("parity"),
    }
    if "power" in lat.context:
        row["power"] = lat.context["power"]
    if examples is not None:
        examples.load(val, pre)
        examples.add(row, keep)
    return row


def deploy_rows(onnx_path: Path, data_root: Path, run_dir: Path, cfg: RunConfig,
                log: Log, examples: MaskExamples | None = None) -> list[dict[str, Any]]:
    """OpenVINO FP32, and INT8 (calibrated on the train split) on ONNX Runtime and OpenVINO."""
    import importlib.util

    from calib.quantize import quantize_onnx_forms
    from calib.reader import CalibrationReader
    from runtime.card import read_card

    rows = []
    has_openvino = importlib.util.find_spec("openvino") is not None
    if cfg.deploy.openvino and not has_openvino:
        log("[deploy] openvino is not installed: no OpenVINO rows (pip install -e '.[openvino]')")
    if cfg.deploy.openvino and has_openvino:
        from export.openvino_export import convert_to_openvino

        xml = run_dir / "openvino" / (onnx_path.stem + ".xml")
        log(f"[export] {onnx_path.name} -> {xml.relative_to(run_dir)}")
        convert_to_openvino(onnx_path, xml)
        row = measure(xml, data_root, run_dir, cfg, "openvino", examples)
        # The IR is the ONNX converted as is: its parity is the OpenVINO check run at export.
        parity = (read_card(onnx_path).get("parity") or {}).get("backends", {}).get("openvino")
        rows.append(dict(row, parity=parity))
    if cfg.deploy.int8:
        int8 = run_dir / "int8" / (onnx_path.stem + ".int8.onnx")
        log(f"[calib] {onnx_path.name}: INT8 Q/DQ, {cfg.deploy.calib_method} on "
            f"{cfg.deploy.calib_images} '{cfg.data.train_split}' images")
        reader = CalibrationReader.for_model(onnx_path, data_root, cfg.data.train_split,
                                             format=cfg.data.format,
                                             num_images=cfg.deploy.calib_images)
        reader.progress = f"[calib] reading {reader.split} images"
        forms = {"int8": int8}  # symmetric: TensorRT's and OpenVINO's form
        if cfg.deploy.ort_int8_activations == "uint8":
            forms["uint8"] = int8.with_name(onnx_path.stem + ".int8-u8s8.onnx")
        quantize_onnx_forms(onnx_path, forms, reader, method=cfg.deploy.calib_method)
        ort = forms.get("uint8", int8)
        rows.append(measure(ort, data_root, run_dir, cfg, examples=examples))
        if cfg.deploy.openvino and has_openvino and cfg.deploy.openvino_int8 == "nncf":
            from calib.nncf_ptq import quantize_openvino

            ir8 = run_dir / "int8" / (onnx_path.stem + ".int8.xml")
            log(f"[calib] {xml.name}: INT8 with NNCF on the same images")
            quantize_openvino(xml, ir8, reader)
            rows.append(measure(ir8, data_root, run_dir, cfg, "openvino", examples))
        elif cfg.deploy.openvino and has_openvino:
            rows.append(measure(int8, data_root, run_dir, cfg, "openvino", examples))
    return rows


class StageClock:
    """Per-stage wall times of a run, and after each stage an estimate of what remains.

    The estimate counts the stages still to come (``plan``: kind -> count) at the mean time of
    the stages of that kind done so far; a kind not seen yet is left out, and the estimate then
    says 'at least'. Export + measure of the deployed student (OpenVINO, INT8 rows) takes longer
    than the others, so until it has run the estimate is low.
    """

    def __init__(self, log: Log, plan: dict[str, int]) -> None:
        self.log, self.plan = log, dict(plan)
        self.start = time.perf_counter()
        self.times: list[tuple[str, str, float]] = []  # (kind, name, seconds)
        self._t0 = self.start

    def done(self, kind: str, name: str) -> None:
        now = time.perf_counter()
        seconds = now - self._t0
        self._t0 = now
        self.times.append((kind, name, seconds))
        self.plan[kind] = max(self.plan.get(kind, 0) - 1, 0)
        left, unknown = 0.0, False
        for k, count in self.plan.items():
            if not count:
                continue
            seen = [t for kk, _, t in self.times if kk == k]
            if not seen:
                unknown = True
                continue
            left += count * sum(seen) / len(seen)
        if not any(self.plan.values()):
            remaining = ""
        elif unknown and not left:
            remaining = "; no estimate of what remains until a stage of each kind has run"
        else:
            remaining = f"; {'at least' if unknown else 'about'} {_duration(left)} left"
        self.log(f"[run] {name} done in {_duration(seconds)} ({_duration(now - self.start)} so "
                 f"far{remaining})")

    def record(self) -> list[dict[str, Any]]:
        return [{"stage": name, "kind": kind, "seconds": round(t, 1)}
                for kind, name, t in self.times]


def _duration(seconds: float) -> str:
    seconds = max(int(round(seconds)), 0)
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def run_pipeline(cfg: RunConfig, out: str | os.PathLike, *, force: bool = False,
                 log: Log = print, example_images: int = EXAMPLE_IMAGES,
                 provenance: dict[str, Any] | None = None, target: str | None = None,
                 remote_timeout: float = 3600.0) -> dict[str, Any]:
    """Synthesise (or open) data, train teacher and students, export, measure, report.

    With ``target`` (a name from ``bckd target add``) the exported models are measured on that
    board (evaluation, profiling, OpenVINO conversion, INT8 calibration), the rest here.

    report.html shows the predictions of every model on the first ``example_images`` validation
    images (kept in memory while measuring).
    """
    from distill.run import distill_stage
    from export.api import export_checkpoint
    from runtime.data.synth import synthesize

    from distill.losses import method_names
    from runtime.tasks import get_task

    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise BckdError("bckd run exports and profiles on one machine and cannot run under "
                        "torchrun; distribute the training with 'torchrun ... -m runtime.cli "
                        "distill' and run the other stages once")
    check_kd_options(cfg.methods, cfg.kd_options)
    deployed = cfg.deploy.students or cfg.methods[-1:]
    for method in deployed:
        if method not in cfg.methods:
            raise BckdError(f"deploy.students names '{method}', which is not one of the run's "
                            f"methods ({', '.join(cfg.methods)})")
    for method in cfg.methods:
        method_names(method, method_kd(method, cfg.kd_options).options, cfg.data.task)
    from runtime.remote.run import host_measured_on

    remote = None
    if target:
        from runtime.remote.run import RemoteMeasurer

        remote = RemoteMeasurer(target, log, timeout=remote_timeout)
        remote.check()  # before any training: the board answers and runs this bckd
    start = time.perf_counter()
    clock = StageClock(log, {"data": 0 if cfg.data.root else 1, "teacher": 1,
                             "student": len(cfg.methods), "measure": len(cfg.methods) + 1,
                             "target": 1 if remote else 0})
    with staged_dir(out, force=force) as tmp:
        data_root = Path(cfg.data.root) if cfg.data.root else tmp / "data"
        # Paths recorded in cards are relative to the run folder when they live inside it.
        root_label = cfg.data.root or "data"
        if not cfg.data.root:
            s = cfg.data.synth
            log(f"[data] synthesising {s.n_train}+{s.n_val} images at {s.size} (seed {s.seed})")
            with Progress("[data] synthesising", s.n_train + s.n_val) as bar:
                synthesize(data_root, n_train=s.n_train, n_val=s.n_val, size=tuple(s.size),
                           seed=s.seed, progress=bar, task=cfg.data.task)
            clock.done("data", "data")
        fingerprint = dataset_fingerprint(data_root, (cfg.data.train_split, cfg.data.val_split),
                                          cfg.data.format)
        teacher = teacher_checkpoint(cfg, data_root, fingerprint, log)
        clock.done("teacher", "teacher")
        checkpoints = {("teacher", "none"): teacher}
        for method in cfg.methods:
            ckpt = tmp / "checkpoints" / f"student-{method}.pt"

            def train(path: Path, method: str = method) -> None:
                log(f"[student] training {cfg.student.backbone}-{cfg.student.head} "
                    f"w{cfg.student.width:g} with method '{method}'")
                distill_stage(data=cfg.data, data_root=data_root, model=cfg.student,
                              train_cfg=cfg.student_train, out=path, method=method,
                              kd=method_kd(method, cfg.kd_options),
                              teacher=teacher, root_label=root_label, log=log)

            cached_student(cfg, method, teacher, fingerprint, ckpt, train, log)
            checkpoints[("student", method)] = ckpt
            clock.done("student", f"student '{method}'")
        rows = []
        on_target: list[tuple[Path, bool]] = []
        examples = make_examples(cfg.data.task, example_images) if example_images > 0 else None
        for (role, method), ckpt in checkpoints.items():
            onnx_path = tmp / "onnx" / f"{role}-{method}.onnx"
            log(f"[export] {ckpt.name} -> {onnx_path.relative_to(tmp)}")
            label = str(ckpt.relative_to(tmp)) if ckpt.is_relative_to(tmp) else str(ckpt)

            def export(path: Path, ckpt: Path = ckpt, role: str = role, label: str = label) -> None:
                export_checkpoint(ckpt, path, opset=cfg.export.opset,
                                  dynamic=cfg.export.dynamic, simplify=cfg.export.simplify,
                                  extra={"role": role}, source_label=label, nms=cfg.export.nms)

            cached_export(cfg, ckpt, onnx_path, export, log)
            deploy = role == "student" and method in deployed
            if remote is not None:  # measured on the board, all in one job, below
                on_target.append((onnx_path, deploy))
            else:
                log(f"[measure] {role}/{method}: evaluating and profiling with onnxruntime")
                new = [measure(onnx_path, data_root, tmp, cfg, examples=examples)]
                if deploy:
                    new += deploy_rows(onnx_path, data_root, tmp, cfg, log, examples)
                here = host_measured_on()
                rows += [dict(r, measured_on=here) for r in new]
            clock.done("measure", f"export{'' if remote else ' and measure'} of {role}/{method}")
        if remote is not None:
            rows += remote.measure(on_target, data_root, tmp, cfg, examples=examples)
            clock.done("target", f"measurement on target '{target}'")
        val = open_dataset(data_root, cfg.data.val_split, format=cfg.data.format)
        report = new_report(to_dict(cfg), {
            "name": val.meta.get("name"), "root": root_label,
            "classes": val.classes, "train_split": cfg.data.train_split,
            "val_split": cfg.data.val_split, "val_images": len(val), "fingerprint": fingerprint})
        report["task"] = get_task(cfg.data.task).name
        report["results"] = rows
        report["wall_seconds"] = round(time.perf_counter() - start, 1)
        report["stage_seconds"] = clock.record()
        report["provenance"] = {**(provenance or {"command": "run_pipeline (Python API)"}),
                                "input_size": list(cfg.data.input_size),
                                "threads": cfg.profile.threads or os.cpu_count(),
                                "machine": report["host"]}
        if remote is not None:
            report["target"] = remote.record()
            report["provenance"]["measured_on"] = f"target '{target}' ({remote.target.url})"
        write_report(tmp, report, examples)
    log("")
    log(render_text(report))
    log(f"\nwrote {Path(out) / 'report.json'}, report.md and report.html "
        f"in {report['wall_seconds']:.0f} s")
    return report
