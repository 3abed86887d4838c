"""The ``bckd`` command line: thin subcommands over the stage functions.

User errors (:class:`~runtime.errors.BckdError`) print one line and exit 1; anything else is a
bug and keeps its traceback. Torch-based stages are imported only by the subcommands that need
them, so ``bckd eval`` and ``bckd profile`` run on a device without torch.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from typing import Any, Callable, Sequence

from runtime.errors import BckdError


def _size(text: str) -> tuple[int, int]:
    """'128' or '128x96' (H x W)."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be N or HxW, got '{text}'") from None
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) <= 0:
        raise argparse.ArgumentTypeError(f"size must be N or HxW with positive numbers, got '{text}'")
    return parts[0], parts[1]


def cmd_run(args: argparse.Namespace) -> None:
    from runtime.config import load_config, task_config
    from runtime.pipeline import run_pipeline

    if args.quick and args.config:
        raise BckdError("--quick replaces the config; pass either a CONFIG or --quick")
    if args.config and args.task:
        raise BckdError("--task picks a built-in run; with a CONFIG set data.task in it instead")
    cfg = load_config(args.config) if args.config else task_config(args.task or "semantic",
                                                                   args.quick)
    if args.cache_dir:
        cfg.cache_dir = args.cache_dir
    provenance = {"command": " ".join(["bckd", *sys.argv[1:]]) if sys.argv[1:] else "bckd run",
                  "quick": bool(args.quick), "task": args.task or cfg.data.task,
                  "config_file": args.config}
    run_pipeline(cfg, args.out, force=args.force, provenance=provenance, target=args.target,
                 remote_timeout=args.remote_timeout or 3600.0)


def cmd_synth(args: argparse.Namespace) -> None:
    from runtime.data.synth import synthesize
    from runtime.progress import Progress

    with Progress("[data] synthesising", args.n_train + args.n_val) as bar:
        path = synthesize(args.out, n_train=args.n_train, n_val=args.n_val, size=args.size,
                          seed=args.seed, force=args.force, progress=bar, task=args.task)
    print(f"wrote {args.n_train}+{args.n_val} images to {path}")


def cmd_distill(args: argparse.Namespace) -> None:
    from runtime.config import DistillConfig, load_config

    cfg = load_config(args.config, DistillConfig)
    if args.epochs:
        cfg.train.epochs = args.epochs
    if args.input_size:
        cfg.data.input_size = args.input_size
        cfg.train.crop_size = args.input_size
    if args.format:
        cfg.data.format = args.format
    if args.tensorboard:
        cfg.train.tensorboard = True
    from distill.run import distill_stage

    result = distill_stage(data=cfg.data, data_root=args.data, model=cfg.model,
                           train_cfg=cfg.train, out=args.out,
                           method=args.method or cfg.kd.method or ("bckd" if args.teacher else "none"),
                           kd=cfg.kd,
                           teacher=args.teacher, resume=args.resume, force=args.force)
    if _launched_rank() == 0:  # under torchrun, one line for the whole job
        print(f"wrote {result.checkpoint} (val mIoU {100 * result.val['miou']:.2f}%, "
              f"{result.seconds:.0f} s)")


def cmd_mfs(args: argparse.Namespace) -> None:
    from distill.run import mfs_stage

    result = mfs_stage(student=args.student, teacher=args.teacher, data_root=args.data,
                       split=args.split, format=args.format, images=args.images,
                       epsilon=args.epsilon, eta=args.eta, directions=args.directions,
                       ascent_steps=args.ascent_steps, out=args.out, force=args.force)
    ratios = ", ".join(f"{r:.3f}" for r in result["ratio"])
    print(f"MFS {result['mfs']:.4f} (per stage: {ratios}; ε={args.epsilon}, "
          f"{args.directions} directions, {args.ascent_steps} ascent steps, "
          f"{result['settings']['images']} images)")


# What --out's suffix means when --format is not given.
EXPORT_SUFFIXES = {".onnx": "onnx", ".xml": "openvino", ".engine": "tensorrt", ".plan": "tensorrt"}


def cmd_export(args: argparse.Namespace) -> None:
    is_onnx = str(args.model).endswith(".onnx")
    fmt = (args.format or EXPORT_SUFFIXES.get(os.path.splitext(str(args.out))[1].lower())
           or (None if is_onnx else "onnx"))
    if not fmt:
        raise BckdError(f"cannot tell the format from --out {args.out}; end it in .onnx, .xml "
                        "or .engine, or pass --format onnx|openvino|tensorrt")
    if fmt == "onnx" and is_onnx:
        raise BckdError(f"{args.model} is already ONNX; pass --format openvino or --format "
                        "tensorrt (or an --out ending in .xml or .engine) to convert it")
    if fmt != "onnx" and not is_onnx:
        raise BckdError(f"--format {fmt} converts an ONNX file, got {args.model}; export it "
                        f"first with 'bckd export {args.model} --out model.onnx'")
    EXPORTERS[fmt](args)


def _export_onnx(args: argparse.Namespace) -> None:
    from export.api import export_checkpoint

    card = export_checkpoint(args.model, args.out, opset=args.opset,
                             dynamic=not args.static, simplify=not args.no_simplify,
                             force=args.force)
    p = card.get("parity", {})
    print(f"wrote {args.out} (simplified: {card.get('simplifier') or 'no'}, parity vs torch "
          f"max |Δ| {p.get('max_abs_diff', float('nan')):.2e}, argmax agreement "
          f"{100 * (p.get('argmax_agreement') or float('nan')):.4f}%)")


def _export_openvino(args: argparse.Namespace) -> None:
    from export.openvino_export import convert_to_openvino

    card = convert_to_openvino(args.model, args.out, compress_fp16=args.fp16_weights,
                               force=args.force)
    print(f"wrote {args.out} and its .bin ({card.get('precision')}, weights "
          f"{card.get('weights_precision')})")


