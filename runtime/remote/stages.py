"""``--target NAME`` on the device-side stages, and ``bckd target``.

``bckd export|profile|eval|calib ... --target NAME`` copies the artifact with its card (and the
dataset it reads) to the board by content hash, runs the same torch-free command there in a job
folder, and brings its outputs (JSON, predictions, artifacts with their cards) back to the paths
the user gave, each renamed into place whole. The command line is passed on as typed, with the
host's paths swapped for the board's; the board's paths in what it prints are swapped back.
Paths given to ``--trtexec``, ``--timing-cache`` and ``--calib-cache`` name files on the board:
those belong to the device an engine is built on.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Sequence

from runtime.errors import BckdError
from runtime.files import refuse_existing
from runtime.remote.ssh import (Connection, host_build, stream_remote)
from runtime.remote.targets import Target, get_target

REMOTE_COMMANDS = ("export", "profile", "eval", "calib")
# Options whose value is a path on the host that the board needs: a dataset folder or a file.
INPUT_DIRS = {"--data", "--calib-data"}
INPUT_FILES = {"--preprocess"}
# Outputs the board writes and the host brings back: a file (with sidecars) or a folder.
OUTPUT_FILES = {"--out"}
OUTPUT_DIRS = {"--save-predictions"}
# Stripped before the command goes to the board.
HOST_ONLY = {"--target", "--remote-timeout"}
DEFAULT_TIMEOUT_S = 3600.0


def artifact_files(path: Path) -> dict[str, Path]:
    """An artifact with what travels with it: its card, an IR's .bin, ONNX external data."""
    from runtime.card import card_path

    if not path.is_file():
        raise BckdError(f"{path} is not a file; pass the artifact to run on the target")
    files = {path.name: path}
    extra = [card_path(path)]
    if path.suffix.lower() == ".xml":
        extra.append(path.with_suffix(".bin"))
    extra += [path.with_name(path.name + ".data"), path.with_suffix(".onnx.data")]
    for p in extra:
        if p.is_file():
            files[p.name] = p
    return files


def folder_files(path: Path, what: str) -> dict[str, Path]:
    if not path.is_dir():
        raise BckdError(f"{what} {path} is not a folder")
    files = {p.relative_to(path).as_posix(): p for p in sorted(path.rglob("*"))
             if p.is_file() and not p.is_symlink()}
    if not files:
        raise BckdError(f"{what} {path} is empty")
    return files


def _subparser(command: str) -> argparse.ArgumentParser:
    from runtime.cli import build_parser

    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]
    raise AssertionError("no subcommands")


class Plan:
    """The board's command line and what moves each way."""

    def __init__(self) -> None:
        self.argv: list[str] = []
        self.uploads: list[tuple[str, dict[str, Path], str]] = []  # (token, files, inner path)
        self.outputs: list[tuple[str, Path, str]] = []  # (kind file|dir, host path, board rel)


def plan_command(command: str, tokens: Sequence[str]) -> Plan:
    """Split the user's tokens (after the subcommand) into the board's argv and the copies."""
    sub = _subparser(command)
    actions = sub._option_string_actions
    plan = Plan()
    plan.argv.append(command)
    i, positional = 0, 0
    tokens = list(tokens)
    while i < len(tokens):
        tok = tokens[i]
        if tok.startswith("-") and tok != "-":
            opt, eq, value = tok.partition("=")
            if opt not in actions:
                raise BckdError(f"with --target spell each option out in full; '{opt}' is not "
                                f"an option of bckd {command}")
            takes = actions[opt].nargs != 0
            if takes and not eq:
                if i + 1 >= len(tokens):
                    raise BckdError(f"{opt} needs a value")
                value = tokens[i + 1]
                i += 1
            i += 1
            if opt in HOST_ONLY:
                continue
            if not takes:
                plan.argv.append(opt)
                continue
            plan.argv += [opt, _map_option(plan, opt, value)]
            continue
        # the one positional of these commands: the artifact
        if positional:
            raise BckdError(f"unexpected argument '{tok}' for bckd {command}")
        positional += 1
        path = Path(tok)
        if command == "export" and path.suffix.lower() in (".pt", ".pth"):
            raise BckdError("exporting a checkpoint needs torch and runs on the host: 'bckd "
                            "export model.pt --out model.onnx' here, then pass the ONNX file "
                            "with --target")
        plan.uploads.append((tok, artifact_files(path), path.name))
        plan.argv.append(f"@upload{len(plan.uploads) - 1}")
        i += 1
    return plan


