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
from typing import Callable, Sequence

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
    from runtime.config import load_config, quick_config
    from runtime.pipeline import run_pipeline

    if args.quick and args.config:
        raise BckdError("--quick replaces the config; pass either a CONFIG or --quick")
    cfg = quick_config() if args.quick else load_config(args.config)
    if args.cache_dir:
        cfg.cache_dir = args.cache_dir
    run_pipeline(cfg, args.out, force=args.force)


def cmd_synth(args: argparse.Namespace) -> None:
    from runtime.data.synth import synthesize

    path = synthesize(args.out, n_train=args.n_train, n_val=args.n_val, size=args.size,
                      seed=args.seed, force=args.force)
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


def cmd_export(args: argparse.Namespace) -> None:
    from export.api import export_checkpoint

    card = export_checkpoint(args.checkpoint, args.out, opset=args.opset,
                             dynamic=not args.static, simplify=not args.no_simplify,
                             force=args.force)
    p = card.get("parity", {})
    print(f"wrote {args.out} (simplified: {card.get('simplified')}, parity max |Δ| "
          f"{p.get('max_abs_diff', float('nan')):.2e}, argmax agreement "
          f"{100 * p.get('argmax_agreement', float('nan')):.4f}%)")


def _open(args: argparse.Namespace):
    from runtime.backends import open_runner

    return open_runner(args.backend, args.model, threads=args.threads or None)


def _write_json(path: str | None, obj: dict, force: bool) -> None:
    from runtime.files import atomic_write_json, refuse_existing

    text = json.dumps(obj, indent=2)
    if path:
        refuse_existing(path, "output", force)
        atomic_write_json(path, obj)
    print(text)


def cmd_eval(args: argparse.Namespace) -> None:
    from runtime.card import read_card
    from runtime.data import open_dataset
    from runtime.data.preprocess import Preprocess
    from runtime.evaluate import evaluate_runner

    card = read_card(args.model)
    pre = Preprocess.from_dict(card["preprocess"])
    data = open_dataset(args.data, args.split, format=args.format)
    if list(data.classes) != list(card["classes"]):
        raise BckdError(f"{args.model} predicts classes {card['classes']} but {args.data} has "
                        f"{data.classes}; evaluate on the dataset the model was trained for")
    with _open(args) as runner:
        result = evaluate_runner(runner, data, pre, card["classes"], batch_size=args.batch)
    _write_json(args.out, {"model": str(args.model), "data": str(args.data),
                           "split": args.split, **result}, args.force)


def cmd_profile(args: argparse.Namespace) -> None:
    import numpy as np

    from runtime.card import read_card
    from runtime.profile import profile_runner

    card = read_card(args.model)
    h, w = args.size or tuple(card["preprocess"]["size"])
    x = np.random.default_rng(0).standard_normal((args.batch, 3, h, w), dtype=np.float32)
    with _open(args) as runner:
        stats = profile_runner(runner, x, warmup=args.warmup, iters=args.iters,
                               min_seconds=args.min_seconds, batch=args.batch)
        info = {"backend": runner.backend, "device": runner.device,
                "precision": runner.precision, "threads": runner.threads}
    _write_json(args.out, {"model": str(args.model), **info, "input_shape": [args.batch, 3, h, w],
                           "latency_ms": stats.to_dict()}, args.force)


def _add_backend_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="artifact to run (ONNX file with its .card.json)")
    p.add_argument("--backend", default="onnxruntime", help="runtime backend (default onnxruntime)")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: all cores)")
    p.add_argument("--out", help="also write the JSON result to this file")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")


class _Parser(argparse.ArgumentParser):
    """argparse with bckd's error convention: one line on stderr, exit status 1."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(1, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bckd", description="Distil, export, calibrate and "
                                     "measure dense-prediction models on edge devices.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_Parser)

    p = sub.add_parser("run", help="the whole chain: data, teacher, students, ONNX, report")
    p.add_argument("config", nargs="?", help="YAML run config (default: the built-in default)")
    p.add_argument("--out", required=True, help="output directory (must not exist)")
    p.add_argument("--quick", action="store_true", help="a shrunken run for smoke tests")
    p.add_argument("--cache-dir", help="teacher cache (default $BCKD_CACHE or ~/.cache/bckd)")
    p.add_argument("--force", action="store_true", help="replace an existing --out directory")
    p.set_defaults(func=cmd_run)

    data = sub.add_parser("data", help="dataset tools").add_subparsers(
        dest="data_command", required=True, metavar="ACTION", parser_class=_Parser)
    p = data.add_parser("synth", help="write the built-in procedural dataset")
    p.add_argument("--out", required=True, help="dataset directory to create")
    p.add_argument("--n-train", type=int, default=600)
    p.add_argument("--n-val", type=int, default=200)
    p.add_argument("--size", type=_size, default=(128, 128), help="image size N or HxW")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace an existing --out directory")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("distill", help="train a student (distilled from --teacher) on a dataset")
    p.add_argument("--data", required=True, help="dataset root")
    p.add_argument("--format", help="dataset format: folder, voc, cityscapes, ade20k, "
                   "cocostuff10k (default: data.format in the config, else folder)")
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
    p.add_argument("--format", default="folder", help="dataset format (default folder)")
    p.add_argument("--images", type=int, default=32, help="images scored (default 32)")
    p.add_argument("--epsilon", type=float, default=1e-3, help="perturbation norm ε")
    p.add_argument("--eta", type=float, default=1e-6, help="floor η of the teacher's constant")
    p.add_argument("--directions", type=int, default=8, help="random directions per image")
    p.add_argument("--ascent-steps", type=int, default=1,
                   help="gradient-ascent steps tightening the sup (default 1; 0: random only)")
    p.add_argument("--out", help="also write the result as JSON here")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    p.set_defaults(func=cmd_mfs)

    p = sub.add_parser("export", help="export a checkpoint to ONNX (simplified, parity-checked)")
    p.add_argument("checkpoint", help="student checkpoint (.pt) with its card")
    p.add_argument("--out", required=True, help="ONNX file to write")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--static", action="store_true", help="fixed input shape (no dynamic axes)")
    p.add_argument("--no-simplify", action="store_true", help="skip onnxsim")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("eval", help="mIoU of an artifact over a dataset split")
    _add_backend_args(p)
    p.add_argument("--data", required=True, help="dataset root")
    p.add_argument("--split", default="val")
    p.add_argument("--format", default="folder", help="dataset format (default folder)")
    p.add_argument("--batch", type=int, default=1)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("profile", help="latency of an artifact on this machine")
    _add_backend_args(p)
    p.add_argument("--size", type=_size, help="input size (default: the card's)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--min-seconds", type=float, default=2.0)
    p.set_defaults(func=cmd_profile)
    return parser


def _launched_rank() -> int:
    """This process's rank under torchrun (0 when not launched by it); torch-free."""
    return int(os.environ.get("RANK", "0") or 0)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except BckdError as exc:
        if _launched_rank() == 0:  # under torchrun every rank fails alike: say it once
            print(f"bckd: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bckd: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