def _export_tensorrt(args: argparse.Namespace) -> None:
    from export.trt import build_engine

    calibrator = None
    if args.calib_data:
        from calib.reader import CalibrationReader

        calibrator = CalibrationReader.for_model(args.model, args.calib_data, args.calib_split,
                                                 format=args.calib_format,
                                                 num_images=args.calib_images)
    profile = args.shapes.split(",") if args.shapes else None
    card = build_engine(args.model, args.out, precision=args.precision, profile=profile,
                        workspace_mib=args.workspace, timing_cache=args.timing_cache,
                        dla_core=args.dla_core, calibrator=calibrator,
                        calib_cache=args.calib_cache, calib_algorithm=args.calib_algorithm,
                        builder=args.builder, trtexec=args.trtexec, force=args.force)
    print(f"wrote {args.out} (TensorRT {card.get('tensorrt', {}).get('version', '?')}, "
          f"{card.get('precision')})")


EXPORTERS = {"onnx": _export_onnx, "openvino": _export_openvino, "tensorrt": _export_tensorrt}


DEFAULT_CALIB_IMAGES = 300


def _calib_format(args: argparse.Namespace, card: dict | None) -> str:
    """The task's dataset format; for a bare model, a plain image folder unless --data is a
    bckd folder dataset."""
    from runtime.bare import is_bare
    from runtime.tasks import get_task

    if is_bare(card):
        return "folder" if os.path.isfile(os.path.join(args.data, "dataset.json")) else "images"
    return get_task(card).dataset_format


def _bare_preprocess(args: argparse.Namespace, card: dict | None) -> dict | None:
    """A bare model's preprocessing from --preprocess / --mean / --std / --layout / --size (None
    for a model whose card has its own; flags that would contradict it are refused)."""
    from runtime.bare import graph_io, is_bare, preprocess_from

    flags = [f"--{k}" for k in ("preprocess", "mean", "std", "layout", "size")
             if getattr(args, k, None)]
    if not is_bare(card):
        if flags:
            raise BckdError(f"{args.model}'s card fixes its preprocessing; drop {', '.join(flags)}")
        return None
    specs, _ = graph_io(args.model)
    if len(specs) != 1:
        raise BckdError(f"{args.model} has {len(specs)} inputs; bckd calibrates models with one "
                        "image input")
    if not (args.preprocess or args.mean or args.std):
        print("bckd: note: no --mean / --std / --preprocess given for this bare model: "
              "ImageNet's mean and std (0-255 scale) are used", file=sys.stderr)
    return preprocess_from(args.model, specs[0], yaml_file=args.preprocess, mean=args.mean,
                           std=args.std, layout=args.layout, size=args.size)


def _calib_images(args: argparse.Namespace, fmt: str) -> int:
    """--images, or the default capped to the split's size (with a note saying so)."""
    if args.images is not None:
        return args.images
    from runtime.data import open_dataset

    available = len(open_dataset(args.data, args.split, format=fmt))
    if available < DEFAULT_CALIB_IMAGES:
        print(f"bckd: note: split '{args.split}' holds {available} images, fewer than the default "
              f"{DEFAULT_CALIB_IMAGES}; calibrating on all of them", file=sys.stderr)
    return min(DEFAULT_CALIB_IMAGES, available)


def cmd_calib(args: argparse.Namespace) -> None:
    from calib.reader import CalibrationReader

    if args.budget is not None and args.quantizer != "onnxruntime":
        raise BckdError("--budget (accuracy-aware INT8) writes a Q/DQ ONNX; drop "
                        "--quantizer nncf or the budget")
    if args.activations != "int8" and (args.budget is not None or args.quantizer != "onnxruntime"):
        raise BckdError("--activations uint8 applies to a plain Q/DQ ONNX only (no --budget, "
                        "no --quantizer nncf); drop one of them")
    from calib.quantize import check_model_file
    from runtime.files import refuse_existing

    refuse_existing(args.out, "INT8 output", args.force)
    if str(args.out).endswith(".xml"):
        refuse_existing(os.path.splitext(args.out)[0] + ".bin", "INT8 IR weights", args.force)
    from runtime.card import read_card_or_none

    check_model_file(args.model)
    card = read_card_or_none(args.model)
    preprocess = _bare_preprocess(args, card)  # the model's problems before the data's
    fmt = args.format or _calib_format(args, card)
    reader = CalibrationReader.for_model(args.model, args.data, args.split, format=fmt,
                                         num_images=_calib_images(args, fmt), seed=args.seed,
                                         preprocess=preprocess)
    reader.progress = f"[calib] {os.path.basename(args.model)}: reading {len(reader.ids)} images"
    if args.budget is not None:
        from calib.sensitivity import accuracy_aware_quantize
        from runtime.data import open_dataset

        heldout = open_dataset(args.data, args.heldout_split or args.split, format=fmt)
        card = accuracy_aware_quantize(args.model, args.out, reader, heldout, budget=args.budget,
                                       method=args.calibration,
                                       heldout_images=args.heldout_images,
                                       backend=args.score_on, force=args.force)
        s = card["sensitivity"]
        print(f"kept {len(s['float_nodes'])} layers in float: {', '.join(s['float_nodes']) or '-'}"
              f" ({'within' if s['within_budget'] else 'NOT within'} the {args.budget} budget)")
    elif args.quantizer == "nncf":
        from calib.nncf_ptq import quantize_openvino

        card = quantize_openvino(args.model, args.out, reader, preset=args.preset,
                                 force=args.force)
    else:
        from calib.quantize import quantize_onnx

        card = quantize_onnx(args.model, args.out, reader, method=args.calibration,
                             activations=args.activations, force=args.force)
    cal = card.get("calibration", {})
    print(f"wrote {args.out} (INT8, {cal.get('method', args.calibration)} on {len(reader.ids)} images of "
          f"split '{args.split}', {cal.get('seconds', float('nan')):.1f} s)")


def _open(args: argparse.Namespace, **extra: Any):
    from runtime.backends import open_runner

    options = {"threads": args.threads or None, **extra}
    for name in ("device", "precision", "hint"):
        value = getattr(args, name, None)
        if value:
            options[name] = value
    old = {"f32": "fp32", "f16": "fp16"}.get(str(options.get("precision", "")).lower())
    if old:
        print(f"bckd: note: --precision {options['precision']} is now {old} (one vocabulary: "
              "fp32, fp16, bf16, int8); the old spelling works until the next release",
              file=sys.stderr)
        options["precision"] = old
    providers, ep_options = getattr(args, "providers", None), getattr(args, "ep_option", None)
    if (providers or ep_options) and args.backend != "onnxruntime":
        raise BckdError("--providers and --ep-option are for --backend onnxruntime; other "
                        "backends take --device / --precision / --hint")
    if ep_options and not providers:
        raise BckdError("--ep-option sets options of the first of --providers; name the "
                        "providers too, e.g. --providers cuda,cpu --ep-option device_id=0")
    if providers:
        names = [ORT_PROVIDERS.get(p.strip().lower(), p.strip()) for p in providers.split(",")]
        options["providers"] = names
        first = {}
        for item in ep_options or []:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise BckdError(f"--ep-option takes KEY=VALUE, got '{item}'")
            first[key] = value
        options["provider_options"] = [first] + [{} for _ in names[1:]]
    return open_runner(args.backend, args.model, **options)