def _map_option(plan: Plan, opt: str, value: str) -> str:
    if opt in INPUT_DIRS:
        plan.uploads.append((value, folder_files(Path(value), opt), ""))
        return f"@upload{len(plan.uploads) - 1}"
    if opt in INPUT_FILES:
        p = Path(value)
        if not p.is_file():
            raise BckdError(f"{opt} {value} is not a file")
        plan.uploads.append((value, {p.name: p}, p.name))
        return f"@upload{len(plan.uploads) - 1}"
    if opt in OUTPUT_FILES:
        rel = f"out/{Path(value).name}"
        plan.outputs.append(("file", Path(value), rel))
        return rel
    if opt in OUTPUT_DIRS:
        rel = f"out/{Path(value).name or 'predictions'}"
        plan.outputs.append(("dir", Path(value), rel))
        return rel
    return value


def run_remote(args: argparse.Namespace, tokens: Sequence[str]) -> int:
    """Run a stage command on ``args.target``; returns the exit status to give."""
    target = get_target(args.target)
    plan = plan_command(args.command, tokens)
    force = bool(getattr(args, "force", False))
    for _, path, _ in plan.outputs:  # before any copy
        refuse_existing(path, "output", force=force)
    conn = Connection(target)
    job = uuid.uuid4().hex[:16]
    build = require_build(conn)
    rewrite: dict[str, str] = {}
    paths: dict[str, str] = {}
    for n, (token, files, inner) in enumerate(plan.uploads):
        tree = conn.push_tree(files)
        remote = f"{tree}/{inner}" if inner else tree
        paths[f"@upload{n}"] = remote
        rewrite[remote] = token
    argv = [paths.get(a, a) for a in plan.argv]
    jobdir = f"{conn.info()['workdir']}/jobs/{job}"
    for _, path, rel in plan.outputs:
        rewrite[f"{jobdir}/{rel}"] = str(path)
        rewrite[rel] = str(path)
    timeout = float(getattr(args, "remote_timeout", None) or DEFAULT_TIMEOUT_S)
    ssh_argv = conn.ssh_argv(conn.agent_argv("exec", job, build, f"{timeout:g}", "--", *argv))
    rc, stderr = stream_remote(ssh_argv, timeout=timeout + 60, rewrite=rewrite)
    try:
        if rc not in (0, 1):
            raise conn.agent_error(stderr, rc)
        if rc == 0 and plan.outputs:
            bring_back(conn, job, plan.outputs, force)
    finally:
        try:
            conn.call("clean", job)
        except BckdError:
            pass
    return rc


def require_build(conn: Connection) -> str:
    """This host's build id, after checking that the board runs the same bckd."""
    info = conn.info()
    build = host_build()
    have = (info.get("bckd") or {}).get("build")
    name = conn.target.name
    if have is None:
        raise BckdError(f"target '{name}' has no bckd installed: run 'bckd target check {name} "
                        f"--install'")
    if have != build:
        raise BckdError(f"target '{name}' runs bckd build {have[:12]} "
                        f"({(info.get('bckd') or {}).get('version')}), this host {build[:12]}: "
                        f"run 'bckd target check {name} --install' to update it")
    return build


