"""Jetson board state recorded next to a measurement: the nvpmodel power mode and jetson_clocks.

Both decide what clocks a run may use (trt-jetson.md §4.3: nvpmodel sets the mode, jetson_clocks
locks clocks to the mode's maximum), so a power or latency figure without them cannot be compared.
They are only read here, never changed. Each query returns ``(value, None)`` or ``(None, reason)``.

``nvpmodel -q`` output is kept verbatim in ``raw``; the mode name and id are read from it with a
loose pattern (``NV Power Mode: <name>`` and a line holding only the id) because §4.3 gives the
command but not its output format. ``jetson_clocks --show`` is kept verbatim (it may need root).
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Sequence

NV_TEGRA_RELEASE = Path("/etc/nv_tegra_release")  # L4T release file (trt-jetson.md §4.2)
TOOL_TIMEOUT_S = 5.0

Query = tuple[Any, str | None]


def is_jetson(release_file: Path = NV_TEGRA_RELEASE) -> bool:
    """True on an L4T system (the release file jtop and jetson-containers read exists)."""
    return release_file.exists()


def run_tool(path: str, args: Sequence[str], timeout_s: float = TOOL_TIMEOUT_S) -> Query:
    """Run a board tool; its stripped output, or None and why it could not be read."""
    command = " ".join([path, *args])
    exe = shutil.which(path)
    if exe is None:
        return None, f"{path} not found (not on PATH or not executable)"
    try:
        proc = subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout_s,
                              stdin=subprocess.DEVNULL)  # nvpmodel can prompt; never answer it
    except subprocess.TimeoutExpired:
        return None, f"`{command}` did not finish within {timeout_s:g} s"
    except OSError as exc:
        return None, f"cannot run `{command}`: {exc}"
    output = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        first = output.splitlines()[0] if output else "no output"
        return None, f"`{command}` exited with status {proc.returncode}: {first}"
    return output, None


def nvpmodel_mode(path: str = "nvpmodel") -> Query:
    """``nvpmodel -q`` as ``{"name", "id", "raw"}`` (name/id None where the output lacks them)."""
    raw, reason = run_tool(path, ["-q"])
    if raw is None:
        return None, reason
    name = re.search(r"NV Power Mode:\s*(\S.*)", raw)
    ident = re.search(r"^\s*(\d+)\s*$", raw, re.M)
    return {"name": name.group(1).strip() if name else None,
            "id": int(ident.group(1)) if ident else None, "raw": raw}, None


def clock_state(path: str = "jetson_clocks") -> Query:
    """``jetson_clocks --show`` as ``{"raw": output}``."""
    raw, reason = run_tool(path, ["--show"])
    return ({"raw": raw} if raw is not None else None), reason