# Short names for --providers (any full onnxruntime provider name is taken as is).
ORT_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                 "tensorrt": "TensorrtExecutionProvider", "trt": "TensorrtExecutionProvider",
                 "openvino": "OpenVINOExecutionProvider", "dml": "DmlExecutionProvider",
                 "coreml": "CoreMLExecutionProvider"}


def _refuse_out(args: argparse.Namespace) -> None:
    """An existing --out is refused before any work, not after it (unless --force)."""
    from runtime.files import refuse_existing

    if getattr(args, "out", None):
        refuse_existing(args.out, "output", getattr(args, "force", False))


def _write_json(path: str | None, obj: dict, force: bool, args: Any = None,
                human: Callable[[dict], str] | None = None) -> None:
    """Write ``obj`` to ``path`` (when given); print it as JSON, or as ``human`` text unless the
    command was given --json."""
    from runtime.files import atomic_write_json, refuse_existing

    if path:
        refuse_existing(path, "output", force)
        atomic_write_json(path, obj)
    if human is not None and not getattr(args, "json", False):
        print(human(obj))
    else:
        print(json.dumps(obj, indent=2))


def _eval_text(obj: dict) -> str:
    from runtime.human import eval_text

    return eval_text(obj)


def _profile_text(obj: dict) -> str:
    from runtime.human import profile_text

    return profile_text(obj)


def cmd_eval(args: argparse.Namespace) -> None:
    from runtime.data import open_dataset
    from runtime.data.preprocess import Preprocess
    from runtime.evaluate import evaluate_runner

    from runtime.tasks import get_task

    _refuse_out(args)
    from runtime.bare import is_bare
    from runtime.card import read_card_or_none

    card = read_card_or_none(args.model)
    card = _bare_eval_card(args, card) if is_bare(card) else card
    if args.classes and not card.get("bare"):
        raise BckdError(f"{args.model}'s card names its classes; drop --classes")
    task = get_task(card)
    pre = Preprocess.from_dict(card["preprocess"])
    data = open_dataset(args.data, args.split, format=args.format or task.dataset_format)
    task.check_dataset(data, card, args.model)
    writer = None
    if args.save_predictions:
        manifest = {"model": str(args.model), "model_sha256": card.get("sha256"),
                    "split": args.split, "data": str(args.data), "classes": list(card["classes"]),
                    "preprocess": card["preprocess"]}
        if hasattr(data, "category_ids"):
            manifest["category_ids"] = list(data.category_ids)
        writer = task.writer(args.save_predictions, manifest, force=args.force)
    from runtime.progress import Progress

    with _open(args) as runner, Progress(f"[eval] {os.path.basename(args.model)} ({args.backend})",
                                         len(data)) as bar:
        result = evaluate_runner(runner, data, pre, card["classes"], batch_size=args.batch,
                                 writer=writer, progress=bar)
    _write_json(args.out, {"model": str(args.model), "data": str(args.data),
                           "split": args.split, "backend": args.backend,
                           "precision": runner.precision, "device": runner.device,
                           "threads": runner.threads, "images": len(data), **result},
                args.force, args, _eval_text)


def _bare_eval_card(args: argparse.Namespace, card: dict | None) -> dict:
    """The card of a model bckd did not make, for eval: task, classes and preprocessing from
    flags (or the --preprocess YAML); semantic segmentation only, whose one output is logits."""
    from runtime.bare import (bare_card, graph_io, output_dims, preprocess_from,
                              read_preprocess_yaml)
    from runtime.data import open_dataset

    extra = read_preprocess_yaml(args.preprocess) if args.preprocess else {}
    task = args.task or extra.get("task")
    if not task:
        raise BckdError(f"{args.model} has no bckd card: give --task semantic and its "
                        "preprocessing (--size, --mean / --std, or --preprocess FILE.yaml with "
                        "task and classes); classes default to the dataset's")
    if task != "semantic":
        raise BckdError(f"a model bckd did not make is evaluated as --task semantic (one logits "
                        f"output [N, C, H, W]); for {task}, export it through bckd so its outputs "
                        "have bckd's layout (num_dets, boxes, scores, labels)")
    specs, outputs = graph_io(args.model)
    if len(specs) != 1:
        raise BckdError(f"{args.model} has {len(specs)} inputs; bckd evaluates one-image-input "
                        "models")
    pre = preprocess_from(args.model, specs[0], yaml_file=args.preprocess, mean=args.mean,
                          std=args.std, layout=args.layout, size=args.size)
    data = open_dataset(args.data, args.split, format=args.format or "folder")
    classes = list(data.classes)
    wanted = args.classes or extra.get("classes")
    if wanted:
        wanted = [str(c) for c in (wanted if isinstance(wanted, list) else str(wanted).split(","))]
        if wanted != classes:
            raise BckdError(f"--classes {','.join(wanted)} differ from the dataset's "
                            f"{','.join(classes)}; the model's class i must be the dataset's")
    dims = output_dims(args.model).get(outputs[0])
    if dims and (len(dims) != 4 or dims[1] not in (None, len(classes))):
        raise BckdError(f"{args.model}'s first output '{outputs[0]}' is {list(dims)}, not logits "
                        f"[N, {len(classes)}, H, W] for the dataset's {len(classes)} classes; "
                        "evaluate on the dataset the model was trained for")
    made = bare_card(args.model, specs, outputs, preprocess=pre)
    return {**(card or {}), **made, "task": "semantic", "classes": classes}


