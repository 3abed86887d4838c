"""Find, identify and run NVIDIA's ``trtexec``: what the engine builder and the profiler share.

The version comes from trtexec's own banner (``[TensorRT v100300]``) or its ``TensorRT version:``
line; the GPU from its ``=== Device Information ===`` block, so no CUDA binding is needed
(trt-jetson.md §3.2). These live in ``runtime/`` because the device-side profiler needs them and
``runtime/`` never imports ``export/``; :mod:`export.trt.trtexec` imports them from here.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Sequence

from runtime.cuda import DeviceInfo, l4t_release
from runtime.errors import BckdError
from runtime.files import atomic_write_text
from runtime.trt_versions import TrtVersion, parse_version

JETSON_TRTEXEC = "/usr/src/tensorrt/bin/trtexec"  # JetPack installs it here, off PATH
VERSION_TIMEOUT_S = 120

_BANNER = re.compile(r"\[TensorRT v(\d+)\]")
_VERSION_LINE = re.compile(r"TensorRT version:\s*([\d.]+)")
_DEVICE = re.compile(r"Selected Device:\s*(.+?)\s*$", re.M)
_CC = re.compile(r"Compute Capability:\s*(\d+\.\d+)")
_MEMORY = re.compile(r"Device Global Memory:\s*(\d+)\s*MiB")


def find_trtexec(trtexec: str | os.PathLike | None = None) -> str:
    """The trtexec executable: the given path, else ``trtexec`` on PATH, else JetPack's location."""
    if trtexec is not None:
        path = Path(trtexec)
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
        found = shutil.which(str(trtexec))
        if found:
            return found
        raise BckdError(f"trtexec {trtexec} is not an executable file; check the path")
    found = shutil.which("trtexec") or (JETSON_TRTEXEC if os.access(JETSON_TRTEXEC, os.X_OK) else None)
    if found is None:
        raise BckdError("trtexec is not on PATH nor at /usr/src/tensorrt/bin/trtexec; install "
                        "TensorRT's samples/binaries, pass trtexec=<path>, or use builder='python'")
    return found


def parse_trtexec_version(text: str) -> TrtVersion | None:
    """The version from a ``TensorRT version: 10.3.0`` line (or '8001' in 8.0), else the banner."""
    if m := _VERSION_LINE.search(text):
        return parse_version(m.group(1))
    if m := _BANNER.search(text):
        return parse_version(m.group(1))
    return None


def parse_trtexec_device(text: str) -> DeviceInfo | None:
    """The GPU from trtexec's device-information block, or None if it printed none."""
    name, cc = _DEVICE.search(text), _CC.search(text)
    if not (name and cc):
        return None
    memory = _MEMORY.search(text)
    return DeviceInfo(name=name.group(1), compute_capability=cc.group(1),
                      total_memory_mib=int(memory.group(1)) if memory else None, api="trtexec",
                      l4t=l4t_release())


def trtexec_version(exe: str) -> TrtVersion:
    """Ask ``exe --version``; some versions then fail with 'Model missing' but print the banner."""
    try:
        result = subprocess.run([exe, "--version"], capture_output=True, text=True,
                                timeout=VERSION_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BckdError(f"could not run {exe} --version ({exc}); check the trtexec installation") from exc
    version = parse_trtexec_version(result.stdout + result.stderr)
    if version is None:
        raise BckdError(f"{exe} --version printed no TensorRT version; is it NVIDIA's trtexec?")
    return version


def shape_spec(name: str, shape: Sequence[int]) -> str:
    """``name:1x3x512x512``; names with ':' or ',' are quoted with ' as trtexec expects."""
    quoted = f"'{name}'" if any(c in name for c in ":,") else name
    return f"{quoted}:{'x'.join(str(d) for d in shape)}"


def run_trtexec(cmd: list[str], log_path: Path, timeout_s: float | None = None) -> str:
    """Run ``cmd``, keep its output in ``log_path``; a failure is one line naming the log."""
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        atomic_write_text(log_path, " ".join(cmd) + "\n\n" + _text(exc.stdout) + _text(exc.stderr))
        raise BckdError(f"trtexec did not finish within {timeout_s:g} s; allow more time or "
                        f"shorten the run; partial log in {log_path}") from exc
    except OSError as exc:
        raise BckdError(f"could not run {cmd[0]} ({exc}); check the trtexec installation") from exc
    output = result.stdout + result.stderr
    atomic_write_text(log_path, " ".join(cmd) + "\n\n" + output)
    if result.returncode != 0 or "&&&& FAILED" in output:
        raise BckdError(f"trtexec failed (exit {result.returncode}): {last_error(output)}; "
                        f"full log in {log_path}")
    return output


def _text(data: str | bytes | None) -> str:
    """Partial output of a timed-out run (bytes on some platforms even with text=True)."""
    if isinstance(data, bytes):
        return data.decode("utf-8", errors="replace")
    return data or ""


def last_error(output: str) -> str:
    """The most telling line of a failed run: its last error, else its last non-blank line."""
    errors = [ln.strip() for ln in output.splitlines() if "[E]" in ln or "Error" in ln]
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    return (errors or lines or ["no output"])[-1]
