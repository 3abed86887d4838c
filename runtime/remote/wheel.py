"""A pure-Python wheel of the bckd on this host, for a board that has no internet.

It holds bckd's packages as they are here (a development checkout included), so what runs on
the board is exactly what runs on the host; the build id (:func:`runtime.remote.ssh.host_build`)
names it. The zip is written with fixed timestamps and order, so the same files give the same
bytes and a board that has it already is sent nothing. It installs with ``pip install`` as any
wheel; ``bckd target check --install`` unpacks it into the target's workdir instead, beside the
board's own Python packages (onnxruntime, OpenVINO, TensorRT stay the board's).
"""
from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path

from runtime import __version__
from runtime.files import atomic_path
from runtime.remote.ssh import package_files

_EPOCH = (1980, 1, 1, 0, 0, 0)
REQUIRES = ("numpy>=1.24", "pillow>=10", "pyyaml>=6", "onnx>=1.16", "onnxruntime>=1.18")


def wheel_name(version: str = __version__) -> str:
    return f"bckd-{version}-py3-none-any.whl"


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


def build_wheel(out_dir: str | Path, version: str = __version__) -> Path:
    """Write the wheel into ``out_dir``; returns its path."""
    dist = f"bckd-{version}.dist-info"
    entries: list[tuple[str, bytes]] = [(rel, p.read_bytes())
                                        for rel, p in sorted(package_files().items())]
    metadata = "\n".join(["Metadata-Version: 2.1", "Name: bckd", f"Version: {version}",
                          "Summary: bckd, torch-free device side (built by bckd target)",
                          *[f"Requires-Dist: {r}" for r in REQUIRES], ""])
    entries += [
        (f"{dist}/METADATA", metadata.encode()),
        (f"{dist}/WHEEL", b"Wheel-Version: 1.0\nGenerator: bckd\nRoot-Is-Purelib: true\n"
                          b"Tag: py3-none-any\n"),
        (f"{dist}/entry_points.txt", b"[console_scripts]\nbckd = runtime.cli:main\n"),
        (f"{dist}/top_level.txt", b"calib\ndistill\nexport\nruntime\n"),
    ]
    record = "".join(f"{name},{_record_hash(data)},{len(data)}\n" for name, data in entries)
    record += f"{dist}/RECORD,,\n"
    entries.append((f"{dist}/RECORD", record.encode()))
    path = Path(out_dir) / wheel_name(version)
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
            for name, data in entries:
                info = zipfile.ZipInfo(name, date_time=_EPOCH)
                info.external_attr = 0o644 << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                z.writestr(info, data)
    return path