def cmd_score(args: argparse.Namespace) -> None:
    _refuse_out(args)
    from runtime.data import open_dataset
    from runtime.predictions import read_manifest, score_predictions
    from runtime.progress import Progress

    from runtime.tasks.det_predictions import FORMAT as DETECTIONS

    manifest = _any_manifest(args.predictions)
    split = args.split or manifest.get("split")
    if manifest.get("format") == DETECTIONS:  # detections: COCO AP against the annotations
        from runtime.tasks.det_predictions import score_detections

        data = open_dataset(args.data, split, format=args.format or "coco")
        with Progress(f"[score] {os.path.basename(os.path.normpath(args.predictions))}",
                      len(manifest["ids"])) as bar:
            result = score_detections(args.predictions, data, progress=bar)
        return _write_json(args.out, {"predictions": str(args.predictions), "data": str(args.data),
                                      "split": split, **result}, args.force, args, _eval_text)
    manifest = read_manifest(args.predictions)
    data = open_dataset(args.data, split, format=args.format or "folder")
    with Progress(f"[score] {os.path.basename(os.path.normpath(args.predictions))}",
                  len(manifest["ids"])) as bar:
        result = score_predictions(args.predictions, data, progress=bar)
    _write_json(args.out, {"predictions": str(args.predictions), "data": str(args.data),
                           "split": split, **result}, args.force, args, _eval_text)


def _any_manifest(folder: str) -> dict:
    """The predictions manifest of a folder, whatever its task (validated by its reader)."""
    path = os.path.join(folder, "predictions.json")
    if not os.path.isfile(path):
        from runtime.predictions import read_manifest

        return read_manifest(folder)  # raises the one-line error
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise BckdError(f"{path} is not a valid predictions manifest ({exc}); re-run the "
                        "evaluation") from exc


def cmd_profile(args: argparse.Namespace) -> None:
    _refuse_out(args)
    if args.backend == "trtexec":
        return _profile_trtexec(args)
    from runtime.bare import is_bare
    from runtime.card import read_card_or_none

    card = read_card_or_none(args.model)
    protocol = dict(warmup=args.warmup, iters=args.iters, min_seconds=args.min_seconds,
                    max_seconds=args.max_seconds, cv_threshold=args.cv_threshold)
    if (args.mode == "pipeline") != bool(args.data):
        raise BckdError("--mode pipeline times real images: give it --data DIR (and --data "
                        "only with --mode pipeline)")
    if args.mode == "pipeline":
        if is_bare(card):
            raise BckdError(f"--mode pipeline needs the model's preprocessing, and {args.model} "
                            "has no bckd card; time the network alone (--mode latency)")
        return _profile_pipeline(args, card, protocol)
    if args.mode == "throughput" and args.telemetry != "none":
        raise BckdError("--telemetry measures the single-stream window; drop it or use "
                        "--mode latency")
    if args.mode == "latency" and args.requests:
        raise BckdError("--requests applies to --mode throughput")
    specs = _graph_inputs(args.model)
    x, shapes = _profile_input(args, card, specs) if specs else (None, {})
    extra = {"shapes": shapes} if args.backend == "openvino" else {}
    with _open(args, **extra) as runner:
        if x is None:  # a TensorRT engine: its runner knows the inputs
            x, shapes = _profile_input(args, card, runner.input_specs)
        telemetry = None
        if args.mode == "latency" and args.telemetry != "none":
            from runtime.telemetry import open_telemetry

            telemetry = open_telemetry(args.telemetry)
        print(f"[profile] {os.path.basename(args.model)} ({args.backend}): warm-up until the "
              f"timings settle, then at least {args.iters} calls and {args.min_seconds:g} s (at "
              f"most {args.max_seconds:g} s)", file=sys.stderr)
        if args.mode == "throughput":
            from runtime.profile import profile_throughput

            stats = profile_throughput(runner, x, requests=args.requests or None, **protocol)
        else:
            from runtime.profile import profile_runner

            stats = profile_runner(runner, x, telemetry=telemetry, **protocol)
        info = {"backend": runner.backend, "device": runner.device,
                "precision": runner.precision, "threads": runner.threads}
    result = stats.to_dict()
    for warning in result.get("warnings") or []:
        print(f"bckd: warning: {warning}", file=sys.stderr)
    first = next(iter(shapes.values()))
    _write_json(args.out, {"model": str(args.model), **info, "input_shape": list(first),
                           "input_shapes": {k: list(v) for k, v in shapes.items()},
                           "latency_ms": result}, args.force, args, _profile_text)


def _graph_inputs(model: str) -> list | None:
    """The inputs of an ONNX file or IR read from its graph (None for other artifacts)."""
    from runtime.bare import graph_io

    if os.path.splitext(model)[1].lower() in (".onnx", ".xml"):
        return graph_io(model)[0]
    return None


def _profile_input(args: argparse.Namespace, card: dict | None, specs: list) -> tuple[Any, dict]:
    """The timed input (one array, or a dict for several inputs) and its shapes by name: the
    inputs with dynamic dims from --shape, --size (else the card's size) and --batch."""
    from runtime.bare import is_bare, parse_shapes, random_feed, resolve_shapes

    size = args.size or (tuple(card["preprocess"]["size"]) if not is_bare(card) else None)
    shapes = resolve_shapes(specs, args.model, shapes=parse_shapes(args.shape), size=size,
                            batch=args.batch, layout=args.layout)
    feed = random_feed(specs, shapes)
    return (next(iter(feed.values())) if len(feed) == 1 else feed), shapes


def _profile_pipeline(args: argparse.Namespace, card: dict, protocol: dict) -> None:
    from runtime.data import open_dataset
    from runtime.data.preprocess import Preprocess
    from runtime.profile import profile_pipeline

    if args.telemetry != "none" or args.requests:
        raise BckdError("--mode pipeline times one stream stage by stage; drop --telemetry and "
                        "--requests")
    if args.images < 1:
        raise BckdError(f"--images must be at least 1, got {args.images}")
    size = list(args.size) if args.size else card["preprocess"]["size"]
    pre = Preprocess.from_dict(dict(card["preprocess"], size=size))
    data = open_dataset(args.data, args.split, format=args.format)
    images = [data.load(i)[0] for i in range(min(len(data), args.images))]
    with _open(args) as runner:
        stats = profile_pipeline(runner, images, pre, batch=args.batch, **protocol)
    result = stats.to_dict()
    for name, stage in result["stages"].items():
        for warning in stage.get("warnings") or []:
            print(f"bckd: warning: {name}: {warning}", file=sys.stderr)
    _write_json(args.out, {"model": str(args.model), "backend": result.get("backend"),
                           "device": result.get("device"), "precision": result.get("precision"),
                           "threads": result.get("threads"), "data": str(args.data),
                           "split": args.split, "latency_ms": result}, args.force, args,
                _profile_text)


