"""Lazy import of optional heavy dependencies through one helper.

``import runtime`` must work with numpy alone (architecture.md rule 6): backends and tools import
their heavy packages through :func:`require`, which names the missing package and how to install it.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from runtime.errors import BckdError

# module name -> (pip package, bckd extra that provides it)
_PROVIDERS: dict[str, tuple[str, str | None]] = {
    "onnx": ("onnx", None),
    "onnxruntime": ("onnxruntime", None),
    "onnxsim": ("onnxsim", None),
    "onnxslim": ("onnxslim", None),
    "openvino": ("openvino", "openvino"),
    "nncf": ("nncf", "openvino"),
    "tensorrt": ("tensorrt", "tensorrt"),
    "pycuda": ("pycuda", "tensorrt"),
    "torch": ("torch==2.13.0", "train"),
    "yaml": ("pyyaml", None),
    "PIL": ("pillow", None),
    "scipy": ("scipy", None),
    "tensorboard": ("tensorboard", "train"),
    "pynvml": ("nvidia-ml-py", None),
}


def install_hint(module: str) -> str:
    """The install command for the package that provides ``module``."""
    top = module.split(".")[0]
    pip_name, extra = _PROVIDERS.get(top, (top, None))
    if extra:
        return f"pip install 'bckd[{extra}]' (or: pip install {pip_name})"
    return f"pip install {pip_name}"


def require(module: str, purpose: str = "") -> ModuleType:
    """Import ``module`` or raise a :class:`BckdError` naming the package to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        why = f" for {purpose}" if purpose else ""
        raise BckdError(
            f"{module} is needed{why} but is not installed ({exc}); install it with: {install_hint(module)}"
        ) from exc