def bring_back(conn: Connection, job: str, outputs: list[tuple[str, Path, str]],
               force: bool) -> None:
    """Fetch the job's outputs and rename each into its host path (whole files only)."""
    first = outputs[0][1].resolve().parent
    first.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".bckd-fetch-", dir=first))
    try:
        conn.fetch_job(job, stage)
        for kind, path, rel in outputs:
            name = rel.split("/", 1)[1]
            src = stage / name
            path = path.resolve()
            path.parent.mkdir(parents=True, exist_ok=True)
            if kind == "dir":
                if src.is_dir():
                    if path.exists() and force:
                        shutil.rmtree(path)
                    os.replace(src, path)
                continue
            # the file and its sidecars (card, an IR's .bin) keep their names: sidecars first
            group = sorted((p for p in stage.iterdir()
                            if p.is_file() and p.name.startswith(src.stem)),
                           key=lambda p: p.name == src.name)
            for p in group:
                os.replace(p, path.parent / p.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


# -- bckd target -----------------------------------------------------------------------------
def describe(info: dict[str, Any], target: Target) -> str:
    """``bckd target check``'s table."""
    pk = info.get("packages", {})
    bckd = info.get("bckd") or {}
    build = host_build()
    if not bckd:
        state = "not installed (bckd target check --install)"
    elif bckd.get("build") == build:
        state = f"{bckd.get('version')} build {bckd['build'][:12]} (same as this host)"
    else:
        state = (f"{bckd.get('version')} build {str(bckd.get('build'))[:12]} (this host: "
                 f"{build[:12]}; update with --install)")
    rows = [
        ("target", f"{target.name} = {target.url}"),
        ("board", f"{info.get('hostname')} ({info.get('system')} {info.get('machine')}, "
                  f"{info.get('cpu_count')} cores)" +
                  (f", {info['device_model']}" if info.get("device_model") else "")),
        ("bckd", state),
        ("python", f"{info.get('python')} ({info.get('python_executable')})"),
        ("onnxruntime", pk.get("onnxruntime") or pk.get("onnxruntime-gpu") or "missing"),
        ("openvino", pk.get("openvino") or "missing"),
        ("nncf", pk.get("nncf") or "missing"),
        ("tensorrt", pk.get("tensorrt") or "missing"),
        ("trtexec", info.get("trtexec") or "missing"),
        ("gpu", "; ".join(info.get("gpus") or []) or "none found (nvidia-smi)"),
        ("dla cores", str(info.get("dla_cores", 0))),
        ("jetpack / l4t", info.get("l4t") or "not a Jetson (no /etc/nv_tegra_release)"),
        ("tegrastats", info.get("tegrastats") or "missing"),
        ("workdir", f"{info.get('workdir')} ({_gib(info.get('free_bytes'))} free)"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**30:.1f} GiB"


def install(conn: Connection, log: Any = print) -> str:
    """Build this host's wheel, copy it (once) and unpack it on the board; returns the build."""
    from runtime import __version__
    from runtime.remote.ssh import hash_file
    from runtime.remote.wheel import build_wheel

    build = host_build()
    with tempfile.TemporaryDirectory(prefix="bckd-wheel-") as tmp:
        wheel = build_wheel(tmp)
        sha = hash_file(wheel)
        sent = conn.push_objects({sha: wheel})
        conn.call("install", sha, build, __version__)
    log(f"installed bckd {__version__} build {build[:12]} on '{conn.target.name}' "
        f"({sent} bytes sent)")
    return build


def verify_install(conn: Connection) -> str:
    """Run ``bckd --version`` on the board through the installed copy."""
    proc = conn._run(conn.agent_argv("exec", uuid.uuid4().hex[:16], host_build(), "60", "--",
                                     "--version"))
    if proc.returncode != 0:
        raise conn.agent_error(proc.stderr.decode(errors="replace"), proc.returncode)
    return proc.stdout.decode().strip()


def cmd_target(args: argparse.Namespace) -> None:
    from runtime.remote import targets as reg

    if args.action == "add":
        t = reg.add_target(args.name, args.url, python=args.python, workdir=args.workdir,
                           identity=args.identity, known_hosts=args.known_hosts,
                           accept_new_host_key=args.accept_new_host_key,
                           ssh_options=args.ssh_option, force=args.force)
        print(f"added target '{t.name}' = {t.url} (python {t.python}, workdir {t.workdir}); "
              f"check it with 'bckd target check {t.name}'")
    elif args.action == "list":
        targets = reg.load_targets()
        if args.json:
            print(json.dumps({n: t.to_dict() for n, t in targets.items()}, indent=2))
        for n, t in sorted(targets.items()):
            if not args.json:
                print(f"{n}  {t.url}  python={t.python}  workdir={t.workdir}")
        if not targets and not args.json:
            print("no targets yet: bckd target add NAME ssh://user@host")
    elif args.action == "remove":
        reg.remove_target(args.name)
        print(f"removed target '{args.name}' (nothing on the board was touched)")
    elif args.action == "check":
        conn = Connection(reg.get_target(args.name))
        t0 = time.perf_counter()
        info = conn.info()
        if args.install and (info.get("bckd") or {}).get("build") != host_build():
            install(conn, log=lambda m: print(m, file=sys.stderr))
            print(f"bckd on the board: {verify_install(conn)}", file=sys.stderr)
            info = conn.info(fresh=True)
        info["round_trip_s"] = round(time.perf_counter() - t0, 3)
        print(json.dumps(info, indent=2) if args.json else describe(info, conn.target))