def _profile_trtexec(args: argparse.Namespace) -> None:
    from runtime.backends.base import load_card_if_any
    from runtime.trtexec import profile_trtexec

    if args.mode != "latency" or args.telemetry != "none":
        raise BckdError("--backend trtexec reports trtexec's own single-stream summary; drop "
                        "--mode throughput and --telemetry")
    card = load_card_if_any(args.model) or {}
    size = args.size or tuple((card.get("preprocess") or {}).get("size") or ())
    name = ((card.get("io") or {}).get("inputs") or [{}])[0].get("name") or \
        (card.get("onnx") or {}).get("input_name") or "input"
    shapes = {name: [args.batch, 3, *size]} if size else None
    result = profile_trtexec(args.model, trtexec=args.trtexec, shapes=shapes,
                             iterations=args.iters, duration=max(1, round(args.min_seconds)))
    for warning in result.get("warnings") or []:
        print(f"bckd: warning: trtexec: {warning}", file=sys.stderr)
    _write_json(args.out, {"model": str(args.model), "backend": "trtexec", "latency_ms": result},
                args.force, args, _profile_text)


def _add_backend_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="artifact to run (ONNX file with its .card.json)")
    p.add_argument("--backend", help="runtime backend: onnxruntime, openvino, tensorrt; "
                   "profile also takes trtexec (default: from the suffix: .xml openvino, "
                   ".engine/.plan tensorrt, else onnxruntime)")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: all cores)")
    p.add_argument("--device", help="device of backends that have several (openvino: CPU, GPU, "
                   "NPU)")
    p.add_argument("--precision", help="inference precision of backends that take one "
                   "(openvino: fp32, bf16, fp16; default fp32, never the CPU's silent bf16)")
    p.add_argument("--hint", help="openvino performance hint: latency or throughput")
    p.add_argument("--providers", help="onnxruntime execution providers in order of preference, "
                   "e.g. tensorrt,cuda,cpu (default cpu); a provider that fails to start is an "
                   "error, never a silent fallback")
    p.add_argument("--ep-option", action="append", metavar="KEY=VALUE",
                   help="option of the first provider, repeatable (e.g. device_id=0, "
                   "trt_fp16_enable=True, trt_engine_cache_enable=True)")
    _add_output_args(p)


class _Renamed(argparse.Action):
    """An old flag spelling: still works, with a one-line note naming the new one."""

    def __init__(self, option_strings: Sequence[str], dest: str, new: str = "",
                 **kwargs: Any) -> None:
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        print(f"bckd: note: {option_string} is now {self.new} here; the old spelling works "
              "until the next release", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _renamed(p: argparse.ArgumentParser, old: str, new: str, **kwargs: Any) -> None:
    p.add_argument(old, action=_Renamed, new=new, dest=new.lstrip("-").replace("-", "_"),
                   default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)


def _add_data_format(p: argparse.ArgumentParser, default: str | None, help: str) -> None:
    """--data-format (dest 'format'): the dataset's format; --format is its old spelling."""
    p.add_argument("--data-format", dest="format", default=default, metavar="FORMAT", help=help)
    p.add_argument("--format", action=_Renamed, new="--data-format", dest="format",
                   default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def _add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true",
                   help="print the full JSON result instead of the short table")
    p.add_argument("--out", help="also write the JSON result to this file")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every flag's default in its help line (unless the text already states it); the
    examples epilog kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        empty = default is None or default is False or default == argparse.SUPPRESS or (
            isinstance(default, (list, str)) and not default)
        if text and "default" not in text and action.option_strings and not empty:
            shown = "x".join(map(str, default)) if isinstance(default, tuple) else default
            text += f" (default: {shown})"
        return text


# One example or more per command, shown under its --help.
EXAMPLES = {
    "bckd": "bckd run --out runs/first            # the whole chain on the built-in data\n"
            "bckd run --task detect --quick --out runs/det",
    "bckd run": "bckd run --out runs/seg\nbckd run --task instance --quick --out runs/inst\n"
                "bckd run my.yaml --out runs/mine",
    "bckd data synth": "bckd data synth --out data/ --task detect --size 128",
    "bckd distill": "bckd distill --data data/ --out teacher.pt --method none\n"
                    "bckd distill --data data/ --teacher teacher.pt --method bckd+cwd "
                    "--out student.pt",
    "bckd analyze mfs": "bckd analyze mfs --student s.pt --teacher t.pt --data data/",
    "bckd export": "bckd export student.pt --out student.onnx\n"
                   "bckd export student.onnx --out student.xml\n"
                   "bckd export student.onnx --out student.engine --precision fp16  # device",
    "bckd calib": "bckd calib student.onnx --data data/ --out student.int8.onnx\n"
                  "bckd calib student.xml --quantizer nncf --data data/ --out student.int8.xml\n"
                  "bckd calib theirs.onnx --data images/ --size 224x224 --mean 0,0,0 "
                  "--std 255,255,255 --out theirs.int8.onnx",
    "bckd eval": "bckd eval student.xml --data data/\n"
                 "bckd eval student.engine --data data/ --save-predictions preds/ --json\n"
                 "bckd eval theirs.onnx --data data/ --task semantic --size 128",
    "bckd score": "bckd score preds/ --data data/",
    "bckd target": "bckd target add orin ssh://me@orin.local --python /usr/bin/python3\n"
                   "bckd target check orin --install\n"
                   "bckd profile student.onnx --target orin --backend onnxruntime\n"
                   "bckd run --quick --target orin --out runs/orin",
    "bckd profile": "bckd profile student.xml --threads 2\n"
                    "bckd profile theirs.onnx --shape input:1x3x224x224\n"
                    "bckd profile student.engine --telemetry auto    # power on a Jetson",
}


class _Parser(argparse.ArgumentParser):
    """argparse with bckd's error convention: one line on stderr, exit status 1; --help shows
    the defaults and examples."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)
        if self.epilog is None and self.prog in EXAMPLES:
            self.epilog = "examples:\n" + "\n".join(
                "  " + line for line in EXAMPLES[self.prog].splitlines())

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(1, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bckd")
    except PackageNotFoundError:  # run from a source tree that was not installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bckd", description="Distil, export, calibrate and "
                                     "measure dense-prediction models on edge devices.")
    parser.add_argument("--version", action="version", version=f"bckd {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_Parser)

    p = sub.add_parser("run", help="the whole chain: data, teacher, students, ONNX, report")
    p.add_argument("config", nargs="?", help="YAML run config (default: the built-in default)")
    p.add_argument("--out", required=True, help="output directory (must not exist)")
    p.add_argument("--quick", action="store_true", help="a shrunken run for smoke tests")
    p.add_argument("--task", choices=["semantic", "detect", "instance"],
                   help="the built-in run: semantic segmentation (default), detection (GFL) "
                   "or instance segmentation (GFL + prototype masks)")
    p.add_argument("--cache-dir", help="teacher cache (default $BCKD_CACHE or ~/.cache/bckd)")
    p.add_argument("--force", action="store_true", help="replace an existing --out directory")
    _add_target_args(p)
    p.set_defaults(func=cmd_run)

    data = sub.add_parser("data", help="dataset tools").add_subparsers(
        dest="data_command", required=True, metavar="ACTION", parser_class=_Parser)
    p = data.add_parser("synth", help="write the built-in procedural dataset")
    p.add_argument("--out", required=True, help="dataset directory to create")
    p.add_argument("--n-train", type=int, default=600, help="training images")
    p.add_argument("--n-val", type=int, default=200, help="validation images")
    p.add_argument("--size", type=_size, default=(128, 128), help="image size N or HxW")
    p.add_argument("--seed", type=int, default=0, help="generator seed")
    p.add_argument("--task", default="semantic", choices=["semantic", "detect", "instance"],
                   help="semantic: the folder format only (default); detect / instance: also "
                   "COCO instances json (boxes; + RLE masks) of the same scenes")
    p.add_argument("--force", action="store_true", help="replace an existing --out directory")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("distill", help="train a student (distilled from --teacher) on a dataset")
    p.add_argument("--data", required=True, help="dataset root")
    _add_data_format(p, None, "dataset format: folder, voc, cityscapes, ade20k, cocostuff10k, "
                     "coco (default: data.format in the config, else folder)")
    p.add_argument("--out", required=True, help="student checkpoint to write (.pt)")
    p.add_argument("--config", help="YAML with data/model/train/kd sections")
    p.add_argument("--teacher", help="teacher checkpoint written by bckd distill")
    p.add_argument("--method", help="distillation method: none, bckd, kd, cwd, cirkd, skd, bpkd "
                   "or several joined by '+' (default: kd.method in the config, else bckd with "
                   "--teacher and none without)")
    p.add_argument("--epochs", type=int, default=0, help="override train.epochs")
    p.add_argument("--input-size", type=_size, help="override data.input_size and crop size")
    p.add_argument("--resume", action="store_true", help="continue from OUT.state.pt")
    p.add_argument("--tensorboard", action="store_true",
                   help="log every loss term to OUT.tb/ for TensorBoard")
    p.add_argument("--force", action="store_true", help="overwrite an existing checkpoint")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("analyze", help="analyses of trained models (MFS)")
    analyses = p.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS",
                                parser_class=_Parser)
    p = analyses.add_parser("mfs", help="manifold stability of a student against its teacher "
                            "(method.md §5.1)")
    p.add_argument("--student", required=True, help="student checkpoint (.pt)")
    p.add_argument("--teacher", required=True, help="teacher checkpoint (.pt)")
    p.add_argument("--data", required=True, help="dataset root")
    p.add_argument("--split", default="val")
    _add_data_format(p, "folder", "dataset format")
    p.add_argument("--images", type=int, default=32, help="images scored (default 32)")
    p.add_argument("--epsilon", type=float, default=1e-3, help="perturbation norm ε")
    p.add_argument("--eta", type=float, default=1e-6, help="floor η of the teacher's constant")
    p.add_argument("--directions", type=int, default=8, help="random directions per image")
    p.add_argument("--ascent-steps", type=int, default=1,
                   help="gradient-ascent steps tightening the sup (default 1; 0: random only)")
    p.add_argument("--out", help="also write the result as JSON here")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    p.set_defaults(func=cmd_mfs)

    p = sub.add_parser("export", help="checkpoint -> ONNX, or ONNX -> OpenVINO IR / TensorRT "
                       "engine (torch needed only for the first)")
    p.add_argument("model", help="student checkpoint (.pt), or an ONNX file to convert")
    p.add_argument("--out", required=True, help="file to write (.onnx, .xml, .engine)")
    p.add_argument("--format", choices=sorted(EXPORTERS),
                   help="onnx (from a checkpoint; the default), openvino or tensorrt (from ONNX)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    g = p.add_argument_group("onnx")
    g.add_argument("--opset", type=int, default=17)
    g.add_argument("--static", action="store_true", help="fixed input shape (no dynamic axes)")
    g.add_argument("--no-simplify", action="store_true", help="skip onnxsim / onnxslim")
    g = p.add_argument_group("openvino")
    g.add_argument("--fp16-weights", action="store_true",
                   help="store weights as FP16 (inference precision is chosen at run time)")
    g = p.add_argument_group("tensorrt")
    g.add_argument("--precision", default="fp16", help="fp32, fp16, int8 or best (default fp16); "
                   "int8 from a Q/DQ ONNX (bckd calib) or, TensorRT <= 10, --calib-data")
    g.add_argument("--shapes", help="optimization profile MIN,OPT,MAX, e.g. "
                   "1x3x512x512,1x3x512x512,4x3x512x512 (default: batch 1-8 at the card's size)")
    g.add_argument("--workspace", type=int, help="workspace pool limit, MiB")
    g.add_argument("--timing-cache", help="timing cache file (read if present, written after)")
    g.add_argument("--dla-core", type=int, help="build for this DLA core (GPU fallback on)")
    g.add_argument("--builder", default="python", choices=["python", "trtexec"],
                   help="TensorRT's Python API (default) or the trtexec tool")
    g.add_argument("--trtexec", help="path of trtexec (default: PATH, then JetPack's location)")
    g.add_argument("--calib-data", help="dataset root for the legacy INT8 calibrator")
    g.add_argument("--calib-split", default="train")
    g.add_argument("--calib-format", default="folder")
    g.add_argument("--calib-images", type=int, default=300)
    g.add_argument("--calib-cache", help="calibration cache file (reused if present)")
    g.add_argument("--calib-algorithm", default="entropy", choices=["entropy", "minmax"])
    _add_target_args(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("calib", help="INT8 calibration: Q/DQ ONNX (ONNX Runtime) or OpenVINO IR "
                       "(NNCF), optionally accuracy-aware")
    p.add_argument("model", help="FP32 ONNX file with its card (or an IR for --backend nncf)")
    p.add_argument("--data", required=True, help="dataset root to draw calibration images from")
    p.add_argument("--split", default="train", help="calibration split (default train; "
                   "evaluation refuses to score on calibration images)")
    _add_data_format(p, None, "dataset format (default: folder for segmentation, coco for "
                     "detect / instance models, images for a model without a bckd card)")
    p.add_argument("--out", required=True, help="INT8 file to write (.onnx, or .xml for nncf)")
    _renamed(p, "--backend", "--quantizer", choices=["onnxruntime", "nncf"])
    p.add_argument("--quantizer", default="onnxruntime", choices=["onnxruntime", "nncf"],
                   help="onnxruntime: Q/DQ ONNX for ORT / OpenVINO / TensorRT (default); "
                   "nncf: OpenVINO IR")
    _renamed(p, "--method", "--calibration", choices=["minmax", "entropy", "percentile"])
    p.add_argument("--calibration", default="percentile",
                   choices=["minmax", "entropy", "percentile"],
                   help="range estimation (default percentile: the best INT8 mIoU measured on "
                   "both ONNX Runtime and OpenVINO, see README)")
    p.add_argument("--activations", default="int8", choices=["int8", "uint8"],
                   help="int8: symmetric, for every runtime incl. TensorRT (default); uint8: "
                   "asymmetric, ONNX Runtime's faster x86 CPU kernels only")
    p.add_argument("--preset", default="performance", choices=["performance", "mixed"],
                   help="NNCF preset")
    p.add_argument("--images", type=positive_int, help=f"calibration images (default "
                   f"{DEFAULT_CALIB_IMAGES}, or the whole split when it holds fewer)")
    p.add_argument("--seed", type=int, default=0, help="seed of the image draw")
    p.add_argument("--budget", type=float, help="max drop in points of the task's metric "
                   "(mIoU; box AP for detect, mask AP for instance): keep the most sensitive "
                   "layers in float until it holds")
    p.add_argument("--heldout-split", help="split to measure sensitivity on (default: the "
                   "calibration split minus the calibration images)")
    p.add_argument("--heldout-images", type=int, default=100,
                   help="images the accuracy-aware search scores each candidate on")
    p.add_argument("--score-on", default="onnxruntime", choices=["onnxruntime", "openvino"],
                   help="runtime the accuracy-aware search scores on: the one the model is for "
                   "(their INT8 kernels round differently)")
    _add_bare_preprocess_args(p)
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    _add_target_args(p)
    p.set_defaults(func=cmd_calib)

    p = sub.add_parser("eval", help="mIoU of an artifact over a dataset split")
    _add_backend_args(p)
    p.add_argument("--data", required=True, help="dataset root")
    p.add_argument("--split", default="val")
    _add_data_format(p, None, "dataset format (default: folder for segmentation, coco for "
                     "detection and instance models)")
    p.add_argument("--batch", type=positive_int, default=1, help="batch size (default 1)")
    p.add_argument("--save-predictions", metavar="DIR",
                   help="also save each predicted label map (PNG) for 'bckd score' on a host")
    g = p.add_argument_group("a model without a bckd card")
    g.add_argument("--task", choices=["semantic"], help="what the model predicts (semantic "
                   "segmentation logits [N, C, H, W])")
    g.add_argument("--classes", type=lambda t: t.split(","), help="its class names, "
                   "comma-separated, checked against the dataset's (default: the dataset's)")
    _add_bare_preprocess_args(p)
    _add_target_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("score", help="metrics of predictions saved by 'bckd eval "
                       "--save-predictions' (on a host, no runtime needed)")
    p.add_argument("predictions", help="folder written by bckd eval --save-predictions")
    p.add_argument("--data", required=True, help="dataset root with the ground truth")
    p.add_argument("--split", help="split (default: the one the predictions were made on)")
    _add_data_format(p, None, "dataset format (default: folder, coco for detections)")
    _add_output_args(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("profile", help="latency of an artifact on this machine")
    _add_backend_args(p)
    p.add_argument("--size", type=_size, help="input size (default: the card's)")
    p.add_argument("--batch", type=positive_int, default=1, help="batch size (default 1)")
    _add_shape_args(p)
    p.add_argument("--mode", default="latency", choices=["latency", "throughput", "pipeline"],
                   help="single-stream latency of the network (default), throughput with "
                   "several requests, or pipeline: decoded --data images through preprocess, "
                   "network and postprocess, each stage timed")
    p.add_argument("--data", help="dataset root whose images --mode pipeline times")
    p.add_argument("--split", default="val", help="split of --data (default val)")
    _add_data_format(p, "folder", "format of --data")
    p.add_argument("--images", type=positive_int, default=8,
                   help="images --mode pipeline cycles through (default 8)")
    p.add_argument("--requests", type=int, default=0,
                   help="requests in flight in throughput mode (default: the backend's choice)")
    p.add_argument("--warmup", type=int, default=10,
                   help="minimum warm-up calls; warm-up goes on until the timings settle (capped)")
    p.add_argument("--iters", type=int, default=100, help="minimum timed calls")
    p.add_argument("--min-seconds", type=float, default=2.0, help="minimum timed seconds")
    p.add_argument("--max-seconds", type=float, default=60.0, help="cap of the timed phase")
    p.add_argument("--cv-threshold", type=float, default=0.1,
                   help="warn when std/mean of the timings exceeds this")
    p.add_argument("--telemetry", default="none",
                   choices=["none", "auto", "tegrastats", "rapl", "nvml"],
                   help="power/energy over the timed window (default none)")
    p.add_argument("--trtexec", help="trtexec path for --backend trtexec (default: PATH, then "
                   "JetPack's location)")
    _add_target_args(p)
    p.set_defaults(func=cmd_profile)
    _add_target_parsers(sub)
    return parser


def _add_target_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("remote target")
    g.add_argument("--target", metavar="NAME", help="run this on a board added with 'bckd target "
                   "add' (over ssh): the artifact and data are copied there by content hash, "
                   "the outputs brought back")
    g.add_argument("--remote-timeout", type=float, metavar="S",
                   help="stop the command on the board after S seconds (default 3600)")


def _add_target_parsers(sub: Any) -> None:
    p = sub.add_parser("target", help="remote boards to run stages on (ssh)")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION",
                               parser_class=_Parser)
    a = actions.add_parser("add", help="store a target (no secrets: ssh keys authenticate)")
    a.add_argument("name", help="a short name, e.g. orin")
    a.add_argument("url", help="ssh://user@host[:port]")
    a.add_argument("--python", help="Python on the board (default python3)")
    a.add_argument("--workdir", help="where bckd keeps its files on the board (default ~/.bckd)")
    a.add_argument("--identity", help="ssh private key file (default: your ssh config and agent)")
    a.add_argument("--known-hosts", help="known_hosts file to check the board's key against "
                   "(default: ssh's own)")
    a.add_argument("--accept-new-host-key", action="store_true", help="accept the board's key "
                   "on first contact (a key that changed is still refused)")
    a.add_argument("--ssh-option", action="append", metavar="KEY=VALUE",
                   help="an extra ssh -o option (repeat)")
    a.add_argument("--force", action="store_true", help="replace a target of the same name")
    c = actions.add_parser("check", help="what the board has: bckd, Python, runtimes, GPU, "
                           "JetPack")
    c.add_argument("name")
    c.add_argument("--install", action="store_true", help="install or update this host's "
                   "torch-free bckd there (a wheel built here; the board needs no internet)")
    c.add_argument("--json", action="store_true", help="print JSON instead of the table")
    ls = actions.add_parser("list", help="the stored targets")
    ls.add_argument("--json", action="store_true", help="print JSON")
    r = actions.add_parser("remove", help="forget a target (the board is not touched)")
    r.add_argument("name")
    for q in (a, c, ls, r):
        q.set_defaults(func=_cmd_target)

    m = sub.add_parser("measure", help="(used by 'bckd run --target') evaluate, profile and "
                       "deploy one exported model as bckd run does, here")
    m.add_argument("model", nargs="+", help="ONNX files with their cards")
    m.add_argument("--data", required=True, help="dataset root")
    m.add_argument("--config-json", required=True, help="the run's config as JSON")
    m.add_argument("--out", required=True, help="run folder to write rows.json and artifacts in")
    m.add_argument("--deploy", nargs="+", metavar="NAME",
                   help="file names of the models to also deploy (OpenVINO and INT8 rows)")
    m.add_argument("--examples", type=int, default=0, help="example predictions kept")
    m.set_defaults(func=_cmd_measure)


def _cmd_target(args: argparse.Namespace) -> None:
    from runtime.remote.stages import cmd_target

    cmd_target(args)


def _cmd_measure(args: argparse.Namespace) -> None:
    from runtime.remote.run import cmd_measure

    cmd_measure(args)


def _add_shape_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", action="append", metavar="NAME:DIMS",
                   help="static shape of an input with dynamic dims, e.g. input:1x3x224x224 "
                   "(repeat per input; the name may be left out for a one-input model)")
    p.add_argument("--layout", choices=["NCHW", "NHWC"], type=str.upper,
                   help="layout of a bare model's image input (default: read from the graph)")


def _add_bare_preprocess_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("preprocessing of a model without a bckd card")
    g.add_argument("--size", type=_size, help="input size HxW (default: the input's static H, W)")
    g.add_argument("--mean", type=_floats, help="per-channel mean, 0-255 scale, e.g. "
                   "123.675,116.28,103.53 (default: ImageNet's)")
    g.add_argument("--std", type=_floats, help="per-channel std, 0-255 scale (default: ImageNet's)")
    g.add_argument("--layout", choices=["NCHW", "NHWC"], type=str.upper,
                   help="image input layout (default: read from the graph)")
    g.add_argument("--preprocess", metavar="YAML", help="a YAML file with size, mean, std, "
                   "layout, resize (the flags override it)")


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got '{text}'") from None


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse turns the ValueError into one usage line)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _launched_rank() -> int:
    """This process's rank under torchrun (0 when not launched by it); torch-free."""
    return int(os.environ.get("RANK", "0") or 0)


RUNTIME_BY_SUFFIX = {".xml": "openvino", ".engine": "tensorrt", ".plan": "tensorrt"}


def runtime_for(artifact: str) -> str:
    """The runtime an artifact is for, from its suffix (ONNX Runtime for anything else)."""
    return RUNTIME_BY_SUFFIX.get(os.path.splitext(str(artifact))[1].lower(), "onnxruntime")


def main(argv: Sequence[str] | None = None) -> int:
    tokens = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(tokens)
    if args.command in ("eval", "profile") and not args.backend:
        args.backend = runtime_for(args.model)
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            if getattr(args, "target", None) and args.command != "run":
                from runtime.remote.stages import run_remote

                return run_remote(args, tokens[tokens.index(args.command) + 1:])
            func(args)
    except BckdError as exc:
        if _launched_rank() == 0:  # under torchrun every rank fails alike: say it once
            print(f"bckd: error: {exc}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as exc:
        top = (exc.name or "").split(".")[0]
        if top not in HOST_MODULES:
            raise
        from runtime.lazy import install_hint

        if _launched_rank() == 0:
            print(f"bckd: error: bckd {args.command} needs {top}, which is not installed: "
                  f"{install_hint(top)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bckd: interrupted", file=sys.stderr)
        return 130
    return 0


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str,
                      lineno: int, file: Any = None, line: str | None = None) -> None:
    """bckd's own warnings as one 'bckd: warning:' line; other packages' as Python prints them."""
    if category.__module__.split(".")[0] in ("runtime", "export", "calib", "distill"):
        print(f"bckd: warning: {message}", file=sys.stderr)
    else:
        print(warnings.formatwarning(message, category, filename, lineno, line).rstrip(),
              file=sys.stderr)


# Packages of the host side (training, export from a checkpoint): their absence on a device is a
# user situation (one line), not a bug.
HOST_MODULES = ("torch", "onnxsim", "onnxslim", "tensorboard")


if __name__ == "__main__":
    sys.exit(main())
